"""GPU hosts a hub reaches through their Docker engines: names, endpoints, TLS.

Each host's Docker engine stays the truth for that host; the hub talks to it through
Docker's remote API only (``unix://`` for the local one, ``tcp://`` with TLS client
certificates, ``ssh://``). Its GPUs are read through the engine too (``gpuspawner.probe``),
since NVML does not cross the network.

``parse_hosts`` checks a configuration (the ``hosts`` setting: name -> endpoint or a
mapping) and says, per host, what is wrong; ``connect`` is the one place a client for a host
is made. A ``tcp://`` engine must come with TLS: Docker's API without it gives root on that
host to anyone who can reach the port.

``HostReader`` reads one host (its containers, its GPUs) into the same ``Snapshot`` a
single-host hub reads; ``read_all`` reads every host at once, and a host that does not
answer is marked down with the reason while the others go on.
"""

from __future__ import annotations

import os
import posixpath
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import docker
import docker.constants
import docker.errors
import docker.tls
import yaml

from . import probe
from .inventory import InventoryError
from .ledger import Ledger, LedgerError
from .policy import Policy
from .records import Inventory, JSONRecord
from .snapshot import Snapshot, take

SCHEMES = ("unix", "tcp", "ssh")
_KEYS = {"url", "address", "tls_ca", "tls_cert", "tls_key", "topology"}


class HostsError(ValueError):
    """A ``hosts`` setting that cannot be used; the message names the host and the fix."""


@dataclass(frozen=True)
class Host(JSONRecord):
    """One GPU host: its name (``ds01.host`` on its containers), its Docker endpoint, the
    address its servers' published ports are reached on, and the TLS files for ``tcp://``."""

    name: str
    url: str
    address: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    topology: str | None = None

    @property
    def reach(self) -> str:
        """Where a server's published port on this host is reached: ``address``, else the
        endpoint's host name (``tcp://gpu2:2376`` -> ``gpu2``), else 127.0.0.1 (local)."""
        return self.address or urlparse(self.url).hostname or "127.0.0.1"


def parse_hosts(value: Mapping[str, Any]) -> tuple[Host, ...]:
    """Hosts from ``{name: url}`` or ``{name: {url:, address:, tls_ca:, tls_cert:, tls_key:,
    topology:}}``; HostsError naming the first entry that is wrong and why."""
    if not isinstance(value, Mapping) or not value:
        raise HostsError("hosts must map at least one host name to its Docker endpoint")
    found = []
    for name, entry in value.items():
        if not isinstance(name, str) or not name.strip() or "," in name:
            raise HostsError(f"host name {name!r} must be a non-empty name without commas")
        spec = {"url": entry} if isinstance(entry, str) else entry
        if not isinstance(spec, Mapping):
            raise HostsError(f"host {name}: give its Docker endpoint (a URL) or a mapping "
                             f"with url:, not {type(entry).__name__}")
        unknown = sorted(set(spec) - _KEYS)
        if unknown:
            raise HostsError(f"host {name}: unknown key(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(_KEYS))}")
        url = str(spec.get("url") or "")
        scheme = urlparse(url).scheme
        if scheme not in SCHEMES:
            raise HostsError(f"host {name}: endpoint {url!r} must start with "
                             + ", ".join(f"{s}://" for s in SCHEMES))
        tls = [spec.get(k) for k in ("tls_ca", "tls_cert", "tls_key")]
        if scheme == "tcp" and not all(tls):
            raise HostsError(f"host {name}: a tcp:// engine needs tls_ca, tls_cert and tls_key "
                             "(Docker's API without TLS gives root on that host to anyone "
                             "who can reach its port)")
        if scheme != "tcp" and any(tls):
            raise HostsError(f"host {name}: TLS files apply to tcp:// endpoints only")
        found.append(Host(name.strip(), url, *(str(spec[k]) if spec.get(k) else None
                                               for k in ("address", "tls_ca", "tls_cert",
                                                         "tls_key", "topology"))))
    return tuple(found)


#: Docker's own default endpoint: the engine a client reaches without ``DOCKER_HOST``.
DEFAULT_ENDPOINT = "unix:///var/run/docker.sock"


