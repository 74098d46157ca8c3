"""The one family of spawn errors: a refusal with a stable ``reason`` code, an HTTP status,
and the sentence the user sees on the spawn page. Codes come from the allocator and the
planner; nothing matches on the English text.
"""

from __future__ import annotations

from typing import Any

from tornado import web

from . import allocator, spawnplan
from .allocator import Refusal

try:  # JupyterHub >= 6: a policy failure, no traceback, a reason label in metrics
    from jupyterhub.spawner import SpawnException
except ImportError:  # pragma: no cover - JupyterHub 5

    class SpawnException(web.HTTPError):  # type: ignore[no-redef]
        def __init__(self, message: str, *, reason: str = "", status_code: int = 400, **_: Any):
            super().__init__(status_code, log_message=message, reason=None)
            self.jupyterhub_message = message


def refuse(message: str, reason: str, status: int = 400) -> SpawnException:
    error = SpawnException(message, reason=reason, status_code=status)
    # JupyterHub shows ``jupyterhub_message`` on the spawn page when it is set.
    error.jupyterhub_message = message
    return error


#: HTTP status of each refusal code (400 for codes not listed).
STATUS = {
    allocator.FORBIDDEN: 403,
    allocator.NO_SUCH_PROFILE: 400,
    allocator.NO_GPUS: 503,
    allocator.QUOTA: 409,
    allocator.TOO_MANY_SERVERS: 409,
    allocator.TOO_MANY_DEVICES: 400,
    allocator.FULL: 503,
    spawnplan.NAME_CLASH: 409,
    spawnplan.GPU_LOST: 409,
    spawnplan.BUSY: 409,
    spawnplan.PORTS: 503,
    spawnplan.HOST_DOWN: 503,
}


def docker_down(exc: Exception) -> SpawnException:
    return refuse(
        f"The Docker engine is not answering, so no server can start now ({exc}). "
        "Try again in a minute; if it persists, tell an admin.", "docker", 503)


def refused(refusal: Refusal) -> SpawnException:
    """The spawn error of a decision's refusal: one sentence, its code, its status."""
    message = refusal.message[0].upper() + refusal.message[1:] + "."
    return refuse(message, refusal.code, STATUS.get(refusal.code, 400))
