"""A fleet of real containers on the private test engine, for ``bench_core.py --engine``.

The engine is the tests' own (tests/engine.py ``PrivateEngine``: a private ``dockerd`` whose
PATH has the simulator's fake NVIDIA hook, tests/gpusim on ``a100x4``), under its own root
(``GPUSPAWNER_TEST_ROOT``, by default /var/lib/gpuspawner-bench) so it never meets a test
session's engine. The containers are made from the tests' offline base image
(tests/images.py) with trivial commands, labelled ``gpuspawner.bench=1`` and kept in the
engine's data root, so a second run only restarts the few that should be running.

The mix repeats every 100 containers (so a container's role depends on its index only, and
a fleet of another size reuses what it can):

    k = index % 100, b = index // 100
    0       running, managed, holding MIG slice b (mod the 13 slices: distinct up to 1,300)
    1-3     running, managed, CPU only
    4       running, unlabelled (block 0: holding the whole GPU 3, an unmanaged holder)
    5-59    exited, managed; every third holds a MIG slice (DeviceRequest by UUID)
    60-84   created (never started), managed; every third holds a MIG slice
    85-94   exited, unlabelled (k = 85: with a MIG DeviceRequest, a stopped unmanaged holder)
    95-99   created, unlabelled
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.types

from gpuspawner import labels as L

BENCH = "gpuspawner.bench"
ROLE = "gpuspawner.bench.role"
INDEX = "gpuspawner.bench.index"
DEVICE = "gpuspawner.bench.device"
MIX = "gpuspawner.bench.mix"
MIX_VERSION = "1"  # bump when the plan below changes: older containers are then re-made
#: The address a managed container's port 8888 is published on: engines side by side on one
#: machine (bench_hosts.py) each publish on an address of their own, since each engine
#: hands out host ports from the same range without knowing the others'.
HOST_IP = "gpuspawner.bench.host-ip"
HUB = "bench"
DEFAULT_ROOT = Path("/var/lib/gpuspawner-bench")
TOPOLOGY = "a100x4"


@dataclass(frozen=True)
class Device:
    uuid: str
    slot: str
    parent_uuid: str
    gi: int | None
    profile: str
    equivalents: float


@dataclass(frozen=True)
class Spec:
    """One container of the fleet: what it should be."""

    index: int
    state: str  # running | exited | created
    managed: bool
    device: Device | None

    @property
    def role(self) -> str:
        who = "managed" if self.managed else "unlabelled"
        return f"{self.state}-{who}-{'gpu' if self.device else 'cpu'}"

    @property
    def name(self) -> str:
        return f"jupyter-student{self.index:04d}" if self.managed else f"tool-{self.index:04d}"


def devices_of(state: Mapping[str, Any]) -> tuple[list[Device], list[Device]]:
    """The simulator's MIG devices and its whole (MIG off) GPUs, as the product names them."""
    migs, whole = [], []
    for gpu in state["gpus"]:
        if gpu["mig_mode"] != "enabled":
            whole.append(Device(gpu["uuid"], str(gpu["index"]), gpu["uuid"], None,
                                gpu["name"], 1.0))
            continue
        for mig in gpu["mig_devices"]:
            migs.append(Device(
                mig["uuid"], f"{gpu['index']}.{mig['index']}", gpu["uuid"], mig["gi"],
                mig["profile"], round(mig["slices"] / gpu["total_slices"], 4)))
    return migs, whole


def plan(n: int, migs: list[Device], whole: list[Device]) -> list[Spec]:
    specs = []
    for i in range(n):
        k, b = i % 100, i // 100
        if k == 0:
            spec = Spec(i, "running", True, migs[b % len(migs)])
        elif k <= 3:
            spec = Spec(i, "running", True, None)
        elif k == 4:
            spec = Spec(i, "running", False, whole[0] if b == 0 and whole else None)
        elif k <= 59:
            spec = Spec(i, "exited", True, migs[(i * 7) % len(migs)] if k % 3 == 0 else None)
        elif k <= 84:
            spec = Spec(i, "created", True, migs[(i * 5) % len(migs)] if k % 3 == 0 else None)
        elif k <= 94:
            spec = Spec(i, "exited", False, migs[b % len(migs)] if k == 85 else None)
        else:
            spec = Spec(i, "created", False, None)
        specs.append(spec)
    return specs


def describe_mix(specs: Iterable[Spec]) -> str:
    counts = Counter((s.state, s.managed, bool(s.device)) for s in specs)

    def part(state: str) -> str:
        mg, mc = counts[(state, True, True)], counts[(state, True, False)]
        ug, uc = counts[(state, False, True)], counts[(state, False, False)]
        return (f"{state} {mg + mc + ug + uc} (managed {mg + mc}, {mg} with a device; "
                f"unlabelled {ug + uc}, {ug} with a device)")

    return "; ".join(part(state) for state in ("running", "exited", "created"))


def _labels(spec: Spec, now: datetime) -> dict[str, str]:
    ours = {BENCH: "1", ROLE: spec.role, INDEX: str(spec.index), MIX: MIX_VERSION,
            DEVICE: spec.device.uuid if spec.device else ""}
    if not spec.managed:
        return {**ours, "com.example.app": f"tool{spec.index}"}
    user = f"student{spec.index:04d}"
    d = spec.device
    return {
        **ours,
        **L.encode(
            hub=HUB, user=user, server="", profile="mig-1g" if d else "cpu", created_at=now,
            slots=[d.slot] if d else [], uuids=[d.uuid] if d else [],
            parent_uuids=[d.parent_uuid] if d else [], gis=[d.gi] if d else [],
            gpu_profile=d.profile if d else None, equivalents=d.equivalents if d else 0.0,
            ports={"notebook": 40000 + spec.index},
        ),
    }


