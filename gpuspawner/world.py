"""The world for tools outside the hub: ``snapshot.take`` over one Docker client, ledger and
policy file, shared by the ``gpuspawner`` CLI and the admin service.

There is no reader of Docker or NVML here: a snapshot is ``inventory.read`` +
``Ledger.read`` + the policy file, put together by ``snapshot.take`` exactly as the spawner
does. What this adds is what a long-running page needs: the policy file is re-read when it
changes, and a snapshot younger than ``max_age`` seconds is shared between the pages and
metrics scrapes that ask at the same moment, so ten open browser tabs cost one Docker list per
second, not ten. Docker is connected on first use, so a page starts (and says what is wrong)
while the engine is down.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from . import inventory
from .ledger import Ledger, connect, remove_stopped
from .policy import Policy, PolicyFile
from .records import Inventory
from .snapshot import Snapshot, take


class World:
    """Snapshots of one engine and host; safe to call from several threads."""

    def __init__(
        self,
        *,
        docker_host: str | None = None,
        policy: str | os.PathLike[str] | None = None,
        inventory_source: str = "auto",
        topology: str | os.PathLike[str] | None = None,
        client: Any = None,
        max_age: float = 0.0,
    ) -> None:
        self.docker_host = docker_host
        self.inventory_source = inventory_source
        self.topology = topology
        self.max_age = max_age
        self._client = client
        self._ledger: Ledger | None = Ledger(client) if client is not None else None
        self._lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self._policy = PolicyFile(policy)
        self._last: tuple[float, Snapshot] | None = None

    def _engine(self) -> tuple[Any, Ledger]:
        """The Docker client and its ledger, made on first use (LedgerError when the engine
        does not answer)."""
        with self._connect_lock:
            if self._ledger is None:
                self._client = connect(self.docker_host)
                self._ledger = Ledger(self._client)
            return self._client, self._ledger

    @property
    def client(self) -> Any:
        return self._engine()[0]

    @property
    def ledger(self) -> Ledger:
        return self._engine()[1]

    def policy(self) -> Policy:
        """The policy file, re-read when it changes (PolicyError when it has errors)."""
        return self._policy.current()

    def read_inventory(self) -> Inventory:
        return inventory.read(self.inventory_source, topology_file=self.topology)

    def snapshot(self, fresh: bool = False) -> Snapshot:
        """One read of the world, or the one taken less than ``max_age`` seconds ago."""
        with self._lock:
            last = self._last
            if not fresh and last is not None and time.monotonic() - last[0] < self.max_age:
                return last[1]
            snap = take(self.read_inventory, self.ledger, self.policy())
            self._last = (time.monotonic(), snap)
            return snap

    def release(self, container_id: str) -> None:
        """Remove a stopped container, volumes kept (``ledger.remove_stopped`` refuses a running
        one), and forget what was cached of it so the next snapshot shows the device free."""
        remove_stopped(self.client, container_id)
        self.ledger.forget(container_id)
        with self._lock:
            self._last = None
