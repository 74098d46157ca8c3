"""One spawn's steps, as the spawn page shows them: the spawn adds, ``Spawner.progress``
streams, and the stream ends when the spawn is done."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any


class Progress:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.done = False
        self._changed = asyncio.Event()

    def add(self, percent: int, message: str) -> None:
        self.events.append({"progress": percent, "message": message})
        self._changed.set()

    def finish(self) -> None:
        self.done = True
        self._changed.set()

    async def stream(self) -> AsyncIterator[dict[str, Any]]:
        sent = 0
        while True:
            while sent < len(self.events):
                yield self.events[sent]
                sent += 1
            if self.done:
                return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=1)
            except asyncio.TimeoutError:
                pass
