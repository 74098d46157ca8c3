"""GPU-aware activity: a server whose devices run compute processes is in use, whether or
not anyone has its browser tab open.

JupyterHub (and jupyterhub-idle-culler, which reads the Hub's ``last_activity``) knows only
what the proxy and the single-user server report: HTTP traffic and kernel activity. A
three-day training run started from a terminal, with the browser closed, looks idle, and the
culler stops it. The admin service already reads NVML and Docker; every
``activity_interval`` it tells the Hub that such servers are active
(``POST /hub/api/users/{name}/activity``, scope ``users:activity``).

Which servers: this hub's running containers holding a device on which NVML lists a compute
process. A MIG device or a whole GPU is seen only by the containers that hold it, so a
process on it is that server's work (no pid-to-container mapping is needed for this).
"""

from __future__ import annotations

from collections import defaultdict

from ..allocator import Taken
from ..records import RUNNING
from ..snapshot import Snapshot


def active_servers(snap: Snapshot) -> dict[str, set[str]]:
    """User -> names of their servers (``""``: the default one) that run compute processes
    on a device they hold: this hub's running containers only (another hub reports its own)."""
    devices = snap.inventory.by_uuid()
    found: dict[str, set[str]] = defaultdict(set)
    for allocation in snap.allocations:
        if allocation.state != RUNNING or not allocation.user:
            continue
        if not allocation.is_ours(snap.hub_id):
            continue
        held = Taken(snap.inventory, [allocation]).by_uuid  # what it holds, Docker's word
        if any(devices[uuid].processes for uuid in held if uuid in devices):
            found[allocation.user].add(allocation.server)
    return dict(found)
