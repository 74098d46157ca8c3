"""What GPUSpawner adds to a student pressing Start, against plain DockerSpawner.

Two real JupyterHubs (tests/hub.py) run side by side on one private Docker engine
(tests/engine.py, under ``GPUSPAWNER_TEST_ROOT``, default /var/lib/gpuspawner-bench) with
the simulated NVIDIA host (tests/gpusim: enough 1g.10gb MIG slices for every concurrent
user), spawning the same single-user image (tests/images.py) with the same configuration:
image, cmd, ``remove = True``, the default bridge network, ``start_timeout``,
``http_timeout``, ``poll_interval`` and log level. GPUSpawner's spawns ask for profile
``mig-1g`` (a MIG slice, so its allocation really runs); DockerSpawner's servers get a slice
each too, written into its config as a lab without gpuspawner does (``FIXED_SLICE``), so
both start the same containers and the simulated NVIDIA hook runs on both sides.

The engine holds a fleet of ``--fleet`` stopped CPU-only containers first, like a lab's
history (benchmarks/engine_fleet.py makes and reuses them; 60% exited and 25% created with
gpuspawner's labels, 10% exited and 5% created without): GPUSpawner reads them all at each
spawn, DockerSpawner never looks.

Both hubs run their spawner under the same timing wrapper (benchmarks/spawn_timing.py), so
inside each hub it measures the same things the same way: ``start()`` from its call to the
container running (*inner*), the phases of that call, and the time until the server answers,
tried every 20 ms by the wrapper on both sides. ``start()`` returns only once the server
answers, so JupyterHub's readiness wait (exponential back-off with random waits of up to 5 s)
finds it at its first try and adds no random delay (``--readiness hub`` leaves the readiness
to JupyterHub, to see that delay). End to end is the REST API's ``POST`` of a server to the
hub reporting it ready.

1. Rounds: spawn + ready + stop + remove with GPUSpawner, then with DockerSpawner, the order
   swapped every other round so drift hits both alike. Medians of end to end and inner
   ``start()``, and the medians of the per-round differences. Goal: GPUSpawner's ``start()``
   at most 100 ms longer than DockerSpawner's (median).
2. For each N of ``--concurrent``: N users press Start at the same moment, on each hub in
   turn (the order alternates from one N to the next): wall time from the first POST to the
   last server ready, per-spawn medians, and GPUSpawner / DockerSpawner. Goal: <= 1.15.

    .venv/bin/python benchmarks/bench_spawn.py [--rounds 7] [--concurrent 20,40] [--fleet 1000]

Runs as root (the private engine makes a bridge). Everything it starts (engine, hubs, proxies,
servers' containers) is stopped and removed at the end, also after an error, Ctrl-C or
SIGTERM; the fleet stays, stopped, in the engine's data root for the next run
(``bench_core.py --engine --clean`` removes it).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:  # the heavy imports wait until a run: --help stays cheap
    from benchmarks.engine_fleet import Spec
    from tests.engine import PrivateEngine
    from tests.hub import RunningHub

REPO = Path(__file__).resolve().parents[1]
START_GOAL_MS = 100.0  # GPUSpawner's start() - DockerSpawner's, median
LOAD_GOAL = 1.15  # GPUSpawner / DockerSpawner under N concurrent spawns
PROFILE = "mig-1g"
SLICES_PER_GPU = 7
GPU, DOCKER = "GPUSpawner", "DockerSpawner"
TIMINGS_ENV = "GPUSPAWNER_BENCH_TIMINGS"  # as benchmarks/spawn_timing.py reads them
READY_ENV = "GPUSPAWNER_BENCH_READY"

#: Both hubs (after tests/hub.py's common config): a fresh container every spawn, the log
#: level of production, the timing wrapper importable, and time-outs that 40 servers booting
#: at once on a small machine stay within (the wrapper's readiness wait is inside start()).
COMMON = f"""\
import sys
sys.path.insert(0, {str(REPO)!r})
c.DockerSpawner.remove = True
c.JupyterHub.log_level = "INFO"
c.Spawner.start_timeout = 600
c.Spawner.http_timeout = 600
"""
SPAWNER_CLASS = {GPU: "benchmarks.spawn_timing.TimedGPUSpawner",
                 DOCKER: "benchmarks.spawn_timing.TimedDockerSpawner"}
#: DockerSpawner's servers get a MIG slice too, fixed per user as a lab without gpuspawner
#: writes it by hand (the k-th user of a burst the k-th slice), so both sides start the same
#: containers and the NVIDIA hook's work counts on both: the difference is gpuspawner's own.
FIXED_SLICE = f"""\
import re
import docker.types


