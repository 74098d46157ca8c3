"""The admin service: the handlers of the pages, the JSON API, the actions and /metrics.

Who may do what (checked on every request, cookie or token alike):
- the Hub lets a browser in only with ``access:services!service=<name>`` (admins have it);
- **view** (pages, JSON API, metrics): a JupyterHub admin, or a token carrying
  ``custom:gpuspawner:view`` (teaching assistants, dashboards);
- **act** (release a hold, stop a server): JupyterHub admins only;
- ``/metrics`` also accepts a token with the Hub's own ``read:metrics`` scope, so one
  Prometheus token scrapes both, and can be made public like the Hub's own metrics.

Actions are POST only, with the Hub's XSRF protection for cookie sessions (a request with an
``Authorization`` header is a script: browsers never add that header cross-site, and a bad
token never falls back to the cookie). Every action is written to the operation log with
the admin's name, and so is every device conflict (two running holders) the first time a
snapshot of the service shows it. What Docker itself does to a container that holds a device
(created, started, died, stopped, removed, by anyone) is written by a thread that follows
Docker's event stream (``dockerevents``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlencode

import docker.errors
from jupyterhub.services.auth import (
    HubOAuth,
    HubOAuthCallbackHandler,
    HubOAuthenticated,
    check_scopes,
)
from tornado import web
from tornado.httpserver import HTTPServer

from .. import events, health, hosts
from ..inventory import InventoryError
from ..ledger import LedgerError, connect
from ..policy import PolicyError
from ..records import Allocation, JSONRecord, host_field
from ..snapshot import Snapshot
from ..world import ReleaseRefused, release
from . import VIEW_SCOPE, activity, metrics, views
from .dockerevents import DockerEvents
from .hubapi import HubAPI, HubUser
from .render import PAGES, STATIC, Page, Renderer
from .settings import Settings, SettingsError
from .world import World

log = logging.getLogger("gpuspawner.admin")
T = TypeVar("T")

#: Scope of the Hub's own /hub/metrics; accepted for ours too.
METRICS_SCOPE = "read:metrics"


@dataclass(frozen=True)
class Access(JSONRecord):
    """What one authenticated user or service may do here."""

    name: str
    kind: str
    view: bool
    act: bool
    metrics: bool


def _kind(kind: str, host: str) -> str:
    """The key of a kind of problem seen on ``host`` ("" : the service's own engine)."""
    return f"{kind}@{host}" if host else kind


def access_of(model: dict[str, Any], access_scopes: set[str]) -> Access:
    """The rule of this module's docstring, on a Hub user/service model (pure)."""
    scopes = set(model.get("scopes") or ())
    entered = bool(check_scopes(access_scopes, scopes))
    admin = bool(model.get("admin"))
    view = entered and (admin or VIEW_SCOPE in scopes)
    return Access(
        name=str(model.get("name") or ""),
        kind=str(model.get("kind") or "user"),
        view=view,
        act=entered and admin,
        metrics=view or METRICS_SCOPE in scopes,
    )


class Admin:
    """What every handler shares: settings, the world, the Hub client, the operation log."""

    def __init__(
        self,
        settings: Settings,
        world: World,
        hub: HubAPI,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.settings = settings
        self.world = world
        self.hub = hub
        self.executor = executor or ThreadPoolExecutor(4, thread_name_prefix="gpuadmin")
        self.renderer = Renderer()
        self.event_log = events.EventLog(settings.events, max_bytes=settings.events_max_bytes,
                                         keep_files=settings.events_keep)
        self.registry = metrics.registry(self.take, settings.events,
                                         self._read_all_hosts if settings.hosts else None)
        #: The hub's hosts (``read_hosts``): readers made on first use, the last read.
        self._host_readers: list[hosts.HostReader] | None = None
        self._host_pool: ThreadPoolExecutor | None = None
        self._hosts_read: tuple[float, tuple[hosts.HostView, ...], list[dict[str, Any]]] | None \
            = None
        self._hosts_lock = threading.Lock()
        #: The GPU activity reporter's task (``report_activity_forever``), when running.
        self.reporter: asyncio.Future[None] | None = None
        #: Per host ("" for the hub's own engine): container id -> when its devices last
        #: ran a compute process (``time.monotonic``), for ``idle_stops``.
        self._last_work: dict[str, dict[str, float]] = {}
        #: Per device: when it last ran a compute process, and its holders then
        #: (``activity.note_work``): the idle time every page, scrape and API answer shows;
        #: the hub's own engine's, and per other host, each host's.
        self._work_seen: activity.WorkSeen = {}
        self._host_work_seen: dict[str, activity.WorkSeen] = {}
        #: Follows Docker's events (``start_docker_events``); None until started.
        self.docker_events: DockerEvents | None = None
        #: What was logged and still present at the last look, per kind of problem:
        #: conflicts (device UUID, container ids), disagreements (container id).
        self._seen: dict[str, set[Any]] = {}
        self._seen_lock = threading.Lock()

    def start_docker_events(self) -> DockerEvents:
        """Write what Docker does to every device container into the log, in a thread."""
        if self.docker_events is None:
            self.docker_events = DockerEvents(
                self.event_log, partial(connect, self.settings.docker_host))
            self.docker_events.start()
        return self.docker_events

    async def report_activity(self) -> dict[str, set[str]]:
        """Once: tell the Hub which servers run compute processes on their devices now
        (``activity.active_servers``), so an idle culler leaves a training run alone; and
        stop those idle past their ``gpu_idle_timeout``. On a hub of several hosts, every
        host that answers, each read now (a remote host through a new probe); the clocks
        of a host that does not answer start again when it is back, so its servers are
        never stopped for the time it could not be seen."""
        readings = await self._activity_readings()
        active: dict[str, set[str]] = {}
        for _host, snap in readings:
            for user, servers in activity.active_servers(snap).items():
                active.setdefault(user, set()).update(servers)
        when = datetime.now(timezone.utc)
        for user, servers in sorted(active.items()):
            await self.hub.report_activity(user, sorted(servers), when)
        users = await self.hub_users()
        groups = {name: u.groups for name, u in users.items()}
        now = time.monotonic()
        stops = []
        for host, snap in readings:
            found = activity.idle_stops(snap, self._last_work.setdefault(host, {}), now, groups)
            stops += [replace(stop, host=host) for stop in found]
        for host in set(self._last_work) - {host for host, _snap in readings}:
            del self._last_work[host]
        if self.hub.error:  # the clocks go on; without users' hub groups, no limit is known
            return active
        for stop in stops:
            await self.stop_idle(stop)
        return active

    async def _activity_readings(self) -> list[tuple[str, Snapshot]]:
        """(host, snapshot) read now for GPU activity: the hub's own engine ("" on a
        one-host hub), and every other host that answers, through a new probe."""
        if not self.settings.hosts:
            return [("", await self.snapshot(fresh=True))]
        parts, _problems = await self.host_parts(fresh=True)
        if not parts:  # the hosts setting cannot be read: the own engine, as on one host
            return [("", await self.snapshot(fresh=True))]
        return [(name, snap) for name, snap, _down in parts if snap is not None]

    async def stop_idle(self, stop: activity.IdleStop) -> None:
        """Stop a server that idled past its ``gpu_idle_timeout``, through the Hub (which
        stops the container as on any stop), and say so in the log for its next spawn."""
        code, message = await self.hub.stop_server(stop.user, stop.server)
        if code >= 400:
            log.warning("stopping idle GPU server %s/%s failed: %s %s", stop.user,
                        stop.server, code, message)
            return
        self._last_work.get(stop.host, {}).pop(stop.container_id, None)
        self.event_log.write(events.GPU_IDLE_STOP, user=stop.user, server=stop.server,
                             container=stop.container, idle=round(stop.idle),
                             timeout=round(stop.timeout), via="admin-service",
                             **host_field(stop.host))
        log.info("stopped %s/%s: no GPU work for %.0f s (gpu_idle_timeout %.0f s)",
                 stop.user, stop.server, stop.idle, stop.timeout)

    async def report_activity_forever(self) -> None:
        """``report_activity`` every ``activity_interval`` seconds; a failure is logged and
        the next round tries again."""
        while True:
            await asyncio.sleep(self.settings.activity_interval)
            try:
                await self.report_activity()
            except Exception:
                log.exception("reporting GPU activity to the Hub failed")

    def take(self, fresh: bool = False) -> Snapshot:
        """``World.snapshot`` for pages, scrapes and checks alike (blocking), noting conflicts."""
        snap = self.world.snapshot(fresh)
        with self._seen_lock:
            snap = replace(snap, work_since=activity.note_work(snap, self._work_seen))
        self.note_problems(snap)
        return snap

    def _first_seen(self, kind: str, current: set[Any]) -> set[Any]:
        """Of the problems of ``kind`` present now, those not present at the last look.

        Pages refresh every few seconds; the log gets one line when a problem appears, not
        one per refresh. A problem that is settled and comes back is logged again.
        """
        with self._seen_lock:
            new = current - self._seen.get(kind, set())
            self._seen[kind] = current
        return new

    def note_problems(self, snap: Snapshot, host: str = "") -> None:
        """Log what is wrong in one read, each problem once: conflicts, containers whose
        labels disagree with Docker, busy devices. ``host``: another host of the hub (its
        problems are kept apart from the own engine's and named with it)."""
        self.note_conflicts(snap, host)
        self.note_disagreements(snap, host)
        self.note_busy(snap, host)

    def note_conflicts(self, snap: Snapshot, host: str = "") -> None:
        """Write ``gpu.conflict`` once for each conflict this service has not seen yet."""
        found = snap.conflicts()
        new = self._first_seen(_kind("conflict", host),
                               {(uuid, tuple(a.container_id for a in holders))
                                for uuid, holders in found.items()})
        if not new:
            return
        devices = snap.inventory.by_uuid()
        for uuid, ids in sorted(new):
            holders = found[uuid]
            device = devices.get(uuid)
            slot = device.slot if device is not None else None
            names = [a.container_name for a in holders]
            self.event_log.write(
                events.GPU_CONFLICT, uuid=uuid, slot=slot, containers=names,
                container_ids=list(ids), users=[a.user for a in holders],
                hubs=[a.hub for a in holders], via="admin-page", **host_field(host),
            )
            log.warning("device %s (%s)%s is held by %d running containers: %s", slot, uuid,
                        f" on host {host}" if host else "", len(names), ", ".join(names))

    def note_busy(self, snap: Snapshot, host: str = "") -> None:
        """Write ``gpu.busy`` once for each device that became busy (processes or memory in
        use, no running container holds it)."""
        found = snap.busy()
        devices = snap.inventory.by_uuid()
        for uuid in sorted(self._first_seen(_kind("busy", host), set(found))):
            device = devices[uuid]
            self.event_log.write(events.GPU_BUSY, uuid=uuid, slot=device.slot,
                                 reason=found[uuid], memory_used_mib=device.memory_used_mib,
                                 pids=[p.pid for p in device.processes], via="admin-page",
                                 **host_field(host))
            log.warning("device %s (%s)%s is %s", device.slot, uuid,
                        f" on host {host}" if host else "", found[uuid])

    def note_disagreements(self, snap: Snapshot, host: str = "") -> None:
        """Write ``gpu.disagree`` once for each container whose labels and device requests
        name different devices."""
        found = {a.container_id: a for a in snap.disagreements()}
        for cid in sorted(self._first_seen(_kind("disagree", host), set(found))):
            a = found[cid]
            self.event_log.write(events.GPU_DISAGREE, container=a.container_name, user=a.user,
                                 hub=a.hub, devices=list(a.uuids), reason=a.disagreement,
                                 via="admin-page", **host_field(host))

    #: Seconds one read of every host serves pages, API calls and scrapes.
    HOSTS_MAX_AGE = 2.0

    def read_hosts(self) -> list[dict[str, Any]]:
        """Every host of the hub at once (``hosts.read_all``), each up with its GPUs, holders
        and free devices, or down with the reason; [] on a one-host hub (blocking). The hub's
        own engine reads its GPUs through this service's NVML reader, the others through
        their probe. A ``hosts`` setting that cannot be read is one row saying why."""
        return self._read_all_hosts()[1]

    def _read_all_hosts(
        self, fresh: bool = False,
    ) -> tuple[tuple[hosts.HostView, ...], list[dict[str, Any]]]:
        """Every host at once, kept ``HOSTS_MAX_AGE``; ``fresh``: read now, and the remote
        hosts' GPUs through a new probe. Each snapshot carries its devices' idle clocks
        (``activity.note_work``, from when its probe read them)."""
        if not self.settings.hosts:
            return (), []
        with self._hosts_lock:
            last = self._hosts_read
            if (not fresh and last is not None
                    and time.monotonic() - last[0] < self.HOSTS_MAX_AGE):
                return last[1], last[2]
            try:
                readers = self._readers()
            except hosts.HostsError as exc:
                return (), [{"name": "hosts", "url": "", "up": False, "down": str(exc)}]
            assert self._host_pool is not None
            if fresh:
                for reader in readers:
                    reader.invalidate()
            found = tuple(self._with_work(view, reader) for view, reader in zip(
                hosts.read_all(readers, self._host_pool, timeout=10.0), readers, strict=True))
            rows = [view.summary(reader.host.url)
                    for view, reader in zip(found, readers, strict=True)]
            self._hosts_read = (time.monotonic(), found, rows)
            return found, rows

    def _with_work(self, view: hosts.HostView, reader: hosts.HostReader) -> hosts.HostView:
        """Another host's snapshot with its devices' idle clocks, kept per host, and its
        problems logged (``note_problems``); the hub's own engine's is the service's own
        snapshot, which has both already. A host that does not answer loses its clocks,
        which start again from its next read."""
        with self._seen_lock:
            if view.snapshot is None:
                self._host_work_seen.pop(view.name, None)
                return view
            if reader.own_snapshot is not None:
                return view  # the service's own snapshot (``take``): its clocks are on it
            since = activity.note_work(view.snapshot,
                                       self._host_work_seen.setdefault(view.name, {}),
                                       reader.activity_at())
        self.note_problems(view.snapshot, view.name)
        return replace(view, snapshot=replace(view.snapshot, work_since=since))

    def release(self, container_id: str, host: str = "") -> Allocation:
        """Release a hold (``world.release``): on the service's own engine, or on ``host`` of
        the hub's hosts through that host's engine, on a fresh read of it (blocking)."""
        try:
            readers = self._readers() if host and self.settings.hosts else []
        except hosts.HostsError as exc:
            raise ReleaseRefused(str(exc)) from exc
        if not host or host == self.own_host():
            return self.world.release(container_id)
        reader = next((r for r in readers if r.host.name == host), None)
        if reader is None:
            raise ReleaseRefused(f"the hub has no host {host}", gone=True)
        found = release(reader.read(self.world.policy()), reader.client(), reader.ledger(),
                        self.settings.hub_id, container_id)
        with self._hosts_lock:
            self._hosts_read = None
        return found

    def own_host(self) -> str | None:
        """The name of the host that is this service's own engine; None on a one-host hub."""
        if not self.settings.hosts:
            return None
        own = hosts.own_endpoint(self.settings.docker_host)
        return next((reader.host.name for reader in self._readers()
                     if hosts.same_endpoint(reader.host.url, own)), None)

    async def overview(self) -> views.Overview:
        """The overview's model: the hub's own engine's cards (from the snapshot that keeps
        GPU activity), and on a hub of several hosts every host's, each card with its host."""
        if not self.settings.hosts:
            return views.overview(await self.snapshot(), self.settings.hub_id)
        parts, problems = await self.host_parts()
        if not parts:  # the setting itself is wrong: say so, show the own engine
            snap = await self.snapshot()
            return replace(views.overview(snap, self.settings.hub_id), problems=problems)
        return views.across_hosts(parts, self.settings.hub_id, acts_on=await self.run(
            self.own_host))

    async def host_parts(
        self, fresh: bool = False,
    ) -> tuple[list[tuple[str, Snapshot | None, str]], tuple[str, ...]]:
        """Every host of the hub as (name, snapshot or None, why it is down), the hub's own
        engine's from the service's own snapshot (``take``, which keeps GPU activity: read
        once, not again for the read of every host); and, when the ``hosts`` setting
        itself cannot be read, no host and why. One read of all hosts serves every page for
        ``HOSTS_MAX_AGE``; ``fresh`` reads now (GPU activity: ``report_activity``)."""
        found, rows = await self.run(self._read_all_hosts, fresh)
        if not found:
            return [], tuple(row["down"] for row in rows)
        return [(view.name, view.snapshot, view.down) for view in found], ()

    async def _readings(self) -> list[tuple[str | None, Snapshot | None]]:
        """The own engine's snapshot (host None), or every host's (None for one that does
        not answer), for the pages that list containers and users."""
        if self.settings.hosts:
            parts, _problems = await self.host_parts()
            if parts:
                return [(name, snap) for name, snap, _down in parts]
        return [(None, await self.snapshot())]

    async def allocation_rows(self) -> list[dict[str, Any]]:
        """The allocations page's rows: the own engine's, or every host's, each naming it."""
        return views.allocation_rows_across(await self._readings(), await self.hub_users(),
                                            self.settings.hub_id)

    async def user_rows(self) -> list[dict[str, Any]]:
        """The users page's rows: over the own engine, or over every host."""
        return views.user_rows(await self._readings(), await self.hub_users(),
                                      self.settings.idle_after)

    def _readers(self) -> list[hosts.HostReader]:
        if self._host_readers is None:
            assert self.settings.hosts
            found = hosts.load_setting(self.settings.hosts)
            self._host_readers = hosts.readers(
                found, image=self.settings.probe_image or "", hub_id=self.settings.hub_id,
                policy=self.world.policy, start_timeout=self.settings.start_timeout,
                own=hosts.own_endpoint(self.settings.docker_host),
                local_inventory=self.world.read_inventory,
                busy_memory_mib=self.settings.busy_memory_mib, own_snapshot=self.take)
            self._host_pool = ThreadPoolExecutor(len(found), thread_name_prefix="gpuadmin-host")
        return self._host_readers

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Blocking work (Docker, NVML, files) off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, partial(fn, *args, **kwargs))

    async def snapshot(self, fresh: bool = False) -> Snapshot:
        try:
            return await self.run(self.take, fresh)
        except (LedgerError, PolicyError, InventoryError) as exc:
            raise web.HTTPError(503, reason="cannot read the world", log_message=str(exc)) from exc

    async def hub_users(self) -> dict[str, HubUser]:
        return await self.hub.users()

    def service_checks(self) -> list[health.Check]:
        """Checks only the service can make: does the Hub answer, can actions be logged."""
        found = []
        if self.hub.error:
            found.append(health.Check("hub-api", health.WARN,
                                      f"{self.hub.error}; last activity is not shown"))
        else:
            found.append(health.Check("hub-api", health.OK,
                                      f"the Hub API answers at {self.hub.api_url}"))
        follower = self.docker_events
        if follower is not None and follower.failure:
            found.append(health.Check("docker-events", health.WARN,
                                      f"Docker's events cannot be followed ({follower.failure});"
                                      " retrying: what happens to GPU containers meanwhile is "
                                      "written when Docker answers"))
        elif follower is not None and follower.following.is_set():
            found.append(health.Check("docker-events", health.OK,
                                      "following Docker's events of GPU containers"))
        elif follower is not None:
            found.append(health.Check("docker-events", health.WARN,
                                      "not following Docker's events yet (connecting)"))
        path = self.settings.events
        failing = self.event_log.failing
        if path and failing:
            found.append(health.Check(
                "operation-log", health.FAIL,
                f"{path} cannot be written ({failing}); {len(self.event_log.pending())} "
                "event(s) wait in memory"))
        elif not path:
            found.append(health.Check(
                "operation-log", health.WARN,
                "no operation log (GPUSPAWNER_EVENTS): refusals are not counted and admin "
                "actions are not recorded; set GPUSpawner.events_file"))
        elif os.access(os.path.dirname(os.path.abspath(path)) or ".", os.W_OK):
            found.append(health.Check("operation-log", health.OK, f"writing to {path}"))
        else:
            found.append(health.Check("operation-log", health.FAIL,
                                      f"{path} cannot be written by the service"))
        return found

    def health(self) -> list[health.Check]:
        """``health.run_all`` (the checks of ``gpuspawner doctor``) plus the service's own."""
        try:
            client = self.world.client
        except LedgerError as exc:
            return [health.Check("docker", health.FAIL, str(exc)), *self.service_checks()]
        checks = health.run_all(client, lambda: self.take(fresh=True), self.settings.ports)
        return checks + self.service_checks()


class BaseHandler(HubOAuthenticated, web.RequestHandler):
    """Authentication and access for every page and API call (see the module docstring)."""

    admin: Admin
    access: Access
    api = False  # API handlers answer 403 JSON instead of sending browsers to the login page
    need = "view"

    def initialize(self, admin: Admin) -> None:
        self.admin = admin

    @property
    def has_token_header(self) -> bool:
        return bool(self.request.headers.get("Authorization"))

    def check_xsrf_cookie(self) -> None:
        if self.has_token_header:
            return  # a script with a token; the token is checked in prepare()
        super().check_xsrf_cookie()

    async def prepare(self) -> None:
        self.set_header("Cache-Control", "no-store")
        model = await self.hub_auth.get_user(self, sync=False)
        if self.has_token_header and not getattr(self, "_token_authenticated", False):
            model = None  # a bad token never falls back to the browser's cookie
        if not model:
            if not self.api and not self.has_token_header and self.request.method == "GET":
                self.redirect(self.get_login_url())
                return
            raise web.HTTPError(403, log_message="log in through the Hub or send "
                                "'Authorization: token <token>'")
        scopes = self.hub_auth.access_scopes or {f"access:services!service={self.conf.name}"}
        self.access = access_of(model, set(scopes))
        if not getattr(self.access, self.need):
            raise web.HTTPError(403, log_message=self.refusal())
        self.current_user = model

    @property
    def conf(self) -> Settings:
        return self.admin.settings

    def refusal(self) -> str:
        who = f"{self.access.kind} {self.access.name}"
        if self.need == "act":
            return f"{who} may look but not act: releasing holds and stopping servers is for " \
                   "JupyterHub admins"
        if self.need == "metrics":
            return f"{who} may not read the metrics: they need admin, the {VIEW_SCOPE} scope " \
                   f"or {METRICS_SCOPE}"
        return f"{who} is not allowed here: this page is for JupyterHub admins and holders " \
               f"of the {VIEW_SCOPE} scope"

    def page(self) -> Page:
        token = self.xsrf_token
        return Page(
            prefix=self.conf.prefix,
            hub_prefix=self.conf.hub_prefix,
            user=self.access.name,
            can_act=self.access.act,
            xsrf=token.decode() if isinstance(token, bytes) else str(token),
            refresh=self.conf.refresh,
            service=self.conf.name,
            message=self.get_argument("message", "")[:500],
            hosts=bool(self.conf.hosts),
        )

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(data, default=str))

    def wants_json(self) -> bool:
        """JSON for scripts and the page's own fetches; HTML for a browser's form post."""
        accept = self.request.headers.get("Accept", "")
        content = self.request.headers.get("Content-Type", "")
        if "json" in accept or "json" in content or self.has_token_header:
            return True
        return self.api and "text/html" not in accept

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        message = self._reason
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, web.HTTPError) and exc.log_message:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        self.clear_header("Location")
        if self.wants_json():
            self.write_json({"status": status_code, "message": message}, status_code)
        elif hasattr(self, "access"):
            page = Page(prefix=self.conf.prefix, hub_prefix=self.conf.hub_prefix,
                        user=self.access.name, can_act=False, xsrf="",
                        refresh=self.conf.refresh, service=self.conf.name)
            self.finish(self.admin.renderer.error(page, status_code, message))
        else:
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish(f"{status_code}: {message}\n")


