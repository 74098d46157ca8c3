"""One read of every GPU host against the slowest single host's read, in the same run.

Three private Docker engines (tests/engine.py) run side by side on this machine, each with its
own simulated host (tests/gpusim ``a100x4``) and its own fleet of ``--containers`` containers
(benchmarks/engine_fleet.py: the same mix as ``bench_core.py --engine``, running servers and
slice holders among a lab's stopped history), kept in the engines' data roots for the next
run. Each host is read by its own ``hosts.HostReader``: a full Docker list and its GPUs
through a probe container, the probe kept between reads as in production (``PROBE_TTL``), so
what is timed is what a page load or a spawn's plan costs per host.

Rounds alternate: each host alone, one after another, then all three at once
(``hosts.read_all``); the figure is the median over rounds of (all at once) / (slowest of the
three alone in that round). Goal: <= 1.3.

The same rounds time a spawn's read of every host, as ``GPUSpawner._read_hosts`` makes it to
choose a host: what runs and what was made lately listed, the older stopped containers from
the reader's last full list (``stopped_max_age``), all hosts at once on a pool.

On this machine the three engines share its cores, so a read of all three competes for CPU
that three real hosts would not share: the plain figure is an upper bound. With
``--engine-cpus F`` each engine's dockerd runs in a CPU cgroup of its own, capped at F cores
(cgroup v1 ``cpu.cfs_quota_us``, or v2 ``cpu.max``), as if each host had its own F cores:
with ``3 * F`` below the machine's cores the engines no longer take CPU from each other, and
what three reads at once still share is the hub's own process, which is what the goal is
about. The hub is not capped.

    .venv/bin/python benchmarks/bench_hosts.py [--containers 1000] [--rounds 9] [--engine-cpus 0.5]

Runs as root (each engine makes a bridge). The engines are stopped at the end, also after an
error or Ctrl-C; their fleets stay, stopped, under ``GPUSPAWNER_TEST_ROOT`` (default
/var/lib/gpuspawner-hosts-bench).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GOAL = 1.3
NAMES = ("gpu1", "gpu2", "gpu3")
DEFAULT_ROOT = "/var/lib/gpuspawner-hosts-bench"


def _engines() -> list[Any]:
    from tests.engine import EnginePaths, PrivateEngine

    root = Path(os.environ.get("GPUSPAWNER_TEST_ROOT") or DEFAULT_ROOT)
    first = EnginePaths.under(root)
    paths = [first, first.beside("remote-h100"), first.beside("cpu-host")]
    return [PrivateEngine(p, nvidia_runtime=True) for p in paths]


CGROUP_V1 = Path("/sys/fs/cgroup/cpu")
CGROUP_V2 = Path("/sys/fs/cgroup")


def cap_cpu(name: str, pid: int, cpus: float) -> Path:
    """Puts ``pid`` (a dockerd) into a CPU cgroup of its own, capped at ``cpus`` cores; returns
    the group, which ``uncap`` removes. Threads it starts later stay in the group. The
    period is 10 ms, so a read of a few hundred ms is slowed evenly, not stopped in 100 ms
    steps at the kernel's default period."""
    period = 10_000
    quota = max(1000, int(cpus * period))
    if (CGROUP_V1 / "cpu.cfs_quota_us").exists() or (CGROUP_V1 / "tasks").exists():
        group = CGROUP_V1 / f"gpuspawner-bench-{name}"
        group.mkdir(exist_ok=True)
        (group / "cpu.cfs_period_us").write_text(str(period))
        (group / "cpu.cfs_quota_us").write_text(str(quota))
    else:
        group = CGROUP_V2 / f"gpuspawner-bench-{name}"
        group.mkdir(exist_ok=True)
        (group / "cpu.max").write_text(f"{quota} {period}")
    (group / "cgroup.procs").write_text(str(pid))
    return group


