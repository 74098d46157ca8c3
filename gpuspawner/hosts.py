"""GPU hosts a hub reaches through their Docker engines: names, endpoints, TLS.

Each host's Docker engine stays the truth for that host; the hub talks to it through
Docker's remote API only (``unix://`` for the local one, ``tcp://`` with TLS client
certificates, ``ssh://``). Its GPUs are read through the engine too (``gpuspawner.probe``),
since NVML does not cross the network.

``parse_hosts`` checks a configuration (the ``hosts`` setting: name -> endpoint or a
mapping) and says, per host, what is wrong; ``connect`` is the one place a client for a host
is made. A ``tcp://`` engine must come with TLS: Docker's API without it gives root on that
host to anyone who can reach the port.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import docker
import docker.constants
import docker.errors
import docker.tls

from .ledger import LedgerError
from .records import JSONRecord

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