def _environment(spec: Spec) -> list[str]:
    if not spec.managed:
        return ["APP=tool"]
    user = f"student{spec.index:04d}"
    return [
        f"JUPYTERHUB_USER={user}", "JUPYTERHUB_SERVER_NAME=", "JUPYTERHUB_API_TOKEN=" + "0" * 32,
        "JUPYTERHUB_API_URL=http://172.31.250.1:8081/hub/api",
        f"JUPYTERHUB_SERVICE_PREFIX=/user/{user}/", "JUPYTERHUB_BASE_URL=/",
        f"NVIDIA_VISIBLE_DEVICES={spec.device.uuid if spec.device else 'void'}",
    ]


def create(api: docker.APIClient, image: str, spec: Spec, now: datetime,
           host_ip: str = "127.0.0.1") -> str:
    device_requests = None
    if spec.device:
        device_requests = [docker.types.DeviceRequest(
            driver="nvidia", device_ids=[spec.device.uuid], capabilities=[["gpu"]])]
    host = api.create_host_config(
        port_bindings={8888: (host_ip, None)} if spec.managed else None,
        device_requests=device_requests,
        init=True,  # so `sleep infinity` ends at SIGTERM when the engine stops
    )
    result = api.create_container(
        image,
        command=["true"] if spec.state == "exited" else ["sleep", "infinity"],
        name=spec.name,
        labels={**_labels(spec, now), HOST_IP: host_ip},
        environment=_environment(spec),
        ports=[8888] if spec.managed else None,
        host_config=host,
        detach=True,
    )
    return result["Id"]


@dataclass
class FleetReport:
    reused: int = 0
    created: int = 0
    started: int = 0
    removed: int = 0
    others: int = 0  # containers of the engine that are not the bench's
    seconds: float = 0.0


def _pool(workers: int, jobs: list[Callable[[], Any]], what: str) -> None:
    """Run jobs on a bounded pool; fail with the first few errors, after all have run."""
    errors: list[str] = []
    lock = threading.Lock()
    done = [0]

    def run(job: Callable[[], Any]) -> None:
        try:
            job()
        except docker.errors.DockerException as exc:
            with lock:
                errors.append(str(exc))
        with lock:
            done[0] += 1
            if done[0] % 250 == 0:
                print(f"  {what}: {done[0]}/{len(jobs)}", flush=True)

    if jobs:
        with ThreadPoolExecutor(max(1, min(workers, len(jobs)))) as pool:
            list(pool.map(run, jobs))
    if errors:
        raise RuntimeError(f"{len(errors)} {what} failed, e.g.: " + "; ".join(errors[:3]))


def ensure(api: docker.APIClient, image: str, specs: list[Spec], workers: int,
           host_ip: str = "127.0.0.1") -> FleetReport:
    """Make the engine hold exactly ``specs`` among its bench containers, in their states."""
    started_at = time.perf_counter()
    report = FleetReport()
    wanted = {s.index: s for s in specs}
    existing: dict[int, dict[str, Any]] = {}
    remove: list[str] = []
    for entry in api.containers(all=True):
        found = entry.get("Labels") or {}
        if found.get(BENCH) != "1":
            report.others += 1
            continue
        try:
            index = int(found.get(INDEX, ""))
        except ValueError:
            index = -1
        spec = wanted.get(index)
        ok = (
            spec is not None and index not in existing
            and found.get(MIX) == MIX_VERSION and found.get(ROLE) == spec.role
            and found.get(DEVICE, "") == (spec.device.uuid if spec.device else "")
            and not (spec.state == "created" and entry.get("State") != "created")
            and found.get(HOST_IP, "127.0.0.1") == host_ip
        )
        if ok:
            existing[index] = entry
        else:
            remove.append(entry["Id"])

    def remover(cid: str) -> Callable[[], None]:
        def job() -> None:
            try:
                api.remove_container(cid, force=True, v=True)
            except docker.errors.NotFound:
                pass
        return job

    _pool(workers, [remover(cid) for cid in remove], "removals")
    report.removed = len(remove)

    now = datetime.now(timezone.utc)
    ids: dict[int, str] = {i: e["Id"] for i, e in existing.items()}
    report.reused = len(ids)
    missing = [s for s in specs if s.index not in ids]
    lock = threading.Lock()

    def creator(spec: Spec) -> Callable[[], None]:
        def job() -> None:
            cid = create(api, image, spec, now, host_ip)
            with lock:
                ids[spec.index] = cid
        return job

    _pool(workers, [creator(s) for s in missing], "creates")
    report.created = len(missing)

    states = {i: (existing[i].get("State") if i in existing else "created") for i in ids}
    to_start = [s for s in specs
                if (s.state == "running" and states[s.index] != "running")
                or (s.state == "exited" and states[s.index] == "created")]

    def starter(spec: Spec) -> Callable[[], None]:
        def job() -> None:
            api.start(ids[spec.index])
            if spec.state == "exited":
                api.wait(ids[spec.index], timeout=120)
        return job

    _pool(workers, [starter(s) for s in to_start], "starts")
    report.started = len(to_start)
    report.seconds = time.perf_counter() - started_at
    return report


def remove_all(api: docker.APIClient, workers: int) -> int:
    """Remove every bench container (and its anonymous volumes)."""
    found = [e["Id"] for e in api.containers(all=True, filters={"label": f"{BENCH}=1"})]

    def remover(cid: str) -> Callable[[], None]:
        return lambda: api.remove_container(cid, force=True, v=True)

    _pool(workers, [remover(cid) for cid in found], "removals")
    return len(found)


def engine_root() -> Path:
    return Path(os.environ.get("GPUSPAWNER_TEST_ROOT") or DEFAULT_ROOT)
