"""Server-side rendering of the admin pages: templates in the package, autoescaping on.

User names, server names, profile slugs and container names come from people and from
Docker labels anyone with engine access can write, so every value is escaped by the template
engine, never by hand; the only data handed to the page's script goes through ``tojson``,
which escapes ``<``, ``>``, ``&`` and quotes for use inside HTML.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2

from ..snapshot import Snapshot
from . import views

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

#: The pages, in the order of the navigation bar: (path under the prefix, title).
PAGES: tuple[tuple[str, str], ...] = (
    ("", "Overview"),
    ("allocations", "Allocations"),
    ("users", "Users"),
    ("events", "Events"),
    ("health", "Health"),
)


def _when(value: str | datetime | None) -> str:
    """ISO 8601 UTC -> ``2024-05-01 14:05 UTC`` (the script turns it into local time)."""
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        return value[:16].replace("T", " ") + " UTC"
    return value.strftime("%Y-%m-%d %H:%M UTC")


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    return env


@dataclass(frozen=True)
class Page:
    """What every page template knows besides its own data."""

    prefix: str
    hub_prefix: str
    user: str
    can_act: bool
    xsrf: str
    refresh: float = 5.0
    service: str = "gpu-allocations"
    message: str = ""
    #: The hub has several hosts: tables name each container's host.
    hosts: bool = False


class Renderer:
    """Renders a page template with the shared context (one template environment per process)."""

    def __init__(self) -> None:
        self.env = environment()

    def page(self, template: str, page: Page, active: str, **data: Any) -> str:
        return self.env.get_template(template).render(
            page=page, pages=PAGES, active=active, states=views.STATES, **data
        )

    def overview(self, page: Page, model: views.Overview | Snapshot, hub_id: str | None = None,
                 hosts: list[dict[str, Any]] | None = None) -> str:
        """The overview (``views.overview``, or ``views.across_hosts`` on a hub of several
        hosts; a snapshot is made one with ``hub_id``); on a hub of several hosts, a line
        per host first (``Admin.read_hosts`` rows), a host down in red with the reason."""
        if isinstance(model, Snapshot):
            model = views.overview(model, hub_id)
        return self.page("overview.html", page, "", overview=model.to_json(), hosts=hosts or [])

    def allocations(self, page: Page, rows: list[dict[str, Any]]) -> str:
        return self.page("allocations.html", page, "allocations", rows=rows)

    def users(self, page: Page, rows: list[dict[str, Any]], idle_after: float) -> str:
        return self.page("users.html", page, "users", rows=rows,
                         idle_after=views.format_duration(idle_after))

    def events(self, page: Page, entries: list[dict[str, Any]], path: str | None) -> str:
        return self.page("events.html", page, "events", entries=entries, path=path)

    def health(self, page: Page, checks: list[dict[str, Any]]) -> str:
        return self.page("health.html", page, "health", checks=checks)

    def error(self, page: Page, status: int, message: str) -> str:
        return self.page("error.html", page, "", status=status, message=message)