def _fixed_slice(spawner):
    digits = re.findall(r"\\d+", spawner.user.name)
    k = int(digits[-1]) if digits else 0
    uuid = "MIG-%04x%04x-beef-4000-8000-000000000000" % divmod(k, {SLICES_PER_GPU})
    return {{"device_requests": [docker.types.DeviceRequest(
        driver="nvidia", device_ids=[uuid], capabilities=[["gpu"]])]}}


c.DockerSpawner.extra_host_config = _fixed_slice
"""


def sliced_host(gpus: int, slices: int = SLICES_PER_GPU) -> dict[str, Any]:
    """``gpus`` A100s each cut into ``slices`` 1g.10gb MIG devices: room for everyone."""
    return {
        "driver_version": "550.90.07",
        "cuda_version": "12.4",
        "gpus": [
            {
                "index": g,
                "uuid": f"GPU-{g:08x}-beef-4000-8000-000000000000",
                "name": "NVIDIA A100-SXM4-80GB",
                "memory_mib": 81920,
                "mig_mode": "enabled",
                "total_slices": 7,
                "mig_devices": [
                    {"index": m, "profile": "1g.10gb", "gi": 7 + m, "ci": 0,
                     "uuid": f"MIG-{g:04x}{m:04x}-beef-4000-8000-000000000000"}
                    for m in range(slices)
                ],
            }
            for g in range(gpus)
        ],
    }


# ------------------------------------------------------------------------------ the fleet


def history_specs(n: int) -> list[Spec]:
    """A lab's history: ``n`` stopped CPU-only containers, most of them gpuspawner's."""
    from benchmarks.engine_fleet import Spec

    specs = []
    for i in range(n):
        k = i % 100
        if k < 60:
            specs.append(Spec(i, "exited", True, None))
        elif k < 85:
            specs.append(Spec(i, "created", True, None))
        elif k < 95:
            specs.append(Spec(i, "exited", False, None))
        else:
            specs.append(Spec(i, "created", False, None))
    return specs


def remove_spawned(engine: PrivateEngine) -> int:
    """Remove every container but the fleet's (servers a killed run may have left)."""
    import docker.errors

    from benchmarks.engine_fleet import BENCH

    api = engine.client.api
    removed = 0
    for entry in api.containers(all=True):
        if (entry.get("Labels") or {}).get(BENCH) == "1":
            continue
        try:
            api.remove_container(entry["Id"], force=True, v=True)
            removed += 1
        except docker.errors.NotFound:
            pass
    return removed


# ------------------------------------------------------------------------------ CPU


