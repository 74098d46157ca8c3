"""GPUSpawner: DockerSpawner that gives each server a MIG slice or whole GPUs, and host ports.

At spawn time, under one allocation lock held from the read of the world until the container
exists, it reads inventory + ledger + policy (one Snapshot), lets the pure allocator choose,
and writes the choice into the new container's labels and DeviceRequest. Docker is the only
record, so a hub restart loses nothing and a second hub on the same engine sees our choices.
"""

from __future__ import annotations

import asyncio
import html
import inspect
import random
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, ClassVar

import docker
import docker.errors
import requests.exceptions
from dockerspawner import DockerSpawner
from tornado import web
from traitlets import (
    Callable as CallableTrait,
)
from traitlets import (
    CaselessStrEnum,
    Dict,
    Float,
    Int,
    List,
    Tuple,
    Unicode,
    Union,
    default,
)

from . import allocator, events, inventory, labels, ports
from .allocator import Choice, Refusal, Request
from .events import EventLog
from .ledger import Ledger, LedgerError, remove_stopped
from .policy import Policy, PolicyError, PolicyFile
from .profiles import Profile, ProfileError, default_of, parse_profiles, permitted
from .records import Inventory
from .snapshot import Snapshot

try:  # JupyterHub >= 6: a policy failure, no traceback, a reason label in metrics
    from jupyterhub.spawner import SpawnException
except ImportError:  # pragma: no cover - JupyterHub 5

    class SpawnException(web.HTTPError):  # type: ignore[no-redef]
        def __init__(self, message: str, *, reason: str = "", status_code: int = 400, **_: Any):
            super().__init__(status_code, log_message=message, reason=None)
            self.jupyterhub_message = message


def refuse(message: str, reason: str, status: int = 400) -> SpawnException:
    error = SpawnException(message, reason=reason, status_code=status)
    # JupyterHub shows ``jupyterhub_message`` on the spawn page when it is set.
    error.jupyterhub_message = message
    return error


def nanotime(stamp: str) -> str:
    """Docker's RFC 3339 time with its fraction padded to nine digits (Go trims trailing
    zeros, which would make text order differ from time order)."""
    head, _, rest = stamp.partition(".")
    digits = "".join(ch for ch in rest if ch.isdigit())
    return f"{head.rstrip('Z')}.{digits.ljust(9, '0')[:9]}"


_STATUS = {
    allocator.FORBIDDEN: 403,
    allocator.NO_SUCH_PROFILE: 400,
    allocator.NO_GPUS: 503,
    allocator.QUOTA: 409,
    allocator.TOO_MANY_SERVERS: 409,
    allocator.TOO_MANY_DEVICES: 400,
    allocator.FULL: 503,
}
_TRANSIENT = (requests.exceptions.ConnectionError, requests.exceptions.Timeout)
_RETRYABLE_CALLS = {
    "inspect_container", "inspect_image", "containers", "start", "stop", "port",
    "remove_container", "wait",
}


class _Waiters:
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


