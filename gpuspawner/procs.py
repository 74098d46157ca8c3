"""Which container a host process runs in: host pid -> cgroup -> Docker container id.

NVML lists the compute processes on each device by host pid and says nothing of containers.
The kernel does: ``/proc/<pid>/cgroup`` names the process's cgroup, and Docker puts each
container in a cgroup named after its full id, whichever cgroup driver and version the host
uses::

    0::/system.slice/docker-<id>.scope        cgroup v2, systemd driver
    0::/docker/<id>                           cgroup v2, cgroupfs driver
    12:memory:/docker/<id>                    cgroup v1
    0::/docker/<id>/init.scope                a container running systemd inside

The pid is the host's, so the reader must see the host's processes: a hub or admin service
on the host does; in the shipped compose deployment the admin service gets ``pid: host``
(docs/deploy.md). Where the pid is not visible (another pid namespace, the process has
ended) the container is unknown (None), never guessed.

The parsing is a pure function of the file's text; the one read is :func:`container_of`.
"""

from __future__ import annotations

import re
from pathlib import Path

#: Where the host's processes are listed.
PROC = Path("/proc")

_ID = r"[0-9a-f]{64}"
#: A Docker container's cgroup: ``docker-<id>.scope`` (systemd) or ``docker/<id>`` (cgroupfs),
#: anywhere in the path (a ``--cgroup-parent`` puts more in front).
_DOCKER = re.compile(rf"(?:/docker-({_ID})\.scope|/docker/({_ID}))(?=/|$)")


def container_id_from_cgroup(text: str) -> str | None:
    """The Docker container id in a ``/proc/<pid>/cgroup`` text; None when the process is in
    no Docker container (a host process, another runtime's)."""
    for line in text.splitlines():
        path = line.split(":", 2)[-1].strip()
        found = _DOCKER.search(path)
        if found:
            return found.group(1) or found.group(2)
    return None


def container_of(pid: int, proc: Path = PROC) -> str | None:
    """The container host process ``pid`` runs in; None where it runs in none, has ended or
    is not visible from here. Never raises: a process is listed with or without a container."""
    try:
        text = (proc / str(int(pid)) / "cgroup").read_text()
    except (OSError, ValueError):
        return None
    return container_id_from_cgroup(text)