# --------------------------------------------------------------------------- pages


class OverviewPage(BaseHandler):
    async def get(self) -> None:
        model, found = await asyncio.gather(self.admin.overview(),
                                            self.admin.run(self.admin.read_hosts))
        self.finish(self.admin.renderer.overview(self.page(), model, hosts=found))


class AllocationsPage(BaseHandler):
    async def get(self) -> None:
        rows = await self.admin.allocation_rows()
        self.finish(self.admin.renderer.allocations(self.page(), rows))


class UsersPage(BaseHandler):
    async def get(self) -> None:
        rows = await self.admin.user_rows()
        self.finish(self.admin.renderer.users(self.page(), rows, self.conf.idle_after))


class EventsPage(BaseHandler):
    async def get(self) -> None:
        entries = await self.admin.run(self.admin.event_log.read, 500)
        self.finish(self.admin.renderer.events(self.page(), views.event_rows(entries),
                                               self.conf.events))


class HealthPage(BaseHandler):
    async def get(self) -> None:
        await self.admin.hub_users()  # so that the hub-api check reports a real answer
        checks = await self.admin.run(self.admin.health)
        self.finish(self.admin.renderer.health(self.page(), [c.to_json() for c in checks]))


# --------------------------------------------------------------------------- JSON API


class ApiHandler(BaseHandler):
    api = True