def uncap(group: Path) -> None:
    """Moves the group's processes back to the root group and removes the group."""
    root = group.parent / "cgroup.procs"
    for pid in (group / "cgroup.procs").read_text().split():
        try:
            root.write_text(pid)
        except OSError:
            pass  # exited since
    try:
        group.rmdir()
    except OSError as error:
        print(f"could not remove {group}: {error}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from benchmarks import engine_fleet as fleet
    from gpuspawner import hosts
    from gpuspawner.policy import Policy
    from tests.gpusim import Simulator
    from tests.images import ensure_base_image

    engines = _engines()
    readers = []
    groups: list[Path] = []
    try:
        for number, (name, engine) in enumerate(zip(NAMES, engines, strict=True), start=1):
            began = time.perf_counter()
            engine.start()
            state = Simulator(engine.state_path, engine.hook_log).install(fleet.TOPOLOGY)
            image = ensure_base_image(engine.client)
            migs, whole = fleet.devices_of(state)
            made = fleet.ensure(engine.client.api, image,
                                fleet.plan(args.containers, migs, whole), args.workers,
                                host_ip=f"127.0.0.{number}")
            print(f"{name}: engine under {engine.paths.data_root}, {args.containers} "
                  f"containers (created {made.created}, reused {made.reused}) in "
                  f"{time.perf_counter() - began:.1f} s", flush=True)
            if args.engine_cpus:
                assert engine._proc is not None
                groups.append(cap_cpu(name, engine._proc.pid, args.engine_cpus))
            readers.append(hosts.HostReader(hosts.Host(name, engine.base_url), image=image,
                                            hub_id=fleet.HUB, policy=Policy.default,
                                            start_timeout=60))
        alone: dict[str, list[float]] = {name: [] for name in NAMES}
        slowest_alone: list[float] = []  # per round: the slowest of the three alone
        together: list[float] = []
        ratios: list[float] = []
        cpu_alone: list[float] = []  # this process's CPU for the three reads one by one
        cpu_together: list[float] = []
        spawn_alone: list[float] = []  # a spawn's read: slowest host alone, all at once
        spawn_together: list[float] = []
        spawn_ratios: list[float] = []

        def spawn_read(reader: Any) -> Any:
            return reader.read(stopped_max_age=300.0)
        with ThreadPoolExecutor(len(readers)) as pool:
            views = hosts.read_all(readers, pool, timeout=120)  # warm: probes, inspects
            bad = [v.down for v in views if not v.up]
            if bad:
                print("a host did not answer: " + "; ".join(bad), file=sys.stderr)
                return 1
            for _round in range(args.rounds):
                slowest = 0.0
                cpu = time.process_time()
                for reader in readers:
                    began = time.perf_counter()
                    snap = reader.read()
                    took = time.perf_counter() - began
                    alone[reader.host.name].append(took)
                    slowest = max(slowest, took)
                    assert len(snap.allocations) > 0
                cpu_alone.append(time.process_time() - cpu)
                slowest_alone.append(slowest)
                cpu, began = time.process_time(), time.perf_counter()
                views = hosts.read_all(readers, pool, timeout=120)
                took = time.perf_counter() - began
                cpu_together.append(time.process_time() - cpu)
                assert all(v.up for v in views)
                together.append(took)
                ratios.append(took / slowest)
                slowest = 0.0
                for reader in readers:
                    began = time.perf_counter()
                    spawn_read(reader)
                    slowest = max(slowest, time.perf_counter() - began)
                began = time.perf_counter()
                list(pool.map(spawn_read, readers))
                took = time.perf_counter() - began
                spawn_alone.append(slowest)
                spawn_together.append(took)
                spawn_ratios.append(took / slowest)
        print(f"\n{args.rounds} rounds; per host {args.containers} containers on its engine"
              + (f", each engine capped at {args.engine_cpus} of the {os.cpu_count()} cores "
                 "in a CPU cgroup of its own (as if on hosts of their own)"
                 if args.engine_cpus else ""))
        for name in NAMES:
            print(f"  {name} alone: median {statistics.median(alone[name]) * 1000:.0f} ms")
        print(f"  the slowest of the three alone, per round: median "
              f"{statistics.median(slowest_alone) * 1000:.0f} ms")
        print(f"  all three at once (hosts.read_all): median "
              f"{statistics.median(together) * 1000:.0f} ms")
        print(f"  the hub's own CPU (client side: JSON, records) for the three: one by one "
              f"{statistics.median(cpu_alone) * 1000:.0f} ms, at once "
              f"{statistics.median(cpu_together) * 1000:.0f} ms; the engines' CPU is the rest "
              + (f"(each engine on its own {args.engine_cpus} cores; the hub's process shares "
                 "the rest)" if args.engine_cpus else
                 f"({os.cpu_count()} cores shared by three engines and the hub here)"))
        ratio = statistics.median(ratios)
        print(f"all at once / slowest alone (median of rounds): {ratio:.2f}  goal <= {GOAL}: "
              f"{'met' if ratio <= GOAL else 'MISSED'}")
        spawn_ratio = statistics.median(spawn_ratios)
        print(f"a spawn's read (kept view, as a spawn chooses its host): slowest alone median "
              f"{statistics.median(spawn_alone) * 1000:.0f} ms, all three at once "
              f"{statistics.median(spawn_together) * 1000:.0f} ms; ratio (median of rounds) "
              f"{spawn_ratio:.2f}  goal <= {GOAL}: {'met' if spawn_ratio <= GOAL else 'MISSED'}")
        print("command: .venv/bin/python benchmarks/bench_hosts.py "
              f"--containers {args.containers} --rounds {args.rounds}"
              + (f" --engine-cpus {args.engine_cpus}" if args.engine_cpus else ""))
        return 0
    finally:
        for group in groups:
            uncap(group)
        for engine in engines:
            engine.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--containers", type=int, default=1000,
                        help="containers on each host's engine (default 1000)")
    parser.add_argument("--rounds", type=int, default=9, help="rounds (default 9)")
    parser.add_argument("--workers", type=int, default=4,
                        help="fleet containers created/started at a time (default 4)")
    parser.add_argument("--engine-cpus", type=float, default=0.0,
                        help="cap each engine's dockerd at this many cores, in a CPU cgroup "
                             "of its own (default: not capped; the engines share the cores)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.containers < 1:
        parser.error("--rounds and --containers must be at least 1")
    if args.engine_cpus < 0 or args.engine_cpus * len(NAMES) > (os.cpu_count() or 1):
        parser.error("--engine-cpus: three engines must fit in this machine's cores")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