def own_endpoint(configured: str | None = None) -> str:
    """The hub's own engine: the endpoint it is configured with, else ``DOCKER_HOST``, else
    Docker's default, as Docker's client chooses."""
    return configured or os.environ.get("DOCKER_HOST") or DEFAULT_ENDPOINT


def same_endpoint(a: str, b: str) -> bool:
    """Whether two Docker endpoints are the same engine (``unix:///x`` is ``unix://x``)."""

    def norm(url: str) -> str:
        parsed = urlparse(url)
        if parsed.scheme == "unix":
            return "unix:" + posixpath.normpath("/" + (parsed.netloc + parsed.path).lstrip("/"))
        return f"{parsed.scheme}://{parsed.hostname}:{parsed.port}{parsed.path.rstrip('/')}"

    return norm(a) == norm(b)


def load_setting(value: str) -> tuple[Host, ...]:
    """Hosts from ``GPUSPAWNER_HOSTS``: a YAML file's path, or the mapping itself as JSON (how
    the hub hands its ``hosts`` setting to its admin service)."""
    if value.lstrip().startswith("{"):
        try:
            return parse_hosts(yaml.safe_load(value) or {})
        except yaml.YAMLError as exc:
            raise HostsError(f"GPUSPAWNER_HOSTS is neither a file nor a mapping ({exc})") from exc
    return load_file(value)


def load_file(path: str | Path) -> tuple[Host, ...]:
    """Hosts from a YAML file holding what the ``hosts`` setting holds; HostsError naming the
    file and what is wrong."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise HostsError(f"{path}: cannot be read ({exc.strerror})") from exc
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise HostsError(f"{path}: not YAML ({exc})") from exc
    try:
        return parse_hosts(value or {})
    except HostsError as exc:
        raise HostsError(f"{path}: {exc}") from exc


def connect(host: Host, timeout: float = 30.0) -> docker.DockerClient:
    """A Docker client for ``host``: TLS-verified both ways for ``tcp://``. LedgerError with
    the host's name and the reason when its TLS files are missing or it does not answer."""
    tls = None
    if host.tls_cert and host.tls_key and host.tls_ca:
        for path in (host.tls_ca, host.tls_cert, host.tls_key):
            if not Path(path).is_file():
                raise LedgerError(f"host {host.name}: TLS file {path} does not exist")
        tls = docker.tls.TLSConfig(client_cert=(host.tls_cert, host.tls_key),
                                   ca_cert=host.tls_ca, verify=True)
    try:
        if tls is None:
            client = docker.DockerClient(base_url=host.url, timeout=timeout)
        else:
            # The host's own CA, always: requests lets REQUESTS_CA_BUNDLE (set on many
            # machines) replace it, and then refuses the engine's certificate. So the
            # session ignores the environment before its first request, the version check.
            client = docker.DockerClient(base_url=host.url, tls=tls, timeout=timeout,
                                         version=docker.constants.MINIMUM_DOCKER_API_VERSION)
            client.api.trust_env = False
            client.api._version = client.api._retrieve_server_version()
        client.api.ping()
    except (docker.errors.DockerException, OSError) as exc:
        raise LedgerError(f"host {host.name}: its Docker engine at {host.url} does not answer "
                          f"({exc})") from exc
    return client


#: Seconds a remote host's GPUs, as its probe last printed them, serve its reads. MIG
#: devices change rarely and an admin's change shows within this time; a start that fails
#: with "unknown device" reads them again at once (``HostReader.invalidate``).
PROBE_TTL = 60.0


