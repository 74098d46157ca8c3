"""Ledger read and allocation decision on a big host: 8 GPUs x 7 slices, 1,000 containers.

The containers are faked at the Docker API boundary: ``containers(all=True)`` returns the
JSON that a Docker 20.10+ engine returns for such a list (decoded from text on every call, as
the HTTP client would), and ``inspect_container`` the HostConfig of each. The ledger, labels,
allocator and snapshot code under test are the real ones.

    .venv/bin/python benchmarks/bench_core.py [--containers 1000] [--repeat 50]

``--engine`` measures the ledger against a real engine instead: the tests' private ``dockerd``
with the GPU simulator (tests/engine.py, tests/gpusim on a100x4) holding N real containers
made from the tests' offline base image (benchmarks/engine_fleet.py: the mix, how they are
made and reused). In one run it times cold ``Ledger.read``s (a new Ledger each, ``--cold``,
default 3), each beside the bound: one list call and one inspect per container, in turn; then
R steady reads on the same Ledger, each right after a plain ``containers(all=True)``. Ratios
are medians of those pairs, so the drift of a busy machine hits both sides alike; the CPU time
of this process (the client side) is shown too. Goals: steady <= 1.2 x the list call; cold <=
the list call plus N inspects in turn. The API calls are ``Reading.api_calls`` and, as a
check, the calls counted at the client.

    .venv/bin/python benchmarks/bench_core.py --engine [--containers 1000] [--repeat 21]
    .venv/bin/python benchmarks/bench_core.py --engine --clean   # remove them, stop the engine

Runs as root (the engine makes a bridge). The engine lives under ``GPUSPAWNER_TEST_ROOT``
(default /var/lib/gpuspawner-bench, never the tests' own); it is stopped at the end of each
run and its containers stay in its data root, so the next run reuses them (creating 1,000 the
first time takes minutes on a small machine); the running ones are started again.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpuspawner import allocator, labels  # noqa: E402
from gpuspawner.inventory import parse_topology  # noqa: E402
from gpuspawner.ledger import Ledger, connect  # noqa: E402
from gpuspawner.policy import Policy  # noqa: E402
from gpuspawner.snapshot import Snapshot  # noqa: E402

NOW = datetime.now(timezone.utc)


def topology(gpus: int = 8) -> dict:
    return {
        "driver_version": "550.90.07",
        "gpus": [
            {
                "index": g,
                "uuid": f"GPU-{g:08x}-0000-0000-0000-000000000000",
                "name": "NVIDIA A100-SXM4-80GB",
                "memory_mib": 81920,
                "mig_mode": "enabled",
                "total_slices": 7,
                "mig_devices": [
                    {
                        "index": m,
                        "profile": "1g.10gb",
                        "gi": 7 + m,
                        "ci": 0,
                        "uuid": f"MIG-{g:04x}{m:04x}-0000-0000-0000-000000000000",
                    }
                    for m in range(7)
                ],
            }
            for g in range(gpus)
        ],
    }


class FakeAPI:
    """The two Docker API calls the ledger makes, answering as a real engine would."""

    base_url = "http+docker://fake"

    def __init__(self, listing: list[dict], inspects: dict[str, dict]) -> None:
        self._listing = json.dumps(listing)
        self._inspects = {k: json.dumps(v) for k, v in inspects.items()}
        self.calls = 0

    def containers(self, all: bool = False) -> list[dict]:  # noqa: A002 - Docker's name
        self.calls += 1
        return json.loads(self._listing)

    def inspect_container(self, cid: str) -> dict:
        self.calls += 1
        return json.loads(self._inspects[cid])


def world(n: int, inventory) -> FakeAPI:
    listing, inspects = [], {}
    migs = list(inventory.migs)
    for i in range(n):
        cid = f"{i:064x}"
        user = f"student{i % 300:03d}"
        status, labelset, requests = "running", {}, []
        finished = (NOW - timedelta(minutes=i % 50 + 2)).isoformat()
        if i < len(migs) - 6:  # most slices held by managed servers
            mig = migs[i]
            status = "running" if i % 3 else "exited"
            labelset = labels.encode(
                hub="lab",
                user=user,
                server="",
                profile="mig-1g",
                created_at=NOW,
                slots=[mig.slot],
                uuids=[mig.uuid],
                parent_uuids=[mig.parent_uuid],
                gis=[mig.gi],
                gpu_profile=mig.profile,
                equivalents=mig.equivalents,
                ports={"ssh": 40000 + i},
            )
            requests = [
                {
                    "Driver": "nvidia",
                    "DeviceIDs": [mig.uuid],
                    "Capabilities": [["gpu"]],
                    "Count": 0,
                    "Options": {},
                }
            ]
        elif i < 600:  # CPU-only servers
            labelset = labels.encode(
                hub="lab", user=user, server=f"s{i}", profile="cpu", created_at=NOW
            )
            status = "running" if i % 2 else "exited"
        else:  # everything else on the host: databases, builds, other people's tools
            labelset = {"com.example.app": f"svc{i}"}
        listing.append(
            {
                "Id": cid,
                "Names": [f"/c{i}"],
                "Image": "img",
                "Labels": labelset,
                "State": status,
                "Status": "Up 2 hours"
                if status == "running"
                else f"Exited (0) {i % 50 + 2} minutes ago",
                "Created": int(NOW.timestamp()) - 3600,
                "Ports": [
                    {"IP": "127.0.0.1", "PrivatePort": 8888, "PublicPort": 30000 + i, "Type": "tcp"}
                ]
                if status == "running"
                else [],
            }
        )
        inspects[cid] = {
            "Id": cid,
            "State": {"Status": status, "FinishedAt": finished},
            "HostConfig": {"DeviceRequests": requests or None, "Runtime": "runc"},
            "Config": {"Env": ["PATH=/usr/bin"]},
        }
    return FakeAPI(listing, inspects)


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def fake_mode(args: argparse.Namespace) -> None:
    inventory = parse_topology(topology(args.gpus), "bench")
    api = world(args.containers, inventory)
    policy = Policy.default()
    ledger = Ledger(api, start_timeout=120)

    api.calls = 0
    start = time.perf_counter()
    first = ledger.read(policy.hold_seconds)
    cold = time.perf_counter() - start
    cold_calls = api.calls
    api.calls = 0
    warm = timed(lambda: ledger.read(policy.hold_seconds), args.repeat)
    warm_calls = api.calls / args.repeat

    snap = Snapshot(inventory, first.allocations, policy, first.bound_ports, NOW)
    limits = policy.for_user("newcomer").limits
    request = allocator.Request("newcomer", mig_profile="1g.10gb")
    decisions = timed(lambda: snap.choose(request), args.repeat * 4)
    result = snap.choose(request)
    render = timed(snap.to_json, max(5, args.repeat // 5))

    held = sum(1 for a in first.allocations if a.holds and a.uuids)
    print(
        f"host: {args.gpus} GPUs x 7 MIG slices; {args.containers} containers, "
        f"{len(first.allocations)} allocations ({held} holding a slice)"
    )
    print(f"ledger read, cold (list + inspects): {cold * 1000:8.2f} ms, {cold_calls} API calls")
    print(
        f"ledger read, steady state (median):  {statistics.median(warm) * 1000:8.2f} ms, "
        f"{warm_calls:.0f} API call(s)"
    )
    print(
        f"allocation decision (median):        {statistics.median(decisions) * 1000:8.3f} ms "
        f"-> {result.describe() if hasattr(result, 'describe') else result.message}"
    )
    print(f"snapshot to JSON (median):           {statistics.median(render) * 1000:8.2f} ms")
    print(
        f"ratio decision / steady ledger read: "
        f"{statistics.median(decisions) / statistics.median(warm):.3f}"
    )
    assert limits is not None


# ------------------------------------------------------------------ against a real engine

STEADY_GOAL = 1.2  # steady read <= 1.2 x one containers(all=True)
COLD_GOAL = 1.0  # cold read <= one list + one inspect per container, one after the other


class CountingAPI:
    """The real APIClient, counting what the ledger asks of it (a check on Reading.api_calls,
    and which containers a steady read inspects). Thread-safe: cold reads inspect in parallel."""

    def __init__(self, api: Any) -> None:
        self._api = api
        self._lock = threading.Lock()
        self.lists = 0
        self.inspected: list[str] = []

    @property
    def base_url(self) -> str:
        return self._api.base_url

    def reset(self) -> None:
        with self._lock:
            self.lists, self.inspected = 0, []

    def containers(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self.lists += 1
        return self._api.containers(*args, **kwargs)

    def inspect_container(self, cid: str) -> Any:
        with self._lock:
            self.inspected.append(cid)
        return self._api.inspect_container(cid)

    @property
    def calls(self) -> int:
        return self.lists + len(self.inspected)


def _ago(status_text: str) -> str:
    """ "Exited (0) 5 minutes ago" -> "Exited ... minutes ago": the unit the ledger checks."""
    words = status_text.split()
    if status_text.startswith("Exited") and words[-1:] == ["ago"]:
        unit = words[-2].rstrip("s")
        return f"Exited ... {'seconds' if unit == 'second' else unit + 's'} ago"
    return status_text or "?"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:10.1f} ms"


def _command(args: argparse.Namespace) -> str:
    env = os.environ.get("GPUSPAWNER_TEST_ROOT")
    python = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) \
        else sys.executable
    argv = [python, "benchmarks/bench_core.py", "--engine", "--containers",
            str(args.containers), "--repeat", str(args.repeat), "--cold", str(args.cold)]
    return (f"GPUSPAWNER_TEST_ROOT={shlex.quote(env)} " if env else "") + shlex.join(argv)


def engine_mode(args: argparse.Namespace) -> None:
    from benchmarks import engine_fleet as fleet
    from tests.engine import EnginePaths, PrivateEngine
    from tests.gpusim import Simulator
    from tests.images import ensure_base_image

    root = fleet.engine_root()
    engine = PrivateEngine(EnginePaths.under(root))
    print(f"engine: private dockerd under {root} ({engine.base_url})", flush=True)
    began = time.perf_counter()
    engine.start()
    try:
        if args.clean:
            removed = fleet.remove_all(engine.client.api, args.workers)
            print(f"removed {removed} bench containers; stopping the engine")
            return
        sim = Simulator(engine.state_path, engine.hook_log)
        state = sim.install(fleet.TOPOLOGY)
        image = ensure_base_image(engine.client)
        print(f"engine up, simulator on {fleet.TOPOLOGY}, image {image} "
              f"({time.perf_counter() - began:.1f} s)", flush=True)
        migs, whole = fleet.devices_of(state)
        specs = fleet.plan(args.containers, migs, whole)
        made = fleet.ensure(engine.client.api, image, specs, args.workers)
        print(f"fleet: {args.containers} containers in {made.seconds:.1f} s (reused "
              f"{made.reused}, created {made.created}, started {made.started}, removed "
              f"{made.removed}; {args.workers} at a time); other containers: {made.others}")
        print(f"  mix: {fleet.describe_mix(specs)}", flush=True)
        measure(engine, args)
    finally:
        engine.stop()


class Timer:
    """Wall and this process's CPU time of one call (CPU: the client side, which the other
    load on a shared machine disturbs much less than the engine's answer times)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __call__(self, fn: Callable[[], Any]) -> Any:
        cpu, start = time.process_time(), time.perf_counter()
        result = fn()
        self.wall.append(time.perf_counter() - start)
        self.cpu.append(time.process_time() - cpu)
        return result

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def min(self) -> float:
        return min(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)