def _cpu_of(pid: int | None) -> float:
    """User + system CPU seconds a process has used (0 when it is gone)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU time of the hubs' processes and of the engine (dockerd and its containerd): what
    the spawns cost, which other load on a shared machine does not change, unlike times."""

    def __init__(self, engine: PrivateEngine, hubs: dict[str, RunningHub]) -> None:
        self.hubs = {label: hub.process.pid if hub.process else None
                     for label, hub in hubs.items()}
        self.engine: list[int] = []
        try:
            dockerd = int(engine.paths.pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        self.engine.append(dockerd)
        for task in Path(f"/proc/{dockerd}/task").glob("*/children"):
            for child in task.read_text().split():
                if Path(f"/proc/{child}/comm").read_text().strip() == "containerd":
                    self.engine.append(int(child))

    def sample(self) -> dict[str, float]:
        out = {f"cpu {label}": _cpu_of(pid) for label, pid in self.hubs.items()}
        out["cpu engine"] = sum(_cpu_of(pid) for pid in self.engine)
        return out

    @staticmethod
    def spent(before: dict[str, float], after: dict[str, float], hub: str) -> dict[str, float]:
        """CPU of the hub ``hub`` and of the engine between two samples."""
        return {"cpu_hub": after[f"cpu {hub}"] - before[f"cpu {hub}"],
                "cpu_engine": after["cpu engine"] - before["cpu engine"]}


# ------------------------------------------------------------------------------ spawning


@dataclass
class Side:
    """One hub under test."""

    label: str
    hub: RunningHub
    profile: str | None
    timings: Path


@dataclass
class Spawn:
    """One spawn as the client saw it (wall-clock times, comparable with the hub's)."""

    user: str
    seconds: float = 0.0
    posted: float = 0.0
    answered: float = 0.0
    failure: str | None = None
    inner: dict[str, Any] | None = None  # the hub's record (benchmarks/spawn_timing.py)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds while it ran

    @property
    def ok(self) -> bool:
        return self.failure is None

    def get(self, key: str) -> float | None:
        """Seconds of one part of the spawn (None: not known)."""
        rec = self.inner
        if key == "e2e":
            return self.seconds if self.ok else None
        if key in self.cpu:
            return self.cpu[key]
        if rec is None:
            return None
        if key == "before":  # POST -> start() called: the hub's own work first
            return rec["called"] - self.posted
        if key == "after":  # server answering -> the hub saying so
            return self.answered - rec["ready"] if rec.get("ready") else None
        if key == "launched":  # POST -> Docker's start of the container returned
            if rec.get("started_s") is None:
                return None
            return rec["called"] + rec["started_s"] - self.posted
        if key == "boot":  # Docker's start of the container returned -> the server answers
            if rec.get("started_s") is None or rec.get("ready_s") is None:
                return None
            return rec["start_s"] - rec["started_s"] + rec["ready_s"]
        return rec.get(key)

    def phase(self, path: str) -> float:
        found = (self.inner or {}).get("phases", {}).get(path)
        return found[1] if found else 0.0


def _path(user: str) -> str:
    return f"/users/{quote(user)}/server"


def spawn_timed(side: Side, user: str, timeout: float = 300) -> Spawn:
    """POST the server and wait until the hub says it is ready.

    The hub answers 201 when the server became ready within its ``slow_spawn_timeout``
    (10 s); otherwise 202, and the progress stream ends at the moment it is ready. Neither
    needs polling, so the measurement neither lags nor loads the hub.
    """
    import requests

    from tests.hub import HubError

    hub, spawn = side.hub, Spawn(user)
    body = {"profile": side.profile} if side.profile is not None else None
    try:
        spawn.posted, started = time.time(), time.perf_counter()
        response = hub.api("POST", _path(user), json=body, timeout=timeout)
        if response.status_code not in (201, 202):
            raise HubError(f"refused: {response.status_code} {response.text[:200]}")
        if response.status_code == 202:
            hub.progress_messages(user, timeout=timeout)
        ended, spawn.answered = time.perf_counter(), time.time()
        deadline = time.monotonic() + timeout
        while True:  # the stream may end on failure, or just before the model says ready
            model = hub.server_model(user)
            if model and model.get("ready"):
                spawn.seconds = ended - started
                return spawn
            if not model or not model.get("pending"):
                raise HubError(f"failed:\n{hub.log_tail(30)}")
            if time.monotonic() > deadline:
                raise HubError(f"not ready in {timeout:.0f} s")
            time.sleep(0.05)
            ended, spawn.answered = time.perf_counter(), time.time()
    except (HubError, requests.RequestException) as exc:
        spawn.failure = str(exc).splitlines()[0] if str(exc) else repr(exc)
        return spawn


def stop_timed(hub: RunningHub, user: str, timeout: float = 120) -> float:
    """Seconds from the DELETE to the hub having no server (container stopped and removed)."""
    from tests.hub import HubError

    started = time.perf_counter()
    response = hub.api("DELETE", _path(user), timeout=timeout)
    if response.status_code not in (202, 204):
        raise HubError(f"stop of {user}: {response.status_code} {response.text}")
    deadline = time.monotonic() + timeout
    while hub.server_model(user) is not None:
        if time.monotonic() > deadline:
            raise HubError(f"{user} did not stop in {timeout:.0f} s")
        time.sleep(0.05)
    return time.perf_counter() - started


def _wide_pool(hub: RunningHub, size: int = 128) -> None:
    """Many threads share the hub's requests session: give them enough connections."""
    import requests.adapters

    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=size)
    hub.session.mount("http://", adapter)


