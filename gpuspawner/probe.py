"""A host's GPUs, read through its Docker engine: for a host whose NVML the hub cannot call.

NVML answers only on the machine whose driver it talks to. A hub serving several hosts
reaches the others through their Docker engines alone, so it asks each engine to run a
short-lived probe container that prints ``nvidia-smi -L`` and ``nvidia-smi -q -x``: the NVIDIA
toolkit mounts the host's own ``nvidia-smi`` into any container given the ``utility``
capability, whatever its image. ``inventory.parse_nvidia_smi_xml`` turns the two into the
same records NVML gives.

The probe asks for every GPU with the ``utility`` capability only (and
``NVIDIA_MIG_MONITOR_DEVICES=all``, so MIG devices are listed): the ledger never counts such
a request as holding a device (``ledger.device_facts``), so a probe never blocks a spawn. It
runs without a network, is labelled ``ds01.interface=probe`` with its hub, and is removed
when it ends, whatever happened; a probe a crashed hub left behind is removed by the next.

It runs in the host's PID namespace (``--pid=host``). The driver names compute processes by
their host pids, and ``nvidia-smi`` lists only those it finds in its own ``/proc``: in a
container's own namespace the process list is empty, whoever computes (memory in use is
still shown). The host's processes are what GPU activity (``admin/activity.py``: idle time,
idle stops, the Hub's ``last_activity``) is read from. In the same namespace the probe
prints each listed process's ``/proc/<pid>/cgroup``, which names its container as on the
hub's own host (``procs``). The probe runs nothing but the host's ``nvidia-smi``, ``sed``
and ``cat``, with no network and no other capability.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import docker
import docker.errors

from . import procs
from .inventory import InventoryError, parse_nvidia_smi_xml
from .records import GpuProcess, Inventory

log = logging.getLogger(__name__)

#: ``ds01.interface`` of a probe container (not a server: no ``ds01.managed``, no schema).
INTERFACE = "probe"
#: Between the outputs in the probe's log: ``-L``, the XML report, each process's cgroup.
MARK = "=== gpuspawner probe: nvidia-smi -q -x ==="
CGROUPS = "=== gpuspawner probe: cgroups ==="
#: Before each process's cgroup lines.
PID = "=== pid "
SCRIPT = f"""nvidia-smi -L || exit $?
echo '{MARK}'
report=$(nvidia-smi -q -x) || exit $?
printf '%s\\n' "$report"
echo '{CGROUPS}'
for pid in $(printf '%s\\n' "$report" | sed -n 's:.*<pid>\\([0-9][0-9]*\\)</pid>.*:\\1:p'); do
  echo "{PID}$pid"
  cat "/proc/$pid/cgroup" 2>/dev/null
done
exit 0
"""
COMMAND = ["sh", "-c", SCRIPT]
#: A probe older than this that is still there was left by a hub that died while it ran.
STALE_SECONDS = 120.0


def labels(hub_id: str) -> dict[str, str]:
    return {"ds01.interface": INTERFACE, "ds01.hub": hub_id}


def parse_output(text: str) -> Inventory:
    """The probe's log: ``-L``, the mark, the XML report, then each listed process's cgroup
    (pure). A process whose cgroup names a Docker container is that container's; one whose
    cgroup was not printed (it ended meanwhile) has none, never a guess."""
    listing, mark, rest = text.partition(MARK)
    if not mark:
        first = text.strip().splitlines()[:1]
        raise InventoryError("the GPU probe printed no report"
                             + (f": {first[0]}" if first else ""))
    report, _mark, cgroups = rest.partition(CGROUPS)
    found = parse_nvidia_smi_xml(listing, report.strip())
    owners = containers_of(cgroups)
    if not owners:
        return found

    def owned(processes: tuple[GpuProcess, ...]) -> tuple[GpuProcess, ...]:
        return tuple(replace(p, container_id=owners.get(p.pid, p.container_id))
                     for p in processes)

    return replace(found,
                   gpus=tuple(replace(g, processes=owned(g.processes)) for g in found.gpus),
                   migs=tuple(replace(m, processes=owned(m.processes)) for m in found.migs))


def containers_of(text: str) -> dict[int, str]:
    """Pid -> Docker container id, from the probe's cgroup section: a ``=== pid N`` line,
    then that process's ``/proc/N/cgroup`` (pure)."""
    sections: dict[int, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith(PID):
            try:
                current = sections.setdefault(int(line[len(PID):].strip()), [])
            except ValueError:
                current = None
        elif current is not None:
            current.append(line)
    owners = {pid: procs.container_id_from_cgroup("\n".join(lines))
              for pid, lines in sections.items()}
    return {pid: cid for pid, cid in owners.items() if cid is not None}


def _remove_stale(client: Any, hub_id: str, now: datetime) -> None:
    wanted = [f"{k}={v}" for k, v in labels(hub_id).items()]
    for found in client.api.containers(all=True, filters={"label": wanted}):
        created = datetime.fromtimestamp(int(found.get("Created") or 0), timezone.utc)
        if (now - created).total_seconds() > STALE_SECONDS:
            try:
                client.api.remove_container(found["Id"], force=True)
            except docker.errors.APIError as exc:
                log.warning("removing a stale GPU probe %s failed: %s", found["Id"][:12], exc)


def read(client: Any, image: str, hub_id: str, timeout: float = 60.0) -> Inventory:
    """The GPUs of the host behind ``client``, from a probe container of ``image`` (any image
    with ``sh``). Blocking: run it off the event loop. InventoryError with the reason when
    the probe cannot run or prints no report (no NVIDIA runtime on that host, a driver that
    does not answer); the container is gone either way."""
    _remove_stale(client, hub_id, datetime.now(timezone.utc))
    api = client.api
    request = docker.types.DeviceRequest(driver="nvidia", count=-1,
                                         capabilities=[["utility"]])
    try:
        created = api.create_container(
            image, command=COMMAND, labels=labels(hub_id), network_disabled=True,
            environment={"NVIDIA_MIG_MONITOR_DEVICES": "all"},
            host_config=api.create_host_config(device_requests=[request], pid_mode="host"),
        )
    except docker.errors.APIError as exc:
        raise InventoryError(f"the GPU probe could not be created: {exc.explanation}") from exc
    cid = created["Id"]
    try:
        api.start(cid)
        code = api.wait(cid, timeout=timeout)["StatusCode"]
        out = api.logs(cid, stdout=True, stderr=False).decode("utf-8", "replace")
        if code != 0:
            err = api.logs(cid, stdout=False, stderr=True).decode("utf-8", "replace")
            first = (err or out).strip().splitlines()[:1]
            raise InventoryError(f"the GPU probe exited with {code}"
                                 + (f": {first[0]}" if first else ""))
        return parse_output(out)
    except InventoryError:
        raise
    except docker.errors.APIError as exc:
        raise InventoryError(f"the GPU probe failed: {exc.explanation}") from exc
    except Exception as exc:  # a wait that timed out (requests' ReadTimeout, ...)
        raise InventoryError(f"the GPU probe did not finish: {exc}") from exc
    finally:
        try:
            api.remove_container(cid, force=True)
        except docker.errors.APIError as exc:
            log.warning("removing the GPU probe %s failed: %s", cid[:12], exc)
