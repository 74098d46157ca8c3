"""Prometheus metrics of the admin service: a collector that reads one Snapshot per scrape.

The metrics are computed at scrape time from the same Snapshot the page shows (so a graph
and the page never disagree), in the service's own CollectorRegistry (so nothing of the
process's default registry leaks in). Refusals come from the operation log, counted
incrementally: a scrape reads only the lines written since the last one, across rotations.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .. import events
from ..allocator import Taken
from ..events import GPU_REFUSE
from ..hosts import HostView
from ..records import MigDevice
from ..snapshot import Snapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
log = logging.getLogger(__name__)


class EventCounter:
    """Counts ``event`` lines of a JSON-lines log by the value of ``key``, reading only new lines.

    ``events.LogReader`` does the reading: bounded chunks, the file kept open between scrapes,
    so a rotation loses nothing and counts nothing twice (the counts only grow while the
    service runs), and a file truncated in place is read again from its start. At start the
    current file is counted from its start (not the rotated ones): Prometheus takes the
    service's restart as a counter reset, which is what it is.
    """

    def __init__(self, path: str | None, event: str = GPU_REFUSE, key: str = "code",
                 chunk: int = events.CHUNK) -> None:
        self.path = path
        self.event = event
        self.key = key
        self._needle = json.dumps(event).encode()  # cheap test before parsing a line
        self._lock = threading.Lock()
        self._reader = events.LogReader(path, chunk=chunk) if path else None
        self._counts: dict[str, int] = defaultdict(int)

    def counts(self) -> dict[str, int]:
        if self._reader is None:
            return {}
        with self._lock:
            try:
                for line in self._reader.new_lines():
                    self._count(line)
            except OSError as exc:  # unreadable now: the counts so far, and try again later
                log.warning("operation log %s cannot be counted: %s", self.path, exc)
            return dict(self._counts)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()

    def _count(self, line: bytes) -> None:
        if self._needle not in line:
            return
        entry = events.parse_line(line)
        if entry is not None and entry.get("event") == self.event:
            self._counts[str(entry.get(self.key) or "unknown")] += 1


class SnapshotCollector:
    """The custom collector: every family is computed from one snapshot per scrape."""

    def __init__(self, take_snapshot: Callable[[], Snapshot], refusals: EventCounter) -> None:
        self.take_snapshot = take_snapshot
        self.refusals = refusals

    def describe(self) -> list[Metric]:
        return []  # computed at scrape time; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("gpuspawner_up", "1 when Docker and the inventory could be read")
        started = time.monotonic()
        try:
            snap = self.take_snapshot()
        except Exception:  # a scrape must answer; the failure is the metric
            up.add_metric([], 0.0)
            yield up
            yield from self._refusals()
            return
        up.add_metric([], 1.0)
        yield up
        took = GaugeMetricFamily("gpuspawner_snapshot_seconds",
                                 "Seconds to read Docker, the GPUs and the policy")
        took.add_metric([], time.monotonic() - started)
        yield took
        yield from self._slots(snap)
        yield from self._holders(snap)
        yield from self._activity(snap)
        yield from self._refusals()

    def _activity(self, snap: Snapshot) -> Iterator[Metric]:
        """What runs on each device, as NVML said at this read (devices NVML does not report
        memory for are left out, not shown as 0), labelled with the user who holds it."""
        activity = DeviceActivity(per_host=False)
        activity.add(snap)
        busy = GaugeMetricFamily("gpuspawner_device_busy",
                                 "Devices no running container holds with processes or memory "
                                 "in use (never given out)")
        busy.add_metric([], len(snap.busy()))
        yield from activity.families()
        yield busy

    def _slots(self, snap: Snapshot) -> Iterator[Metric]:
        total = GaugeMetricFamily("gpuspawner_gpu_slots",
                                  "Devices that can be allocated, per GPU and profile",
                                  labels=["gpu", "profile"])
        used = GaugeMetricFamily("gpuspawner_gpu_slots_used",
                                 "Devices held (running, starting or held after stop)",
                                 labels=["gpu", "profile"])
        for (gpu_index, profile), (count, busy) in slot_counts(snap).items():
            total.add_metric([gpu_index, profile], count)
            used.add_metric([gpu_index, profile], busy)
        yield total
        yield used
        free = GaugeMetricFamily("gpuspawner_profile_free", "Free devices per profile",
                                 labels=["profile"])
        for profile, (count, _) in snap.free_by_profile().items():
            free.add_metric([profile], count)
        yield free

    def _holders(self, snap: Snapshot) -> Iterator[Metric]:
        per_user = GaugeMetricFamily("gpuspawner_allocations",
                                     "gpuspawner containers holding devices, per user and state",
                                     labels=["user", "state"])
        equivalents = GaugeMetricFamily("gpuspawner_user_gpu_equivalents",
                                        "GPU-equivalents held per user", labels=["user"])
        counts: dict[tuple[str, str], int] = defaultdict(int)
        users: set[str] = set()
        for a in snap.allocations:
            if a.managed and a.user and a.holds and (a.uuids or a.slots or a.gpu_count):
                counts[(a.user, a.state)] += 1
                users.add(a.user)
        for (user, state), count in sorted(counts.items()):
            per_user.add_metric([user, state], count)
        for user in sorted(users):
            equivalents.add_metric([user], snap.usage(user))
        yield per_user
        yield equivalents
        unmanaged = GaugeMetricFamily("gpuspawner_unmanaged_holders",
                                      "Containers holding GPUs without gpuspawner labels")
        unmanaged.add_metric([], len(snap.unmanaged()))
        yield unmanaged
        missing = GaugeMetricFamily("gpuspawner_missing_uuids",
                                    "Labelled device UUIDs the inventory no longer has")
        missing.add_metric([], len(snap.missing_uuids()))
        yield missing
        conflicts = GaugeMetricFamily("gpuspawner_device_conflicts",
                                      "Devices held by two or more running containers")
        conflicts.add_metric([], len(snap.conflicts()))
        yield conflicts

    def _refusals(self) -> Iterator[Metric]:
        refused = CounterMetricFamily("gpuspawner_allocation_refusals",
                                      "Spawns refused, by reason (from the operation log)",
                                      labels=["code"])
        for code, count in sorted(self.refusals.counts().items()):
            refused.add_metric([code], count)
        yield refused


class DeviceActivity:
    """The per-device activity families: memory in use (bytes), compute processes and idle
    seconds, labelled with the device, its slot and the users holding it; for the own
    engine (``gpuspawner_device_*``) or, ``per_host``, for every host of the hub
    (``gpuspawner_host_device_*``, with ``host`` first). A device the driver reports no
    memory for is left out of the first two, not shown as 0; one without an idle clock, out
    of the third."""

    def __init__(self, per_host: bool) -> None:
        prefix = "gpuspawner_host_device_" if per_host else "gpuspawner_device_"
        labels = ["host", "device", "slot", "user"] if per_host else ["device", "slot", "user"]
        each = "each device, per host" if per_host else "each device"
        self.memory = GaugeMetricFamily(
            prefix + "memory_used_bytes", f"GPU memory in use on {each}"
            + (" (a remote host's as its last probe read it)" if per_host else ""),
            labels=labels)
        self.processes = GaugeMetricFamily(prefix + "processes",
                                           f"Compute processes on {each}", labels=labels)
        self.idle = GaugeMetricFamily(
            prefix + "idle_seconds", f"Seconds since a compute process last ran on {each} "
            "(0 while one runs; counted from the admin service's start"
            + (", or the host's return," if per_host else "") + " at most)", labels=labels)

    def add(self, snap: Snapshot, *host: str) -> None:
        """The devices of one read (``host``: its host's name, for the per-host families)."""
        by_id = {a.container_id: a for a in snap.allocations}
        for view in snap.devices():
            users = sorted({by_id[h].user or by_id[h].container_name
                            for h in view.holders if h in by_id})
            labels = [*host, view.uuid, view.slot, ",".join(users)]
            if view.memory_used_mib is not None:
                self.memory.add_metric(labels, view.memory_used_mib * 1024 * 1024)
                self.processes.add_metric(labels, len(view.processes))
            if view.idle_seconds is not None:
                self.idle.add_metric(labels, view.idle_seconds)

    def families(self) -> tuple[Metric, ...]:
        return (self.memory, self.processes, self.idle)


def slot_counts(snap: Snapshot) -> dict[tuple[str, str], tuple[int, int]]:
    """(GPU index, profile) -> (devices, devices held) of one host, sorted: what the slot
    metrics say (a whole GPU with MIG off is one device of profile ``gpu``)."""
    inv = snap.inventory
    taken = Taken(inv, snap.allocations)
    rows: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for gpu in inv.gpus:
        devices: list[Any] = list(inv.migs_of(gpu)) if gpu.mig_enabled else [gpu]
        for device in devices:
            profile = device.profile if isinstance(device, MigDevice) else "gpu"
            row = rows[(str(gpu.index), profile)]
            row[0] += 1
            row[1] += 1 if taken.blockers(device) else 0
    return {key: (count, busy) for key, (count, busy) in sorted(rows.items())}


class HostsCollector:
    """A hub of several hosts: each host up or down, its free devices per profile, its
    devices and holders per GPU and profile, and what each user holds there, from one read
    of every host per scrape (``hosts.HostView`` and its ``summary`` rows)."""

    def __init__(
        self,
        read_hosts: Callable[[], tuple[Sequence[HostView], list[dict[str, Any]]]],
    ) -> None:
        self.read_hosts = read_hosts

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("gpuspawner_host_up",
                               "1 when the host's Docker engine answers, per host", labels=["host"])
        free = GaugeMetricFamily("gpuspawner_host_profile_free",
                                 "Free devices per host and profile", labels=["host", "profile"])
        slots = GaugeMetricFamily("gpuspawner_host_gpu_slots",
                                  "Devices that can be allocated, per host, GPU and profile",
                                  labels=["host", "gpu", "profile"])
        used = GaugeMetricFamily("gpuspawner_host_gpu_slots_used",
                                 "Devices held, per host, GPU and profile",
                                 labels=["host", "gpu", "profile"])
        equivalents = GaugeMetricFamily("gpuspawner_host_user_gpu_equivalents",
                                        "GPU-equivalents held per host and user",
                                        labels=["host", "user"])
        activity = DeviceActivity(per_host=True)
        views, rows = self.read_hosts()
        for row in rows:
            up.add_metric([row["name"]], 1.0 if row["up"] else 0.0)
            for profile, counts in (row.get("free") or {}).items():
                free.add_metric([row["name"], profile], counts["free"])
        for view in views:
            snap = view.snapshot
            if snap is None:
                continue
            for (gpu_index, profile), (count, busy) in slot_counts(snap).items():
                slots.add_metric([view.name, gpu_index, profile], count)
                used.add_metric([view.name, gpu_index, profile], busy)
            users = sorted({a.user for a in snap.allocations
                            if a.managed and a.user and a.holds
                            and (a.uuids or a.slots or a.gpu_count)})
            for user in users:
                equivalents.add_metric([view.name, user], snap.usage(user))
            activity.add(snap, view.name)
        yield from (up, free, slots, used, equivalents, *activity.families())


def registry(
    take_snapshot: Callable[[], Snapshot],
    events_path: str | None,
    read_hosts: Callable[[], tuple[Sequence[HostView], list[dict[str, Any]]]] | None = None,
) -> CollectorRegistry:
    """The service's own registry with the snapshot collector in it (and, on a hub of
    several hosts, the hosts collector)."""
    own = CollectorRegistry(auto_describe=False)
    own.register(SnapshotCollector(take_snapshot, EventCounter(events_path)))  # type: ignore[arg-type]
    if read_hosts is not None:
        own.register(HostsCollector(read_hosts))  # type: ignore[arg-type]
    return own


def exposition(own: CollectorRegistry) -> bytes:
    """The text format of every metric (blocking: reads Docker; call it in the executor)."""
    return generate_latest(own)