def read_records(path: Path) -> list[dict[str, Any]]:
    import json

    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def attach(side: Side, spawns: list[Spawn], wait: float = 0.0) -> None:
    """Give each spawn the hub's record of it: same user, ``start()`` called while the
    client waited for that spawn. ``wait``: records may still come (``--readiness hub``)."""
    deadline = time.monotonic() + wait
    while True:
        records = read_records(side.timings)
        for spawn in spawns:
            if spawn.inner is not None:
                continue
            for rec in records:
                if (rec.get("user") == spawn.user and not rec.get("error")
                        and spawn.posted <= rec.get("called", 0) <= spawn.answered + 1):
                    spawn.inner = rec
        if all(s.inner is not None for s in spawns if s.ok) or time.monotonic() > deadline:
            return
        time.sleep(0.5)


# ------------------------------------------------------------------------------ statistics


def median_of(spawns: list[Spawn], key: str) -> float | None:
    values = [v for s in spawns if (v := s.get(key)) is not None]
    return statistics.median(values) if values else None


def paired_median(a: list[Spawn], b: list[Spawn], key: str) -> float | None:
    """Median of the differences a - b of spawns made one right after the other."""
    diffs = [x - y for sa, sb in zip(a, b, strict=True)
             if (x := sa.get(key)) is not None and (y := sb.get(key)) is not None]
    return statistics.median(diffs) if diffs else None


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f} s"


def _ms(seconds: float | None, signed: bool = False) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:+.0f} ms" if signed else f"{seconds * 1000:.0f} ms"


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(
        zip(cells, widths, strict=True))).rstrip()


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join([_row(header, widths), _row(["-" * w for w in widths], widths),
                      *(_row(r, widths) for r in rows)])


PARTS = [("e2e", "end to end"), ("before", "POST->start()"), ("start_s", "start()->running"),
         ("ready_s", "running->answers"), ("after", "answers->hub ready"),
         ("boot", "docker start->answers"), ("cpu_hub", "hub CPU"),
         ("cpu_engine", "dockerd CPU")]


#: Under load: when the containers were started, and how long their servers then took.
BURST_PARTS = [("before", "POST->start()"), ("launched", "POST->docker start done"),
               ("boot", "docker start->answers"), ("after", "answers->hub ready")]


def parts_table(results: dict[str, list[Spawn]], parts: list[tuple[str, str]] = PARTS) -> str:
    rows = [[label, *(_s(median_of(spawns, key)) for key, _ in parts)]
            for label, spawns in results.items()]
    return table(["medians", *(title for _, title in parts)], rows)


