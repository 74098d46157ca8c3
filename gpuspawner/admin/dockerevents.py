"""Docker's own record of every container that holds a device, in the operation log.

The admin service follows Docker's event stream in a thread and writes ``docker.create``,
``docker.start``, ``docker.die`` (with the exit code), ``docker.stop`` and ``docker.destroy``
for every container whose ``HostConfig.DeviceRequests`` (or, with the ``nvidia`` runtime,
``NVIDIA_VISIBLE_DEVICES``) give it an NVIDIA device, whoever made it: so a ``docker rm`` done
by hand is on the events page next to gpuspawner's own ``container.*`` lines. A container is
inspected once, at its first event; what it holds is remembered per id, so its ``destroy``
(after which it cannot be inspected) is still attributed. Containers without devices are
remembered as such and never logged.

Nothing lost, nothing twice. Each line of a Docker event carries ``time_nano`` (Docker's
``timeNano``). When the stream drops (the engine restarts, a proxy cuts it) the follower
reconnects with backoff and, in this order:

1. replays what Docker still has since the last event it handled (``since`` = that
   ``timeNano``, ``until`` = the engine's clock now, T), skipping events already written (the
   same container id, action and ``timeNano``);
2. compares every device container with what it knows (one list, an inspect of the new ones):
   a transition Docker's state shows (``Created``, ``StartedAt``, ``FinishedAt``) after the
   last event handled and before T, that no event delivered, is written with ``via:
   "docker-reconcile"`` and its Docker time as ``at``. That is what a replay cannot give: an
   engine keeps only its newest 256 events, in memory, so a restarted engine has forgotten
   the ``die`` of the containers its predecessor stopped while nobody was listening (and a
   long gap overflows the buffer). A device container that is gone is written as
   ``docker.destroy`` the same way (without ``at``: Docker no longer knows when);
3. follows the live stream from T (an event of T itself, delivered twice, is skipped).

At start the follower resumes from the newest ``docker.*`` line of the log (a service
restart loses nothing Docker still has); with no such line it starts from now and only
learns what exists. Docker down: the service runs on, the follower says so once and retries
(1 s, doubling up to 30 s).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import docker.errors

from .. import events
from .. import labels as L
from ..events import DOCKER_ACTIONS, EventLog
from ..ledger import device_facts

log = logging.getLogger("gpuspawner.admin.docker-events")

#: What a replay or the live stream asks Docker for: containers, the logged actions only.
FILTERS = {"type": ["container"], "event": list(DOCKER_ACTIONS)}
#: Written events remembered for de-duplication (id, action, timeNano).
REMEMBER = 10_000
#: Log lines read back at start to resume from the newest Docker event.
RESUME_LINES = 2_000

_RUNNING = frozenset({"running", "paused", "restarting"})
_ISO = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:?\d\d)?$"
)


def nanos(text: str | None) -> int:
    """Docker's RFC 3339 time with nanoseconds -> ns since the epoch; 0 for Docker's zero
    time (``0001-01-01T00:00:00Z``, never started / never finished) or for nonsense."""
    match = _ISO.match(text or "")
    if not match or match[1] == "0001":
        return 0
    year, month, day, hour, minute, second = (int(match[i]) for i in range(1, 7))
    zone = match[8] or "Z"
    offset = 0
    if zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        offset = sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    whole = datetime(year, month, day, hour, minute, second, tzinfo=timezone.utc)
    fraction = int((match[7] or "0").ljust(9, "0"))
    return (int(whole.timestamp()) - offset) * 1_000_000_000 + fraction


def iso(ns: int) -> str:
    """ns since the epoch -> ISO 8601 UTC with nanoseconds, as Docker writes its times (the
    ``at`` of a logged line)."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    whole = datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{whole}.{fraction:09d}Z"


def stamp(ns: int) -> str:
    """ns since the epoch -> Docker's ``since``/``until`` form, ``seconds.nanoseconds``."""
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


@dataclass
class Holder:
    """A container that holds (or held) a device, as first inspected, and what the log has
    said of it: ``seen[action]`` is the Docker time of the last such event handled."""

    id: str
    name: str
    devices: tuple[str, ...] = ()
    gpu_count: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    image: str | None = None
    devices_from: str | None = None  # "labels" when the container was gone before inspect
    seen: dict[str, int] = field(default_factory=dict)
    #: The last transition a reconcile wrote: when the first event after it is the same
    #: action, it is the same transition (Docker's state time came just before T, its event
    #: just after), and is skipped.
    reconciled: str | None = None

    def fields(self) -> dict[str, Any]:
        return {
            "container": self.name,
            "container_id": self.id,
            "user": self.labels.get(L.USER),
            "server": self.labels.get(L.SERVER),
            "hub": self.labels.get(L.HUB),
            "image": self.image,
            "devices": list(self.devices),
            "gpu_count": self.gpu_count or None,
            "devices_from": self.devices_from,
        }