class GpusApi(ApiHandler):
    async def get(self) -> None:
        snap = await self.admin.snapshot()
        self.write_json([d.to_json() for d in snap.devices()])


class HostsApi(ApiHandler):
    async def get(self) -> None:
        self.write_json(await self.admin.run(self.admin.read_hosts))


class OverviewApi(ApiHandler):
    async def get(self) -> None:
        self.write_json((await self.admin.overview()).to_json())


class AllocationsApi(ApiHandler):
    async def get(self) -> None:
        self.write_json(await self.admin.allocation_rows())


class UsersApi(ApiHandler):
    async def get(self) -> None:
        self.write_json(await self.admin.user_rows())


class AvailableApi(ApiHandler):
    async def get(self) -> None:
        snap = await self.admin.snapshot()
        profile = self.get_argument("profile", "") or None
        found = views.available(snap, profile)
        if profile and not found:
            have = ", ".join(snap.free_by_profile()) or "none"
            raise web.HTTPError(404, log_message=f"no {profile} devices on this host (have: "
                                f"{have})")
        self.write_json(found)


class EventsApi(ApiHandler):
    async def get(self) -> None:
        try:
            limit = min(max(int(self.get_argument("limit", "200")), 1), 10_000)
        except ValueError:
            raise web.HTTPError(400, log_message="limit must be a whole number") from None
        self.write_json(await self.admin.run(self.admin.event_log.read, limit))