def phase_table(results: dict[str, list[Spawn]], max_depth: int = 9) -> str:
    """Per phase of ``start()``: the median over spawns of its time (a spawn that did not
    make the call counts 0) and the calls per spawn, for each side; nested phases indented.
    ``(thread)`` rows: Docker calls in the pool's thread, without the queue."""
    order: list[str] = []
    for spawns in results.values():
        for s in spawns:
            for path in (s.inner or {}).get("phases", {}):
                if path not in order:
                    order.append(path)
    order = ([p for p in order if not p.endswith("(thread)")]
             + sorted(p for p in order if p.endswith("(thread)")))
    rows = []
    labels = list(results)
    for path in order:
        depth = path.count("/")
        if depth > max_depth:
            continue
        cells = ["  " * depth + path.rsplit("/", 1)[-1]]
        for label in labels:
            spawns = [s for s in results[label] if s.inner]
            if not any(path in s.inner["phases"] for s in spawns):
                cells += ["", ""]
                continue
            cells.append(_ms(statistics.median(s.phase(path) for s in spawns)))
            calls = statistics.median((s.inner["phases"].get(path) or [0])[0] for s in spawns)
            cells.append(f"x{calls:g}")
        rows.append(cells)
    totals = ["start() -> running"]
    others = ["  not in a timed phase"]
    for label in labels:
        spawns = [s for s in results[label] if s.inner]
        totals += [_ms(median_of(spawns, "start_s")), ""]
        rest = [s.inner["start_s"] - sum(v[1] for p, v in s.inner["phases"].items()
                                         if "/" not in p and not p.endswith("(thread)"))
                for s in spawns]
        others += [_ms(statistics.median(rest)) if rest else "-", ""]
    header = ["phase of start() (median ms)"]
    for label in labels:
        header += [label, "calls"]
    return table(header, [totals, *rows, others])


# ------------------------------------------------------------------------------ the runs


def rounds(sides: list[Side], count: int, warmup: int,
           meter: CpuMeter) -> dict[str, list[Spawn]]:
    """Spawn, wait, stop, remove: A then B, B then A, ... (warm-up rounds not kept)."""
    from tests.hub import HubError

    kept: dict[str, list[Spawn]] = {side.label: [] for side in sides}
    stops: dict[str, list[float]] = {side.label: [] for side in sides}
    user_of = {GPU: "alt-gpu", DOCKER: "alt-docker"}
    for side in sides:
        side.hub.ensure_user(user_of[side.label])
    for number in range(warmup + count):
        order = sides if number % 2 == 0 else sides[::-1]
        done: dict[str, Spawn] = {}
        for side in order:
            before = meter.sample()
            spawn = spawn_timed(side, user_of[side.label])
            spawn.cpu = meter.spent(before, meter.sample(), side.label)
            if not spawn.ok:
                raise HubError(f"{side.label} spawn of {spawn.user} failed: {spawn.failure}")
            attach(side, [spawn], wait=10)
            done[side.label] = spawn
            stop = stop_timed(side.hub, user_of[side.label])
            if number >= warmup:
                kept[side.label].append(spawn)
                stops[side.label].append(stop)
        kind = "warm-up" if number < warmup else f"round {number - warmup + 1}/{count}"
        print(f"  {kind}: " + ", ".join(
            f"{label} {s.seconds:.2f} s (start() {_s(s.get('start_s'))}, then answers in "
            f"{_s(s.get('ready_s'))})" for label, s in done.items()), flush=True)
    print("  stop + remove medians: " + ", ".join(
        f"{label} {_s(statistics.median(v))}" for label, v in stops.items()), flush=True)
    return kept


def report_rounds(results: dict[str, list[Spawn]]) -> dict[str, Any]:
    gpu, docker = results[GPU], results[DOCKER]
    print(parts_table(results))
    for label, spawns in results.items():
        print(f"  {label} end to end: " + " ".join(f"{s.seconds:.2f}" for s in spawns))
        print(f"  {label} start():    " + " ".join(f"{s.get('start_s') or 0:.2f}"
                                                    for s in spawns))
    e2e_ratio = median_of(gpu, "e2e") / median_of(docker, "e2e")
    start_diff = median_of(gpu, "start_s") - median_of(docker, "start_s")
    paired = paired_median(gpu, docker, "start_s")
    print(f"end to end, GPUSpawner / DockerSpawner (medians): {e2e_ratio:.3f}; difference "
          f"{_ms(median_of(gpu, 'e2e') - median_of(docker, 'e2e'), True)} (median of the "
          f"rounds' differences {_ms(paired_median(gpu, docker, 'e2e'), True)})")
    verdict = "met" if start_diff * 1000 <= START_GOAL_MS else "MISSED"
    print(f"start() -> running, GPUSpawner - DockerSpawner: {_ms(start_diff, True)} "
          f"(difference of medians; median of the rounds' differences {_ms(paired, True)})  "
          f"goal <= +{START_GOAL_MS:.0f} ms: {verdict}")
    cpu = {key: median_of(gpu, key) - median_of(docker, key)
           for key in ("cpu_hub", "cpu_engine") if median_of(gpu, key) is not None}
    if cpu:
        print(f"CPU a spawn costs, GPUSpawner - DockerSpawner (medians): hub process "
              f"{_ms(cpu.get('cpu_hub'), True)}, dockerd + containerd "
              f"{_ms(cpu.get('cpu_engine'), True)}")
    outside = [g.get("start_s") - g.phase("_await_host") - d.get("start_s")
               for g, d in zip(gpu, docker, strict=True)
               if g.get("start_s") is not None and d.get("start_s") is not None]
    if outside and any(g.phase("_await_host") > 0.005 for g in gpu):
        print(f"  of which _await_host (a snapshot, only in the hub's first boot_timeout "
              f"seconds): {_ms(statistics.median(g.phase('_await_host') for g in gpu))}; "
              f"without it: {_ms(statistics.median(outside), True)} (median of the rounds)")
    print()
    print(phase_table(results))
    return {"e2e_ratio": e2e_ratio, "start_diff": start_diff}


