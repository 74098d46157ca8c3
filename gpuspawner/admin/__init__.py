"""The GPU allocations admin page: a JupyterHub-managed service that shows who holds which GPU.

This module holds only what ``jupyterhub_config.py`` needs, so the hub can import it without
pulling in the service's web stack::

    from gpuspawner import admin
    c.JupyterHub.services.append(admin.service(c))
    c.JupyterHub.load_roles.append(admin.role())

``service(c)`` reads the spawner's own settings (policy file, inventory source, operation log,
port range, hub id, start time-out) from the same config object, so the page sees the world
exactly as the spawner does; nothing is configured twice. Non-admin viewers (teaching
assistants) are optional and need one custom scope, see ``custom_scopes`` and ``viewer_role``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "DEFAULT_HUB_ID",
    "DEFAULT_NAME",
    "DEFAULT_PORT",
    "SERVICE_SCOPES",
    "VIEW_SCOPE",
    "custom_scopes",
    "role",
    "service",
    "viewer_role",
]

DEFAULT_NAME = "gpu-allocations"
DEFAULT_PORT = 10101
#: The spawner's default ``hub_id``: the service always has a hub id, so that "ours" (the
#: containers it may remove) is never "anything".
DEFAULT_HUB_ID = "jupyterhub"

#: The custom scope that lets a non-admin see the page and the JSON API, never act.
VIEW_SCOPE = "custom:gpuspawner:view"

#: What the service's own token may do at the Hub API, and nothing more: list users with their
#: groups (the policy's limits depend on hub groups) and last activity, read server models
#: (per-server last activity), and stop servers for the "Stop server" action. ``delete:servers``
#: is the narrowest scope that stops a server; ``admin:servers`` would add reading and writing
#: every server's state, which the page never needs.
SERVICE_SCOPES: tuple[str, ...] = (
    "list:users",
    "read:users:name",
    "read:users:groups",
    "read:users:activity",
    "read:servers",
    "delete:servers",
    "users:activity",
)

#: Spawner trait -> environment variable of the service (the names ``gpuspawner`` CLI reads).
_FROM_SPAWNER: tuple[tuple[str, str], ...] = (
    ("policy_file", "GPUSPAWNER_POLICY"),
    ("inventory_source", "GPUSPAWNER_INVENTORY"),
    ("topology_file", "GPUSPAWNER_TOPOLOGY"),
    ("events_file", "GPUSPAWNER_EVENTS"),
    ("events_max_bytes", "GPUSPAWNER_EVENTS_MAX_BYTES"),
    ("events_keep", "GPUSPAWNER_EVENTS_KEEP"),
    ("port_range", "GPUSPAWNER_PORTS"),
    ("hub_id", "GPUSPAWNER_HUB_ID"),
    # JupyterHub's Spawner.start_timeout: how long a created container is a spawn in flight.
    ("start_timeout", "GPUSPAWNER_START_TIMEOUT"),
    ("busy_memory_mib", "GPUSPAWNER_BUSY_MEMORY_MIB"),
    ("hosts", "GPUSPAWNER_HOSTS"),
    # The servers' image, which every host has: what the probe of a host's GPUs runs.
    ("image", "GPUSPAWNER_PROBE_IMAGE"),
)
#: Variables passed through from the hub's own environment when set there.
_PASS_THROUGH: tuple[str, ...] = (
    "DOCKER_HOST",
    "DOCKER_TLS_VERIFY",
    "DOCKER_CERT_PATH",
    *(env for _, env in _FROM_SPAWNER),
    "GPUSPAWNER_ADMIN_IDLE",
    "GPUSPAWNER_ADMIN_DOCKER_EVENTS",
    "GPUSPAWNER_ADMIN_ACTIVITY_INTERVAL",
    "GPUSPAWNER_DCGM_URL",
)


def _configured(config: Any, trait: str) -> Any | None:
    """A spawner trait set in ``config``, looked up without creating empty sections.

    traitlets' ``Config`` creates a section (and a lazy value) on attribute access, which
    would then be applied to the spawner; plain membership tests keep the config untouched.
    """
    if config is None:
        return None
    for section in ("GPUSpawner", "DockerSpawner", "Spawner"):
        if section in config and trait in config[section]:
            return config[section][trait]
    return None


def _env_value(trait: str, value: Any) -> str:
    if trait == "port_range":
        low, high = value
        return f"{int(low)}-{int(high)}"
    if trait == "hosts":
        return json.dumps(dict(value))
    return str(value)


def service(
    config: Any = None,
    *,
    name: str = DEFAULT_NAME,
    port: int = DEFAULT_PORT,
    host: str = "127.0.0.1",
    environment: Mapping[str, str] | None = None,
    viewers: bool = False,
    metrics_public: bool = False,
    display: bool = True,
) -> dict[str, Any]:
    """The ``c.JupyterHub.services`` entry that runs the admin page as a managed service.

    ``config``: the hub's ``c``; the spawner settings found there are passed on as the
    service's environment. ``environment`` adds or overrides variables. ``viewers=True`` lets
    the OAuth token carry ``custom:gpuspawner:view`` (define it with ``custom_scopes()``).
    ``metrics_public=True`` serves ``/metrics`` without a token, like the Hub's
    ``authenticate_prometheus = False``.
    """
    env: dict[str, str] = {k: os.environ[k] for k in _PASS_THROUGH if os.environ.get(k)}
    for trait, variable in _FROM_SPAWNER:
        value = _configured(config, trait)
        if value not in (None, "") and (trait != "hosts" or value):
            env[variable] = _env_value(trait, value)
    client_kwargs = _configured(config, "client_kwargs")
    if isinstance(client_kwargs, Mapping) and client_kwargs.get("base_url"):
        env["DOCKER_HOST"] = str(client_kwargs["base_url"])  # the engine DockerSpawner uses
    if config is not None and "GPUSPAWNER_HUB_ID" not in env:
        env["GPUSPAWNER_HUB_ID"] = DEFAULT_HUB_ID  # the spawner's default hub_id
    if metrics_public:
        env["GPUSPAWNER_ADMIN_METRICS_PUBLIC"] = "1"
    env.update(environment or {})
    entry: dict[str, Any] = {
        "name": name,
        "url": f"http://{host}:{port}",
        "command": [sys.executable, "-m", "gpuspawner.admin"],
        "environment": env,
        "display": display,
        # The page is run by the hub's admins for the hub's admins: no consent screen.
        "oauth_no_confirm": True,
        "oauth_client_allowed_scopes": [VIEW_SCOPE] if viewers else [],
    }
    return entry


def role(name: str | None = None, *, service_name: str = DEFAULT_NAME) -> dict[str, Any]:
    """The ``c.JupyterHub.load_roles`` entry granting the service its Hub API scopes."""
    return {
        "name": name or f"{service_name}-service",
        "description": "GPU allocations page: list users and servers, stop servers",
        "scopes": list(SERVICE_SCOPES),
        "services": [service_name],
    }


def custom_scopes() -> dict[str, dict[str, str]]:
    """``c.JupyterHub.custom_scopes`` entries: the read-only viewer scope."""
    return {
        VIEW_SCOPE: {
            "description": "See the GPU allocations page, its JSON API and metrics (read only)",
        }
    }


def viewer_role(
    users: Iterable[str] = (),
    groups: Iterable[str] = (),
    services: Iterable[str] = (),
    *,
    name: str | None = None,
    service_name: str = DEFAULT_NAME,
) -> dict[str, Any]:
    """A role for people (e.g. teaching assistants) and scripts that may look but not act.

    It needs both scopes: the Hub's access scope, without which the Hub refuses the login to
    the service at all, and the view scope, which the service checks.
    """
    return {
        "name": name or f"{service_name}-viewer",
        "description": "See the GPU allocations page (read only)",
        "scopes": [f"access:services!service={service_name}", VIEW_SCOPE],
        "users": list(users),
        "groups": list(groups),
        "services": list(services),
    }