class HealthApi(ApiHandler):
    async def get(self) -> None:
        await self.admin.hub_users()  # so that the hub-api check reports a real answer
        checks = await self.admin.run(self.admin.health)
        self.write_json([c.to_json() for c in checks])


class MetricsHandler(ApiHandler):
    need = "metrics"

    async def prepare(self) -> None:
        if self.conf.metrics_public:
            self.set_header("Cache-Control", "no-store")
            return
        await super().prepare()

    async def get(self) -> None:
        text = await self.admin.run(metrics.exposition, self.admin.registry)
        self.set_header("Content-Type", metrics.CONTENT_TYPE)
        self.finish(text)


# --------------------------------------------------------------------------- actions


class ActionHandler(ApiHandler):
    need = "act"

    def field(self, name: str) -> str:
        if "json" in self.request.headers.get("Content-Type", ""):
            try:
                data = json.loads(self.request.body or b"{}")
            except ValueError:
                raise web.HTTPError(400, log_message="the body is not JSON") from None
            value = data.get(name, "") if isinstance(data, dict) else ""
            return value if isinstance(value, str) else ""
        return self.get_body_argument(name, "")

    def done(self, message: str, **extra: Any) -> None:
        if self.wants_json():
            self.write_json({"ok": True, "message": message, **extra})
            return
        target = self.field("next")
        known = {path for path, _ in PAGES}
        path = target if target in known else ""
        self.redirect(f"{self.conf.prefix}{path}?{urlencode({'message': message})}",
                      status=303)


