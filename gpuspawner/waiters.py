"""The queue of spawns waiting for a device (``gpu_wait_timeout``), per hub process."""

from __future__ import annotations

import time


class Waiters:
    """Spawns waiting for a device (``gpu_wait_timeout``): first come, first served within a
    priority, per GPU request."""

    def __init__(self) -> None:
        self.queue: list[tuple[int, float, str, str]] = []  # (-priority, since, key, who)

    def join(self, priority: int, key: str, who: str) -> None:
        if not any(w[3] == who for w in self.queue):
            self.queue.append((-priority, time.monotonic(), key, who))
            self.queue.sort()

    def leave(self, who: str) -> None:
        self.queue = [w for w in self.queue if w[3] != who]

    def position(self, key: str, who: str) -> int:
        mine = [w[3] for w in self.queue if w[2] == key]
        return mine.index(who) + 1 if who in mine else 0
