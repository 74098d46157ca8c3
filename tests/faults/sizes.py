"""How big each scenario is: scaled down in CI (the default), full size for
``scripts/reliability.py`` (``GPUSPAWNER_FAULTS_FULL=1``).

The CI sizes keep the whole of ``tests/faults`` at about six minutes on two cores; the full
sizes are the issue's. Every test's id says the size it ran at.

The servers: the full size runs the real ``jupyterhub-singleuser``; CI runs a stand-in
(tests/faults/standin.py) that boots in a tenth of a second instead of four CPU-seconds, in
the same image and container. ``GPUSPAWNER_FAULTS_SERVER=jupyter`` or ``=stand-in`` chooses
either way at any size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

FULL = os.environ.get("GPUSPAWNER_FAULTS_FULL", "") not in ("", "0")
SERVER = os.environ.get("GPUSPAWNER_FAULTS_SERVER") or ("jupyter" if FULL else "stand-in")


def pick(ci: int, full: int) -> int:
    return full if FULL else ci


def label(text: str) -> str:
    return text + (" (stand-in servers)" if SERVER == "stand-in" else "")


@dataclass(frozen=True)
class Size:
    """One scenario's parameters; ``id`` is the pytest id and ``label`` the table's text."""

    id: str
    label: str
    n: int = 0  # rounds, operations, restarts, kills, spawns: the scenario says which
    users: int = 0
    extra: int = 0


TWO_HUBS = Size(
    id=f"{pick(2, 5)}-rounds-2x{pick(12, 20)}-spawns",
    label=label(f"2 hubs × {pick(12, 20)} spawns at once on 9 slices, {pick(2, 5)} rounds"),
    n=pick(2, 5), users=pick(12, 20),
)
CHURN = Size(
    id=f"{pick(50, 500)}-ops",
    label=label(f"{pick(50, 500)} operations on {pick(10, 16)} users × 2 servers, "
                "a holder made by hand every 50"),
    n=pick(50, 500), users=pick(10, 16),
)
ENGINE_RESTARTS = Size(
    id=f"{pick(2, 10)}-restarts",
    label=label(f"{pick(2, 10)} engine restarts, each during {pick(3, 4)} spawns, "
                f"{pick(2, 3)} servers running"),
    n=pick(2, 10), users=pick(3, 4), extra=pick(2, 3),
)
HUB_KILLS = Size(
    id=f"{pick(2, 10)}-kills",
    label=label(f"{pick(2, 10)} SIGKILLs of the hub, each during {pick(3, 4)} spawns, "
                f"{pick(2, 3)} servers running"),
    n=pick(2, 10), users=pick(3, 4), extra=pick(2, 3),
)
NVML = Size(
    id=f"{pick(4, 8)}-spawns",
    label=label(f"{pick(4, 8)} spawns (CPU and GPU) during the fault, "
                f"{pick(2, 4)} servers running"),
    n=pick(4, 8), users=pick(2, 4),
)
EVENT_LOG = Size(
    id=f"{pick(4, 8)}-spawns",
    label=label(f"{pick(4, 8)} spawns (CPU and GPU) with the log failing, 2 servers running"),
    n=pick(4, 8),
)
PORT_SQUATTER = Size(
    id=f"{pick(4, 10)}-spawns",
    label=label(f"{pick(4, 10)} spawns at once, each with an extra port"),
    n=pick(4, 10),
)
POWER_CYCLE = Size(
    id=f"{pick(6, 14)}-users",
    label=label(f"{pick(6, 14)} servers (MIG, whole GPU, CPU) through one power-cycle"),
    n=1, users=pick(6, 14),
)