class HostReader:
    """One host's snapshots: its engine's containers (a ``Ledger`` of its own) and its GPUs,
    through a probe container on that engine (NVML does not cross the network), kept
    ``probe_ttl`` seconds; or ``local_inventory`` for the hub's own host (NVML). A host whose
    engine does not answer raises LedgerError naming it; the next read connects again.
    Safe to call from several threads."""

    def __init__(
        self,
        host: Host,
        *,
        image: str,
        hub_id: str,
        policy: Callable[[], Policy],
        start_timeout: float = 60.0,
        local_inventory: Callable[[], Inventory] | None = None,
        probe_ttl: float = PROBE_TTL,
        clock: Callable[[], float] = time.monotonic,
        busy_memory_mib: int = 0,
        own_snapshot: Callable[[bool], Snapshot] | None = None,
    ) -> None:
        self.host = host
        self.image = image
        self.hub_id = hub_id
        self.policy = policy
        self.start_timeout = start_timeout
        self.local_inventory = local_inventory
        #: The hub's ``busy_memory_mib``, for every read of this host that does not say.
        self.busy_memory_mib = busy_memory_mib
        self.probe_ttl = probe_ttl
        self.clock = clock
        #: The hub's own host, read by the caller's own snapshot (``fresh`` after
        #: ``invalidate``): the admin service keeps one of its own engine, and reading the
        #: engine again for the read of every host would double its work.
        self.own_snapshot = own_snapshot
        self._fresh = False
        self._lock = threading.Lock()
        self._client: docker.DockerClient | None = None
        self._ledger: Ledger | None = None
        #: The last probe: when (this reader's clock, and the wall clock) and what it printed.
        self._probed: tuple[float, datetime, Inventory] | None = None
        self._pending: Future[Snapshot] | None = None

    def invalidate(self) -> None:
        """Forget the probed GPUs: the next read runs the probe again (the own snapshot's
        next read is fresh)."""
        with self._lock:
            self._probed = None
            self._fresh = True

    def _engine(self) -> tuple[docker.DockerClient, Ledger]:
        with self._lock:
            if self._client is not None and self._ledger is not None:
                return self._client, self._ledger
        client = connect(self.host)
        with self._lock:
            self._client, self._ledger = client, Ledger(client, start_timeout=self.start_timeout)
            return self._client, self._ledger

    def client(self) -> docker.DockerClient:
        """This host's Docker client (connected on first use; LedgerError naming the host)."""
        return self._engine()[0]

    def ledger(self) -> Ledger:
        """The ledger of this host's engine (connected on first use)."""
        return self._engine()[1]

    def reset(self) -> None:
        """Connect again on the next call, and run the probe again: the engine failed, and
        may have restarted (with other MIG devices)."""
        with self._lock:
            self._client, self._ledger, self._probed = None, None, None

    def probe(self) -> Inventory:
        """The host's GPUs through its probe now, kept for the next reads."""
        self.invalidate()
        return self.inventory()

    def inventory(self) -> Inventory:
        """The host's GPUs: the hub's own NVML for the local host, else what its probe printed
        within ``probe_ttl`` (the probe runs again after that)."""
        if self.local_inventory is not None:
            return self.local_inventory()
        with self._lock:
            probed = self._probed
        if probed is not None and self.clock() - probed[0] < self.probe_ttl:
            return probed[2]
        client, _ledger = self._engine()
        began = datetime.now(timezone.utc)
        try:
            found = probe.read(client, self.image, self.hub_id)
        except InventoryError as exc:  # a host without the NVIDIA runtime: CPU servers only
            found = Inventory(source="none", problems=(f"host {self.host.name}: {exc}",))
        with self._lock:
            self._probed = (self.clock(), began, found)
        return found

    def activity_at(self) -> datetime | None:
        """When the GPU activity (memory in use, processes) of this host's last read was
        read: its probe's start, which may be up to ``probe_ttl`` before the read; None for
        the hub's own host, whose NVML is read with every read."""
        if self.local_inventory is not None:
            return None
        with self._lock:
            return None if self._probed is None else self._probed[1]

    def read(self, policy: Policy | None = None, *, live: str = "",
             stopped_max_age: float = 0.0, busy_memory_mib: int | None = None) -> Snapshot:
        """Docker's containers of this host, then its GPUs (``snapshot.take``, whose
        arguments the others are)."""
        try:
            if self.own_snapshot is not None and not live and not stopped_max_age:
                with self._lock:
                    fresh, self._fresh = self._fresh, False
                return self.own_snapshot(fresh)
            _client, ledger = self._engine()
            return take(self.inventory, ledger, policy or self.policy(), hub_id=self.hub_id,
                        live=live, stopped_max_age=stopped_max_age,
                        busy_memory_mib=(self.busy_memory_mib if busy_memory_mib is None
                                         else busy_memory_mib))
        except (LedgerError, docker.errors.DockerException, OSError) as exc:
            self.reset()
            # Docker's client names a unix socket "http+docker://localhost": say which.
            said = str(exc) if isinstance(exc, LedgerError) else (
                f"its Docker engine did not answer ({exc})")
            if said.startswith(f"host {self.host.name}:"):
                said = said[len(f"host {self.host.name}:"):].strip()
            raise LedgerError(f"host {self.host.name} ({self.host.url}): {said}") from exc

    def begin(self, pool: ThreadPoolExecutor) -> Future[Snapshot]:
        """This host's read on ``pool``, or the one still running: a host that hangs holds
        one thread, never one per page load."""
        with self._lock:
            if self._pending is None or self._pending.done():
                self._pending = pool.submit(self.read)
            return self._pending