class ReleaseAction(ActionHandler):
    """Release a hold now: remove a stopped container of this hub, keep its volumes.

    ``World.release`` decides on a fresh read of Docker (not the page's snapshot, which may
    be seconds old): only this hub's containers, only exited or dead ones.
    """

    async def post(self) -> None:
        cid = self.field("container").strip()
        if not cid:
            raise web.HTTPError(400, log_message="say which container: container=<id>")
        host = self.field("host").strip()
        try:
            allocation = await self.admin.run(self.admin.release, cid, host)
        except ReleaseRefused as exc:
            raise web.HTTPError(404 if exc.gone else 409, log_message=str(exc)) from None
        except docker.errors.NotFound:
            raise web.HTTPError(404, log_message=f"container {cid[:12]} is already "
                                "gone") from None
        except (PolicyError, InventoryError) as exc:
            raise web.HTTPError(503, reason="cannot read the world",
                                log_message=str(exc)) from exc
        except (LedgerError, docker.errors.APIError) as exc:
            raise web.HTTPError(409, log_message=str(exc)) from exc
        who = f"{allocation.user}/{allocation.server or '(default)'}"
        self.admin.event_log.write(
            events.GPU_RELEASE, user=allocation.user, server=allocation.server,
            container=allocation.container_name, uuids=list(allocation.uuids),
            slots=list(allocation.slots), state=allocation.state, by=self.access.name,
            via="admin-page", **host_field(host),
        )
        devices = ", ".join(allocation.slots) or "no device"
        log.info("%s released %s (%s) of %s", self.access.name, devices,
                 allocation.container_name, who)
        self.done(f"Released {devices} of {who}: container {allocation.container_name} "
                  "removed, volumes kept", container=cid)