@dataclass
class Burst:
    label: str
    users: int
    wall: float = 0.0
    spawns: list[Spawn] = field(default_factory=list)
    distinct_slices: int | None = None
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds of the whole burst

    @property
    def ok(self) -> list[Spawn]:
        return [s for s in self.spawns if s.ok]


def burst(side: Side, n: int, engine: PrivateEngine, meter: CpuMeter) -> Burst:
    """N users press Start at the same moment; then all are stopped (not timed)."""
    users = [f"{side.label[0].lower()}{n}-{k:02d}" for k in range(n)]
    for user in users:
        side.hub.ensure_user(user)
    gate = threading.Barrier(n + 1)
    found: list[Spawn] = []
    lock = threading.Lock()

    def press(user: str) -> None:
        gate.wait()
        spawn = spawn_timed(side, user)
        with lock:
            found.append(spawn)

    threads = [threading.Thread(target=press, args=(u,), daemon=True) for u in users]
    for thread in threads:
        thread.start()
    gate.wait()
    started, before = time.perf_counter(), meter.sample()
    for thread in threads:
        thread.join()
    result = Burst(side.label, n, time.perf_counter() - started, found,
                   cpu=meter.spent(before, meter.sample(), side.label))
    attach(side, found, wait=30)
    if side.label == GPU:
        wanted = set(users)
        uuids = [c.labels.get("ds01.gpu.uuids")
                 for c in engine.client.containers.list(filters={"label": "ds01.managed"})
                 if c.labels.get("ds01.user") in wanted]
        result.distinct_slices = len(set(uuids) - {None})
    stoppers = [threading.Thread(target=stop_timed, args=(side.hub, s.user), daemon=True)
                for s in found if s.ok]
    for thread in stoppers:
        thread.start()
    for thread in stoppers:
        thread.join()
    remove_spawned(engine)
    return result