def readers(
    found: Sequence[Host],
    *,
    image: str,
    hub_id: str,
    policy: Callable[[], Policy],
    start_timeout: float = 60.0,
    own: str | None = None,
    local_inventory: Callable[[], Inventory] | None = None,
    busy_memory_mib: int = 0,
    own_snapshot: Callable[[bool], Snapshot] | None = None,
) -> list[HostReader]:
    """One reader per host; the host whose endpoint is ``own`` (the reader's own engine)
    reads its GPUs through ``local_inventory`` (NVML), the others through their probe; with
    ``own_snapshot``, the own host's reads are that (``HostReader.own_snapshot``)."""
    def is_own(host: Host) -> bool:
        return own is not None and same_endpoint(host.url, own)

    return [HostReader(host, image=image, hub_id=hub_id, policy=policy,
                       start_timeout=start_timeout, busy_memory_mib=busy_memory_mib,
                       local_inventory=local_inventory if is_own(host) else None,
                       own_snapshot=own_snapshot if is_own(host) else None)
            for host in found]


@dataclass(frozen=True)
class HostView(JSONRecord):
    """One host in a read of all of them: its snapshot, or why it is down."""

    name: str
    snapshot: Snapshot | None
    down: str = ""

    @property
    def up(self) -> bool:
        return self.snapshot is not None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "up": self.up, "down": self.down,
                "snapshot": None if self.snapshot is None else self.snapshot.to_json()}

    def summary(self, url: str) -> dict[str, Any]:
        """What the CLI's ``hosts``, the admin page and its JSON API show of a host: up with
        its GPUs, holders and free devices per profile, or down with the reason."""
        snap = self.snapshot
        if snap is None:
            return {"name": self.name, "url": url, "up": False, "down": self.down}
        return {
            "name": self.name, "url": url, "up": True, "down": "",
            "gpus": len(snap.inventory.gpus), "migs": len(snap.inventory.migs),
            "holders": sorted({a.container_name for a in snap.allocations
                               if a.holds and a.uuids}),
            "free": snap.free_json(),
            "problems": list(snap.inventory.problems),
        }


def timed_out(host: Host, timeout: float) -> str:
    """Why a host is down when its read took longer than ``timeout`` seconds."""
    return (f"host {host.name}: its Docker engine at {host.url} did not answer within "
            f"{timeout:g} s")


def read_all(
    readers: Sequence[HostReader], pool: ThreadPoolExecutor, timeout: float = 10.0
) -> tuple[HostView, ...]:
    """Every host at once, in ``readers``' order. A host that fails, or does not answer
    within ``timeout`` seconds, is down with the reason; the others are read as usual. The
    read of a slow host goes on, and the next call shares it."""
    started = {reader.host.name: reader.begin(pool) for reader in readers}
    deadline = time.monotonic() + timeout
    views = []
    for reader in readers:
        name = reader.host.name
        try:
            snap = started[name].result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            views.append(HostView(name, None, timed_out(reader.host, timeout)))
        except LedgerError as exc:
            views.append(HostView(name, None, str(exc)))
        else:
            views.append(HostView(name, snap))
    return tuple(views)