class StopAction(ActionHandler):
    """Stop a server through the Hub API (its container then keeps its hold as usual)."""

    async def post(self) -> None:
        user = self.field("user").strip()
        server = self.field("server").strip()
        if not user:
            raise web.HTTPError(400, log_message="say whose server: user=<name>")
        status, message = await self.admin.hub.stop_server(user, server)
        who = f"{user}/{server or '(default)'}"
        if status not in (202, 204):
            code = status if 400 <= status < 600 else 502
            raise web.HTTPError(code, log_message=f"the Hub did not stop {who}: "
                                f"{message or status}")
        self.admin.event_log.write(events.SERVER_STOP, user=user, server=server,
                                   by=self.access.name, via="admin-page")
        log.info("%s stopped server %s", self.access.name, who)
        self.done(f"Stopping {who}" if status == 202 else f"Stopped {who}")


# --------------------------------------------------------------------------- application


#: Every handler, by path under the service prefix ("" is the overview page).
ROUTES: tuple[tuple[str, type[BaseHandler]], ...] = (
    ("", OverviewPage), ("allocations", AllocationsPage), ("users", UsersPage),
    ("events", EventsPage), ("health", HealthPage),
    ("api/gpus", GpusApi), ("api/overview", OverviewApi),
    ("api/allocations", AllocationsApi), ("api/users", UsersApi),
    ("api/available", AvailableApi), ("api/events", EventsApi), ("api/health", HealthApi),
    ("api/hosts", HostsApi),
    ("api/release", ReleaseAction), ("api/stop", StopAction), ("metrics", MetricsHandler),
)


