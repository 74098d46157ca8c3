"""The operation log: one JSON line per decision, so an admin can answer "why did my
student get slice 1.3, and who released it?" after the fact.

Appends are single ``write`` calls of one line on a file opened in append mode, which the
kernel keeps whole even with several hub processes writing to the same file.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import deque
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .records import _jsonable

log = logging.getLogger(__name__)

#: Event names (stable: the admin page, metrics and people's scripts read them).
GPU_ALLOCATE = "gpu.allocate"
GPU_REFUSE = "gpu.refuse"
GPU_REALLOCATE = "gpu.reallocate"
GPU_KEEP = "gpu.keep"
GPU_PREEMPT = "gpu.preempt"
GPU_BACKOFF = "gpu.backoff"
GPU_RELEASE = "gpu.release"
#: Two or more running containers hold one device (``Snapshot.conflicts``); written once per
#: conflict by whoever first sees it (the admin service), not on every look.
GPU_CONFLICT = "gpu.conflict"
#: A container's labels name other devices than Docker's device requests give it
#: (``Snapshot.disagreements``); written once per container by the admin service.
GPU_DISAGREE = "gpu.disagree"
PORT_ALLOCATE = "port.allocate"
CONTAINER_CREATE = "container.create"
CONTAINER_REMOVE = "container.remove"
#: A container committed to an image before gpuspawner removed it (nothing the user made is
#: lost: the next container of that server starts from the image).
CONTAINER_SAVE = "container.save"
CONTAINER_START = "container.start"
CONTAINER_STOP = "container.stop"
SERVER_STOP = "server.stop"


class EventLog:
    """Append-only JSON lines; ``path=None`` keeps the last events in memory only."""

    def __init__(self, path: str | os.PathLike[str] | None = None, keep: int = 1000) -> None:
        self.path = Path(path) if path else None
        self._recent: deque[dict[str, Any]] = deque(maxlen=keep)
        self._lock = threading.Lock()

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                 "event": event}
        entry.update({k: _jsonable(v) for k, v in fields.items() if v is not None})
        line = json.dumps(entry, sort_keys=False, default=str) + "\n"
        with self._lock:
            self._recent.append(entry)
            if self.path is not None:
                try:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    with self.path.open("a", encoding="utf-8") as out:
                        out.write(line)
                except OSError as exc:
                    log.warning("operation log %s cannot be written (%s): %s", self.path, exc, line)
        return entry

    def read(self, limit: int = 200) -> list[dict[str, Any]]:
        """The newest ``limit`` events, oldest first (from the file when there is one)."""
        if self.path is None:
            with self._lock:
                return list(self._recent)[-limit:] if limit > 0 else []
        return list(tail(self.path, limit))


def tail(path: str | os.PathLike[str], limit: int = 200) -> Iterator[dict[str, Any]]:
    """The last ``limit`` parseable lines of a log; a torn or foreign line is skipped."""
    if limit <= 0:
        return
    try:
        with open(path, encoding="utf-8", errors="replace") as source:
            lines = deque(source, maxlen=limit + 64)  # slack for lines that do not parse
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("operation log %s cannot be read: %s", path, exc)
        return
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    yield from entries[-limit:]
