"""The world for tools outside the hub: ``snapshot.take`` over one Docker client, ledger and
policy file, shared by the ``gpuspawner`` CLI and the admin service.

There is no reader of Docker or NVML here: a snapshot is ``inventory.read`` +
``Ledger.read`` + the policy file, put together by ``snapshot.take`` exactly as the spawner
does. What this adds is what a long-running page needs: the policy file is re-read when it
changes, and a snapshot younger than ``max_age`` seconds is shared between the pages and
metrics scrapes that ask at the same moment, so ten open browser tabs cost one Docker list per
second, not ten. Docker is connected on first use, so a page starts (and says what is wrong)
while the engine is down.

Two settings make it see exactly what the spawner sees: the hub's ``start_timeout`` (a
container created and not yet started is a spawn in flight for that long, DESIGN.md "What
taken means"; a shorter one would show a slow spawn as failed and its device as free) and the
hub's id (whose containers count against its users' limits, and the only ones ``release``
removes).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from . import dcgm, inventory
from .admin import DEFAULT_HUB_ID
from .ledger import RELEASABLE_STATUSES, Ledger, connect, remove_stopped, save
from .policy import Policy, PolicyFile
from .records import Allocation, Inventory
from .snapshot import Snapshot, take

#: JupyterHub's default ``Spawner.start_timeout``: what the spawner uses when the hub's
#: config does not set it, so what the CLI and the admin service assume when not told.
DEFAULT_START_TIMEOUT = 60.0
#: The only Docker states in which a container may be released: stopped for good. Never
#: ``created`` (a spawn in flight, about to start), never running, paused or restarting.


class ReleaseRefused(RuntimeError):
    """An admin asked to release a container that may not be removed; the message says why.
    ``gone``: there is no such container (any more)."""

    def __init__(self, message: str, gone: bool = False) -> None:
        super().__init__(message)
        self.gone = gone


def release_refusal(allocation: Allocation, hub_id: str | None) -> str | None:
    """Why ``allocation``'s container may not be released, or None when it may: the one rule
    for the admin page's button and for ``World.release`` (which checks it again on a fresh
    read). Only a container of this hub (``Allocation.is_ours``) that is stopped for good."""
    name = allocation.container_name
    if not allocation.managed:
        return f"{name} was not made by gpuspawner; only this hub's own containers are removed"
    if not allocation.is_ours(hub_id):
        return (f"{name} belongs to hub {allocation.hub or '(unlabelled)'}, not to "
                f"{hub_id or '(no hub id)'}; only its own hub removes it")
    status = allocation.docker_status
    if status in RELEASABLE_STATUSES:
        return None
    who = f"{allocation.user}/{allocation.server or '(default)'}"
    if status in ("running", "paused", "restarting"):
        return f"the server {who} is {status}; stop it first"
    if status == "created":
        return (f"{name} of {who} is created and not started: a spawn in flight (or a failed "
                "one, which its spawner removes); it is not released from here")
    return f"{name} is {status}; only an exited or dead container can be released"


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
        start_timeout: float = DEFAULT_START_TIMEOUT,
        hub_id: str = DEFAULT_HUB_ID,
        busy_memory_mib: int = 0,
        dcgm_url: str | None = None,
    ) -> None:
        self.docker_host = docker_host
        self.busy_memory_mib = busy_memory_mib
        #: A dcgm-exporter's ``/metrics``: utilization per MIG device (``dcgm``), or None.
        self.dcgm_url = dcgm_url
        self.hub_id = hub_id
        self.inventory_source = inventory_source
        self.topology = topology
        self.max_age = max_age
        self.start_timeout = start_timeout
        self._client = client
        self._ledger: Ledger | None = (
            Ledger(client, start_timeout=start_timeout) if client is not None else None
        )
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
                self._ledger = Ledger(self._client, start_timeout=self.start_timeout)
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
        """Through an ``inventory.Reader`` (NVML on its own thread, never twice at once, what
        a failing GPU was known to be kept from the last read), not cached beyond this
        world's own ``max_age``."""
        if self._reader is None:
            self._reader = inventory.Reader(self.inventory_source, topology_file=self.topology,
                                            ttl=0.0)
        found = self._reader.read_blocking()
        return dcgm.apply(found, dcgm.read(self.dcgm_url)) if self.dcgm_url else found

    _reader: inventory.Reader | None = None

    def snapshot(self, fresh: bool = False) -> Snapshot:
        """One read of the world, or the one taken less than ``max_age`` seconds ago."""
        with self._lock:
            last = self._last
            if not fresh and last is not None and time.monotonic() - last[0] < self.max_age:
                return last[1]
            snap = take(self.read_inventory, self.ledger, self.policy(), hub_id=self.hub_id,
                        busy_memory_mib=self.busy_memory_mib)
            self._last = (time.monotonic(), snap)
            return snap

    def release(self, container_id: str) -> Allocation:
        """Save a stopped container of this hub to an image, then remove it (volumes kept:
        the user's next start is made from the image), and forget what was
        cached of it so the next snapshot shows the device free. Returns the container as
        read just before.

        The rule (``release_refusal``) is checked on a fresh read of Docker, not on the
        snapshot a page was drawn from: the server may have been started since. Raises
        ReleaseRefused when the container is gone or may not be removed; ``remove_stopped``
        still refuses one that started in the instant between the read and the removal.
        """
        found = release(self.snapshot(fresh=True), self.client, self.ledger, self.hub_id,
                        container_id)
        with self._lock:
            self._last = None
        return found


def release(snap: Snapshot, client: Any, ledger: Ledger, hub_id: str | None,
            container_id: str) -> Allocation:
    """``World.release`` on any engine: ``snap`` is a fresh read of that engine, ``client``
    and ``ledger`` its own (a host of a hub of several). The container is saved to an image
    there, so the user's next start on that host is made from it."""
    found = next((a for a in snap.allocations if a.container_id == container_id), None)
    if found is None:
        raise ReleaseRefused(
            f"no container {container_id[:12]} holds or held a device; it may have been "
            "removed already", gone=True)
    why = release_refusal(found, hub_id)
    if why:
        raise ReleaseRefused(why)
    # Nothing the user made is lost: the container is saved to an image first, and the
    # user's next start is made from it (the spawner looks for it).
    save(client, container_id, hub=hub_id or "", user=found.user or "",
         server=found.server, reason="released by an admin")
    remove_stopped(client, container_id)
    ledger.forget(container_id)
    return found
