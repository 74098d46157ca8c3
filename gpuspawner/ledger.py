"""What Docker says is taken: one pass over the engine gives the Allocation records.

Docker is the only record of who holds what. The ledger lists every container once per read
(labels, state and published ports come with the list) and inspects only what the list
cannot tell: the device requests of every container (inspected once, cached for good: a
container's device requests never change), which say what it holds whatever its labels say,
and the finish time of stopped managed containers (cached while the container stays
stopped). In steady state a full read is one API call; a spawn's read lists only what runs
and what was made lately (``Ledger.read``).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any

import docker
import docker.errors
import requests.exceptions

from . import labels as L
from .records import (
    CREATED,
    EXPIRED,
    FAILED,
    HELD,
    RUNNING,
    Allocation,
    Change,
    Changes,
    JSONRecord,
)

log = logging.getLogger(__name__)

_RUNNING_STATES = frozenset({"running", "paused", "restarting"})
_LIVE_STATES = _RUNNING_STATES | {"created"}
_STOPPED_STATES = frozenset({"exited", "dead", "removing"})

#: What a live reading lists (``Ledger.read``).
LIVE_ALL, LIVE_RUNNING = "all", "running"


class LedgerError(RuntimeError):
    """Docker could not be read; the message says what to check."""


def classify(
    docker_status: str,
    *,
    managed: bool,
    created_at: datetime | None,
    finished_at: datetime | None,
    hold_seconds: float,
    start_timeout: float,
    now: datetime,
) -> str:
    """The allocation state of DESIGN.md's "what taken means", from Docker's facts (pure)."""
    if docker_status in _RUNNING_STATES:
        return RUNNING
    if docker_status == "created":
        if created_at is not None and (now - created_at).total_seconds() < start_timeout:
            return CREATED
        return FAILED
    if not managed or docker_status == "removing":
        # An unmanaged holder holds its devices only while it runs; a container Docker is
        # removing (``remove=True``'s auto-removal) never runs again: nothing to hold for.
        return EXPIRED
    if finished_at is not None and now < finished_at + timedelta(seconds=hold_seconds):
        return HELD
    return EXPIRED


@dataclass(frozen=True)
class DeviceFacts(JSONRecord):
    """What a container's HostConfig says about NVIDIA devices (never changes after create)."""

    ids: tuple[str, ...] = ()  # device ids as given: UUIDs, indexes "0", MIG "0:1"
    count: int = 0  # count=N: "the first N GPUs"; -1: all


def device_facts(attrs: Mapping[str, Any]) -> DeviceFacts:
    """NVIDIA devices from an inspect result: DeviceRequests, or the legacy runtime's env."""
    host = attrs.get("HostConfig") or {}
    ids: list[str] = []
    count = 0
    for request in host.get("DeviceRequests") or []:
        capabilities = {c for group in request.get("Capabilities") or [] for c in group}
        if request.get("Driver") != "nvidia" and "gpu" not in capabilities:
            continue
        if capabilities and capabilities <= {"utility"}:
            continue  # NVML / nvidia-smi only (a hub reading the GPUs): runs nothing on them
        ids.extend(request.get("DeviceIDs") or [])
        wanted = request.get("Count") or 0
        if wanted < 0 or count < 0:
            count = -1
        else:
            count = max(count, wanted)
    if not ids and not count and host.get("Runtime") == "nvidia":
        for entry in (attrs.get("Config") or {}).get("Env") or []:
            if entry.startswith("NVIDIA_VISIBLE_DEVICES="):
                value = entry.split("=", 1)[1].strip()
                if value == "all":
                    count = -1
                elif value not in ("", "none", "void"):
                    ids.extend(v.strip() for v in value.split(",") if v.strip())
    return DeviceFacts(tuple(ids), count)


_AGO = re.compile(
    r"(Less than a second|About a minute|About an hour"
    r"|(\d+) (second|minute|hour|day|week|month|year)s?) ago"
)
_UNIT = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "week": 604800,
         "month": 2592000, "year": 31536000}


def ago_bounds(status_text: str) -> tuple[float, float] | None:
    """The range of seconds since a stop that Docker's "Exited (0) 5 minutes ago" allows.

    Docker's list carries no finish time, only this human text; it is enough to notice that a
    cached finish time no longer fits (the container was started and stopped again).
    """
    match = _AGO.search(status_text or "")
    if not match:
        return None
    phrase = match.group(1)
    if phrase == "Less than a second":
        return (0.0, 1.0)
    if phrase == "About a minute":
        return (60.0, 120.0)
    if phrase == "About an hour":
        return (3600.0, 5400.0)
    count, unit = int(match.group(2)), _UNIT[match.group(3)]
    if unit == 3600:  # Docker (go-units HumanDuration) rounds to the nearest hour
        return (3600 * (count - 0.5), 3600 * (count + 0.5))
    if unit in (86400, 604800, 2592000):
        # ... and counts days, weeks and months from those rounded hours: "2 days" is
        # 47.5 h up to 71.5 h.
        return (unit * count - 1800.0, unit * (count + 1) - 1800.0)
    return (float(count * unit), float((count + 1) * unit))


