"""After a power-cycle: what the GPU host is still missing, from what was read.

A rebooted host brings up Docker, the NVIDIA driver (``nvidia-persistenced``) and the MIG
devices (a boot script re-creates them) in its own order and time. A spawn in that window
must wait, saying what for, rather than fail or, worse, judge a restarting server's slice
gone and move it. Pure: plain data in, the words of what is missing out.
"""

from __future__ import annotations

from collections.abc import Iterable

from .records import Inventory

DOCKER = "the Docker engine"
DRIVER = "the NVIDIA driver"


def mig_devices(profile: str) -> str:
    return f"MIG devices ({profile})"


def missing(docker_answers: bool, inventory: Inventory | None, mig_profiles: Iterable[str],
            had_gpus: bool) -> list[str]:
    """What the host still lacks for a spawn. Docker, always. With ``inventory`` (None: the
    spawn needs no GPU): the NVIDIA driver, when NVML shows no GPU although Docker shows
    containers that hold NVIDIA devices (``had_gpus``: this host had GPUs before the
    reboot; a host without GPUs does not make anyone wait); and a MIG device of each wanted
    profile while a MIG-enabled GPU has none at all (its devices are still being made)."""
    out = [] if docker_answers else [DOCKER]
    if inventory is None or not docker_answers:
        return out
    if not inventory.gpus:
        return [*out, DRIVER] if had_gpus else out
    present = {m.profile for m in inventory.migs}
    making = any(g.mig_enabled and not inventory.migs_of(g) for g in inventory.gpus)
    return out + [mig_devices(p) for p in sorted(set(mig_profiles))
                  if making and p not in present]


def sentence(what: list[str]) -> str:
    return f"The GPU host is still starting (waiting for {', '.join(what)})"
