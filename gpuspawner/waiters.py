"""The queue of spawns waiting for a device (``gpu_wait_timeout``), per hub process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


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

    async def wait(
        self,
        key: str,
        who: str,
        priority: int,
        timeout: float,
        ready: Callable[[], Awaitable[bool]],
        tell: Callable[[str], None],
    ) -> None:
        """Wait in the queue for ``key`` until ``ready()`` says a device is free for ``who``
        (asked only when first in line) or ``timeout`` seconds pass; ``tell`` the place."""
        self.join(priority, key, who)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                tell(f"Waiting for a free device: number {self.position(key, who)} in the queue")
                await asyncio.sleep(2)
                if self.position(key, who) == 1 and await ready():
                    return
        finally:
            self.leave(who)
