"""What GPUSpawner's allocation costs a student pressing Start, against plain DockerSpawner.

Two real JupyterHubs (tests/hub.py) run side by side on one private Docker engine
(tests/engine.py) with the simulated NVIDIA host (tests/gpusim), spawning the same
single-user image (tests/images.py). Times are taken from the REST API's ``POST`` of a server
to the hub reporting it ready, so they include everything a student waits for: the hub, the
spawner's allocation (inventory, Docker ledger, policy, labels), the container start, the
fake NVIDIA hook, and Jupyter answering.

1. Alternating rounds on the simulated a100x4 host: spawn + ready + stop + remove with
   GPUSpawner (profile ``mig-1g``), then the same with DockerSpawner, the order swapped every
   other round so drift (page cache, a busy neighbour) hits both alike. Medians and their
   ratio (target: GPUSpawner / DockerSpawner <= 1.10).
2. N users pressing Start at the same moment (profile ``mig-1g`` on 3 GPUs x 7 1g.10gb
   slices, so every one of them gets a slice): wall time from the first POST to the last
   server ready, and the per-spawn median. DockerSpawner's figure beside it shows what the
   allocation lock and the Docker re-reads add under contention.

    .venv/bin/python benchmarks/bench_spawn.py [--rounds 7] [--concurrent 20]

Runs as root (the private engine makes a bridge). ``GPUSPAWNER_TEST_ROOT`` moves the engine
beside another test session's, as for the tests. Everything it starts (engine, hubs, proxies,
containers) is stopped and removed at the end, also after an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests
import requests.adapters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import gpusim  # noqa: E402
from tests.engine import PrivateEngine  # noqa: E402
from tests.hub import HubError, RunningHub  # noqa: E402
from tests.images import ensure_singleuser_image  # noqa: E402

TARGET_RATIO = 1.10
PROFILE = "mig-1g"

#: Both hubs: a fresh container every spawn (stop removes it), production-like log level.
COMMON = """\
c.DockerSpawner.remove = True
c.JupyterHub.log_level = "INFO"
"""
DOCKER_ONLY = 'c.JupyterHub.spawner_class = "docker"\n'


def sliced_host(gpus: int = 3, slices: int = 7) -> dict[str, Any]:
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


@dataclass
class Side:
    """One hub under test and what it measured."""

    label: str
    hub: RunningHub
    profile: str | None
    spawns: list[float] = field(default_factory=list)
    stops: list[float] = field(default_factory=list)


def _path(user: str) -> str:
    return f"/users/{quote(user)}/server"


def spawn_timed(hub: RunningHub, user: str, profile: str | None, timeout: float = 300) -> float:
    """Seconds from the POST to the hub saying the server is ready.

    The hub answers 201 when the server became ready within its ``slow_spawn_timeout``
    (10 s); otherwise 202, and the progress stream ends at the moment it is ready. Neither
    needs polling, so the measurement neither lags nor loads the hub.
    """
    body = {"profile": profile} if profile is not None else None
    started = time.perf_counter()
    response = hub.api("POST", _path(user), json=body, timeout=timeout)
    if response.status_code not in (201, 202):
        raise HubError(f"spawn of {user} refused: {response.status_code} {response.text}")
    if response.status_code == 202:
        hub.progress_messages(user, timeout=timeout)
    ended = time.perf_counter()
    deadline = time.monotonic() + timeout
    while True:  # the stream may end on failure, or just before the model says ready
        model = hub.server_model(user)
        if model and model.get("ready"):
            return ended - started
        if not model or not model.get("pending"):
            raise HubError(f"spawn of {user} failed:\n{hub.log_tail(30)}")
        if time.monotonic() > deadline:
            raise HubError(f"spawn of {user} not ready in {timeout:.0f} s")
        time.sleep(0.05)
        ended = time.perf_counter()


def stop_timed(hub: RunningHub, user: str, timeout: float = 120) -> float:
    """Seconds from the DELETE to the hub having no server (container stopped and removed)."""
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


def _wide_pool(hub: RunningHub, size: int = 64) -> None:
    """Many threads share the hub's requests session: give them enough connections."""
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=size)
    hub.session.mount("http://", adapter)


def alternate(sides: list[Side], rounds: int, warmup: int, user_of: dict[str, str]) -> None:
    """Spawn, wait, stop, remove: A then B, B then A, ... (warm-up rounds not recorded)."""
    for number in range(warmup + rounds):
        order = sides if number % 2 == 0 else sides[::-1]
        took: dict[str, float] = {}
        for side in order:
            took[side.label] = spawn_timed(side.hub, user_of[side.label], side.profile)
            stop = stop_timed(side.hub, user_of[side.label])
            if number >= warmup:
                side.spawns.append(took[side.label])
                side.stops.append(stop)
        kind = "warm-up" if number < warmup else f"round {number - warmup + 1}/{rounds}"
        print(f"  {kind}: " + ", ".join(f"{label} {took[label]:.2f} s" for label in took),
              flush=True)


@dataclass
class Burst:
    label: str
    wall: float
    times: list[float]
    failures: list[str]
    containers: list[Any]


def burst(side: Side, users: list[str], engine: PrivateEngine) -> Burst:
    """Every user presses Start at the same moment; then all are stopped (not timed)."""
    for user in users:
        side.hub.ensure_user(user)
    gate = threading.Barrier(len(users) + 1)
    times: dict[str, float] = {}
    failures: list[str] = []
    lock = threading.Lock()

    def press(user: str) -> None:
        gate.wait()
        try:
            took = spawn_timed(side.hub, user, side.profile)
            with lock:
                times[user] = took
        except (HubError, requests.RequestException) as exc:
            with lock:
                failures.append(f"{user}: {str(exc).splitlines()[0]}")

    threads = [threading.Thread(target=press, args=(u,), daemon=True) for u in users]
    for thread in threads:
        thread.start()
    gate.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    wanted = set(users)
    containers = [c for c in engine.client.containers.list(filters={"label": "ds01.managed"})
                  if c.labels.get("ds01.user") in wanted]
    stoppers = [threading.Thread(target=stop_timed, args=(side.hub, u), daemon=True)
                for u in times]
    for thread in stoppers:
        thread.start()
    for thread in stoppers:
        thread.join()
    return Burst(side.label, wall, sorted(times.values()), failures, containers)