def make_app(admin: Admin) -> web.Application:
    prefix = admin.settings.prefix
    routes: list[Any] = [
        (prefix + path, handler, {"admin": admin}) for path, handler in ROUTES
    ]
    routes.append((prefix + "oauth_callback", HubOAuthCallbackHandler))
    if prefix != "/":
        routes.append((prefix.rstrip("/"), web.RedirectHandler, {"url": prefix}))
    return web.Application(
        routes,
        cookie_secret=os.urandom(32),
        xsrf_cookies=True,
        compress_response=True,  # the overview JSON of 50 GPUs is ~190 KiB, ~11 KiB gzipped
        static_path=str(STATIC),
        static_url_prefix=prefix + "static/",
    )


async def serve(settings: Settings) -> None:
    HubOAuth.instance()  # the one instance the handlers and the OAuth callback share
    world = World(settings)
    hub = HubAPI(settings.hub_api_url, os.environ.get("JUPYTERHUB_API_TOKEN"))
    admin = Admin(settings, world, hub)
    if settings.docker_events:
        admin.start_docker_events()
    if settings.activity_interval > 0:
        admin.reporter = asyncio.ensure_future(admin.report_activity_forever())
    server = HTTPServer(make_app(admin), xheaders=True)
    server.listen(settings.bind_port, settings.bind_host)
    log.info("GPU allocations page at %s, listening on %s:%d", settings.prefix,
             settings.bind_host, settings.bind_port)
    # The Hub stops its services with SIGINT, then SIGTERM: both end this one at once, even
    # where SIGINT came in ignored (a hub started in the background of a script passes that
    # on), so a stopping hub never waits for it, and it never outlives its hub.
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, stopping.set)
    await stopping.wait()
    log.info("stopping: the Hub asked")
    server.stop()
    if admin.reporter is not None:
        admin.reporter.cancel()
    # A worker blocked in a slow Docker or NVML call is not waited for.
    admin.executor.shutdown(wait=False, cancel_futures=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m gpuspawner.admin``: run as a Hub-managed service (settings from env)."""
    logging.basicConfig(level=logging.INFO,
                        format="[%(levelname).1s %(asctime)s %(name)s] %(message)s")
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"gpuspawner.admin: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(settings))
    except KeyboardInterrupt:
        pass
    return 0