def report_burst(n: int, bursts: dict[str, Burst]) -> dict[str, float | None]:
    rows = []
    for label, b in bursts.items():
        ok = b.ok
        rows.append([label, _s(b.wall), _s(median_of(ok, "e2e")),
                     _s(min(s.seconds for s in ok) if ok else None),
                     _s(max(s.seconds for s in ok) if ok else None),
                     _s(median_of(ok, "start_s")), _s(median_of(ok, "ready_s")),
                     f"{len(ok)}/{n}", _s(b.cpu.get("cpu_hub")), _s(b.cpu.get("cpu_engine"))])
    print(table(["spawner", "wall (all ready)", "e2e median", "min", "max",
                 "start() median", "answers median", "ready", "hub CPU", "dockerd CPU"], rows))
    print()
    print(parts_table({label: b.ok for label, b in bursts.items()}, BURST_PARTS))
    for b in bursts.values():
        for spawn in [s for s in b.spawns if not s.ok][:5]:
            print(f"  {b.label} failed: {spawn.user}: {spawn.failure}")
        if b.distinct_slices is not None:
            print(f"  {b.label}: {len(b.ok)} servers on {b.distinct_slices} distinct "
                  "1g.10gb slices")
    gpu, docker = bursts.get(GPU), bursts.get(DOCKER)
    out: dict[str, float | None] = {"wall": None, "median": None}
    if gpu and docker and gpu.ok and docker.ok:
        out["wall"] = gpu.wall / docker.wall
        out["median"] = median_of(gpu.ok, "e2e") / median_of(docker.ok, "e2e")
        inner = median_of(gpu.ok, "start_s") / median_of(docker.ok, "start_s")
        for what in ("wall", "median"):
            verdict = "met" if out[what] <= LOAD_GOAL else "MISSED"
            name = "wall time" if what == "wall" else "per-spawn end-to-end median"
            print(f"N={n} {name}, GPUSpawner / DockerSpawner: {out[what]:.3f}  "
                  f"goal <= {LOAD_GOAL:.2f}: {verdict}")
        print(f"N={n} per-spawn start() median, GPUSpawner / DockerSpawner: {inner:.3f} "
              f"({_ms(median_of(gpu.ok, 'start_s') - median_of(docker.ok, 'start_s'), True)})")
        if gpu.cpu and docker.cpu:
            print(f"N={n} CPU of the burst, GPUSpawner - DockerSpawner: hub process "
                  f"{gpu.cpu['cpu_hub'] - docker.cpu['cpu_hub']:+.1f} s, dockerd + containerd "
                  f"{gpu.cpu['cpu_engine'] - docker.cpu['cpu_engine']:+.1f} s (per spawn: "
                  f"{_ms((gpu.cpu['cpu_hub'] - docker.cpu['cpu_hub']) / n, True)}, "
                  f"{_ms((gpu.cpu['cpu_engine'] - docker.cpu['cpu_engine']) / n, True)})")
    print()
    print(phase_table({label: b.ok for label, b in bursts.items()}, max_depth=2))
    return out


# ------------------------------------------------------------------------------ main


@contextmanager
def interrupted_as_keyboard() -> Iterator[None]:
    """SIGTERM runs the same clean-up as Ctrl-C: nothing this started may be left running."""
    def raise_interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _step(what: str, action: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    print(f"{what} ...", end=" ", flush=True)
    result = action()
    print(f"{time.perf_counter() - started:.1f} s", flush=True)
    return result


def _command(argv: list[str]) -> str:
    env = os.environ.get("GPUSPAWNER_TEST_ROOT")
    python = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) \
        else sys.executable
    line = shlex.join([python, "benchmarks/bench_spawn.py", *argv])
    return (f"GPUSPAWNER_TEST_ROOT={shlex.quote(env)} " if env else "") + line