def _split_ids(ids: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Device ids -> (UUIDs, slot ids); Docker accepts both, we compare on both."""
    uuids, slots = [], []
    for device in ids:
        if device.startswith(("GPU-", "MIG-")):
            uuids.append(device)
        else:
            slots.append(device.replace(":", "."))
    return tuple(uuids), tuple(slots)


def anchors(
    entries: Iterable[Mapping[str, Any]], before: float, keep: int = 3
) -> tuple[str, ...]:
    """The ids of the ``keep`` newest containers Docker made before ``before`` (epoch
    seconds; Docker's list gives whole seconds), newest first (pure).

    Docker's ``since`` filter on such a container lists every container made after it, at a
    cost that grows with what it returns, not with the engine's whole history. Made before
    ``before`` (a start time-out and more ago), every container that may still be starting
    is after it. Several are kept because the newest may be removed."""
    old = [entry for entry in entries if int(entry.get("Created") or 0) < before]
    old.sort(key=lambda entry: int(entry.get("Created") or 0), reverse=True)
    return tuple(entry["Id"] for entry in old[:keep])


@dataclass(frozen=True)
class Reading(JSONRecord):
    """One pass over the engine."""

    allocations: tuple[Allocation, ...]
    #: Host ports published by running containers, whoever made them.
    bound_ports: frozenset[int]
    containers: int
    api_calls: int
    read_at: datetime


class Ledger:
    """Reads allocations from a Docker engine; safe to share between threads.

    Every container is inspected once in its life, for its device requests (they cannot
    change after create): that, not its labels, is what it holds. The list call gives state,
    labels and published ports each time; the inspect of a stopped container is repeated only
    when Docker's "Exited … ago" text says it was started and stopped again since.
    """

    #: Inspects run at most this many at once on a cold read (a hub restart at 1,000
    #: containers), so the engine's answers overlap and a bound keeps it responsive. On a
    #: 2-core host the client's own work per inspect is the limit: it then only matches
    #: inspecting one after another (benchmarks/bench_core.py --engine).
    concurrency = 8

    #: Seconds beyond ``start_timeout`` a container must be older than to anchor Docker's
    #: ``since`` filter: a created container made before the anchor is past its start
    #: time-out (a failed start, never a rival), whatever the skew between the hub's clock
    #: and a remote engine's.
    anchor_slack = 60.0

    def __init__(
        self,
        client: docker.DockerClient | docker.APIClient,
        *,
        start_timeout: float = 120.0,
        logger: logging.Logger | None = None,
    ) -> None:
        self.api: docker.APIClient = getattr(client, "api", client)
        self.start_timeout = start_timeout
        self.log = logger or log
        self._lock = threading.Lock()
        self._devices: dict[str, DeviceFacts] = {}
        self._labels: dict[str, L.LabelRecord] = {}
        self._built: dict[str, tuple[tuple[Any, ...], Allocation]] = {}
        self._finished: dict[str, datetime | None] = {}
        #: The entries of the last full list (kept current by merges) and when it began.
        self._view: list[dict[str, Any]] | None = None
        self._view_at = 0.0
        self._dirty: set[str] = set()  # forgotten since: inspected again by the next merge
        #: ``since`` anchors from the last full list (``anchors``) and the first one's Docker
        #: ``Created``: every container made after it is in a ``since`` list.
        self._anchors: tuple[str, ...] = ()
        self._anchor_created = 0
        self._refreshing = False
        #: The engine's clock minus the hub's (an estimate: ``learn_skew``), whether it keeps
        #: containers running across its own restarts, and when ``info`` said so (None: not
        #: read yet).
        self._skew_ns = 0
        self._facts_at: float | None = None
        self._live_restore = False

    #: Seconds the race checks' event window reaches back before a plan's read, beyond what
    #: the engine's clock is known to be: event times and the clocks' lower bound are not
    #: exact to the nanosecond.
    event_margin = 0.5

    #: Seconds the window reaches past the check's moment on the engine's clock as far as
    #: it is known: the spawn's own event, a moment before, must be in it. A window that
    #: ends in the engine's future makes Docker wait until then, so it is kept short.
    event_reach = 0.005

    #: Seconds an event read may take; past that it is dropped and the lists answer. A read
    #: asked up to a moment still to come on the engine's clock waits for it.
    event_timeout = 1.0

    #: Seconds what ``info`` said (live-restore, the engine's clock) is trusted.
    facts_max_age = 60.0

    def changes(self, planned_ns: int, checked_ns: int) -> Changes | None:
        """The container events of Docker's buffer from a plan's read (``planned_ns``, the
        hub's clock) to now (``checked_ns``), asked on the engine's clock as far as it is
        known. None when the buffer cannot prove anything: the engine keeps containers
        running across its restarts (live-restore: a restart empties the buffer and no
        start is ever logged for them), or it did not answer in time.

        Whether the answer covers the whole window is for ``spawnplan.newcomers`` to judge
        (the buffer's size, this spawn's own event, the clocks)."""
        if not self._engine_facts() or self._live_restore:
            return None
        since = planned_ns + self._skew_ns - int(self.event_margin * 1e9)
        until = checked_ns + self._skew_ns + int(self.event_reach * 1e9)
        try:
            stream = self.api.events(since=_stamp(since), until=_stamp(until))
        except (docker.errors.DockerException, requests.exceptions.RequestException):
            return None
        late = threading.Event()

        def give_up() -> None:
            late.set()
            stream.close()

        timer = threading.Timer(self.event_timeout, give_up)
        timer.start()
        try:
            raw = b"".join(stream)
        except Exception:  # noqa: BLE001 - closed by the timer, or the engine went away
            return None
        finally:
            timer.cancel()
        if late.is_set():
            with self._lock:
                self._facts_at = None  # the clocks moved: read them again
            return None
        found: list[Change] = []
        count, daemon = 0, False
        for line in raw.splitlines():
            if not line.strip():
                continue
            count += 1
            # Docker writes compact JSON: a full buffer of 256 events is counted without
            # decoding the networks', images' and execs' ones.
            if b'"Type":"container"' not in line and b'"Type":"daemon"' not in line:
                continue
            event = json.loads(line)
            if event.get("Type") == "daemon":
                daemon = True
                continue
            found.append(Change(str((event.get("Actor") or {}).get("ID") or event.get("id")),
                                str(event.get("Action") or event.get("status") or ""),
                                int(event.get("timeNano") or 0)))
        if daemon:
            with self._lock:
                self._facts_at = None  # live-restore may have changed
        return Changes(tuple(found), count, daemon, since, until)

    def learn_skew(self, skew_ns: int) -> None:
        """The engine's clock minus the hub's as a race check just bounded it from below
        (this spawn's own event happened before the check's moment). The estimate, first
        from ``info`` (its ``SystemTime`` against the middle of the call), is raised to
        every such bound; it is read again from ``info`` after ``facts_max_age`` and after a
        read that waited too long. It only places the window: whether the window covered
        what it must is ``spawnplan.newcomers``'s test, not this estimate's."""
        with self._lock:
            self._skew_ns = max(self._skew_ns, skew_ns)

    def holds_gpu(self, container_ids: Iterable[str]) -> bool:
        """Whether any of these containers asks for an NVIDIA device (its device requests:
        the one rule of what a container holds). One that is gone holds nothing."""
        for cid in container_ids:
            try:
                facts, _calls = self._facts(cid)
            except docker.errors.NotFound:
                continue
            if facts.ids or facts.count:
                return True
        return False

    def _engine_facts(self) -> bool:
        """Read ``info`` when what it said is older than ``facts_max_age``: live-restore, and
        a first estimate of the engine's clock minus the hub's. False when the engine did
        not tell."""
        with self._lock:
            known = self._facts_at
        if known is not None and time.monotonic() - known < self.facts_max_age:
            return True
        asked = time.time_ns()
        try:
            info = self.api.info()
        except (docker.errors.DockerException, requests.exceptions.RequestException):
            return False
        answered = time.time_ns()
        engine_now = _epoch_ns(str(info.get("SystemTime") or ""))
        if engine_now is None:
            return False
        with self._lock:
            self._live_restore = bool(info.get("LiveRestoreEnabled"))
            self._skew_ns = engine_now - (asked + answered) // 2
            self._facts_at = time.monotonic()
        return True

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except docker.errors.NotFound:
            raise
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise LedgerError(
                f"the Docker engine at {self.api.base_url} did not answer {what} ({exc}); "
                "check that dockerd is running and this user may use its socket"
            ) from exc

    def forget(self, container_id: str) -> None:
        """Drop what is cached of a container (the spawner calls it after start/stop/remove):
        its finish time, and what the kept view of stopped containers says of it."""
        with self._lock:
            self._finished.pop(container_id, None)
            self._dirty.add(container_id)

    def view_age(self) -> float | None:
        """Seconds since the last full list began; None before the first."""
        with self._lock:
            return None if self._view is None else time.monotonic() - self._view_at

    def refresh(self) -> None:
        """A full list, for the kept view (the spawner runs it off a spawn's path); at most
        one at a time, a second call returns at once."""
        with self._lock:
            if self._refreshing:
                return
            self._refreshing = True
        try:
            self.read()
        finally:
            with self._lock:
                self._refreshing = False

    def read(
        self,
        hold_for: Callable[[str | None], float] = lambda user: 0.0,
        now: datetime | None = None,
        live: str = "",
        stopped_max_age: float = 0.0,
    ) -> Reading:
        """Every container, or with ``live`` only containers that run or may start: it
        answers who runs or is starting on a device (the race rule), not who holds one.

        - ``LIVE_ALL``: created, running, paused and restarting, whatever their age (a
          created container made before the anchor is a failed start: not listed).
        - ``LIVE_RUNNING``: running, paused and restarting (Docker's plain list): all a
          running container can lose to, by the race rule.

        ``stopped_max_age``: what runs and every container made lately from Docker now, and
        the older ones that do not run as the last full list (at most this many seconds old)
        showed them, with each container that ran then and does not now inspected. Who runs
        or starts on a device is exact; only an old container started *and* stopped since by
        someone other than this hub, or removed since, is seen up to that late (a hold,
        which only delays a hand-out).

        Both list only what runs and what was made after the anchor (``anchors``): Docker
        spends its time on each container it returns, and a lab's hundreds of stopped
        containers would cost a spawn far more than its own work."""
        if live not in ("", LIVE_ALL, LIVE_RUNNING):
            raise ValueError(f"unknown live reading {live!r}")
        now = now or datetime.now(timezone.utc)
        calls = 0
        full = False
        with self._lock:
            view, view_at = self._view, self._view_at
        use_view = (stopped_max_age > 0 and view is not None
                    and time.monotonic() - view_at < stopped_max_age)
        current = None
        if live == LIVE_RUNNING:
            current = (self._call("a container list", self.api.containers), 1)
        elif live or use_view:
            current = self._current()
        if current is not None:
            listed, calls = current
            if live:
                listed = [entry for entry in listed if entry.get("State") in _LIVE_STATES]
            else:
                listed, used = self._merge(listed, view)
                calls += used
        elif live:  # no anchor (a young engine), or Docker refused it: filter by state
            listed = self._call("a container list", self.api.containers, all=True,
                                filters={"status": sorted(_LIVE_STATES)})
            calls = 1
        else:
            began = time.monotonic()
            listed = self._call("a container list", self.api.containers, all=True)
            calls, full = 1, True
        # Docker's "Exited … ago" texts are relative to the moment of the list.
        listed_at = datetime.now(timezone.utc)
        if full:
            found = anchors(listed, listed_at.timestamp()
                            - self.start_timeout - self.anchor_slack)
            created = {entry["Id"]: int(entry.get("Created") or 0) for entry in listed}
            with self._lock:
                self._view, self._view_at = list(listed), began
                self._dirty.clear()
                self._anchors = found
                self._anchor_created = created[found[0]] if found else 0
        calls += self._learn([entry["Id"] for entry in listed])
        holds: dict[str | None, float] = {}

        def hold(user: str | None) -> float:  # asked once per user and read
            if user not in holds:
                holds[user] = hold_for(user)
            return holds[user]

        allocations: list[Allocation] = []
        bound: set[int] = set()
        seen: set[str] = set()
        for entry in listed:
            cid = entry["Id"]
            seen.add(cid)
            status = entry.get("State") or "unknown"
            if status in _RUNNING_STATES:
                bound.update(published_ports(entry))
            try:
                allocation, used = self._allocation(entry, status, hold, now, listed_at)
            except docker.errors.NotFound:
                continue  # removed between the list and the inspect
            calls += used
            if allocation is not None:
                allocations.append(allocation)
        if full:  # a container missing from a filtered or merged list may well exist
            with self._lock:
                for cache in (self._devices, self._labels, self._finished, self._built):
                    for cid in set(cache) - seen:
                        del cache[cid]
        allocations.sort(key=lambda a: (a.user or "", a.server, a.container_name))
        return Reading(tuple(allocations), frozenset(bound), len(listed), calls, now)

    def _current(self) -> tuple[list[dict[str, Any]], int] | None:
        """What runs (Docker's plain list: running, paused and restarting, whatever their
        age) and every container made after the first anchor, whatever its state, both at
        once: each container once, and the number of calls. None without an anchor, or when
        Docker refused it (removed since): the caller lists otherwise, and the next full
        list chooses new anchors."""
        with self._lock:
            found = self._anchors
        if not found:
            return None
        pool = ThreadPoolExecutor(1)
        try:  # the two lists at once: dockerd answers both in the time of the longer
            running = pool.submit(self._call, "a container list", self.api.containers)
            calls = 1
            for anchor in found:  # an older anchor lists more, never less
                calls += 1
                recent = self._call("a container list", self._since, anchor)
                if recent is not None:
                    ids = {entry["Id"] for entry in recent}
                    more = running.result()
                    return recent + [e for e in more if e["Id"] not in ids], calls
                with self._lock:
                    self._anchors = tuple(a for a in self._anchors if a != anchor)
            running.result()  # an engine that is down says so here
        finally:
            pool.shutdown(wait=False)
        with self._lock:
            self._view_at = 0.0  # no anchor left: the next read lists everything
        return None

    def _since(self, anchor: str) -> list[dict[str, Any]] | None:
        try:
            return self.api.containers(all=True, filters={"since": anchor})
        except docker.errors.APIError:
            # Docker answers 500 for an anchor that was removed; a real outage shows in the
            # plain list just before, and in the full list the caller falls back to.
            return None

    def _merge(
        self, current: list[dict[str, Any]], view: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], int]:
        """``current`` (what runs, and every container made after the anchor) plus the
        older containers of the last full list that do not run. Inspected: a container that
        ran then and does not now (stopped since: its state and finish time; removed:
        dropped), and one this hub forgot since (stopped, removed, started by this hub). A
        container made after the anchor and missing from ``current`` is gone. The result is
        the next merge's view."""
        current_ids = {entry["Id"] for entry in current}
        with self._lock:
            dirty = set(self._dirty)
            after = self._anchor_created
        merged, calls = list(current), 0
        for entry in view:
            cid = entry["Id"]
            if cid in current_ids:
                continue
            if cid not in dirty and int(entry.get("Created") or 0) > after:
                continue  # made after the anchor and not in the since list: removed
            if entry.get("State") in _RUNNING_STATES or cid in dirty:
                calls += 1
                try:
                    attrs = self._inspect(cid)
                except docker.errors.NotFound:
                    continue
                self._remember(cid, attrs)  # its finish time, for the hold
                entry = {**entry, "State": (attrs.get("State") or {}).get("Status", "exited"),
                         "Status": "", "Ports": []}
            elif entry.get("Status"):
                # Docker's "Exited … ago" was true at the full list: judged against a later
                # moment it would have the finish time inspected again on every read.
                entry = {**entry, "Status": ""}
            merged.append(entry)
        # Forgotten containers the view never had (made and stopped since the full list: a
        # server's own container, stopped a moment after its start) are inspected and added.
        known = current_ids | {entry["Id"] for entry in view}
        for cid in sorted(dirty - known):
            calls += 1
            try:
                attrs = self._inspect(cid)
            except docker.errors.NotFound:
                continue
            self._remember(cid, attrs)
            merged.append(_entry(attrs))
        with self._lock:
            if self._view is view:  # a full list since is newer than this merge
                self._view = merged
            self._dirty -= dirty
        return merged, calls

    def _learn(self, ids: Iterable[str]) -> int:
        """Inspect the containers never seen before, a bounded number at a time; returns the
        number of calls made."""
        with self._lock:
            new = [cid for cid in ids if cid not in self._devices]
        if not new:
            return 0

        def one(cid: str) -> None:
            try:
                self._remember(cid, self._inspect(cid))
            except docker.errors.NotFound:
                pass  # removed since the list: the read skips it

        if len(new) == 1:
            one(new[0])
        else:
            with ThreadPoolExecutor(min(self.concurrency, len(new))) as pool:
                list(pool.map(one, new))
        return len(new)

    def _remember(self, cid: str, attrs: Mapping[str, Any]) -> None:
        state = attrs.get("State") or {}
        with self._lock:
            self._devices[cid] = device_facts(attrs)
            if state.get("Status") in _STOPPED_STATES:
                self._finished[cid] = L.parse_time(state.get("FinishedAt"))

    def _inspect(self, cid: str) -> dict[str, Any]:
        return self._call(f"an inspect of {cid[:12]}", self.api.inspect_container, cid)

    def _facts(self, cid: str) -> tuple[DeviceFacts, int]:
        with self._lock:
            cached = self._devices.get(cid)
        if cached is not None:
            return cached, 0
        self._remember(cid, self._inspect(cid))
        with self._lock:
            return self._devices[cid], 1

    def _label_record(self, cid: str, labelset: Mapping[str, str] | None) -> L.LabelRecord:
        """A container's decoded labels: decoded once, since labels never change."""
        record = self._labels.get(cid)
        if record is None:
            record = self._labels[cid] = L.decode(labelset)
        return record

    def _finished_at(
        self, cid: str, status_text: str, listed_at: datetime
    ) -> tuple[datetime | None, int]:
        with self._lock:
            known = cid in self._finished
            cached = self._finished.get(cid)
        if known and cached is None:
            return None, 0
        if cached is not None:
            bounds = ago_bounds(status_text)
            slack = 1.5  # the engine's clock and the rounding of its text
            if bounds is None:
                return cached, 0
            # The text is relative to the moment of the list, whatever ``now`` the caller
            # judges by.
            age = (listed_at - cached).total_seconds()
            if bounds[0] - slack <= age <= bounds[1] + slack:
                return cached, 0
        attrs = self._inspect(cid)
        self._remember(cid, attrs)  # caches the finish time while it stays stopped
        return L.parse_time((attrs.get("State") or {}).get("FinishedAt")), 1

    def _carried(
        self,
        entry: Mapping[str, Any],
        status: str,
        hold_for: Callable[[str | None], float],
        now: datetime,
    ) -> Allocation | None:
        """A stopped container carried from the kept view (no "Exited … ago" text) whose
        record was built before, with the same state and finish time: only its state,
        judged by the clock, can differ. None: build it (``_allocation``). At 1,000 stopped
        containers this is most of a spawn's read."""
        if status not in _STOPPED_STATES or entry.get("Status"):
            return None
        cid = entry["Id"]
        cached = self._built.get(cid)  # single dict reads: atomic, no lock needed
        if cached is None or cached[0][0] != status:
            return None
        allocation = cached[1]
        if allocation.managed and (cid not in self._finished
                                   or self._finished.get(cid) != allocation.finished_at):
            return None
        state = classify(
            status,
            managed=allocation.managed,
            created_at=None,  # judged for a created container only
            finished_at=allocation.finished_at,
            hold_seconds=hold_for(allocation.user) if allocation.managed else 0.0,
            start_timeout=self.start_timeout,
            now=now,
        )
        if allocation.state != state:
            allocation = replace(allocation, state=state)
            self._built[cid] = (cached[0], allocation)
        return allocation

    def _allocation(
        self,
        entry: Mapping[str, Any],
        status: str,
        hold_for: Callable[[str | None], float],
        now: datetime,
        listed_at: datetime,
    ) -> tuple[Allocation | None, int]:
        """One container's record. What Docker cannot change (labels, device requests) is read
        once; the record is rebuilt only when what the list shows changes, and its state
        (which depends on the clock) is judged on every read."""
        cid = entry["Id"]
        quick = self._carried(entry, status, hold_for, now)
        if quick is not None:
            return quick, 0
        with self._lock:
            if status not in _STOPPED_STATES:
                self._finished.pop(cid, None)
        facts, calls = self._facts(cid)
        record = self._label_record(cid, entry.get("Labels"))
        if not record.managed and not facts.ids and not facts.count:
            return None, calls  # holds nothing, says nothing: not an allocation
        finished = None
        if record.managed and status in _STOPPED_STATES:
            finished, used = self._finished_at(cid, entry.get("Status") or "", listed_at)
            calls += used
        name = ((entry.get("Names") or ["/" + cid[:12]])[0]).lstrip("/")
        published = tuple(sorted(published_ports(entry))) if status in _RUNNING_STATES else ()
        key = (status, name, finished, published)
        cached = self._built.get(cid)
        if cached is not None and cached[0] == key:
            allocation = cached[1]
        else:
            allocation = _record(cid, name, entry, record, facts, status, finished, published)
        state = classify(
            status,
            managed=record.managed,
            # Docker's own time: a place-holder carries its container's labels, and with
            # them a creation time long past.
            created_at=datetime.fromtimestamp(entry.get("Created") or 0, timezone.utc),
            finished_at=finished,
            hold_seconds=hold_for(record.user) if record.managed else 0.0,
            start_timeout=self.start_timeout,
            now=now,
        )
        if allocation.state != state:
            allocation = replace(allocation, state=state)
        self._built[cid] = (key, allocation)
        return allocation, calls


def _stamp(ns: int) -> str:
    """Nanoseconds since the epoch as Docker's ``since``/``until`` take them."""
    seconds, nanos = divmod(ns, 10**9)
    return f"{seconds}.{nanos:09d}"


_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)")


def _epoch_ns(text: str) -> int | None:
    """Docker's RFC 3339 time with nanoseconds (``SystemTime``) as nanoseconds since the
    epoch; None when it is not one."""
    match = _RFC3339.fullmatch(text.strip())
    if not match:
        return None
    head, fraction, zone = match.groups()
    whole = datetime.fromisoformat(head + ("+00:00" if zone == "Z" else zone))
    return int(whole.timestamp()) * 10**9 + int((fraction or "0").ljust(9, "0")[:9])


def _entry(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """A container list entry made from an inspect (of a container that does not run: no
    published ports)."""
    created = L.parse_time(attrs.get("Created"))
    return {
        "Id": attrs["Id"],
        "Names": ["/" + str(attrs.get("Name", "")).lstrip("/")],
        "Labels": (attrs.get("Config") or {}).get("Labels") or {},
        "State": (attrs.get("State") or {}).get("Status", "exited"),
        "Status": "",
        "Created": int(created.timestamp()) if created else 0,
        "Ports": [],
    }


def _record(
    cid: str,
    name: str,
    entry: Mapping[str, Any],
    record: L.LabelRecord,
    facts: DeviceFacts,
    status: str,
    finished: datetime | None,
    published: tuple[int, ...],
) -> Allocation:
    """The Allocation of a container (its state judged by the caller): what it holds is what
    Docker gives it, its labels say whose it is and why."""
    created = datetime.fromtimestamp(entry.get("Created") or 0, timezone.utc)
    held_uuids, held_slots = _split_ids(facts.ids)
    if not record.managed:
        return Allocation(
            container_id=cid, container_name=name, managed=False, state="", docker_status=status,
            uuids=held_uuids, slots=held_slots, slot_requests=held_slots,
            gpu_count=facts.count, created_at=created, published=published,
        )
    # The union of its device requests and its labels (a label may name a device the request
    # does not; both count as taken, and the disagreement is reported).
    disagreement = ""
    if set(held_uuids) != set(record.uuids) or held_slots or facts.count:
        given = ", ".join(facts.ids) or (
            "all GPUs" if facts.count < 0
            else f"the first {facts.count} GPU(s)" if facts.count else "no device"
        )
        disagreement = (f"labels name {', '.join(record.uuids) or 'no device'} but Docker "
                        f"gives the container {given}; it holds both")
    return Allocation(
        container_id=cid,
        container_name=name,
        managed=True,
        state="",
        docker_status=status,
        user=record.user,
        server=record.server,
        profile=record.profile,
        hub=record.hub,
        interface=record.interface,
        schema=record.schema,
        uuids=tuple(dict.fromkeys((*record.uuids, *held_uuids))),
        slots=record.slots if set(held_uuids) == set(record.uuids) else held_slots,
        slot_requests=held_slots,
        parent_uuids=record.parent_uuids,
        gis=record.gis,
        gpu_profile=record.gpu_profile,
        equivalents=record.equivalents,
        priority=record.priority,
        ports=record.ports,
        gpu_count=facts.count,
        created_at=record.created_at or created,
        allocated_at=record.allocated_at,
        finished_at=finished,
        published=published,
        disagreement=disagreement,
        label_problems=record.problems,
    )


def published_ports(entry: Mapping[str, Any]) -> set[int]:
    """Host ports a container really publishes, from the list's ``Ports`` (Docker's
    NetworkSettings), never from the bindings it asked for."""
    return {p["PublicPort"] for p in entry.get("Ports") or [] if p.get("PublicPort")}


def connect(base_url: str | None = None, timeout: float = 30.0) -> docker.DockerClient:
    """A Docker client for ``base_url`` (or DOCKER_HOST / the default socket)."""
    try:
        if base_url:
            return docker.DockerClient(base_url=base_url, timeout=timeout)
        return docker.from_env(timeout=timeout)
    except docker.errors.DockerException as exc:
        raise LedgerError(
            f"cannot reach the Docker engine ({exc}); check that dockerd is running and "
            "DOCKER_HOST points at it"
        ) from exc


#: Docker statuses of a container that may be released: stopped for good. Not ``created``
#: (a spawn in flight), never running, paused or restarting.
RELEASABLE_STATUSES = frozenset({"exited", "dead"})


def remove_stopped(client: docker.DockerClient | docker.APIClient, container_id: str) -> None:
    """Remove an exited (or dead) container, keeping its volumes: the one removal gpuspawner
    makes outside a spawn (an admin releasing a hold early, after ``save``). Asks Docker
    itself, at the last moment: a running container or one still being created (a spawn in
    flight) is refused."""
    api = getattr(client, "api", client)
    state = (api.inspect_container(container_id).get("State") or {}).get("Status")
    if state not in RELEASABLE_STATUSES:
        raise LedgerError(
            f"container {container_id[:12]} is {state}; only a stopped server's container is "
            "released (stop the server first)"
        )
    api.remove_container(container_id, v=False)


#: Repository of the images a user's container is saved to before gpuspawner removes it.
SAVED_REPOSITORY = "gpuspawner-saved"
#: Copies kept for the user but not started from (the user chose another image since).
KEPT_REPOSITORY = "gpuspawner-kept"


def save(
    client: docker.DockerClient | docker.APIClient,
    container_id: str,
    *,
    hub: str,
    user: str,
    server: str,
    reason: str,
    now: datetime | None = None,
    kept: bool = False,
) -> str:
    """Commit a container to an image before it is removed, so nothing the user made outside
    volumes (files, installed packages) is lost; returns the image's ``repository:tag``.

    The image is labelled with whose it is (``ds01.hub``/``ds01.user``/``ds01.server``), and
    the labels that would otherwise pass from the old container into a new one made from the
    image (its device, allocation time and ports) are blanked: a new container's devices come
    only from its own allocation. ``kept``: a copy for the user that no later start takes
    (``gpuspawner-kept/…``), made when the user chose another image: the new container runs
    that image, and what the old one held stays on disk.
    """
    api = getattr(client, "api", client)
    now = now or datetime.now(timezone.utc)
    attrs = api.inspect_container(container_id)
    old = (attrs.get("Config") or {}).get("Labels") or {}
    blank = {k: "" for k in old if k.startswith((L.PORT_PREFIX, "aime."))
             or k in (L.GPU_UUID, L.GPU_ALLOCATED_AT)}
    stamp = now.strftime("%Y%m%d%H%M%S")
    name = (attrs.get("Name") or container_id[:12]).lstrip("/")
    repository = f"{KEPT_REPOSITORY if kept else SAVED_REPOSITORY}/{name.lower()}"
    api.commit(
        container_id,
        repository=repository,
        tag=stamp,
        message=f"saved by gpuspawner before removal: {reason}",
        conf={"Labels": {**blank, L.HUB: hub, L.USER: user, L.SERVER: server,
                         L.CREATED_AT: L.utc_iso(now)}},
    )
    return f"{repository}:{stamp}"


def saved_image(
    client: docker.DockerClient | docker.APIClient, *, hub: str, user: str, server: str
) -> str | None:
    """The newest image (``repository:tag``) a server's container was saved to and that no
    container was made from yet (``claim`` untags it then), or None."""
    api = getattr(client, "api", client)
    found = [
        image for image in api.images(filters={"label": [f"{L.HUB}={hub}", f"{L.USER}={user}"]})
        if (image.get("Labels") or {}).get(L.SERVER, "") == server
        and any(tag.startswith(SAVED_REPOSITORY + "/") for tag in image.get("RepoTags") or [])
    ]
    if not found:
        return None
    newest = max(found, key=lambda image: image.get("Created") or 0)
    return next(t for t in newest["RepoTags"] if t.startswith(SAVED_REPOSITORY + "/"))


def copy_image(
    source: docker.DockerClient | docker.APIClient,
    target: docker.DockerClient | docker.APIClient,
    image: str,
) -> str:
    """Stream ``image`` (``repository:tag``) from one engine to another (``docker save`` into
    ``docker load``, never on disk here) and return its id, checked equal on both: Docker's
    image id is the digest of the image's configuration, so an equal id on the target is the
    same image, layers and all. Raises LedgerError when the copy is not there whole."""
    src = getattr(source, "api", source)
    dst = getattr(target, "api", target)
    wanted = src.inspect_image(image)["Id"]
    for message in dst.load_image(src.get_image(image)) or ():
        if isinstance(message, dict) and (message.get("error") or message.get("errorDetail")):
            raise LedgerError(f"the copy of {image} was refused by {dst.base_url}: "
                              f"{message.get('error') or message.get('errorDetail')}")
    try:
        got = dst.inspect_image(image)["Id"]
    except docker.errors.NotFound:
        got = None
    if got != wanted:
        raise LedgerError(f"the copy of {image} on {dst.base_url} is not the image it was "
                          f"copied from ({got} instead of {wanted})")
    return wanted


def claim(client: docker.DockerClient | docker.APIClient, saved: str) -> None:
    """Untag a saved image once a new container was made from it: the container keeps the
    image (and so the user's files); the tag would otherwise hand the same old copy to a
    later fresh start."""
    api = getattr(client, "api", client)
    try:
        api.remove_image(saved, force=True, noprune=True)
    except docker.errors.NotFound:
        pass