class DockerEvents:
    """Follows one engine's container events in a background thread (``start`` / ``stop``).

    ``connect`` makes a ``docker.DockerClient`` (called again after a failure). The follower
    keeps its own client: the event stream holds a connection for as long as it runs.
    """

    def __init__(
        self,
        event_log: EventLog,
        connect: Callable[[], Any],
        *,
        backoff: tuple[float, float] = (1.0, 30.0),
        resume: bool = True,
    ) -> None:
        self.event_log = event_log
        self._connect = connect
        self.backoff = backoff
        self._holders: dict[str, Holder] = {}
        self._plain: set[str] = set()  # ids of containers that hold no device
        self._written: OrderedDict[tuple[str, str, int], None] = OrderedDict()
        self.since: int | None = None  # timeNano of the newest event handled
        self._resume = resume
        self._stop = threading.Event()
        self._stream: Any = None
        self._client: Any = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        #: Set while the live stream is open (the replay and the reconcile are done).
        self.following = threading.Event()
        self.failure: str | None = None  # why the engine cannot be followed now

    # ---------------------------------------------------------------------- life cycle

    def start(self) -> None:
        if self._thread is not None:
            return
        if self._resume:
            self.resume_from_log()
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="docker-events", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._close_stream()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # closing a client of a dead engine: nothing to do
                pass
            self._client = None

    def _close_stream(self) -> None:
        with self._lock:
            stream = self._stream
        if stream is not None:
            try:
                stream.close()
            except Exception:  # the stream is already broken
                pass

    def resume_from_log(self) -> None:
        """Start from the newest Docker event in the log, and know the ones written there."""
        for entry in self.event_log.read(RESUME_LINES):
            nano = entry.get("time_nano")
            action = str(entry.get("event") or "").removeprefix("docker.")
            if action not in DOCKER_ACTIONS or not isinstance(nano, int):
                continue
            self._remember((str(entry.get("container_id") or ""), action, nano))
            self.since = max(self.since or 0, nano)

    def run(self) -> None:
        """The thread: connect, replay, reconcile, follow; on any failure, back off and
        again, until ``stop``."""
        delay = self.backoff[0]
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                if self._client is None:
                    self._client = self._connect()
                self.follow(self._client.api)
                if time.monotonic() - began > 10 * self.backoff[0]:
                    delay = self.backoff[0]  # it worked a while: reconnect at once
                    continue
                # A stream that ends as soon as it opens is retried with backoff too.
            except Exception as exc:  # Docker down, a broken stream, a bug: never die
                self._failed(exc)
            finally:
                self.following.clear()
            if self._client is not None:
                try:
                    self._client.close()
                except Exception:  # the engine is gone; so is the client
                    pass
                self._client = None
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, self.backoff[1])

    def _failed(self, exc: BaseException) -> None:
        if self._stop.is_set():
            return
        reason = f"{type(exc).__name__}: {exc}"
        if self.failure is None:
            log.warning("cannot follow Docker's events (%s); retrying, up to every %.0f s. "
                        "Events Docker still has are written when it answers again.",
                        reason, self.backoff[1])
        else:
            log.debug("Docker's events still cannot be followed: %s", reason)
        self.failure = reason

    # -------------------------------------------------------------------------- following

    def follow(self, api: Any) -> None:
        """One connection: replay, reconcile, then the live stream until it ends."""
        until = self._engine_now(api)
        first = self.since is None
        base = self.since
        if base is not None:
            replay = api.events(since=stamp(base), until=stamp(until), filters=FILTERS,
                                decode=True)
            with self._lock:
                self._stream = replay
            for event in replay:
                self.handle(api, event)
                if self._stop.is_set():
                    return
        self.reconcile(api, base, until, quiet=first)
        if self.since is None or self.since < until:
            self.since = until
        live = api.events(since=stamp(until), filters=FILTERS, decode=True)
        with self._lock:
            self._stream = live
        if self._stop.is_set():
            return
        if self.failure is not None:
            log.info("following Docker's events again")
            self.failure = None
        self.following.set()
        for event in live:
            self.handle(api, event)
            if self._stop.is_set():
                return

    @staticmethod
    def _engine_now(api: Any) -> int:
        """The engine's clock (its events and states are in it), or ours."""
        return nanos(str(api.info().get("SystemTime") or "")) or time.time_ns()

    def handle(self, api: Any, event: Mapping[str, Any]) -> dict[str, Any] | None:
        """One Docker event: written when it concerns a device holder and is new."""
        action = str(event.get("Action") or event.get("status") or "")
        actor = event.get("Actor") or {}
        cid = str(event.get("id") or actor.get("ID") or "")
        nano = int(event.get("timeNano") or int(event.get("time") or 0) * 1_000_000_000)
        if event.get("Type", "container") != "container" or action not in DOCKER_ACTIONS:
            return None
        if nano > (self.since or 0):
            self.since = nano
        key = (cid, action, nano)
        if not cid or key in self._written:
            return None
        attributes = actor.get("Attributes") or {}
        holder = self._holder(api, cid, action, attributes)
        if holder is None:
            return None
        self._remember(key)
        last, holder.reconciled = holder.reconciled, None
        holder.seen[action] = max(holder.seen.get(action, 0), nano)
        if action == last:  # the event of the transition a reconcile wrote just before
            return None
        extra: dict[str, Any] = {}
        if action == "die":
            code = attributes.get("exitCode")
            extra["exit_code"] = int(code) if str(code or "").lstrip("-").isdigit() else code
        if action == "destroy":
            self._holders.pop(cid, None)
        return self.event_log.write(DOCKER_ACTIONS[action], **holder.fields(), **extra,
                                    at=iso(nano), time_nano=nano, via="docker-events")

    def _holder(self, api: Any, cid: str, action: str,
                attributes: Mapping[str, str]) -> Holder | None:
        """What container ``cid`` holds, inspected once (None: no device, or unknown)."""
        holder = self._holders.get(cid)
        if holder is not None:
            return holder
        if cid in self._plain:
            if action == "destroy":
                self._plain.discard(cid)
            return None
        if action == "destroy":
            return None  # never seen, cannot be inspected any more: nothing to say
        try:
            attrs = api.inspect_container(cid)
        except docker.errors.NotFound:
            return self._from_labels(cid, attributes)
        return self._learn(cid, attrs)

    def _learn(self, cid: str, attrs: Mapping[str, Any]) -> Holder | None:
        facts = device_facts(attrs)
        if not facts.ids and not facts.count:
            self._plain.add(cid)
            return None
        config = attrs.get("Config") or {}
        holder = Holder(
            id=cid,
            name=str(attrs.get("Name") or cid[:12]).lstrip("/"),
            devices=tuple(facts.ids),
            gpu_count=facts.count,
            labels=dict(config.get("Labels") or {}),
            image=config.get("Image"),
        )
        self._holders[cid] = holder
        return holder

    def _from_labels(self, cid: str, attributes: Mapping[str, str]) -> Holder | None:
        """A container gone before it could be inspected (created and removed between two
        looks): gpuspawner's labels, which every event carries, are all there is to go by."""
        uuids = [u for u in (attributes.get(L.GPU_UUIDS) or attributes.get(L.GPU_UUID)
                             or "").split(",") if u]
        if not uuids:
            return None
        holder = Holder(id=cid, name=str(attributes.get("name") or cid[:12]),
                        devices=tuple(uuids), labels=dict(attributes),
                        image=attributes.get("image"), devices_from="labels")
        self._holders[cid] = holder
        return holder

    def _remember(self, key: tuple[str, str, int]) -> None:
        self._written[key] = None
        while len(self._written) > REMEMBER:
            self._written.popitem(last=False)

    # -------------------------------------------------------------------------- reconcile

    def reconcile(self, api: Any, base: int | None, until: int, quiet: bool = False) -> int:
        """Write what Docker's state shows happened in (``base``, ``until``) that no event
        said; ``quiet`` (the first look, with nothing to resume from): only learn. Returns
        how many lines were written."""
        written = 0
        present = set()
        for entry in api.containers(all=True):
            cid = entry["Id"]
            present.add(cid)
            if cid in self._plain:
                continue
            try:
                attrs = api.inspect_container(cid)
            except docker.errors.NotFound:
                present.discard(cid)
                continue
            holder = self._holders.get(cid) or self._learn(cid, attrs)
            if holder is None:
                continue
            holder.reconciled = None
            for action, nano, extra in _transitions(attrs):
                if holder.seen.get(action, 0) >= nano:
                    continue  # an event said it
                holder.seen[action] = nano
                if quiet or base is None or not base < nano < until:
                    continue  # before what we follow, or the live stream will say it
                holder.reconciled = action
                self.event_log.write(DOCKER_ACTIONS[action], **holder.fields(), **extra,
                                     at=iso(nano), via="docker-reconcile")
                written += 1
        for cid in [c for c in self._holders if c not in present]:
            holder = self._holders.pop(cid)
            if not quiet:
                self.event_log.write(events.DOCKER_DESTROY, **holder.fields(),
                                     via="docker-reconcile")
                written += 1
        self._plain &= present
        return written


def _transitions(attrs: Mapping[str, Any]) -> Iterable[tuple[str, int, dict[str, Any]]]:
    """What a container's state says happened to it, oldest first: created, its last start,
    its last exit (before the last start when it runs again: its exit code is then gone)."""
    state = attrs.get("State") or {}
    found: list[tuple[str, int, dict[str, Any]]] = []
    created = nanos(attrs.get("Created"))
    if created:
        found.append(("create", created, {}))
    started = nanos(state.get("StartedAt"))
    finished = nanos(state.get("FinishedAt"))
    running = str(state.get("Status") or "") in _RUNNING
    if started:
        found.append(("start", started, {}))
    if finished:
        code = None if running or finished < started else state.get("ExitCode")
        found.append(("die", finished, {"exit_code": code}))
    found.sort(key=lambda item: item[1])
    return found