def _paired(top: list[float], bottom: list[float]) -> float:
    """Median of the ratios of pairs taken one right after the other: on a shared machine
    the engine's speed drifts between pairs far more than within one."""
    return statistics.median(t / b for t, b in zip(top, bottom, strict=True))


def measure(engine: Any, args: argparse.Namespace) -> None:
    # The product's own client (connect: docker-py's default pool of 10 connections).
    api = connect(engine.base_url, timeout=120).api
    policy = Policy.default()
    hold = policy.hold_seconds
    listing = api.containers(all=True)  # warm-up: the engine's and the client's
    n = len(listing)
    ids = [e["Id"] for e in listing]
    listed = {e["Id"]: (e.get("State"), e.get("Status"), e.get("Labels") or {}) for e in listing}

    def bound_pass() -> None:
        """The bound for a cold read: one list, then one inspect per container, in turn."""
        api.containers(all=True)
        for cid in ids:
            api.inspect_container(cid)

    # 1. Cold reads (each on a new Ledger), each paired with a bound pass; the order within
    # a pair alternates so that drift favours neither.
    counting = CountingAPI(api)
    cold, bound = Timer(), Timer()
    cold_calls: list[str] = []
    cold_again: Counter[str] = Counter()  # inspected twice in one cold read: listed statuses
    ledger = Ledger(counting, start_timeout=120)
    for k in range(args.cold):
        if k % 2:
            bound(bound_pass)
        counting.reset()
        ledger = Ledger(counting, start_timeout=120)
        first = cold(functools.partial(ledger.read, hold))
        cold_calls.append(f"{first.api_calls} / {counting.calls}")
        cold_again.update(_ago(listed.get(cid, ("?", "?", {}))[1])
                          for cid, times in Counter(counting.inspected).items() if times > 1)
        if not k % 2:
            bound(bound_pass)

    # 2. Steady reads on the last of those Ledgers, each right after a plain list call.
    lists, steady = Timer(), Timer()
    steady_calls: Counter[int] = Counter()
    counted_calls: Counter[int] = Counter()
    reinspected: Counter[str] = Counter()
    reading = first
    for _ in range(args.repeat):
        lists(lambda: api.containers(all=True))
        counting.reset()
        reading = steady(lambda: ledger.read(hold))
        steady_calls[reading.api_calls] += 1
        counted_calls[counting.calls] += 1
        reinspected.update(counting.inspected)

    states = Counter(a.state for a in reading.allocations)
    holding = sum(1 for a in reading.allocations if a.holds and (a.uuids or a.gpu_count))
    print(f"ledger: {reading.containers} containers listed, {len(reading.allocations)} "
          f"allocations ({', '.join(f'{k} {v}' for k, v in sorted(states.items()))}); "
          f"{holding} holding a device; {len(reading.bound_ports)} published ports")

    def calls(counter: Counter[int]) -> str:
        return ", ".join(f"{k}" + (f" (x{v})" if len(counter) > 1 else "")
                         for k, v in sorted(counter.items()))

    def row(what: str, timer: Timer, note: str) -> None:
        print(f"{what:44} {_ms(timer.median)} {_ms(timer.min)} {_ms(timer.cpu_median)}   {note}")

    print()
    print(f"{'measure':44} {'median':>13} {'min':>13} {'CPU here':>13}   "
          "API calls (Reading / counted)")
    row(f"containers(all=True), x{args.repeat}", lists, "1")
    row(f"Ledger.read steady (same Ledger), x{args.repeat}", steady,
        f"{calls(steady_calls)} / {calls(counted_calls)}")
    row(f"Ledger.read cold (new Ledger), x{args.cold}", cold, "; ".join(cold_calls))
    row(f"bound: list + {n} inspects in turn, x{args.cold}", bound,
        f"{1 + n}  ({(bound.median - lists.median) / n * 1000:.2f} ms an inspect)")
    print()
    steady_ratio = _paired(steady.wall, lists.wall)
    cold_ratio = _paired(cold.wall, bound.wall)
    print(f"steady / list               {steady_ratio:5.2f}   goal <= {STEADY_GOAL:.2f}  "
          f"{'met' if steady_ratio <= STEADY_GOAL else 'NOT MET'}   (median of {args.repeat} "
          f"paired ratios; of medians {steady.median / lists.median:.2f})")
    print(f"cold / (list + N inspects)  {cold_ratio:5.2f}   goal <= {COLD_GOAL:.2f}  "
          f"{'met' if cold_ratio <= COLD_GOAL else 'NOT MET'}   (median of {args.cold} paired "
          f"ratios; of medians {cold.median / bound.median:.2f}; "
          f"ledger concurrency {Ledger.concurrency})")
    print(f"client CPU a steady read adds to its list call: "
          f"{(steady.cpu_median - lists.cpu_median) * 1000:.0f} ms "
          f"({(steady.cpu_median - lists.cpu_median) / n * 1e6:.0f} us a container)")
    if cold_again:
        print(f"cold reads inspected {sum(cold_again.values())} container(s) twice "
              f"(over {args.cold} reads), by their listed status: "
              + ", ".join(f"{k} {v}" for k, v in cold_again.most_common()))
    if reinspected:
        print(f"steady reads inspected {len(reinspected)} container(s) again:")
        for cid, times in reinspected.most_common(10):
            status, text, found = listed.get(cid, ("?", "?", {}))
            print(f"  {cid[:12]} x{times}: {status} {text!r} "
                  f"{found.get('gpuspawner.bench.role', '')}")
    print()
    print(f"command: {_command(args)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--containers", type=int, default=1000)
    parser.add_argument("--gpus", type=int, default=8, help="fake mode: GPUs of the fake host")
    parser.add_argument("--repeat", type=int, default=None,
                        help="repeats of each timed call (default 50; --engine: 21)")
    parser.add_argument("--engine", action="store_true",
                        help="measure the ledger against real containers on a private engine")
    parser.add_argument("--cold", type=int, default=3,
                        help="--engine: cold reads, each on a new Ledger (default 3)")
    parser.add_argument("--workers", type=int, default=4,
                        help="--engine: containers created/started at a time (default 4)")
    parser.add_argument("--clean", action="store_true",
                        help="--engine: remove the bench containers and stop the engine")
    args = parser.parse_args()
    if args.repeat is None:
        args.repeat = 21 if args.engine else 50
    if args.repeat < 1 or args.cold < 1:
        parser.error("--repeat and --cold must be at least 1")
    if args.clean and not args.engine:
        parser.error("--clean goes with --engine")
    if args.engine:
        engine_mode(args)
    else:
        fake_mode(args)


if __name__ == "__main__":
    main()
