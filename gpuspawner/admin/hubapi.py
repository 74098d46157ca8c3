"""What only the Hub knows: users' last activity and groups, and stopping a server.

Docker knows who holds which device; the Hub knows who last touched their notebook and who
is in which group (the policy gives limits per hub group). The service asks the Hub's REST
API with the token the Hub gives every managed service, under the least scopes listed in
``admin.SERVICE_SCOPES``. Answers are cached for a few seconds: every open page polls, and
the Hub should not pay for each poll.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlencode

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from ..labels import parse_time
from ..records import JSONRecord

log = logging.getLogger(__name__)

_PAGINATED = "application/jupyterhub-pagination+json"


@dataclass(frozen=True)
class HubUser(JSONRecord):
    """One Hub user as the page needs them."""

    name: str
    groups: tuple[str, ...] = ()
    last_activity: datetime | None = None
    #: Active servers: name ("" for the default one) -> last activity.
    servers: tuple[tuple[str, datetime | None], ...] = ()

    def activity(self, server: str | None = None) -> datetime | None:
        """The server's last activity when the Hub has it running, else the user's."""
        if server is not None:
            for name, when in self.servers:
                if name == server and when is not None:
                    return when
        return self.last_activity


def parse_users(items: Iterable[Mapping[str, Any]]) -> dict[str, HubUser]:
    """User models of ``GET /users`` -> HubUser by name (fields we may not read are absent)."""
    found: dict[str, HubUser] = {}
    for item in items:
        name = item.get("name")
        if not isinstance(name, str):
            continue
        servers = item.get("servers") or {}
        found[name] = HubUser(
            name=name,
            groups=tuple(item.get("groups") or ()),
            last_activity=_time(item.get("last_activity")),
            servers=tuple(
                (str(server), _time((model or {}).get("last_activity")))
                for server, model in sorted(servers.items())
            ),
        )
    return found


def _time(value: Any) -> datetime | None:
    try:
        return parse_time(value) if isinstance(value, str) else None
    except ValueError:
        return None


class HubAPI:
    """A small async client of the Hub's REST API with a short-lived cache of the user list."""

    def __init__(self, api_url: str, token: str | None, ttl: float = 10.0) -> None:
        self.api_url = api_url.rstrip("/")
        self.token = token
        self.ttl = ttl
        self.client = AsyncHTTPClient()
        self._users: dict[str, HubUser] = {}
        self._users_at = -1e9
        self._lock = asyncio.Lock()
        #: The last failure to read the Hub, shown as a health check; None when it answered.
        self.error: str | None = None

    def _request(self, method: str, path: str, body: Any = None, **headers: str) -> HTTPRequest:
        return HTTPRequest(
            self.api_url + path,
            method=method,
            headers={"Authorization": f"token {self.token}", **headers},
            body=None if body is None else json.dumps(body),
            allow_nonstandard_methods=True,
            request_timeout=20,
        )

    async def users(self) -> dict[str, HubUser]:
        """Every user (paged through), from a cache younger than ``ttl`` when there is one.

        When the Hub does not answer, the last known list is returned and ``error`` says why:
        the page still shows who holds what, only without last activity.
        """
        async with self._lock:
            if time.monotonic() - self._users_at < self.ttl:
                return self._users
            if not self.token:
                self.error = "no JUPYTERHUB_API_TOKEN: run the page as a Hub-managed service"
                return self._users
            try:
                self._users = await self._fetch_users()
                self.error = None
            except (HTTPClientError, OSError, ValueError) as exc:
                self.error = f"the Hub API at {self.api_url} did not answer ({exc})"
                log.warning("%s", self.error)
            self._users_at = time.monotonic()
            return self._users

    async def _fetch_users(self) -> dict[str, HubUser]:
        items: list[Mapping[str, Any]] = []
        offset, limit = 0, 200
        for _ in range(10_000):  # a bound, not a limit anyone reaches
            query = urlencode({"offset": offset, "limit": limit})
            response = await self.client.fetch(
                self._request("GET", f"/users?{query}", Accept=_PAGINATED)
            )
            page = json.loads(response.body)
            if isinstance(page, list):  # a Hub without pagination answers a plain list
                items.extend(page)
                break
            items.extend(page.get("items") or [])
            following = (page.get("_pagination") or {}).get("next")
            if not following:
                break
            offset = int(following.get("offset", offset + limit))
            limit = int(following.get("limit", limit))
        return parse_users(items)

    async def report_activity(self, user: str, servers: Iterable[str], when: datetime) -> int:
        """Tell the Hub that these servers of ``user`` were active at ``when`` (its
        ``POST /users/{name}/activity``); the HTTP status, or 0 when the Hub did not answer."""
        stamp = when.isoformat().replace("+00:00", "Z")
        body = {"last_activity": stamp,
                "servers": {name: {"last_activity": stamp} for name in servers}}
        try:
            response = await self.client.fetch(
                self._request("POST", f"/users/{quote(user, safe='')}/activity", body,
                              **{"Content-Type": "application/json"}))
        except HTTPClientError as exc:
            log.warning("the Hub refused the GPU activity of %s: %s", user, exc)
            return exc.code
        except OSError as exc:
            log.warning("the Hub did not answer the GPU activity of %s: %s", user, exc)
            return 0
        return response.code

    async def stop_server(self, user: str, server: str = "") -> tuple[int, str]:
        """Ask the Hub to stop a server: (HTTP status, the Hub's message)."""
        path = (
            f"/users/{quote(user, safe='')}/servers/{quote(server, safe='')}"
            if server
            else f"/users/{quote(user, safe='')}/server"
        )
        try:
            response = await self.client.fetch(self._request("DELETE", path))
        except HTTPClientError as exc:
            message = ""
            if exc.response is not None and exc.response.body:
                try:
                    message = json.loads(exc.response.body).get("message", "")
                except (ValueError, AttributeError):
                    message = exc.response.body.decode(errors="replace")[:200]
            return exc.code, message or str(exc)
        async with self._lock:
            self._users_at = -1e9  # the next page shows the stop
        return response.code, ""