# ------------------------------------------------------------------------------ output


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(
        zip(cells, widths, strict=True))).rstrip()


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join([_row(header, widths), _row(["-" * w for w in widths], widths),
                      *(_row(r, widths) for r in rows)])


def _s(seconds: float) -> str:
    return f"{seconds:.2f} s"


def report_rounds(sides: list[Side]) -> float:
    rows = []
    for side in sides:
        rows.append([side.label, _s(statistics.median(side.spawns)), _s(min(side.spawns)),
                     _s(max(side.spawns)), _s(statistics.median(side.stops))])
    print(table(["spawner", "spawn median", "min", "max", "stop+remove median"], rows))
    for side in sides:
        print(f"  {side.label} rounds: " + " ".join(f"{t:.2f}" for t in side.spawns))
    ratio = statistics.median(sides[0].spawns) / statistics.median(sides[1].spawns)
    verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
    print(f"ratio {sides[0].label} / {sides[1].label} (medians): {ratio:.3f}  "
          f"(target <= {TARGET_RATIO:.2f}: {verdict})")
    return ratio


def report_bursts(bursts: list[Burst], users: int) -> None:
    rows = []
    for b in bursts:
        if b.times:
            rows.append([b.label, _s(b.wall), _s(statistics.median(b.times)), _s(b.times[0]),
                         _s(b.times[-1]), f"{len(b.times)}/{users}"])
        else:
            rows.append([b.label, _s(b.wall), "-", "-", "-", f"0/{users}"])
    print(table(["spawner", "wall (all ready)", "per-spawn median", "min", "max", "ready"],
                rows))
    for b in bursts:
        for failure in b.failures[:5]:
            print(f"  {b.label} failed: {failure}")


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


def run(args: argparse.Namespace) -> int:
    engine = PrivateEngine()
    workdir = Path(tempfile.mkdtemp(prefix="bench-spawn-"))
    hubs: list[RunningHub] = []
    try:
        _step(f"starting the private engine ({engine.base_url})", engine.start)
        engine.remove_containers()  # left by an earlier run that was killed
        gpusim.install("a100x4", engine.state_path)
        image = _step("single-user image", lambda: ensure_singleuser_image(engine.client))
        gpu_hub = RunningHub(engine, image, workdir / "gpuspawner", config_extra=COMMON)
        docker_hub = RunningHub(engine, image, workdir / "dockerspawner",
                                config_extra=COMMON + DOCKER_ONLY)
        hubs += [gpu_hub, docker_hub]
        _step("starting two hubs", lambda: [h.start() for h in hubs])
        for hub in hubs:
            _wide_pool(hub)
        sides = [Side("GPUSpawner", gpu_hub, PROFILE), Side("DockerSpawner", docker_hub, None)]
        user_of = {"GPUSpawner": "alt-gpu", "DockerSpawner": "alt-docker"}
        for side in sides:
            side.hub.ensure_user(user_of[side.label])

        print(f"\n== {args.rounds} alternating rounds (+{args.warmup} warm-up): spawn + ready "
              f"+ stop + remove; a100x4, GPUSpawner profile {PROFILE}", flush=True)
        alternate(sides, args.rounds, args.warmup, user_of)
        print()
        report_rounds(sides)

        if args.concurrent:
            per_gpu = 7
            gpus = max(1, -(-args.concurrent // per_gpu))
            gpusim.install(sliced_host(gpus, per_gpu), engine.state_path)
            print(f"\n== {args.concurrent} users at once; {gpus} GPUs x {per_gpu} 1g.10gb "
                  f"({gpus * per_gpu} slices)", flush=True)
            bursts = []
            for side, prefix in ((sides[0], "g"), (sides[1], "d")):
                if side is sides[1] and args.no_baseline:
                    continue
                users = [f"{prefix}{n:02d}" for n in range(args.concurrent)]
                found = burst(side, users, engine)
                bursts.append(found)
                print(f"  {side.label}: {len(found.times)}/{len(users)} ready in "
                      f"{found.wall:.2f} s", flush=True)
                if side is sides[0]:
                    uuids = [c.labels.get("ds01.gpu.uuids") for c in found.containers]
                    distinct = len(set(uuids) - {None})
                    print(f"  GPUSpawner containers: {len(found.containers)}, distinct "
                          f"1g.10gb slices: {distinct}", flush=True)
                engine.remove_containers()
            print()
            report_bursts(bursts, args.concurrent)
        return 0
    finally:
        for hub in reversed(hubs):
            hub.stop()
        try:
            engine.remove_containers()
        except Exception:  # the engine may never have started; stop() copes with that
            pass
        engine.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds (default 7)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="unrecorded rounds first: cold caches are not what we compare")
    parser.add_argument("--concurrent", type=int, default=20,
                        help="users pressing Start at once (0: skip; default 20)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip DockerSpawner's concurrent run")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if os.geteuid() != 0:
        print("bench_spawn: run as root (the private Docker engine makes a bridge)",
              file=sys.stderr)
        return 2
    with interrupted_as_keyboard():
        try:
            return run(args)
        except KeyboardInterrupt:
            print("\ninterrupted; everything started was stopped", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