def run(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from benchmarks import engine_fleet as fleet
    from tests import gpusim
    from tests.engine import EnginePaths, PrivateEngine
    from tests.hub import RunningHub
    from tests.images import ensure_base_image, ensure_singleuser_image

    root = fleet.engine_root()
    engine = PrivateEngine(EnginePaths.under(root))
    workdir = Path(tempfile.mkdtemp(prefix="bench-spawn-"))
    hubs: list[RunningHub] = []
    summary: list[str] = []
    try:
        _step(f"starting the private engine under {root} ({engine.base_url})", engine.start)
        left = remove_spawned(engine)  # left by an earlier run that was killed
        if left:
            print(f"removed {left} containers an earlier run left")
        gpus = max(1, math.ceil(max([1, *args.concurrent]) / SLICES_PER_GPU))
        gpusim.install(sliced_host(gpus), engine.state_path)
        image = _step("single-user image", lambda: ensure_singleuser_image(engine.client))
        base = ensure_base_image(engine.client)
        made = fleet.ensure(engine.client.api, base, history_specs(args.fleet), args.workers)
        print(f"fleet: {args.fleet} stopped CPU-only containers in {made.seconds:.1f} s "
              f"(reused {made.reused}, created {made.created}, started {made.started}, removed "
              f"{made.removed}); other containers: {made.others}", flush=True)
        print(f"  mix: {fleet.describe_mix(history_specs(args.fleet))}", flush=True)
        total = len(engine.client.api.containers(all=True))
        print(f"simulated host: {gpus} GPUs x {SLICES_PER_GPU} 1g.10gb; {total} containers on "
              "the engine", flush=True)

        sides = []
        for label, profile in ((GPU, PROFILE), (DOCKER, None)):
            folder = workdir / label.lower()
            timings = folder / "timings.jsonl"
            config = COMMON + f"c.JupyterHub.spawner_class = {SPAWNER_CLASS[label]!r}\n"
            if label == DOCKER:
                config += FIXED_SLICE
            hub = RunningHub(engine, image, folder, config_extra=config,
                             env_extra={TIMINGS_ENV: str(timings), READY_ENV: args.readiness})
            hubs.append(hub)
            sides.append(Side(label, hub, profile, timings))
        _step("starting two hubs", lambda: [h.start() for h in hubs])
        for hub in hubs:
            _wide_pool(hub)
        meter = CpuMeter(engine, {side.label: side.hub for side in sides})

        print(f"\n== {args.rounds} rounds (+{args.warmup} warm-up), one spawn at a time: spawn "
              f"+ ready + stop + remove; GPUSpawner profile {PROFILE}; readiness: "
              f"{args.readiness}", flush=True)
        found = rounds(sides, args.rounds, args.warmup, meter)
        print()
        got = report_rounds(found)
        summary.append(f"rounds: start() GPUSpawner - DockerSpawner "
                       f"{_ms(got['start_diff'], True)} (goal <= +{START_GOAL_MS:.0f} ms); "
                       f"end to end ratio {got['e2e_ratio']:.3f}")

        for index, n in enumerate(args.concurrent):
            order = sides if index % 2 == 0 else sides[::-1]
            print(f"\n== {n} users press Start at once, on each hub in turn "
                  f"({' then '.join(s.label for s in order)})", flush=True)
            bursts: dict[str, Burst] = {}
            for side in order:
                bursts[side.label] = burst(side, n, engine, meter)
                b = bursts[side.label]
                print(f"  {side.label}: {len(b.ok)}/{n} ready in {b.wall:.2f} s", flush=True)
            print()
            ratios = report_burst(n, {label: bursts[label] for label in (GPU, DOCKER)})
            if ratios["wall"] is not None:
                summary.append(f"N={n}: wall ratio {ratios['wall']:.3f}, per-spawn median "
                               f"ratio {ratios['median']:.3f} (goal <= {LOAD_GOAL:.2f})")
        print("\n== summary")
        for line in summary:
            print(f"  {line}")
        print(f"command: {_command(args.argv)}")
        return 0
    finally:
        for hub in reversed(hubs):
            hub.stop()
        try:
            remove_spawned(engine)
        except Exception:  # the engine may never have started; stop() copes with that
            pass
        engine.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if any(c < 0 for c in counts):
        raise argparse.ArgumentTypeError("counts cannot be negative")
    return [c for c in counts if c > 0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds one at a time (default 7)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="unrecorded rounds first: cold caches are not what we compare")
    parser.add_argument("--concurrent", type=_counts, default=[20, 40],
                        help="users pressing Start at once, e.g. 20,40 (0: none; default 20,40)")
    parser.add_argument("--fleet", type=int, default=1000,
                        help="stopped containers on the engine first (default 1000)")
    parser.add_argument("--readiness", choices=["wrapper", "hub"], default="wrapper",
                        help="who waits for the server to answer: the timing wrapper, every "
                             "20 ms on both sides (default), or JupyterHub's back-off")
    parser.add_argument("--workers", type=int, default=4,
                        help="fleet containers created/started at a time (default 4)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.rounds < 1 or args.fleet < 0:
        parser.error("--rounds must be at least 1 and --fleet at least 0")
    if os.geteuid() != 0:
        print("bench_spawn: run as root (the private Docker engine makes a bridge)",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    with interrupted_as_keyboard():
        try:
            return run(args)
        except KeyboardInterrupt:
            print("\ninterrupted; everything started was stopped", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
