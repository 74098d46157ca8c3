"""The admin service's settings, read once from the environment the Hub gives it.

The Hub passes what a managed service needs (``JUPYTERHUB_*``), and ``admin.service(c)``
passes the spawner's settings under the same ``GPUSPAWNER_*`` names the ``gpuspawner`` CLI
reads, so the page, the CLI and the spawner agree on the world. A bad value stops the service
at start with a sentence naming the variable, instead of a page that half works.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlparse

from ..events import DEFAULT_KEEP_FILES, DEFAULT_MAX_BYTES
from ..inventory import SOURCES
from ..policy import parse_duration
from ..records import JSONRecord
from ..world import DEFAULT_START_TIMEOUT
from . import DEFAULT_HUB_ID, DEFAULT_NAME, DEFAULT_PORT


class SettingsError(ValueError):
    """An environment variable the admin must fix; the message names it."""


@dataclass(frozen=True)
class Settings(JSONRecord):
    name: str = DEFAULT_NAME
    #: URL path the proxy routes to us, with the trailing slash (``/services/<name>/``).
    prefix: str = f"/services/{DEFAULT_NAME}/"
    bind_host: str = "127.0.0.1"
    bind_port: int = DEFAULT_PORT
    hub_api_url: str = "http://127.0.0.1:8081/hub/api"
    #: The Hub's own URL prefix (``/hub/``), for its static CSS, logo and home page.
    hub_prefix: str = "/hub/"
    docker_host: str | None = None
    policy: str | None = None
    inventory: str = "auto"
    topology: str | None = None
    events: str | None = None
    #: Rotation of the operation log, as the spawner's ``events_max_bytes`` / ``events_keep``.
    events_max_bytes: int = DEFAULT_MAX_BYTES
    events_keep: int = DEFAULT_KEEP_FILES
    #: Follow Docker's event stream and log what happens to every container that holds a
    #: device (``docker.create`` … ``docker.destroy``), whoever made it.
    docker_events: bool = True
    ports: tuple[int, int] = (40000, 40999)
    #: Whose containers the page may remove (``Allocation.is_ours``); never unset.
    hub_id: str = DEFAULT_HUB_ID
    #: The hub's ``Spawner.start_timeout``: a created container younger than this is a spawn
    #: in flight and holds its devices, exactly as the spawner counts it.
    start_timeout: float = DEFAULT_START_TIMEOUT
    #: The hub's ``GPUSpawner.busy_memory_mib``: memory in use above which a device no
    #: running container holds is busy (0: the default).
    busy_memory_mib: int = 0
    #: A dcgm-exporter's ``/metrics`` URL (``GPUSPAWNER_DCGM_URL``): utilization per MIG
    #: device, which NVML does not give; None: shown as "n/a".
    dcgm_url: str | None = None
    #: A holder whose last activity is older than this is listed as idle.
    idle_after: float = 3600.0
    #: Seconds between the page's refreshes.
    refresh: float = 5.0
    #: Seconds between reports of GPU activity to the Hub (``admin/activity.py``); 0: never.
    activity_interval: float = 60.0
    metrics_public: bool = False
    #: The hub's GPU hosts (``GPUSPAWNER_HOSTS``: a YAML file, or the mapping as JSON, as the
    #: hub's ``hosts`` setting hands it over); None on a one-host hub.
    hosts: str | None = None
    #: The image the probe of another host's GPUs runs (``GPUSPAWNER_PROBE_IMAGE``, else
    #: ``GPUSPAWNER_IMAGE``: the servers' image, which every host has).
    probe_image: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        name = env.get("JUPYTERHUB_SERVICE_NAME") or DEFAULT_NAME
        prefix = env.get("JUPYTERHUB_SERVICE_PREFIX") or f"/services/{name}/"
        if not prefix.endswith("/"):
            prefix += "/"
        url = urlparse(env.get("JUPYTERHUB_SERVICE_URL") or f"http://127.0.0.1:{DEFAULT_PORT}")
        base = env.get("JUPYTERHUB_BASE_URL") or "/"
        if not base.endswith("/"):
            base += "/"
        inventory = env.get("GPUSPAWNER_INVENTORY") or "auto"
        if inventory not in SOURCES:
            raise SettingsError(
                f"GPUSPAWNER_INVENTORY={inventory!r} is not an inventory source; "
                f"use one of {', '.join(SOURCES)}"
            )
        return cls(
            name=name,
            prefix=prefix,
            bind_host=url.hostname or "127.0.0.1",
            bind_port=url.port or DEFAULT_PORT,
            hub_api_url=(env.get("JUPYTERHUB_API_URL") or "http://127.0.0.1:8081/hub/api")
            .rstrip("/"),
            hub_prefix=base + "hub/",
            docker_host=env.get("DOCKER_HOST") or None,
            policy=env.get("GPUSPAWNER_POLICY") or None,
            inventory=inventory,
            topology=env.get("GPUSPAWNER_TOPOLOGY") or None,
            events=env.get("GPUSPAWNER_EVENTS") or None,
            events_max_bytes=_bytes(env, "GPUSPAWNER_EVENTS_MAX_BYTES", DEFAULT_MAX_BYTES),
            events_keep=_count(env, "GPUSPAWNER_EVENTS_KEEP", DEFAULT_KEEP_FILES),
            docker_events=_flag(env, "GPUSPAWNER_ADMIN_DOCKER_EVENTS", True),
            ports=_port_range(env.get("GPUSPAWNER_PORTS") or "40000-40999"),
            hub_id=env.get("GPUSPAWNER_HUB_ID") or DEFAULT_HUB_ID,
            start_timeout=_duration(env, "GPUSPAWNER_START_TIMEOUT",
                                    str(DEFAULT_START_TIMEOUT)),
            busy_memory_mib=_count(env, "GPUSPAWNER_BUSY_MEMORY_MIB", 0),
            dcgm_url=env.get("GPUSPAWNER_DCGM_URL") or None,
            idle_after=_duration(env, "GPUSPAWNER_ADMIN_IDLE", "1h"),
            refresh=max(1.0, _duration(env, "GPUSPAWNER_ADMIN_REFRESH", "5s")),
            activity_interval=_duration(env, "GPUSPAWNER_ADMIN_ACTIVITY_INTERVAL", "60s"),
            metrics_public=(env.get("GPUSPAWNER_ADMIN_METRICS_PUBLIC") or "").lower()
            in ("1", "true", "yes"),
            hosts=env.get("GPUSPAWNER_HOSTS") or None,
            probe_image=env.get("GPUSPAWNER_PROBE_IMAGE") or env.get("GPUSPAWNER_IMAGE") or None,
        )


def _duration(env: Mapping[str, str], key: str, default: str) -> float:
    try:
        return parse_duration(env.get(key) or default)
    except ValueError as exc:
        raise SettingsError(f"{key}: {exc}") from None


#: Suffixes of a size, as JupyterHub's ByteSpecification (the spawner's trait) takes them.
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_bytes(text: str) -> int:
    """``10485760``, ``10M``, ``10MiB``, ``1.5G`` -> bytes (suffixes are powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"{text!r} is not a size; write e.g. 10485760 or 10M")
    return int(float(match[1]) * _UNITS[match[2].upper()])


def _bytes(env: Mapping[str, str], key: str, default: int) -> int:
    text = env.get(key)
    if not text:
        return default
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise SettingsError(f"{key}: {exc}") from None


def _count(env: Mapping[str, str], key: str, default: int) -> int:
    text = env.get(key)
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise SettingsError(f"{key}={text!r} is not a whole number") from None
    if value < 0:
        raise SettingsError(f"{key}={text!r}: need 0 or more")
    return value


def _flag(env: Mapping[str, str], key: str, default: bool) -> bool:
    text = (env.get(key) or "").strip().lower()
    if not text:
        return default
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{key}={text!r}: write 1 or 0")


def _port_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        first, last = int(low), int(high or low)
    except ValueError:
        raise SettingsError(
            f"GPUSPAWNER_PORTS={text!r} is not a port range; write e.g. 40000-40999"
        ) from None
    if not 0 < first <= last < 65536:
        raise SettingsError(f"GPUSPAWNER_PORTS={text!r}: need 0 < first <= last < 65536")
    return first, last