class GPUSpawner(DockerSpawner):
    """A DockerSpawner that allocates NVIDIA MIG slices / whole GPUs and host ports per server.

    Configure ``profile_list`` (what students choose from), ``policy_file`` (who may take
    what), and ``port_range``; everything else has working defaults.
    """

    # One lock per hub process: from the read of Docker until the container is created.
    _allocation_lock: ClassVar[asyncio.Lock | None] = None
    _ledgers: ClassVar[dict[str, Ledger]] = {}
    _policies: ClassVar[dict[str, PolicyFile]] = {}
    _event_logs: ClassVar[dict[str, EventLog]] = {}
    _waiters: ClassVar[_Waiters] = _Waiters()

    hub_id = Unicode(
        "jupyterhub",
        config=True,
        help="""Id of this hub, written into each container's ``ds01.hub`` label so that two
        hubs on one Docker engine can tell their containers apart. Devices are shared: every
        hub counts every container's devices as taken, whoever made it.""",
    )

    profile_list = Union(
        [List(Dict()), CallableTrait()],
        default_value=[],
        config=True,
        help="""The profiles a user chooses from, as in KubeSpawner's ``profile_list``.

        Each entry: ``display_name``, ``slug`` (default: from the display name),
        ``description``, ``default`` (bool), ``gpu`` (``{"mig_profile": "1g.10gb"}``,
        ``{"gpus": 2}`` for whole GPUs, or absent for CPU only), and ``overrides`` with any of
        ``image``, ``mem_limit``, ``cpu_limit``, ``environment`` (dict) and ``ports``
        (dict name -> container port, added to ``ports``).

        May be a callable ``f(spawner) -> list`` (may be async) for per-user lists. Profiles
        the user's policy forbids are not offered. With no profiles, the server is CPU only.""",
    )

    policy_file = Unicode(
        None,
        allow_none=True,
        config=True,
        help="""Path of the YAML policy file (limits per user and group, priorities, holds);
        see docs/policy.md. Re-read when it changes; a file with errors refuses new spawns with
        the error (running servers are untouched). Unset: built-in defaults (one GPU-equivalent
        per user, no whole GPUs, no hold after stop).""",
    )

    inventory_source = CaselessStrEnum(
        list(inventory.SOURCES),
        default_value="auto",
        config=True,
        help="""Where the GPU inventory comes from: ``nvml`` (nvidia-ml-py), ``nvidia-smi``,
        ``file`` (``topology_file``), ``none`` (CPU only), or ``auto``: the topology file if
        set, else NVML, else nvidia-smi, else none.""",
    )

    topology_file = Unicode(
        None,
        allow_none=True,
        config=True,
        help="""A static topology file (YAML/JSON; see docs/inventory.md) for hubs that
        cannot see the GPUs themselves. Must be kept in step with the host by hand.""",
    )

    port_range = Tuple(
        Int(),
        Int(),
        default_value=(40000, 40999),
        config=True,
        help="""Host ports (inclusive) from which each server's ``ports`` are published.
        Ports are checked against every container in Docker and against the host itself.""",
    )

    ports = Union(
        [Dict(), CallableTrait()],
        default_value={},
        config=True,
        help="""Extra container ports to publish on a host port each, as ``{name: container
        port}``, e.g. ``{"ssh": 22, "tensorboard": 6006}``. Host ports come from
        ``port_range``; a server keeps its ports across restarts while they are free. The
        choice is shown in the spawn progress, written to the ``ds01.port.<name>`` labels and
        given to the server as ``GPUSPAWNER_PORT_<NAME>`` environment variables. May be a
        callable of the spawner.""",
    )

    ports_host_ip = Unicode(
        "0.0.0.0",
        config=True,
        help="Host address the extra ``ports`` are published on (and probed on).",
    )

    on_gpu_lost = CaselessStrEnum(
        ["reallocate", "fail"],
        default_value="reallocate",
        config=True,
        help="""What a restart does when the stopped server's device is gone (MIG re-created,
        GPU removed) or was given to someone else after the hold: ``reallocate`` removes the
        old container (volumes are kept) and creates a new one, preferring the same GPU and
        profile; ``fail`` refuses, saying what happened and what to do.""",
    )

    gpu_wait_timeout = Float(
        0,
        config=True,
        help="""Seconds a spawn waits for a device when its profile is full, showing its
        place in the queue (first come, first served within a priority). 0: refuse at once
        with the reason.""",
    )

    allocation_strategy = CaselessStrEnum(
        [allocator.PACK, allocator.SPREAD],
        default_value=allocator.PACK,
        config=True,
        help="""``pack``: fill partly used GPUs first so whole GPUs stay free for multi-GPU
        profiles; ``spread``: prefer the emptiest GPU.""",
    )

    events_file = Unicode(
        None,
        allow_none=True,
        config=True,
        help="""Operation log (JSON lines: allocations, refusals, re-allocations, ports,
        containers). Unset: kept in memory only, and in the hub's log.""",
    )

    docker_retries = Int(
        3,
        config=True,
        help="""Times a Docker call that failed for a transient reason (engine restarting,
        connection refused, 5xx) is retried, with backoff, before the spawn fails.""",
    )

    @default("remove")
    def _default_remove(self) -> bool:
        return False

    @default("apply_user_options")
    def _default_apply_user_options(self) -> Callable[..., None]:
        # ``profile`` is the only option, and start() resolves it (on every JupyterHub
        # version); this only tells JupyterHub >= 5.3 that the option is handled.
        def apply_user_options(spawner: GPUSpawner, user_options: dict[str, Any]) -> None:
            return None

        return apply_user_options

    _engine_checked: ClassVar[bool] = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reset_progress()
        if not GPUSpawner._engine_checked:
            GPUSpawner._engine_checked = True
            self._log_engine()

    def _log_engine(self) -> None:
        """Say once, at start-up, whether Docker answers: a hub must come up without it."""
        try:
            version = self.client.version().get("Version", "?")
            self.log.info("gpuspawner: Docker %s answers at %s", version, self.client.base_url)
        except Exception as exc:
            type(self)._client = None  # try again on the next call
            self.log.error(
                "gpuspawner: the Docker engine does not answer (%s); servers cannot start "
                "until it does, running ones are left alone", exc
            )

    async def poll(self):
        try:
            return await super().poll()
        except (docker.errors.DockerException, *_TRANSIENT) as exc:
            if isinstance(exc, docker.errors.APIError) and exc.status_code and (
                exc.status_code < 500
            ):
                raise
            # The engine is down or restarting, not the container: claim nothing changed, so
            # the hub keeps the server (Docker still has it) instead of forgetting it.
            type(self)._client = None
            self.log.warning("Docker does not answer a poll of %s (%s); assuming it still "
                             "runs", self._log_name, exc)
            return None

    def _reset_progress(self) -> None:
        self._events: list[dict[str, Any]] = []
        self._progress_changed = asyncio.Event()
        self._spawn_done = False

    def run_pre_spawn_hook(self):
        # JupyterHub serves /progress as soon as a spawn is pending, before start() runs:
        # the progress of this spawn must exist (and the last one's be gone) by then.
        self._reset_progress()
        return super().run_pre_spawn_hook()

    # ------------------------------------------------------------------ shared parts

    @property
    def event_log(self) -> EventLog:
        key = self.events_file or ""
        if key not in self._event_logs:
            self._event_logs[key] = EventLog(self.events_file)
        return self._event_logs[key]

    @property
    def ledger(self) -> Ledger:
        # One ledger (and its cache) per Docker client: base_url alone reads the same
        # "http+docker://localhost" for every unix socket.
        key = str(id(self.client))
        if key not in self._ledgers:
            self._ledgers[key] = Ledger(
                self.client, start_timeout=self.start_timeout, logger=self.log
            )
        return self._ledgers[key]

    @classmethod
    def _lock(cls) -> asyncio.Lock:
        if cls._allocation_lock is None:
            cls._allocation_lock = asyncio.Lock()
        return cls._allocation_lock

    def load_policy(self) -> Policy:
        """The policy, re-read when the file changes. Raises a SpawnException on errors."""
        source = self._policies.setdefault(self.policy_file or "", PolicyFile(self.policy_file))
        try:
            return source.current()
        except PolicyError as exc:
            raise refuse(
                f"The GPU policy file has an error, so no server can be allocated now: {exc}. "
                "Ask an admin to fix it; running servers are not affected.",
                "policy",
                500,
            ) from exc

    def read_inventory(self) -> Inventory:
        """The GPUs; an inventory that cannot be read leaves CPU servers working."""
        try:
            return inventory.read(
                self.inventory_source, topology_file=self.topology_file, logger=self.log
            )
        except inventory.InventoryError as exc:
            self.log.error("GPU inventory (%s) cannot be read: %s", self.inventory_source, exc)
            return Inventory(source="none", problems=(f"the GPU inventory cannot be read: {exc}",))

    def _groups(self) -> list[str]:
        try:
            return [g.name for g in self.user.groups]
        except Exception:  # a mocked user in tests, or no database
            return []

    def take_snapshot(self) -> Snapshot:
        """Read the world once (blocking: call through the executor)."""
        policy = self.load_policy()
        read = self.ledger.read(policy.hold_seconds)
        return Snapshot(self.read_inventory(), read.allocations, policy, read.bound_ports,
                        read.read_at)

    async def snapshot(self) -> Snapshot:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.executor, self.take_snapshot)
        except LedgerError as exc:
            raise refuse(
                f"The Docker engine is not answering, so no server can start now ({exc}). "
                "Try again in a minute; if it persists, tell an admin.",
                "docker",
                503,
            ) from exc

    # ------------------------------------------------------------------ profiles & form

    async def _profiles(self) -> list[Profile]:
        raw = self.profile_list
        if callable(raw):
            raw = raw(self)
            if inspect.isawaitable(raw):
                raw = await raw
        try:
            return parse_profiles(raw or [])
        except ProfileError as exc:
            message = f"The hub's profile list is misconfigured: {exc}."
            raise refuse(message, "profiles", 500) from exc

    async def user_profiles(self) -> list[Profile]:
        """The profiles this user may choose (the policy decides)."""
        profiles = await self._profiles()
        limits = self.load_policy().for_user(self.user.name, self._groups()).limits
        return permitted(profiles, limits)

    async def _render_options_form(self) -> str:
        try:
            profiles = await self.user_profiles()
        except web.HTTPError as exc:
            return f"<p class='alert alert-danger'>{html.escape(str(exc.log_message))}</p>"
        if not profiles:
            return ""
        try:
            snap = await self.snapshot()
            free = snap.free_by_profile()
            has_gpus = bool(snap.inventory.gpus)
            trouble = None
        except web.HTTPError as exc:
            free, has_gpus, trouble = {}, True, exc.log_message
        chosen = (self.user_options or {}).get("profile") or default_of(profiles).slug
        rows = []
        for profile in profiles:
            note, full = self._availability(profile, free, has_gpus, trouble)
            checked = "checked" if profile.slug == chosen and not full else ""
            disabled = "disabled" if full else ""
            rows.append(
                f"""
  <label class="list-group-item gpuspawner-profile{' text-muted' if full else ''}">
    <input type="radio" class="form-check-input me-2" name="profile"
           value="{html.escape(profile.slug)}" {checked} {disabled}>
    <strong>{html.escape(profile.display_name)}</strong>
    <span class="badge {'bg-secondary' if full else 'bg-success'} ms-2"
          data-free="{html.escape(note)}">{html.escape(note)}</span>
    <div class="small">{html.escape(profile.description)}</div>
  </label>"""
            )
        return (
            '<div class="list-group gpuspawner-profiles">'
            + "".join(rows)
            + "\n</div>"
        )

    @staticmethod
    def _availability(
        profile: Profile, free: dict[str, tuple[int, int]], has_gpus: bool, trouble: str | None
    ) -> tuple[str, bool]:
        if not profile.wants_gpu:
            return "CPU only", False
        if trouble:
            return "availability unknown", False
        if not has_gpus:
            return "unavailable: no NVIDIA GPUs on this host", True
        key = profile.mig_profile or "gpu"
        have, total = free.get(key, (0, 0))
        label = profile.mig_profile or "whole GPUs"
        if total == 0:
            return f"unavailable: no {label} on this host", True
        if profile.gpus and have < profile.gpus:
            return f"{label}: {have} of {total} free (needs {profile.gpus}) - full", True
        if have == 0:
            return f"{label}: 0 of {total} free - full", True
        return f"{label}: {have} of {total} free", False

    @default("options_form")
    def _default_options_form(self) -> Callable[[Any], Any]:
        async def form(spawner: GPUSpawner) -> str:
            return await spawner._render_options_form()

        return form

    @default("options_from_form")
    def _default_options_from_form(self) -> Callable[[dict[str, list[str]]], dict[str, Any]]:
        def options_from_form(formdata: dict[str, list[str]]) -> dict[str, Any]:
            slug = (formdata.get("profile") or [""])[0]
            return {"profile": slug} if slug else {}

        return options_from_form

    async def resolve_profile(self) -> Profile:
        """The profile of ``user_options``; only a permitted slug, nothing else, is accepted."""
        options = dict(self.user_options or {})
        extra = sorted(set(options) - {"profile"})
        allowed = await self.user_profiles()
        names = ", ".join(p.slug for p in allowed) or "none"
        if extra:
            raise refuse(
                f"Only a profile can be chosen (got {', '.join(extra)}); devices, ports and "
                f"images come with the profile. Profiles you may choose: {names}.",
                "options",
            )
        if not allowed:
            everything = await self._profiles()
            if everything:
                raise refuse("Your policy allows none of this hub's profiles; ask an admin.",
                             "profile", 403)
            return Profile(slug="default", display_name="Default")
        slug = options.get("profile")
        if not slug:
            return default_of(allowed)
        for profile in allowed:
            if profile.slug == slug:
                return profile
        raise refuse(
            f"Unknown or forbidden profile {str(slug)[:80]!r}. Profiles you may choose: {names}.",
            "profile",
        )

    def _apply_overrides(self, profile: Profile) -> None:
        overrides = profile.overrides
        if "image" in overrides:
            self.image = overrides["image"]
        if "mem_limit" in overrides:
            self.mem_limit = overrides["mem_limit"]
        if "cpu_limit" in overrides:
            self.cpu_limit = overrides["cpu_limit"]
        if "environment" in overrides:
            env = dict(self.environment) if isinstance(self.environment, dict) else {}
            env.update(overrides["environment"])
            self.environment = env

    def _wanted_ports(self, profile: Profile) -> dict[str, int]:
        wanted = self.ports(self) if callable(self.ports) else dict(self.ports)
        wanted = dict(wanted)
        wanted.update(profile.overrides.get("ports") or {})
        for name in wanted:
            labels.port_label(name)  # a name that cannot be a label is a config error
        return {k: int(v) for k, v in wanted.items()}

    # ------------------------------------------------------------------ progress

    def _progress(self, percent: int, message: str) -> None:
        self._events.append({"progress": percent, "message": message})
        self._progress_changed.set()

    async def progress(self):
        sent = 0
        while True:
            while sent < len(self._events):
                yield self._events[sent]
                sent += 1
            if self._spawn_done:
                return
            self._progress_changed.clear()
            try:
                await asyncio.wait_for(self._progress_changed.wait(), timeout=1)
            except asyncio.TimeoutError:
                pass

    # ------------------------------------------------------------------ Docker calls

    def _docker(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "create_container" and self._plan is not None:
            kwargs = self._with_allocation(kwargs)
        attempts = self.docker_retries if method in _RETRYABLE_CALLS else 0
        delay = 0.5
        for attempt in range(attempts + 1):
            try:
                return super()._docker(method, *args, **kwargs)
            except docker.errors.APIError as exc:
                server_side = exc.response is not None and exc.response.status_code >= 500
                if not server_side or attempt == attempts or "unknown device" in str(exc):
                    raise
                self.log.warning("Docker %s failed (%s); retrying in %.1fs", method, exc, delay)
            except _TRANSIENT as exc:
                if attempt == attempts:
                    raise
                self.log.warning("Docker %s failed (%s); retrying in %.1fs", method, exc, delay)
            time.sleep(delay + random.random() * 0.2)
            delay *= 2
        raise AssertionError("unreachable")

    def _with_allocation(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        plan = self._plan
        kwargs = dict(kwargs)
        kwargs["labels"] = {**(kwargs.get("labels") or {}), **plan["labels"]}
        host_config = kwargs.setdefault("host_config", {})
        if plan["uuids"]:
            host_config["DeviceRequests"] = [
                docker.types.DeviceRequest(
                    driver="nvidia", device_ids=list(plan["uuids"]), capabilities=[["gpu"]]
                )
            ]
        exposed = kwargs.get("ports") or {}
        if isinstance(exposed, list):
            exposed = {p: None for p in exposed}
        bindings = host_config.setdefault("PortBindings", {})
        for name, host_port in plan["ports"].items():
            key = f"{plan['container_ports'][name]}/tcp"
            exposed[key] = None
            bindings[key] = [{"HostIp": self.ports_host_ip, "HostPort": str(host_port)}]
        kwargs["ports"] = list(exposed)
        return kwargs

    def get_env(self) -> dict[str, str]:
        env = super().get_env()
        plan = getattr(self, "_plan", None)
        if plan:
            for name, port in plan["ports"].items():
                env[f"GPUSPAWNER_PORT_{name.upper().replace('-', '_')}"] = str(port)
            env["GPUSPAWNER_PROFILE"] = plan["labels"][labels.PROFILE]
            env["GPUSPAWNER_GPU"] = plan["labels"][labels.GPU_ALLOCATED]
        return env

    # ------------------------------------------------------------------ spawn

    _plan: dict[str, Any] | None = None

    async def start(self):
        if self._spawn_done:  # started without the pre-spawn hook (tests, other callers)
            self._reset_progress()
        try:
            return await self._start()
        except (requests.exceptions.ConnectionError, docker.errors.DockerException) as exc:
            if isinstance(exc, docker.errors.APIError):
                raise
            type(self)._client = None  # reconnect on the next call
            raise refuse(
                f"The Docker engine is not answering ({exc}), so no server can start now. "
                "Try again in a minute; if it persists, tell an admin.",
                "docker",
                503,
            ) from exc
        finally:
            self._spawn_done = True
            self._progress_changed.set()
            self._plan = None
            self._waiters.leave(self._log_name)

    async def _start(self):
        profile = await self.resolve_profile()
        self._apply_overrides(profile)
        # The slug in user_options is what JupyterHub's admin panel shows for the server.
        self.user_options = {**(self.user_options or {}), "profile": profile.slug}
        if getattr(self, "orm_spawner", None) is not None:
            self.orm_spawner.user_options = self.user_options
        self._progress(10, f"Profile {profile.display_name} ({profile.request_label()})")
        await self.pull_image(self.image)
        wanted_ports = self._wanted_ports(profile)
        policy = self.load_policy()
        limits = policy.for_user(self.user.name, self._groups()).limits
        quota = limits.max_gpu_equivalents
        self._progress(15, "Policy checked: " + (
            "no GPU quota" if quota is None else f"up to {quota:g} GPU-equivalents"))

        obj = await self.get_object()
        if obj and self.remove:
            await self._remove_container(obj, "remove=True: a fresh container every start")
            obj = None

        reused = False
        for _attempt in range(4):
            async with self._lock():
                snap = await self.snapshot()
                obj = await self.get_object() if obj is not None else None
                decision = await self._decide(snap, profile, limits, obj, wanted_ports)
                if decision == "reuse":
                    reused = True
                    self._reuse_token(obj)
                    break
                await self.create_object_locked()
            lost = await self._lost_race()
            if not lost:
                break
            self.event_log.write(events.GPU_BACKOFF, user=self.user.name, server=self.name,
                                 container=self.object_name, devices=lost)
            self._progress(30, "Another server took the same device at the same moment; "
                               "choosing again")
            await self._remove_container(await self.get_object(), "lost a race for a device")
            obj = None
            await asyncio.sleep(random.random() * 0.3)
        else:
            raise refuse("Could not allocate a device after several tries (other servers "
                         "kept taking them); try again.", "race", 503)

        self._progress(70, "Starting the container")
        try:
            await self._start_container(profile, limits, wanted_ports)
        except Exception:
            # A container that was created and could not start is a failed spawn: it must
            # not sit on its device until the start time-out runs out.
            await self._remove_never_started()
            raise
        self.ledger.forget(self.object_id)
        self.event_log.write(events.CONTAINER_START, user=self.user.name, server=self.name,
                             container=self.object_name, reused=reused)
        if self.post_start_cmd:
            await self.post_start_exec()
        ip, port = await self.get_ip_and_port()
        self._progress(90, "Server started; waiting for Jupyter to answer")
        return ip, port

    async def _remove_never_started(self) -> None:
        try:
            obj = await self.get_object()
            if obj and obj["State"].get("Status") == "created":
                await self._remove_container(obj, "the spawn failed before it started")
        except Exception as exc:  # the original failure matters more
            self.log.warning("could not remove the failed container %s: %s", self.object_name,
                             exc)

    async def _start_container(self, profile: Profile, limits: Any, wanted_ports) -> None:
        try:
            await self.start_object()
        except docker.errors.APIError as exc:
            if "unknown device" not in str(exc) or self.on_gpu_lost == "fail":
                raise
            # The device vanished between our read and the start (a MIG re-creation).
            self.log.warning("GPU vanished while starting %s: %s", self.object_name, exc)
            await self._remove_container(await self.get_object(), "device vanished at start")
            async with self._lock():
                snap = await self.snapshot()
                await self._decide(snap, profile, limits, None, wanted_ports)
                await self.create_object_locked()
            await self.start_object()

    def _reuse_token(self, obj: dict[str, Any]) -> None:
        """A reused container keeps the API token it was created with (as DockerSpawner does)."""
        for line in obj["Config"]["Env"] or []:
            if line.startswith(("JPY_API_TOKEN=", "JUPYTERHUB_API_TOKEN=")):
                self.api_token = line.split("=", 1)[1]
                break

    async def create_object_locked(self) -> None:
        obj = await self.create_object()
        self.object_id = obj[self.object_id_key]
        plan = self._plan or {}
        self.event_log.write(
            events.CONTAINER_CREATE, user=self.user.name, server=self.name,
            container=self.object_name, id=self.object_id[:12], image=self.image,
            devices=list(plan.get("uuids", ())), slots=list(plan.get("slots", ())),
            ports=plan.get("ports"),
        )
        self._progress(60, f"Container {self.object_name} created")

    async def _remove_container(self, obj: dict[str, Any] | None, why: str) -> None:
        if not obj:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, remove_stopped, self.client, obj["Id"])
        self.ledger.forget(obj["Id"])
        self.event_log.write(events.CONTAINER_REMOVE, user=self.user.name, server=self.name,
                             container=obj["Name"].lstrip("/"), reason=why, volumes="kept")
        self.object_id = ""

    async def _decide(
        self,
        snap: Snapshot,
        profile: Profile,
        limits: Any,
        obj: dict[str, Any] | None,
        wanted_ports: dict[str, int],
    ) -> str:
        """Reuse the stopped container, or plan a new one. Raises a SpawnException to refuse."""
        old = labels.decode((obj or {}).get("Config", {}).get("Labels")) if obj else None
        if old is not None and old.hub and old.hub != self.hub_id:
            # Never remove another hub's container: two hubs share a name template.
            raise refuse(
                f"A container named {self.object_name} already belongs to hub {old.hub}; an "
                "admin must give this hub its own DockerSpawner.prefix.",
                "name-clash",
                409,
            )
        request = Request(
            user=self.user.name,
            server=self.name,
            profile=profile.slug,
            mig_profile=profile.mig_profile,
            gpus=profile.gpus,
            prefer_uuids=old.uuids if old else (),
            prefer_parents=old.parent_uuids if old else (),
            strategy=self.allocation_strategy,
        )
        choice = snap.choose(request, self._groups())
        if isinstance(choice, Refusal) and choice.code == allocator.FULL and self.gpu_wait_timeout:
            choice = await self._wait_for_device(snap, request, limits)
        if isinstance(choice, Refusal):
            self.event_log.write(events.GPU_REFUSE, user=self.user.name, server=self.name,
                                 profile=profile.slug, code=choice.code, reason=choice.message,
                                 holders=[h.to_json() for h in choice.holders])
            raise refuse(choice.message[0].upper() + choice.message[1:] + ".", choice.code,
                         _STATUS.get(choice.code, 400))

        if obj is not None and old is not None:
            reason = self._cannot_reuse(snap, obj, old, profile, choice, wanted_ports)
            if reason is None:
                self._progress(40, f"Keeping {choice.describe()} (same as before)")
                self.event_log.write(events.GPU_KEEP, user=self.user.name, server=self.name,
                                     container=self.object_name, devices=list(choice.uuids),
                                     slots=list(choice.slots))
                return "reuse"
            if reason.startswith("gpu:") and self.on_gpu_lost == "fail":
                raise refuse(
                    f"{reason[4:]}. Your server was not started; its files are safe. Ask an "
                    "admin, or set up a fresh server (it will get another device).",
                    "gpu-lost",
                    409,
                )
            self._progress(35, f"{reason.removeprefix('gpu:')}: creating a new container "
                               "(your volumes are kept)")
            if reason.startswith("gpu:"):
                self.event_log.write(events.GPU_REALLOCATE, user=self.user.name,
                                     server=self.name, container=self.object_name,
                                     old=list(old.uuids), new=list(choice.uuids),
                                     reason=reason[4:])
            await self._remove_container(obj, reason.removeprefix("gpu:"))

        for container_id in choice.preempts:
            victim = next(a for a in snap.allocations if a.container_id == container_id)
            self.event_log.write(events.GPU_PREEMPT, user=self.user.name, server=self.name,
                                 holder=victim.user, container=victim.container_name,
                                 devices=list(victim.uuids))
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self.executor, remove_stopped, self.client, container_id)
            self.ledger.forget(container_id)

        self._plan = self._make_plan(snap, profile, choice, wanted_ports, limits, old)
        self.event_log.write(
            events.GPU_ALLOCATE, user=self.user.name, server=self.name, profile=profile.slug,
            devices=list(choice.uuids), slots=list(choice.slots), gpu_profile=choice.gpu_profile,
            equivalents=choice.equivalents,
        )
        self._progress(40, f"Device chosen: {choice.describe()}")
        if self._plan["ports"]:
            shown = ", ".join(f"{k} {v}" for k, v in sorted(self._plan["ports"].items()))
            self.event_log.write(events.PORT_ALLOCATE, user=self.user.name, server=self.name,
                                 ports=self._plan["ports"])
            self._progress(50, f"Host ports: {shown}")
        return "create"

    def _cannot_reuse(self, snap, obj, old, profile, choice: Choice, wanted_ports) -> str | None:
        """Why the stopped container cannot simply be started again (None: it can)."""
        if not old.managed:
            return "the old container predates gpuspawner's labels"
        if old.profile != profile.slug:
            return f"profile changed from {old.profile} to {profile.slug}"
        if set(old.uuids) != set(choice.uuids):
            present = snap.inventory.by_uuid()
            gone = [u for u in old.uuids if u not in present]
            if gone:
                return f"gpu:Your previous GPU device {gone[0]} no longer exists (the GPU was " \
                       "re-partitioned or the host rebooted)"
            return "gpu:Your previous GPU slot was given to someone else after your hold ended"
        if set(dict(old.ports)) != set(wanted_ports):
            return "the published ports changed"
        mine = {p for _, p in old.ports}
        others = snap.reserved_ports() - mine
        for name, port in old.ports:
            if port in others or not ports.host_port_free(port, self.ports_host_ip):
                return f"host port {port} ({name}) is now used by something else"
        return None

    def _make_plan(self, snap, profile, choice: Choice, wanted_ports, limits, old):
        previous = dict(old.ports) if old else {}
        try:
            chosen = ports.choose(
                wanted_ports, tuple(self.port_range), snap.reserved_ports(), previous,
                lambda p: ports.host_port_free(p, self.ports_host_ip),
            )
        except ports.PortsExhausted as exc:
            raise refuse(f"{exc}.", "ports", 503) from exc
        now = datetime.now(timezone.utc)
        labelset = labels.encode(
            hub=self.hub_id, user=self.user.name, server=self.name, profile=profile.slug,
            created_at=now, slots=choice.slots, uuids=choice.uuids,
            parent_uuids=choice.parent_uuids, gis=choice.gis, gpu_profile=choice.gpu_profile,
            equivalents=choice.equivalents, priority=limits.priority, ports=chosen,
        )
        return {
            "labels": labelset, "uuids": choice.uuids, "slots": choice.slots,
            "ports": chosen, "container_ports": wanted_ports,
        }

    async def _lost_race(self) -> list[str]:
        """After create: did another creator take one of our devices at the same moment?

        Every creator applies the same rule, so two hubs never both stay: a running holder
        keeps the device, and otherwise the earlier creation keeps it, by Docker's own
        nanosecond ``Created`` time (one engine, one clock; the container id breaks a tie).
        A container created after our check cannot be earlier than ours, so whoever checked
        first and saw no rival is right to stay.
        """
        plan = self._plan or {}
        if not plan.get("uuids"):
            return []
        snap = await self.snapshot()
        if not any(a.container_id == self.object_id for a in snap.allocations):
            return []
        taken = allocator.Taken(
            snap.inventory, [a for a in snap.allocations if a.container_id != self.object_id]
        )
        devices = snap.inventory.by_uuid()
        rivals = {
            other.container_id: (uuid, other)
            for uuid in plan["uuids"]
            if uuid in devices
            for other in taken.blockers(devices[uuid])
        }
        if not rivals:
            return []
        mine = await self._created(self.object_id)
        lost = []
        for container_id, (uuid, other) in rivals.items():
            if other.state == "running":
                lost.append(uuid)
                continue
            theirs = await self._created(container_id)
            if (theirs, container_id) < (mine, self.object_id):
                lost.append(uuid)
        return sorted(set(lost))

    async def _created(self, container_id: str) -> str:
        """Docker's Created time with all nine digits of nanoseconds, comparable as text."""
        try:
            attrs = await self.docker("inspect_container", container_id)
        except docker.errors.NotFound:
            return "9999"  # gone already: it backed off
        return nanotime(str(attrs.get("Created", "")))

    async def _wait_for_device(self, snap: Snapshot, request: Request, limits: Any):
        key = f"{request.mig_profile}:{request.gpus}"
        who = self._log_name
        self._waiters.join(limits.priority, key, who)
        deadline = time.monotonic() + self.gpu_wait_timeout
        choice: Choice | Refusal = Refusal(allocator.FULL, "")
        lock = self._lock()
        lock.release()  # let other spawns and stops go on while we wait
        try:
            while time.monotonic() < deadline:
                place = self._waiters.position(key, who)
                self._progress(20, f"Waiting for a free device: number {place} in the queue")
                await asyncio.sleep(2)
                if self._waiters.position(key, who) != 1:
                    continue
                snap = await self.snapshot()
                choice = snap.choose(request, self._groups())
                if isinstance(choice, Choice):
                    break
        finally:
            await lock.acquire()
            self._waiters.leave(who)
        if isinstance(choice, Choice):
            # Re-decide under the lock on a fresh read: the world moved while we waited.
            fresh = await self.snapshot()
            return fresh.choose(request, self._groups())
        last = snap.choose(request, self._groups())
        why = last.message if isinstance(last, Refusal) else "try again"
        return Refusal(
            allocator.FULL, f"no device came free within {self.gpu_wait_timeout:.0f} s: {why}"
        )

    async def stop(self, now: bool = False):
        await super().stop(now=now)
        if self.object_id:
            self.ledger.forget(self.object_id)
        self.event_log.write(events.CONTAINER_STOP, user=self.user.name, server=self.name,
                             container=self.object_name, removed=bool(self.remove))
