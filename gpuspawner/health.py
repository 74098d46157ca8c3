"""Health checks shared by ``gpuspawner doctor``, the admin page and spawner start-up.

Each check looks at one thing an admin can fix, and says how. The checks read the world
through the same Snapshot as everything else, plus two questions only the engine can answer
(does it answer at all; is an NVIDIA runtime registered).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import docker.errors

from . import cuda
from .records import RUNNING, Inventory, JSONRecord, MigDevice
from .snapshot import Snapshot

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class Check(JSONRecord):
    name: str
    status: str  # ok | warn | fail
    message: str


def engine_check(client: Any) -> tuple[Check, dict[str, Any] | None]:
    """Does the Docker engine answer? Returns its ``info`` for the runtime check."""
    api = getattr(client, "api", client)
    try:
        info = api.info()
    except Exception as exc:  # any failure to talk to the engine is the finding
        return (
            Check("docker", FAIL, f"the Docker engine at {api.base_url} does not answer ({exc}); "
                  "start dockerd or fix DOCKER_HOST"),
            None,
        )
    version = info.get("ServerVersion", "?")
    return Check("docker", OK, f"Docker {version} answers at {api.base_url}"), info


def runtime_check(info: dict[str, Any] | None) -> Check:
    """Docker can only honour NVIDIA device requests with the NVIDIA container toolkit.

    One check, not two: ``nvidia`` as Docker's *default* runtime (DGX-style hosts) is also a
    finding about the toolkit's set-up, and it implies the toolkit is there. It is a warning
    because then every container whose image sets ``NVIDIA_VISIBLE_DEVICES`` gets GPUs without
    a device request, so neither Docker's records nor gpuspawner's ledger show that use.
    """
    if info is None:
        return Check("nvidia-runtime", WARN, "unknown: the engine does not answer")
    if info.get("DefaultRuntime") == "nvidia":
        return Check(
            "nvidia-runtime", WARN,
            "the nvidia runtime is registered and is Docker's default runtime, so any "
            "container whose image sets NVIDIA_VISIBLE_DEVICES sees GPUs unless it says "
            "'void'; gpuspawner sets NVIDIA_VISIBLE_DEVICES=void on CPU servers, but "
            "containers made by hand may use GPUs no one sees; gpuspawner needs only the "
            'toolkit\'s hook: set "default-runtime": "runc" in /etc/docker/daemon.json unless '
            "something else on this host relies on it",
        )
    runtimes = set((info.get("Runtimes") or {}).keys())
    if "nvidia" in runtimes:
        return Check("nvidia-runtime", OK, "the nvidia runtime is registered with Docker")
    if shutil.which("nvidia-container-runtime-hook"):
        return Check(
            "nvidia-runtime", OK,
            "nvidia-container-runtime-hook is installed (Docker's NVIDIA device driver)",
        )
    return Check(
        "nvidia-runtime", WARN,
        "no NVIDIA container toolkit found: GPU containers will fail to start; install "
        "nvidia-container-toolkit and restart dockerd",
    )


def conflicts_check(snap: Snapshot) -> Check:
    """Two running containers on one device (``Snapshot.conflicts``) is broken now: both
    users compute on one GPU's memory and neither was told. A failure, naming the devices
    and the containers, so an admin knows which one to stop."""
    found = snap.conflicts()
    if not found:
        return Check("conflicts", OK, "no device is held by two running containers")
    devices = snap.inventory.by_uuid()
    parts = []
    for uuid, holders in list(found.items())[:10]:
        device = devices[uuid]
        kind = "MIG slice" if isinstance(device, MigDevice) else "GPU"
        parts.append(f"{kind} {device.slot} ({uuid}) held by "
                     f"{', '.join(a.container_name for a in holders)}")
    more = f" (and {len(found) - 10} more)" if len(found) > 10 else ""
    return Check(
        "conflicts", FAIL,
        f"{len(found)} device(s) held by two or more running containers: "
        f"{'; '.join(parts)}{more}; stop all but one of them",
    )


def busy_check(snap: Snapshot) -> Check:
    """Compute processes or memory in use on a device no running container holds: a process
    that outlived its container (or memory it leaked). gpuspawner does not give it out, so
    a slice is lost to everyone until an admin ends the process: a failure, naming each."""
    found = snap.busy()
    if not found:
        return Check("busy", OK, "no process runs on a device that no container holds")
    devices = snap.inventory.by_uuid()
    parts = []
    for uuid, why in list(found.items())[:10]:
        device = devices[uuid]
        pids = ", ".join(str(p.pid) for p in device.processes[:5]) or "none listed"
        kind = "MIG slice" if isinstance(device, MigDevice) else "GPU"
        parts.append(f"{kind} {device.slot} ({uuid}) {why} (pids: {pids})")
    more = f" (and {len(found) - 10} more)" if len(found) > 10 else ""
    return Check(
        "busy", FAIL,
        f"{len(found)} device(s) in use with no running container: {'; '.join(parts)}{more}; "
        "end those processes (nvidia-smi on the host names them), or reset the GPU",
    )


def snapshot_checks(snap: Snapshot, port_range: tuple[int, int] | None = None) -> list[Check]:
    inv = snap.inventory
    checks: list[Check] = []
    if inv.source == "none":
        checks.append(Check("nvml", WARN, inv.problems[0] if inv.problems else
                            "no NVIDIA GPUs: only CPU servers can start"))
    else:
        what = f"{len(inv.gpus)} GPU(s), {len(inv.migs)} MIG device(s) through {inv.source}"
        if inv.driver_version:
            what += f"; driver {inv.driver_version}"
        if inv.cuda_version:
            what += f", CUDA {inv.cuda_version}"
        checks.append(Check("nvml", OK, what))
    pending = [p for p in inv.problems if "pending" in p]
    empty = [p for p in inv.problems if "no MIG devices" in p]
    checks.append(Check("mig-pending", WARN, "; ".join(pending)) if pending else
                  Check("mig-pending", OK, "no MIG mode change is pending"))
    if empty:
        checks.append(Check("mig-empty", WARN, "; ".join(empty)))
    down = [g for g in inv.gpus if g.unavailable]
    if down:
        # A warning, not a failure: nothing is given out on them, the others serve as usual;
        # a server already on one has a broken GPU, which is the hardware's finding.
        parts = [f"GPU {g.index} ({g.uuid}, {len(inv.migs_of(g))} MIG device(s)): "
                 f"{g.unavailable}" for g in down]
        checks.append(Check(
            "unavailable", WARN,
            f"{len(down)} of {len(inv.gpus)} GPU(s) cannot be read and are not given out: "
            + "; ".join(parts),
        ))
    if inv.unprivileged:
        checks.append(Check("nvml-permissions", WARN, inv.unprivileged))
    missing = snap.missing_uuids()
    if missing:
        holders = sorted({a.container_name for found in missing.values() for a in found})
        # A stopped server on a gone device re-allocates at its next start; only a running
        # one is really broken.
        live = sorted({a.container_name for found in missing.values() for a in found
                       if a.state == RUNNING})
        status = FAIL if live else WARN
        checks.append(Check(
            "missing-uuids", status,
            f"{len(missing)} labelled device(s) no longer exist (MIG re-created or GPU "
            f"removed), held by {', '.join(holders[:10])}; their servers re-allocate on restart",
        ))
    else:
        checks.append(Check("missing-uuids", OK, "every labelled device exists"))
    outside = snap.unmanaged()
    if outside:
        names = ", ".join(a.container_name for a in outside[:10])
        checks.append(Check(
            "unmanaged", WARN,
            f"{len(outside)} container(s) hold GPUs without gpuspawner labels: {names}",
        ))
    else:
        checks.append(Check("unmanaged", OK, "no unmanaged GPU containers"))
    checks.append(conflicts_check(snap))
    checks.append(busy_check(snap))
    bad = [a for a in snap.allocations if a.label_problems]
    if bad:
        checks.append(Check(
            "labels", WARN,
            f"{len(bad)} container(s) have labels that make no sense, e.g. "
            f"{bad[0].container_name}: {bad[0].label_problems[0]}",
        ))
    disagree = snap.disagreements()
    if disagree:
        checks.append(Check(
            "device-requests", WARN,
            f"{len(disagree)} container(s) hold other devices than their labels say (they "
            f"hold both), e.g. {disagree[0].container_name}: {disagree[0].disagreement}",
        ))
    if port_range:
        low, high = port_range
        used = {p for p in snap.reserved_ports() if low <= p <= high}
        free = high - low + 1 - len(used)
        status = OK if free > (high - low + 1) // 10 else WARN
        checks.append(Check("ports", status, f"{free} of {high - low + 1} ports free in "
                            f"{low}-{high}"))
    return checks


def cuda_images_check(client: Any, images: Sequence[str], inventory: Inventory) -> Check:
    """Every profile image with its ``NVIDIA_REQUIRE_*`` against this driver (``cuda``):
    an image the NVIDIA runtime would refuse to start is a warning (its users are refused
    with the sentence; everyone else is unaffected)."""
    envs: dict[str, list[str] | None] = {}
    for image in dict.fromkeys(images):
        try:
            envs[image] = cuda.image_env(client.api.inspect_image(image))
        except docker.errors.ImageNotFound:
            envs[image] = None
    rows = cuda.doctor_rows(envs, inventory.driver_version, inventory.cuda_version)
    status, message = cuda.doctor_summary(rows)
    return Check("cuda-images", WARN if status == "warn" else OK, message)


def run_all(
    client: Any,
    take_snapshot: Callable[[], Snapshot],
    port_range: tuple[int, int] | None = None,
    images: Sequence[str] = (),
) -> list[Check]:
    engine, info = engine_check(client)
    checks = [engine, runtime_check(info)]
    if engine.status == FAIL:
        return checks
    try:
        snap = take_snapshot()
    except Exception as exc:
        return [*checks, Check("snapshot", FAIL, f"could not read the world: {exc}")]
    checks += snapshot_checks(snap, port_range)
    if images:
        checks.append(cuda_images_check(client, images, snap.inventory))
    return checks


def worst(checks: list[Check]) -> str:
    states = {c.status for c in checks}
    return FAIL if FAIL in states else WARN if WARN in states else OK


def host_checks(reader: Any) -> list[Check]:
    """One GPU host of several (``hosts.HostReader``), each check named after it: its engine
    answers (through TLS, for ``tcp://``), and its probe lists its GPUs, which shows the
    NVIDIA toolkit works there (what is installed on the hub's machine says nothing of
    another host). A host whose probe finds no GPU is a warning: it serves CPU servers."""
    from .ledger import LedgerError

    name = reader.host.name
    try:
        client = reader.client()
    except LedgerError as exc:
        return [Check(f"host {name}", FAIL, f"{exc}; check that its dockerd listens there and, "
                                            "for tcp://, that its TLS files are the host's")]
    engine, info = engine_check(client)
    checks = [Check(f"host {name}", engine.status, engine.message)]
    if engine.status == FAIL:
        return checks
    if (info or {}).get("DefaultRuntime") == "nvidia":
        checks.append(Check(f"host {name}: nvidia-runtime", WARN, runtime_check(info).message))
    try:
        found = reader.probe()
    except LedgerError as exc:  # gone between the two questions
        return [*checks, Check(f"host {name}: GPUs", FAIL, str(exc))]
    if found.source == "none":
        why = "; ".join(found.problems) or "no GPU found"
        checks.append(Check(f"host {name}: GPUs", WARN,
                            f"{why}: this host serves CPU servers only (if it has GPUs, "
                            "install nvidia-container-toolkit there and restart its dockerd)"))
    else:
        checks.append(Check(f"host {name}: GPUs", OK,
                            f"{len(found.gpus)} GPU(s), {len(found.migs)} MIG device(s), "
                            f"driver {found.driver_version or '?'}, read through its engine"))
    return checks
