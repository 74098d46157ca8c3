"""GPUSpawner: DockerSpawner that gives each server a MIG slice or whole GPUs, and host ports.

At spawn time, under one allocation lock held from the read of the world until the container
exists, it reads inventory + ledger + policy (one Snapshot), lets the pure allocator choose,
and writes the choice into the new container's labels and DeviceRequest. Docker is the only
record, so a hub restart loses nothing and a second hub on the same engine sees our choices.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import random
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, ClassVar, NoReturn

import docker
import docker.errors
import requests.exceptions
from dockerspawner import DockerSpawner
from tornado import web
from traitlets import default

from . import (
    allocator,
    boot,
    cuda,
    events,
    form,
    hosts,
    inventory,
    labels,
    ports,
    records,
    spawnplan,
)
from . import ledger as ledger_mod
from .allocator import Refusal
from .errors import docker_down, refuse, refused
from .events import EventLog
from .ledger import Ledger, LedgerError
from .policy import Policy, PolicyError, PolicyFile, format_duration
from .profiles import (
    DEFAULT,
    IMAGE_OPTION,
    Chosen,
    Profile,
    ProfileError,
    ProfileRefused,
    default_of,
    from_form,
    parse_profiles,
    permitted,
    resolve,
    with_images,
)
from .progress import Progress
from .records import Inventory, host_field
from .snapshot import Snapshot, take
from .traits import GPUSpawnerTraits
from .waiters import Waiters

#: When the hub's process loaded gpuspawner: the start of its boot window.
_LOADED = time.monotonic()

_TRANSIENT = (requests.exceptions.ConnectionError, requests.exceptions.Timeout)
_RETRYABLE_CALLS = {
    "inspect_container", "inspect_image", "containers", "start", "stop", "port",
    "remove_container", "wait",
}


@dataclass(frozen=True)
class Move:
    """A server on its way to another host (``GPUSpawner._bring_over``): the host it leaves,
    the image it was saved to there, whether this spawn made that image (else an admin's
    release did), its old container, and the host the image was copied to ("" before)."""

    source: str
    image: str
    committed: bool
    container: str = ""
    target: str = ""


class GPUSpawner(GPUSpawnerTraits, DockerSpawner):
    """A DockerSpawner that allocates NVIDIA MIG slices / whole GPUs and host ports per server.

    Configure ``profile_list`` (what students choose from), ``policy_file`` (who may take
    what), and ``port_range``; everything else has working defaults.
    """

    # One lock per host and hub process: from the read of Docker until the container is
    # created. Spawns on different hosts of a hub of several run side by side.
    _allocation_locks: ClassVar[dict[str, asyncio.Lock]] = {}
    _ledgers: ClassVar[dict[str, Ledger]] = {}
    _policies: ClassVar[dict[str, PolicyFile]] = {}
    _event_logs: ClassVar[dict[str, EventLog]] = {}
    _waiters: ClassVar[Waiters] = Waiters()
    #: Stopped containers this hub's spawns are starting again (id -> allocation when
    #: planned), from the plan under the lock until their start is checked: the planner
    #: counts them as holders, so no spawn of this hub gives their devices to another.
    _starting: ClassVar[dict[str, Any]] = {}

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

    #: What a profile (or a choice in it) may override. The spawner object lives on between
    #: a server's spawns, so each spawn first puts back what the last one set (unless
    #: something else, a pre-spawn hook say, set it since).
    _OVERRIDDEN = ("image", "mem_limit", "cpu_limit", "environment")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: name -> (the value before the last spawn's overrides, the value they set)
        self._applied: dict[str, tuple[Any, Any]] = {}
        self._reset_progress()
        if not GPUSpawner._engine_checked:
            GPUSpawner._engine_checked = True
            try:  # on the hub's loop: ask Docker from a thread, never block the hub's start
                asyncio.get_running_loop().run_in_executor(self.executor, self._log_engine)
            except RuntimeError:  # no loop (a script, a test): ask now
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
        except (docker.errors.DockerException, LedgerError, *_TRANSIENT) as exc:
            if isinstance(exc, docker.errors.APIError) and exc.status_code and (
                exc.status_code < 500
            ):
                raise
            # The engine is down or restarting, not the container: claim nothing changed, so
            # the hub keeps the server (Docker still has it) instead of forgetting it.
            self._reconnect()
            self.log.warning("Docker does not answer a poll of %s (%s); assuming it still "
                             "runs", self._log_name, exc)
            return None

    def _reset_progress(self) -> None:
        self._steps = Progress()

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
            self._event_logs[key] = EventLog(self.events_file, max_bytes=self.events_max_bytes,
                                             keep_files=self.events_keep)
        return self._event_logs[key]

    @property
    def ledger(self) -> Ledger:
        """The ledger of the server's host."""
        return self._ledger_of(self.host_name)

    def _ledger_of(self, name: str | None) -> Ledger:
        reader = self._reader(name)
        if reader is not None:
            return reader.ledger()
        # One ledger (and its cache) per Docker client: base_url alone reads the same
        # "http+docker://localhost" for every unix socket.
        client = DockerSpawner.client.fget(self)
        key = str(id(client))
        if key not in self._ledgers:
            self._ledgers[key] = Ledger(client, start_timeout=self.start_timeout, logger=self.log)
        return self._ledgers[key]

    def _user_lock(self) -> asyncio.Lock | contextlib.nullcontext[None]:
        """This user's lock on a hub of several hosts (``_user_locks``); on one host the
        host's lock alone makes the limits exact."""
        if not self.hosts:
            return contextlib.nullcontext()
        return self._user_locks.setdefault(self.user.name, asyncio.Lock())

    async def _user_elsewhere(self) -> tuple[Any, ...]:
        """Under this user's lock: what the user holds on the hub's other hosts
        (``spawnplan.held_elsewhere``), each host as read when the host was chosen, or read
        again now when a spawn of the user made or started a container there since that
        read began (it planned before this one took the lock, and the read may not show it)."""
        if not self._views:
            return ()
        made = self._user_made.get(self.user.name, {})
        views = dict(self._views)
        for name in views:
            if name != self.host_name and made.get(name, 0.0) > self._views_at.get(name, 0.0):
                began = time.monotonic()
                try:
                    views[name] = await self._run(self._snapshot_of, name, "",
                                                  self.STOPPED_MAX_AGE)
                except (LedgerError, docker.errors.DockerException, *_TRANSIENT) as exc:
                    # Gone since it was chosen: what the earlier read showed still counts.
                    self.log.warning("%s: host %s could not be read again for the user's "
                                     "limits: %s", self._log_name, name, exc)
                    continue
                self._views = {**self._views, name: views[name]}
                self._views_at = {**self._views_at, name: began}
        return spawnplan.held_elsewhere(views, self.host_name or "", self.hub_id,
                                        self.user.name, self.name)

    def _lock(self) -> asyncio.Lock:
        key = self.host_name or ""
        if key not in self._allocation_locks:
            self._allocation_locks[key] = asyncio.Lock()
        return self._allocation_locks[key]

    # ------------------------------------------------------------------ several hosts

    #: The host (of ``hosts``) this server's container is on or is being made on, kept in
    #: the hub's state; None on a one-host hub.
    host_name: str | None = None
    #: The last read of every host answering (name -> snapshot), from the choice of a host,
    #: and when each read began (``time.monotonic``).
    _views: dict[str, Snapshot] = {}  # noqa: RUF012 - replaced, never changed in place
    _views_at: dict[str, float] = {}  # noqa: RUF012 - replaced, never changed in place
    #: One lock per user of this hub process, held around the host lock by the plans of a
    #: hub of several hosts: two spawns of one user on two hosts plan one after the other,
    #: so the user's limits count across hosts exactly (``_user_elsewhere``). Spawns of
    #: different users never wait for each other on it.
    _user_locks: ClassVar[dict[str, asyncio.Lock]] = {}
    #: User -> host -> when this hub last made or started a container of theirs there
    #: (``time.monotonic``, under the locks): a host whose read began before that is read
    #: again by the user's next plan on another host.
    _user_made: ClassVar[dict[str, dict[str, float]]] = {}
    _host_readers: ClassVar[dict[tuple[hosts.Host, str], hosts.HostReader]] = {}
    #: This hub's spawns on their way to a host: spawner -> (host, GPU-equivalents or one
    #: CPU server, when its container was made or None). The choice of a host counts each
    #: one that a read of Docker may not show yet, so twenty spawns at once spread (or
    #: pack) as if one after another.
    _on_the_way: ClassVar[dict[int, tuple[str, float, float | None]]] = {}
    _parsed_hosts: tuple[Any, tuple[hosts.Host, ...]] | None = None

    def _host_list(self) -> tuple[hosts.Host, ...]:
        """``hosts``, parsed (checked when the config was loaded)."""
        if self._parsed_hosts is None or self._parsed_hosts[0] is not self.hosts:
            self._parsed_hosts = (self.hosts, hosts.parse_hosts(self.hosts))
        return self._parsed_hosts[1]

    def _own_url(self) -> str:
        """The hub's own engine, as DockerSpawner connects to it."""
        return hosts.own_endpoint((self.client_kwargs or {}).get("base_url"))

    def _host(self, name: str | None) -> hosts.Host | None:
        """Host ``name`` of ``hosts``; for None (or a name no longer configured) the hub's
        own engine's, else the first. None on a one-host hub."""
        if not self.hosts:
            return None
        found = self._host_list()
        host = next((h for h in found if h.name == name), None)
        if host is None:
            own = self._own_url()
            host = next((h for h in found if hosts.same_endpoint(h.url, own)), found[0])
        return host

    def _reader(self, name: str | None) -> hosts.HostReader | None:
        """The reader of host ``name``: None for the hub's own engine (DockerSpawner's
        client, NVML), and on a one-host hub."""
        host = self._host(name)
        if host is None or hosts.same_endpoint(host.url, self._own_url()):
            return None
        key = (host, self.hub_id)
        reader = self._host_readers.get(key)
        if reader is None:
            reader = self._host_readers[key] = hosts.HostReader(
                host, image=self._unapplied("image"), hub_id=self.hub_id,
                policy=Policy.default, start_timeout=self.start_timeout)
        return reader

    @property
    def client(self) -> Any:
        """The Docker client of the server's host: DockerSpawner's for the hub's own."""
        return self._client_of(self.host_name)

    def _client_of(self, name: str | None) -> Any:
        reader = self._reader(name)
        if reader is None:
            return DockerSpawner.client.fget(self)
        return reader.client().api  # LedgerError naming the host when it does not answer

    def _reconnect(self) -> None:
        """The server's engine failed: connect again on the next call."""
        reader = self._reader(self.host_name)
        if reader is None:
            type(self)._client = None
        else:
            reader.reset()

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        if self.host_name:
            state["gpu_host"] = self.host_name
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        if state.get("gpu_host"):
            self.host_name = state["gpu_host"]

    async def _read_hosts(self) -> tuple[dict[str, Snapshot], dict[str, str]]:
        """Every host at once, as a spawn's plan reads its own (``STOPPED_MAX_AGE``): the
        snapshots of those that answer, and why each other does not."""
        names = [h.name for h in self._host_list()]

        async def one(name: str) -> Snapshot | str:
            try:
                return await asyncio.wait_for(self._run(
                    self._snapshot_of, name, "", self.STOPPED_MAX_AGE), self.HOST_READ_TIMEOUT)
            except asyncio.TimeoutError:
                host = self._host(name)
                assert host is not None
                return hosts.timed_out(host, self.HOST_READ_TIMEOUT)
            except (LedgerError, docker.errors.DockerException, *_TRANSIENT) as exc:
                return str(exc)

        read = await asyncio.gather(*(one(name) for name in names))
        views = {n: r for n, r in zip(names, read, strict=True) if isinstance(r, Snapshot)}
        down = {n: r for n, r in zip(names, read, strict=True) if isinstance(r, str)}
        return views, down

    #: Seconds a host's read may take when a spawn chooses its host; a host that takes
    #: longer is down for that spawn.
    HOST_READ_TIMEOUT = 15.0

    async def _home(self, views: Mapping[str, Snapshot], down: Mapping[str, str]) -> str | None:
        """The host this server's container is on: looked up by name on every host that
        answers (the files are there, so the server stays there); the host the hub's state
        names when it does not answer, or when it keeps the saved copy of the server's last
        container. None for a server that has nothing on any host."""
        name = self.object_name

        def on(host: str) -> bool:
            try:
                self._client_of(host).inspect_container(name)
                return True
            except docker.errors.NotFound:
                return False

        try:
            found = await asyncio.gather(*(self._run(on, host) for host in views))
        except (LedgerError, docker.errors.DockerException, *_TRANSIENT) as exc:
            raise docker_down(exc) from exc
        there = [host for host, yes in zip(views, found, strict=True) if yes]
        if self.host_name in there or (self.host_name in down and not there):
            return self.host_name
        if there:
            return there[0]
        if self.remove:
            return None
        # No container: the host keeping the saved copy of its last one (an admin released
        # it), the one the hub's state names first.
        order = sorted(views, key=lambda host: host != self.host_name)

        def saved(host: str) -> str | None:
            return ledger_mod.saved_image(self._client_of(host), hub=self.hub_id,
                                          user=self.user.name, server=self.name)

        try:
            kept = await asyncio.gather(*(self._run(saved, host) for host in order))
        except (LedgerError, docker.errors.DockerException, *_TRANSIENT) as exc:
            raise docker_down(exc) from exc
        return next((host for host, image in zip(order, kept, strict=True) if image), None)

    #: The host this server moves from (its host has no device for it: ``move_max_mib``),
    #: and why, in the planner's words; None when it stays.
    _move_from: str | None = None
    _home_full: str = ""
    #: The move under way: what was saved and copied where.
    _moved: Move | None = None

    async def _bring_over(self) -> None:
        """Copy the server to the host it moves to, before anything is planned there: its
        container on its old host saved to an image (or the saved image it already has
        there), then the image streamed to this host's engine and checked equal. Nothing is
        removed on the old host until the server runs here (``_finish_move``). Refuses, with
        the reason in the operation log, for a server with a volume or a bind mount, an
        image above ``move_max_mib``, or a copy that fails; the server stays whole where it
        was."""
        source, there = self._move_from, self.host_name
        if source is None or there is None or source == there:
            return
        moved = self._moved
        if moved is not None and moved.target == there:
            return
        if moved is not None and moved.target:  # taken meanwhile there: that copy goes
            await self._drop_copy(moved)
        self._progress(13, f"Moving your server from host {source} to host {there}: "
                           "saving and copying its container")
        if moved is None:
            moved = await self._save_for_move(source, there)
        try:
            await self._run(ledger_mod.copy_image, self._client_of(source),
                            self._client_of(there), moved.image)
        except (LedgerError, docker.errors.DockerException, *_TRANSIENT) as exc:
            self._refuse_move(source, there, f"copying it failed ({exc})")
        self._moved = replace(moved, target=there)

    async def _save_for_move(self, source: str, there: str) -> Move:
        client = self._client_of(source)
        try:
            attrs = await self._run(client.inspect_container, self.object_name)
        except docker.errors.NotFound:
            attrs = None
        user, server = self.user.name, self.name
        if attrs is None:  # an admin released it: its saved image is what moves
            image = await self._run(ledger_mod.saved_image, client, hub=self.hub_id,
                                    user=user, server=server)
            if image is None:
                self._refuse_move(source, there, "it has nothing there to copy")
            moved = Move(source, image, committed=False)
        else:
            kept = spawnplan.kept_on_host(attrs.get("Mounts"))
            if kept:
                self._refuse_move(source, there, f"its files in {kept[0]} stay on that host")
            try:
                image = await self._run(ledger_mod.save, client, attrs["Id"], hub=self.hub_id,
                                        user=user, server=server,
                                        reason=f"moved to host {there}")
            except docker.errors.APIError as exc:
                self._refuse_move(source, there, f"it could not be saved ({exc})")
            moved = Move(source, image, committed=True, container=attrs["Id"])
            self.event_log.write(events.CONTAINER_SAVE, user=user, server=server,
                                 container=self.object_name, image=image,
                                 reason=f"moved to host {there}", host=source)
        self._moved = moved  # from here on, a failure takes back what was made
        size = int((await self._run(client.inspect_image, image)).get("Size") or 0)
        if size > self.move_max_mib * 2**20:
            self._refuse_move(source, there, f"its image is {size / 2**20:,.0f} MiB, more "
                                             f"than the {self.move_max_mib:,} MiB a move copies")
        return moved

    def _refuse_move(self, source: str, there: str, why: str) -> NoReturn:
        self.event_log.write(events.SERVER_MOVE, user=self.user.name, server=self.name,
                             **{"from": source, "to": there, "refused": why})
        raise refuse(
            f"Your server is on host {source}, where {self._home_full}, and it cannot move to "
            f"host {there}: {why}. Your files are safe on host {source}; try again when a "
            "device is free there, or ask an admin.", "move", 503)

    async def _drop_copy(self, moved: Move) -> None:
        """Untag the copy on the host it went to (the original stays on its old host)."""
        try:
            await self._run(ledger_mod.claim, self._client_of(moved.target), moved.image)
        except (LedgerError, docker.errors.DockerException, *_TRANSIENT) as exc:
            self.log.warning("The copy %s on host %s could not be removed: %s",
                             moved.image, moved.target, exc)
        self._moved = replace(moved, target="")

    async def _undo_move(self) -> None:
        """The spawn failed: the server stays whole on its old host. The copy goes, and so
        does the image saved for the move (its container is still there)."""
        moved, self._moved = self._moved, None
        if moved is None:
            return
        if moved.target:
            await self._drop_copy(moved)
        if moved.committed:
            try:
                await self._run(ledger_mod.claim, self._client_of(moved.source), moved.image)
            except (LedgerError, docker.errors.DockerException, *_TRANSIENT) as exc:
                self.log.warning("The image %s saved on host %s for a move could not be "
                                 "removed: %s", moved.image, moved.source, exc)

    async def _finish_move(self) -> None:
        """The server runs on its new host, from the copy: only now do its old container
        and the image saved from it go from the old host. If that fails, they stay (the
        server's state names its new host; the old container is an admin's to remove)."""
        moved, self._moved = self._moved, None
        if moved is None:
            return
        client = self._client_of(moved.source)
        try:
            if moved.container:
                await self._run(client.remove_container, moved.container)
                self._ledger_of(moved.source).forget(moved.container)
            await self._run(ledger_mod.claim, client, moved.image)
        except (LedgerError, docker.errors.DockerException, *_TRANSIENT) as exc:
            self.log.warning("Server %s moved to host %s; its old container on host %s "
                             "could not be removed: %s", self._log_name, self.host_name,
                             moved.source, exc)
        self.event_log.write(events.SERVER_MOVE, user=self.user.name, server=self.name,
                             container=self.object_name, image=moved.image,
                             **{"from": moved.source, "to": self.host_name})

    #: What this spawn adds to each host it fits on (``_on_the_way``).
    _amounts: dict[str, float] = {}  # noqa: RUF012 - replaced, never changed in place

    def _on_its_way(self, made: bool = False) -> None:
        """Count this spawn on its host until it ends (``_on_the_way``)."""
        if self.host_name is not None:
            self._on_the_way[id(self)] = (self.host_name, self._amounts.get(self.host_name, 0.0),
                                          time.monotonic() if made else None)

    async def _host_candidates(
        self, profile: Profile, wanted: dict[str, int], limits: Any
    ) -> list[str]:
        """The hosts this spawn is tried on, in order: the server's own host alone (its
        files are there), else every host answering that it fits on, by
        ``allocation_strategy`` (``spawnplan.order_hosts``). Refuses when none fits, saying
        why on each host, or when the host it must use does not answer."""
        read_at = time.monotonic()
        self._amounts = {}
        self._move_from = None
        views, down = await self._read_hosts()
        self._views = views
        self._views_at = dict.fromkeys(views, read_at)
        home = await self._home(views, down)
        if home is not None:
            if home in down:
                raise refuse(
                    f"Your server is on host {home}, which does not answer now "
                    f"({down[home]}); your files are safe there. Try again in a few minutes; "
                    "if it persists, tell an admin.", spawnplan.HOST_DOWN, 503)
            if self.move_max_mib and len(views) > 1 and not self.remove:
                # It moves only when its host has no device for it and another host has.
                self.host_name = home
                request = await self._spawn_request(profile, wanted)
                result = spawnplan.plan(
                    spawnplan.with_elsewhere(views[home], spawnplan.held_elsewhere(
                        views, home, self.hub_id, self.user.name, self.name)),
                    request, lambda _port: True, limits)
                if isinstance(result, Refusal) and result.code == allocator.FULL:
                    others = {name: snap for name, snap in views.items() if name != home}
                    fits, _refusals = self._fitting(others, views, request, profile, limits,
                                                    read_at)
                    if fits:
                        self._move_from, self._home_full = home, result.message
                        return list(spawnplan.order_hosts(fits, self.allocation_strategy))
            return [home]
        if not views:
            raise refuse("No GPU host answers now (" + "; ".join(down.values()) + "). Try "
                         "again in a few minutes; if it persists, tell an admin.",
                         spawnplan.HOST_DOWN, 503)
        self.host_name = next(iter(views))
        request = await self._spawn_request(profile, wanted)
        fits, refusals = self._fitting(views, views, request, profile, limits, read_at)
        if fits:
            return list(spawnplan.order_hosts(fits, self.allocation_strategy))
        first = next(iter(refusals.values()))
        if self.gpu_wait_timeout and all(r.code == allocator.FULL for r in refusals.values()):
            return [next(iter(refusals))]  # the spawn waits there, as on one host
        if len({r.message for r in refusals.values()}) == 1:
            message = first.message  # the policy's word, the same on every host
        else:
            message = "; ".join(f"on host {n}: {r.message}" for n, r in refusals.items())
        if down:
            message += "; " + "; ".join(down.values())
        self.event_log.write(events.GPU_REFUSE, user=self.user.name, server=self.name,
                             code=first.code, reason=message, holders=[])
        raise refused(Refusal(first.code, message))

    def _fitting(
        self, hosts: Mapping[str, Snapshot], views: Mapping[str, Snapshot],
        request: spawnplan.SpawnRequest, profile: Profile, limits: Any, read_at: float,
    ) -> tuple[list[tuple[str, float]], dict[str, Refusal]]:
        """A new container of this server planned on each of ``hosts`` (a dry run): the
        hosts it fits on with their load (``spawnplan.host_load``, this hub's spawns on
        their way counted), and each other host's refusal."""
        fits: list[tuple[str, float]] = []
        refusals: dict[str, Refusal] = {}
        pending: dict[str, float] = {}
        for name, amount, made in self._on_the_way.values():
            if made is None or made > read_at:  # not in that host's read
                pending[name] = pending.get(name, 0.0) + amount
        for name, snap in hosts.items():
            mine = spawnplan.with_elsewhere(snap, spawnplan.held_elsewhere(
                views, name, self.hub_id, self.user.name, self.name))
            result = spawnplan.plan(
                mine, replace(request, host=name, saved_image=None, existing=None),
                lambda _port: True, limits)
            if isinstance(result, Refusal):
                refusals[name] = result
            else:
                fits.append((name, spawnplan.host_load(snap, profile.wants_gpu,
                                                       pending.get(name, 0.0))))
                self._amounts[name] = result.choice.equivalents if profile.wants_gpu else 1.0
        return fits, refusals

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

    _readers: ClassVar[dict[tuple[str, str], inventory.Reader]] = {}

    @property
    def inventory_reader(self) -> inventory.Reader:
        """One reader per inventory source for the hub process: NVML on a thread of its own,
        a read shared by every spawn and kept briefly."""
        key = (self.inventory_source, self.topology_file or "")
        reader = self._readers.get(key)
        if reader is None:
            reader = self._readers[key] = inventory.Reader(
                self.inventory_source, topology_file=self.topology_file, logger=self.log,
                patience=self.inventory_timeout)
        return reader

    def read_inventory(self) -> Inventory:
        """The GPUs; an inventory that cannot be read leaves CPU servers working."""
        try:
            return self.inventory_reader.read_blocking()
        except inventory.InventoryError as exc:
            self.log.error("GPU inventory (%s) cannot be read: %s", self.inventory_source, exc)
            return Inventory(source="none", problems=(f"the GPU inventory cannot be read: {exc}",))

    def _groups(self) -> list[str]:
        try:
            return [g.name for g in self.user.groups]
        except Exception:  # a mocked user in tests, or no database
            return []

    #: Seconds the older stopped containers of Docker's last full list serve a spawn's read
    #: under the allocation lock (``Ledger.read``'s ``stopped_max_age``): what runs and what
    #: was made lately are always listed then, so who runs or starts on a device is exact; a
    #: lab's hundreds of stopped containers are not listed once per spawn.
    STOPPED_MAX_AGE = 300.0
    #: A spawn whose start is checked lists them all again, off its own path, once the last
    #: full list is this old: the next spawn then finds a view this fresh. (A full list of
    #: 1,000 containers costs dockerd about 200 ms of CPU: during 40 spawns at once, not
    #: every 5 s.)
    REFRESH_AFTER = 30.0

    def take_snapshot(self, live: str = "", stopped_max_age: float = 0.0) -> Snapshot:
        """Read the server's host once (blocking: call through the executor)."""
        return self._snapshot_of(self.host_name, live, stopped_max_age)

    def _snapshot_of(self, name: str | None, live: str = "",
                     stopped_max_age: float = 0.0) -> Snapshot:
        reader = self._reader(name)
        if reader is not None:
            return reader.read(self.load_policy(), live=live, stopped_max_age=stopped_max_age,
                               busy_memory_mib=self.busy_memory_mib)
        self.inventory_reader.begin()  # NVML on its thread while Docker lists
        return take(self.read_inventory, self._ledger_of(name), self.load_policy(),
                    hub_id=self.hub_id, live=live, stopped_max_age=stopped_max_age,
                    busy_memory_mib=self.busy_memory_mib)

    async def snapshot(self, live: str = "", stopped_max_age: float = 0.0) -> Snapshot:
        try:
            return await self._run(self.take_snapshot, live, stopped_max_age)
        except LedgerError as exc:
            raise docker_down(exc) from exc

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
        """The profiles this user may choose (the policy decides), each with its options
        (DockerSpawner's ``allowed_images`` among them); the CPU default without a
        ``profile_list``."""
        profiles = await self._profiles()
        if profiles:
            policy = await self._run(self.load_policy)  # a file read and YAML: off the loop
            profiles = permitted(profiles, policy.for_user(self.user.name, self._groups()).limits)
        else:
            profiles = [DEFAULT]
        return with_images(profiles, self._get_allowed_images(), self._unapplied("image"))

    async def _render_options_form(self) -> str:
        try:
            everything = await self._profiles()
            profiles = await self.user_profiles()
        except web.HTTPError as exc:
            return form.error(str(exc.log_message))
        if not profiles:
            return form.error("Your policy allows none of this hub's profiles; ask an admin.")
        if not everything and not profiles[0].options:
            return ""  # DockerSpawner's server, nothing to choose
        blocked: dict[str, str] = {}
        try:
            if self.hosts:  # what every host answering offers, summed
                views, _down = await self._read_hosts()
                snaps = list(views.values())
                if not snaps:
                    raise docker_down(LedgerError("no host answers"))
                free = allocator.summed(s.free_by_profile() for s in snaps)
                has_gpus, trouble = any(s.inventory.gpus for s in snaps), None
            else:
                snap = await self.snapshot()
                free, has_gpus, trouble = snap.free_by_profile(), bool(snap.inventory.gpus), None
                blocked = await self._cuda_blocked(profiles, snap.inventory)
        except web.HTTPError as exc:
            free, has_gpus, trouble = {}, True, exc.log_message
        last = dict(self.user_options or {})
        chosen = last.get("profile") or default_of(profiles).slug
        try:  # the last spawn's choices, shown again
            picked = dict(resolve(last, profiles, everything).choices)
        except ProfileRefused:
            picked = {}
        return form.render(profiles, free, has_gpus, trouble, chosen, picked, blocked,
                           notice=await self._why_stopped())

    async def _cuda_blocked(self, profiles: list[Profile], inv: Inventory) -> dict[str, str]:
        """GPU profiles, and choices of their image option, whose image this driver cannot
        start (``cuda.check``), with the sentence: the form shows them unavailable. Images
        not on the engine yet, and free text, are checked at the spawn."""
        host, verdicts, out = cuda.Host.of(inv), {}, {}

        async def verdict(image: str, env: Mapping[str, str] | None) -> str | None:
            key = (image, tuple(sorted((env or {}).items())))
            if key not in verdicts:
                try:
                    info = await self.docker("inspect_image", image)
                    verdicts[key] = cuda.check(cuda.image_env(info), host, image=image,
                                               container_env=env)
                except docker.errors.DockerException:
                    verdicts[key] = None
            return verdicts[key]

        for profile in profiles:
            if not profile.wants_gpu:
                continue
            env = profile.overrides.get("environment")
            option = profile.option(IMAGE_OPTION)
            if option is None:
                image = profile.overrides.get("image") or self._unapplied("image")
                why = await verdict(image, env)
                if why:
                    out[profile.slug] = why
                continue
            for choice in option.choices:
                image = choice.overrides.get("image")
                why = await verdict(image, {**(env or {}),
                                            **(choice.overrides.get("environment") or {})}
                                    ) if image else None
                if why:
                    out[form.choice_key(profile.slug, option.name, choice.name)] = why
        return out

    @default("options_form")
    def _default_options_form(self) -> Any:
        if not self.profile_list:
            # No profiles: DockerSpawner's own form (its allowed_images picker, or none).
            return super()._default_options_form()

        async def options_form(spawner: GPUSpawner) -> str:
            return await spawner._render_options_form()

        return options_form

    @default("options_from_form")
    def _default_options_from_form(self) -> Callable[[dict[str, list[str]]], dict[str, Any]]:
        return from_form

    async def resolve_options(self) -> Chosen:
        """What ``user_options`` ask for (``profiles.resolve``): a permitted profile and the
        choices it offers; devices, ports and labels never come from the user."""
        try:
            chosen = resolve(dict(self.user_options or {}), await self.user_profiles(),
                             await self._profiles())
        except ProfileRefused as exc:
            raise refuse(exc.message, exc.code, exc.status) from exc
        if chosen.passed:
            self.log.info("%s: options %s passed through unread (a site's own form)",
                          self._log_name, ", ".join(chosen.passed))
        return chosen

    def _unapplied(self, name: str) -> Any:
        """A trait's value without the last spawn's override (what the config, or a hook since,
        says)."""
        value = getattr(self, name)
        before, applied = self._applied.get(name, (value, value))
        return before if value == applied else value

    def _apply_overrides(self, overrides: Mapping[str, Any]) -> None:
        base = {name: self._unapplied(name) for name in self._OVERRIDDEN}
        for name, value in base.items():
            setattr(self, name, value)
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
        self._applied = {name: (base[name], getattr(self, name)) for name in self._OVERRIDDEN}

    def _wanted_ports(self, profile: Profile) -> dict[str, int]:
        wanted = self.ports(self) if callable(self.ports) else dict(self.ports)
        wanted = dict(wanted)
        wanted.update(profile.overrides.get("ports") or {})
        for name in wanted:
            labels.port_label(name)  # a name that cannot be a label is a config error
        return {k: int(v) for k, v in wanted.items()}

    # ------------------------------------------------------------------ progress

    def _progress(self, percent: int, message: str) -> None:
        self._steps.add(percent, message)

    async def progress(self):
        async for event in self._steps.stream():
            yield event

    # ------------------------------------------------------------------ Docker calls

    @property
    def executor(self) -> ThreadPoolExecutor:
        """Docker calls of every server run on this pool: DockerSpawner's single thread would
        put one spawn's slow call in front of every other spawn and poll."""
        cls = GPUSpawner
        if cls._gpu_executor is None:
            cls._gpu_executor = ThreadPoolExecutor(self.docker_threads,
                                                   thread_name_prefix="gpuspawner-docker")
        return cls._gpu_executor

    _gpu_executor: ClassVar[ThreadPoolExecutor | None] = None

    def docker(self, method: str, *args: Any, **kwargs: Any) -> asyncio.Future:
        """DockerSpawner's ``docker()``, retrying transient failures with ``asyncio.sleep``
        between tries (never a sleeping executor thread)."""
        return asyncio.ensure_future(self._docker_retrying(method, *args, **kwargs))

    async def _docker_retrying(self, method: str, *args: Any, **kwargs: Any) -> Any:
        attempts = self.docker_retries if method in _RETRYABLE_CALLS else 0
        delay = 0.5
        for attempt in range(attempts + 1):
            try:
                return await asyncio.wrap_future(
                    self.executor.submit(self._docker, method, *args, **kwargs))
            except docker.errors.APIError as exc:
                server_side = exc.response is not None and exc.response.status_code >= 500
                if not server_side or attempt == attempts or "unknown device" in str(exc):
                    raise
                self.log.warning("Docker %s failed (%s); retrying in %.1fs", method, exc, delay)
            except _TRANSIENT as exc:
                if attempt == attempts:
                    raise
                self.log.warning("Docker %s failed (%s); retrying in %.1fs", method, exc, delay)
            await asyncio.sleep(delay + random.random() * 0.2)
            delay *= 2
        raise AssertionError("unreachable")

    async def get_object(self):
        """DockerSpawner's, except that an engine answering 5xx is an error, not "the
        container is gone": a poll must never report a running server stopped because the
        engine hiccupped, and a spawn must never plan as if the container did not exist."""
        try:
            obj = await self.docker("inspect_container", self.object_name)
        except docker.errors.NotFound:
            self.log.info("Container '%s' is gone", self.object_name)
            self.object_id = ""
            return None
        self.object_id = obj[self.object_id_key]
        return obj

    def get_env(self) -> dict[str, str]:
        env = super().get_env()
        env["NVIDIA_VISIBLE_DEVICES"] = "void"  # never a GPU unless the plan gives one
        if self._plan is not None:
            env.update(dict(self._plan.environment))
        return env

    async def create_object(self):
        """DockerSpawner's create, plus what the plan decided: labels, the device request by
        UUID, and the extra ports published on ``ports_host_ip`` (docker-py's dict forms,
        so Docker really publishes them)."""
        plan = self._plan
        if plan is None:
            return await super().create_object()
        admin_kwargs, admin_host = self.extra_create_kwargs, self.extra_host_config
        publish, host_ip = self.ports_host_ip or self.host_ip, self.host_ip
        reader = self._reader(self.host_name)
        if reader is not None:  # another host: published on its address, reached there
            if not reader.host.address:
                raise refuse(f"The hub's setting for host {reader.host.name} has no address "
                             "(the IP its servers are published on and reached at); ask an "
                             "admin to add it.", "hosts", 500)
            publish = self.host_ip = reader.host.address
        create, host = spawnplan.docker_kwargs(plan, publish)

        async def merged(spawner: GPUSpawner, admin: Any, ours: dict[str, Any]) -> dict[str, Any]:
            value = spawner._eval_if_callable(admin)
            return spawnplan.merge(await value if inspect.isawaitable(value) else value, ours)

        self.extra_create_kwargs = lambda sp: merged(sp, admin_kwargs, create)
        self.extra_host_config = lambda sp: merged(sp, admin_host, host)
        try:
            return await super().create_object()
        finally:
            self.extra_create_kwargs, self.extra_host_config = admin_kwargs, admin_host
            self.host_ip = host_ip

    # ------------------------------------------------------------------ spawn

    _plan: spawnplan.Plan | None = None

    async def start(self):
        if self._steps.done:  # started without the pre-spawn hook (tests, other callers)
            self._reset_progress()
        try:
            return await self._start()
        except (requests.exceptions.ConnectionError, docker.errors.DockerException,
                LedgerError) as exc:
            if isinstance(exc, docker.errors.APIError):
                raise
            self._reconnect()  # on the next call
            raise docker_down(exc) from exc
        finally:
            if "image" in self._applied:  # what was chosen, not the saved copy it ran from
                self.image = self._applied["image"][1]
            self._steps.finish()
            self._plan = None
            self._waiters.leave(self._log_name)
            self._on_the_way.pop(id(self), None)

    #: The kinds of spawn (MIG profile, "gpu", "cpu") the host had everything for in the
    #: boot window (``_await_host``).
    _host_ready: ClassVar[set[str]] = set()

    async def _await_host(self, profile: Profile) -> None:
        """In the boot window (``boot_timeout`` after the hub started): wait, saying what for,
        while the host still lacks the NVIDIA driver or the MIG devices this spawn needs
        (``boot.missing``); refuse with the same words before the hub's start time-out. After
        the window, and whenever Docker itself does not answer, the usual refusals speak.
        Once the host had what a kind of spawn needs, later ones of that kind do not ask
        again: the window is for the host coming up, not for what happens after."""
        key = profile.mig_profile or ("gpu" if profile.wants_gpu else "cpu")
        if time.monotonic() - _LOADED > self.boot_timeout or key in GPUSpawner._host_ready:
            return
        if self.hosts:  # the hub's host booting is one host of several: the others serve
            return
        own_deadline = time.monotonic() + max(0.0, float(self.start_timeout) - 15)
        wanted = [profile.mig_profile] if profile.mig_profile else []
        while True:
            try:
                await self.docker("ping")
                inv = await self._run(self.read_inventory) if profile.wants_gpu else None
                what = boot.missing(True, inv, wanted, had_gpus=True)
                if boot.DRIVER in what:  # only then: did this host have GPUs? Docker knows
                    snap = await self.snapshot()
                    what = boot.missing(True, snap.inventory, wanted,
                                        had_gpus=any(a.uuids for a in snap.allocations))
            except (web.HTTPError, docker.errors.DockerException, *_TRANSIENT):
                return  # Docker down: the usual refusal says so at once (the hub runs, the
                # engine is the admin's to start; `gpuspawner wait` is for boot scripts)
            now = time.monotonic()
            if not what:
                GPUSpawner._host_ready.add(key)
                return
            if now - _LOADED > self.boot_timeout:
                return
            if now >= own_deadline:
                raise refuse(boot.sentence(what) + "; try again in a minute.", "booting", 503)
            self._progress(5, boot.sentence(what))
            await asyncio.sleep(2)

    async def _start(self):
        chosen = await self.resolve_options()
        profile = chosen.profile
        await self._say_why_stopped()
        await self._await_host(profile)
        self._apply_overrides(chosen.overrides)
        # The slug in user_options is what JupyterHub's admin panel shows for the server.
        self.user_options = {**(self.user_options or {}), "profile": profile.slug}
        if getattr(self, "orm_spawner", None) is not None:
            self.orm_spawner.user_options = self.user_options
        self._progress(10, f"Profile {profile.display_name} ({profile.request_label()})")
        wanted_ports = self._wanted_ports(profile)
        policy = await self._run(self.load_policy)  # a file read and YAML: off the loop
        limits = policy.for_user(self.user.name, self._groups()).limits
        candidates: list[str] = []
        if self.hosts:
            candidates = await self._host_candidates(profile, wanted_ports, limits)
            self.host_name = candidates.pop(0)
            self._on_its_way()
            self._progress(12, f"Host {self.host_name}")
        await self.pull_image(self.image)
        image = self.image
        await self._check_cuda(profile, image)
        try:
            await self._bring_over()
            quota = limits.max_gpu_equivalents
            self._progress(15, "Policy checked: " + (
                "no GPU quota" if quota is None else f"up to {quota:g} GPU-equivalents"))
            await self._start_on_host(profile, image, limits, wanted_ports, candidates)
        except BaseException:
            await asyncio.shield(self._undo_move())
            raise
        if self._moved is not None:
            await self._finish_move()
        self.ledger.forget(self.object_id)
        self.event_log.write(events.CONTAINER_START, user=self.user.name, server=self.name,
                             container=self.object_name, reused=self._plan.action == "reuse")
        if self.post_start_cmd:
            await self.post_start_exec()
        ip, port = await self.get_ip_and_port()
        age = self.ledger.view_age()
        if age is None or age > self.REFRESH_AFTER:
            self.executor.submit(self._refresh_view)  # not waited for: the next spawn's
        self._progress(90, "Server started; waiting for Jupyter to answer")
        return ip, port

    async def _start_on_host(self, profile: Profile, image: str, limits: Any,
                             wanted_ports: dict[str, int], candidates: list[str]) -> None:
        """Plan, create, check and start under the rule, on the chosen host (the next
        candidate when a device is taken there meanwhile), until this server runs on a
        device of its own."""
        waited = False
        try:
            for _attempt in range(8):
                self.image = image
                self._unmark_starting()
                await self._release_place()  # after a port taken at the start, say
                if self.object_id:  # the server's own container is read afresh, always
                    self.ledger.forget(self.object_id)
                next_host = False
                async with self._user_lock(), self._lock():
                    elsewhere = await self._user_elsewhere()
                    self._planned_ns = time.time_ns()
                    snap = spawnplan.with_starting(
                        await self.snapshot(stopped_max_age=self.STOPPED_MAX_AGE),
                        self._starting)
                    snap = spawnplan.with_elsewhere(snap, elsewhere)
                    request = await self._spawn_request(profile, wanted_ports)
                    result = spawnplan.plan(snap, request, self._port_free, limits)
                    full = isinstance(result, Refusal) and result.code == allocator.FULL
                    if full and candidates:  # taken since the hosts were read: the next one
                        next_host = True
                    elif not (full and self.gpu_wait_timeout and not waited):
                        if isinstance(result, Refusal) and self.hosts:
                            result = replace(result, message=f"on host {self.host_name}: "
                                                             f"{result.message}")
                        self._plan = await self._carry_out(result)  # raises a refusal
                        self._mark_starting(snap)
                        self._on_its_way(made=True)
                        if self.host_name is not None:
                            self._user_made.setdefault(self.user.name, {})[
                                self.host_name] = time.monotonic()
                if next_host:
                    self.host_name = candidates.pop(0)
                    self._on_its_way()
                    self._progress(12, f"Host {self.host_name}")
                    await self.pull_image(self.image)
                    await self._check_cuda(profile, image)
                    await self._bring_over()
                    continue
                if self._plan is None:  # full: wait outside the lock, then plan again
                    waited = True
                    await self._wait_for_device(request, limits)
                    continue
                try:
                    lost = await self._race(running=False)
                    if not lost:
                        if not await self._start_container():
                            continue  # the device or a port was taken at the start: again
                        lost = await self._race(running=True)
                        if not lost:
                            break
                except BaseException:
                    # A check after the create failed (Docker, a cancelled spawn): the
                    # container this spawn made must not sit on its device until the start
                    # time-out.
                    await asyncio.shield(self._drop_own(spawnplan.START_FAILED))
                    raise
                await self._back_off(lost)
            else:
                raise refuse("Could not allocate a device and ports after several tries "
                             "(other servers kept taking them); try again.", "race", 503)
        finally:
            self._unmark_starting()
            await asyncio.shield(self._release_place())
        if self.image.startswith(ledger_mod.SAVED_REPOSITORY + "/"):
            # Started from a saved copy: only now is the copy not needed any more (a spawn
            # that fails before this point leaves it for the next start).
            await self._run(ledger_mod.claim, self.client, self.image)

    def _refresh_view(self) -> None:
        try:
            self.ledger.refresh()
        except LedgerError as exc:  # the next spawn's read lists everything, and says so
            self.log.warning("Docker's container list could not be refreshed: %s", exc)

    async def _why_stopped(self) -> str | None:
        """When the admin service stopped this server for want of GPU work
        (``gpu_idle_timeout``) since its last start, the sentence that says so: the spawn
        form shows it above the profiles, and the spawn page first."""
        if not self.events_file:
            return None
        try:
            entries = await self._run(lambda: list(events.tail(self.events_file, 500)))
        except OSError:
            return None
        stop = events.idle_stopped(entries, self.user.name, self.name)
        if stop is None:
            return None
        return (f"Your server was stopped at {str(stop.get('time', ''))[:16].replace('T', ' ')}"
                f" UTC after {format_duration(float(stop.get('idle') or 0))} without GPU work "
                f"(the limit is {format_duration(float(stop.get('timeout') or 0))}); your "
                "files are kept.")

    async def _say_why_stopped(self) -> None:
        why = await self._why_stopped()
        if why:
            self._progress(2, why)

    async def _check_cuda(self, profile: Profile, image: str) -> None:
        """Refuse at once an image whose ``NVIDIA_REQUIRE_*`` this driver does not meet: the
        NVIDIA runtime would refuse its start after the create, a bare 500 for the user."""
        if not profile.wants_gpu:
            return  # a CPU server sees no GPU (NVIDIA_VISIBLE_DEVICES=void): nothing checks
        try:
            info = await self.docker("inspect_image", image)
        except docker.errors.ImageNotFound:
            return  # the create says so, as for any image
        # The driver's versions change only with a driver reload: any inventory read says.
        reader = self._reader(self.host_name)
        if reader is not None:
            inv = await self._run(reader.inventory)
        else:
            inv = self.inventory_reader.latest() or await self._run(self.read_inventory)
        sentence = cuda.check(cuda.image_env(info), cuda.Host.of(inv), image=image,
                              container_env=self.get_env())
        if sentence:
            self.event_log.write(events.GPU_REFUSE, user=self.user.name, server=self.name,
                                 code=cuda.CODE, reason=sentence, holders=[])
            raise refuse(sentence, cuda.CODE, 409)

    def _port_free(self, port: int) -> bool:
        if self._reader(self.host_name) is not None:
            return True  # another host: its engine's refusal at the start says (and heals)
        return ports.host_port_free(port, self.ports_host_ip or self.host_ip)

    async def _spawn_request(self, profile: Profile, wanted: dict[str, int]):
        """The plain data ``spawnplan.plan`` decides on: this server's existing container as
        Docker shows it, and the saved image of its last container."""
        obj = await self.get_object()
        config = (obj or {}).get("Config") or {}
        existing = None if obj is None else spawnplan.Existing(
            obj["Id"], obj["Name"].lstrip("/"), (obj.get("State") or {}).get("Status", ""),
            labels.decode(config.get("Labels")), spawnplan.chosen_image(config.get("Env")),
        )
        saved = None
        if obj is None and not self.remove:
            saved = await self._run(ledger_mod.saved_image, self.client, hub=self.hub_id,
                                    user=self.user.name, server=self.name)
        return spawnplan.SpawnRequest(
            hub_id=self.hub_id, user=self.user.name, server=self.name, profile=profile.slug,
            container_name=self.object_name, mig_profile=profile.mig_profile,
            gpus=profile.gpus, groups=tuple(self._groups()), existing=existing,
            ports=tuple(sorted(wanted.items())), port_range=tuple(self.port_range),
            on_gpu_lost=self.on_gpu_lost, replace_with=self.replace_with, remove=self.remove,
            strategy=self.allocation_strategy, saved_image=saved, image=self.image,
            avoid_ports=self._avoided_ports(),
            now=datetime.now(timezone.utc),
            host=self.host_name if self.hosts else None,
        )

    async def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, lambda: fn(*args, **kwargs))

    async def _carry_out(self, result: spawnplan.Plan | Refusal) -> spawnplan.Plan:
        """The executor, under the allocation lock: refuse, or remove what the plan removes
        (saving each to an image first where it says so) and create the new container."""
        user, server = self.user.name, self.name
        if isinstance(result, Refusal):
            self.event_log.write(events.GPU_REFUSE, user=user, server=server,
                                 code=result.code, reason=result.message,
                                 holders=[h.to_json() for h in result.holders])
            raise refused(result)
        plan = result
        for percent, message in plan.progress:
            self._progress(percent, message)
        for event in plan.events:
            self.event_log.write(event.name, user=user, server=server, **event.data())
        for removal in plan.removals:
            await self._retire(removal)
        if plan.action == spawnplan.REUSE:
            self.object_id = plan.existing or ""
            self._reuse_token(await self.get_object())
            return plan
        old_name, saved = None, None
        if plan.replaced is not None:
            if plan.replaced.save:
                saved = await self._save(plan.replaced)
                if plan.replaced.carried:  # else the new image was chosen; the copy is kept
                    self.image = saved
            old_name = f"{plan.replaced.container_name}-replaced-{plan.replaced.container_id[:12]}"
            await self.docker("rename", plan.replaced.container_id, old_name)
        elif plan.image:
            self.image = plan.image
        self._plan = plan
        try:
            obj = await self.create_object()
        except Exception:
            if old_name is not None:  # put the old container back: nothing changed
                await self.docker("rename", plan.replaced.container_id,
                                  plan.replaced.container_name)
                if saved is not None:  # the copy is not needed: the container is back
                    await self._run(ledger_mod.claim, self.client, saved)
            raise
        self.object_id = obj[self.object_id_key]
        self.event_log.write(
            events.CONTAINER_CREATE, user=user, server=server, container=self.object_name,
            id=self.object_id[:12], image=self.image, devices=list(plan.device_ids),
            slots=list(plan.choice.slots), ports=plan.host_ports,
            **host_field(self.host_name),
        )
        self._progress(60, f"Container {self.object_name} created")
        if plan.replaced is not None:
            await self._retire(plan.replaced, saved=True)
        return plan

    async def _save(self, removal: spawnplan.Removal) -> str:
        """Commit a container before its removal; a failed commit refuses the spawn and
        keeps the container as it is."""
        self._progress(36, f"Saving {removal.container_name} (your files and packages)")
        try:
            image = await self._run(
                ledger_mod.save, self.client, removal.container_id, hub=self.hub_id,
                user=removal.user or "", server=removal.server, reason=removal.reason,
                kept=not removal.carried)
        except docker.errors.APIError as exc:
            raise refuse(
                f"Your server's container could not be saved before it is replaced ({exc}); "
                "nothing was removed. Try again, or ask an admin to check the disk space.",
                "save", 503) from exc
        self.event_log.write(events.CONTAINER_SAVE, user=removal.user, server=removal.server,
                             container=removal.container_name, image=image,
                             reason=removal.reason)
        return image

    async def _retire(self, removal: spawnplan.Removal, saved: bool = False) -> None:
        """Remove a container the plan removes: saved first where the plan says (unless it
        was just saved), volumes kept (anonymous ones too, except for ``remove=True``)."""
        if removal.save and not saved:
            await self._save(removal)
        await self.docker("remove_container", removal.container_id,
                          v=removal.reason == spawnplan.FRESH)
        self.ledger.forget(removal.container_id)
        self.event_log.write(events.CONTAINER_REMOVE, user=removal.user, server=removal.server,
                             container=removal.container_name, reason=removal.reason,
                             saved=removal.save, volumes="kept")

    def _mark_starting(self, snap: Snapshot) -> None:
        """Under the lock, after a plan to start the server's stopped container again: its
        devices are spoken for until the start is checked (``_starting``)."""
        plan = self._plan
        if plan is None or plan.action != spawnplan.REUSE or not plan.choice.uuids:
            return
        mine = next((a for a in snap.allocations if a.container_id == plan.existing), None)
        if mine is not None:
            self._starting[plan.existing] = mine
            self._starting_key = plan.existing

    #: The key this spawner holds in ``_starting`` (the plan is dropped on a back-off).
    _starting_key: str | None = None

    def _unmark_starting(self) -> None:
        if self._starting_key is not None:
            self._starting.pop(self._starting_key, None)
            self._starting_key = None

    async def _race(self, running: bool) -> tuple[str, ...]:
        """``spawnplan.race_loser`` on a fresh read, with Docker's nanosecond clocks.

        Before a stopped container is started again, it is not a rival in anyone's check
        (it does not run or start), so another hub could pass its own check and both would
        start. It first gets a place-holder (``_hold_place``), which races for it exactly as
        a new container does."""
        plan = self._plan
        if plan is None or not plan.choice.uuids:
            return ()
        racer = self.object_id
        if plan.action == spawnplan.REUSE and not running:
            racer = await self._hold_place()
        if await self._quiet(racer, running):
            return ()
        for _read in range(5):
            # Rivals run or start: none stopped. Before the start, everything that runs and
            # every spawn in flight (all made lately): an old container may have started
            # since the plan's read, and its place-holder may be gone already. After it,
            # only what runs, however old: only a running rival beats a running container.
            snap = await self.snapshot(
                live=ledger_mod.LIVE_RUNNING if running else ledger_mod.LIVE_ALL)
            mine = next((a for a in snap.allocations if a.container_id == racer), None)
            if mine is None:
                return ()
            others = spawnplan.rivals(mine, snap)
            if not others:
                return ()  # nobody to compare clocks with: the usual case, no inspect
            clocks = {a.container_id: await self._clock(a.container_id)
                      for a in (mine, *others)}
            if spawnplan.NEVER not in clocks.values():
                break
            # A rival went away between the list and its inspect: it backed off, or it was a
            # place-holder whose container now runs (started before it went). Read again:
            # that container shows in the next list.
        return spawnplan.race_loser(mine, snap, clocks, running)

    #: When this spawn's last plan began reading Docker (``time.time_ns()``): the race
    #: checks ask Docker what became live since.
    _planned_ns: int | None = None

    async def _quiet(self, racer: str, running: bool) -> bool:
        """Whether Docker's event buffer proves that nothing which asks for a GPU was made or
        started since the plan's read (``spawnplan.newcomers``): the plan's read showed no
        live container on this spawn's devices, so then there is no rival and the check
        needs no list. One call of a few milliseconds at any engine size, where each list
        costs Docker a walk over every container. Anything short of proof (the buffer may
        have dropped events, this spawn's own event is missing, the clocks do not fit, a
        newcomer holds a GPU, live-restore) leaves the answer to the lists."""
        if self._planned_ns is None:
            return False
        ledger = self.ledger
        checked = time.time_ns()
        changes = await self._run(ledger.changes, self._planned_ns, checked)
        if changes is None:
            return False
        own = frozenset(c for c in (racer, self._place) if c)  # its container, place-holder
        found = spawnplan.newcomers(changes, racer, "start" if running else "create", own,
                                    self._planned_ns, checked)
        if found.skew_ns is not None:
            ledger.learn_skew(found.skew_ns)
        if not found.proven:
            self.log.debug("Race check of %s by lists: %s", self._log_name, found.reason)
            return False
        return not (found.suspects and await self._run(ledger.holds_gpu, found.suspects))

    #: The place-holder of the stopped container this spawn starts again, while it exists.
    _place: str | None = None

    async def _hold_place(self) -> str:
        """Create (never start) ``<name>-starting``: the server's own labels and device
        requests on a container that does nothing, so that until the start is checked every
        other hub's check sees a spawn in flight on those devices. A place-holder left by a
        hub that died is this server's, so it is removed first; anyone else's name is never
        touched (the create then fails with Docker's conflict)."""
        own = await self.docker("inspect_container", self.object_id)
        name = f"{self.object_name}-starting"
        try:
            stale = await self.docker("inspect_container", name)
        except docker.errors.NotFound:
            stale = None
        if stale is not None:
            record = labels.decode((stale.get("Config") or {}).get("Labels"))
            if (records.made_by(self.hub_id, record.managed, record.hub, record.interface,
                                record.schema)
                    and record.user == self.user.name and record.server == self.name):
                await self.docker("remove_container", stale["Id"], force=True)
        requests_ = [
            docker.types.DeviceRequest(
                driver=r.get("Driver") or "", count=r.get("Count") or 0,
                device_ids=r.get("DeviceIDs") or [], capabilities=r.get("Capabilities") or [],
                options=r.get("Options") or {})
            for r in (own.get("HostConfig") or {}).get("DeviceRequests") or []
        ]
        host_config = self.client.create_host_config(device_requests=requests_)
        made = await self.docker(
            "create_container", own["Image"], command=["true"], name=name,
            labels=(own.get("Config") or {}).get("Labels") or {}, host_config=host_config,
            network_disabled=True)
        self._place = made["Id"]
        return made["Id"]

    async def _release_place(self) -> None:
        place, self._place = self._place, None
        if place is not None:
            try:
                await self.docker("remove_container", place, force=True)
            except docker.errors.NotFound:
                pass

    async def _back_off(self, lost: tuple[str, ...]) -> None:
        """Lost the race: stop our own container; remove it if this spawn made it."""
        self.event_log.write(events.GPU_BACKOFF, user=self.user.name, server=self.name,
                             container=self.object_name, devices=list(lost))
        self._progress(30, "Another server took the same device at the same moment; "
                           "choosing again")
        # At once: the container started a moment ago and shares a device until it stops.
        await self.docker("stop", self.object_id, timeout=1)
        await self._drop_own(spawnplan.RACE_LOST)
        await self._release_place()
        self._plan = None
        await asyncio.sleep(random.random() * 0.3)

    async def _drop_own(self, reason: str) -> None:
        """Remove the container this spawn created (never one it reused: that one is the
        user's, and the next plan replaces it without loss if it must). Once: the plan is
        done with afterwards. A saved copy it was made from is still tagged (``claim`` comes
        only after a successful start), so nothing the user made goes with it."""
        plan, self._plan = self._plan, None
        if plan is not None and plan.creates:
            await self._retire(spawnplan.Removal(self.object_id, self.object_name, reason,
                                                 self.user.name, False, self.name))

    #: host port -> when Docker last refused to bind it (``time.monotonic``)
    _ports_taken: ClassVar[dict[int, float]] = {}
    #: Seconds a refused port is avoided: long enough for a stray to be found and stopped.
    PORT_AVOID_SECONDS = 600.0

    def _avoided_ports(self) -> tuple[int, ...]:
        now = time.monotonic()
        return tuple(sorted(port for port, when in GPUSpawner._ports_taken.items()
                            if now - when < self.PORT_AVOID_SECONDS))

    async def _start_container(self) -> bool:
        """Start; False when the device vanished or a host port was taken at the start (the
        caller plans again)."""
        self._progress(70, "Starting the container")
        try:
            await self.start_object()
            return True
        except Exception as exc:
            # A container this spawn made that cannot start is a failed spawn: it must not
            # sit on its device until the start time-out runs out.
            await self._drop_own(spawnplan.START_FAILED)
            port = spawnplan.taken_port(str(exc))
            if port is not None:
                # Something the hub cannot see (it may live in a container's network
                # namespace) has this host port: avoid it for a while, for every server.
                GPUSpawner._ports_taken[port] = time.monotonic()
                self.event_log.write(events.PORT_TAKEN, user=self.user.name, server=self.name,
                                     container=self.object_name, port=port)
                self._progress(65, f"Host port {port} is used by something else on the host; "
                                   "choosing another")
                return False
            if "unknown device" not in str(exc):
                raise
            reader = self._reader(self.host_name)  # the next plan reads the GPUs again
            (self.inventory_reader if reader is None else reader).invalidate()
            self.log.warning("GPU vanished while starting %s: %s", self.object_name, exc)
            self._progress(65, "The GPU device vanished at the start; choosing again")
            self._plan = None
            return False

    def _reuse_token(self, obj: dict[str, Any] | None) -> None:
        """A reused container keeps the API token it was created with (as DockerSpawner does)."""
        for line in (obj or {}).get("Config", {}).get("Env") or []:
            if line.startswith(("JPY_API_TOKEN=", "JUPYTERHUB_API_TOKEN=")):
                self.api_token = line.split("=", 1)[1]
                break

    async def _clock(self, container_id: str) -> spawnplan.Clock:
        """Docker's Created and StartedAt with all nine digits of nanoseconds, comparable
        as text."""
        try:
            attrs = await self.docker("inspect_container", container_id)
        except docker.errors.NotFound:
            return spawnplan.NEVER  # gone already: it backed off
        return spawnplan.Clock(spawnplan.nanotime(str(attrs.get("Created", ""))),
                               spawnplan.nanotime(str(attrs["State"].get("StartedAt", ""))))

    async def _wait_for_device(self, request: spawnplan.SpawnRequest, limits: Any) -> None:
        """Wait, outside the lock, until the profile has a free device for this user (the
        caller then plans again under the lock) or ``gpu_wait_timeout`` runs out."""

        async def ready() -> bool:
            plan = spawnplan.plan(await self.snapshot(), request, self._port_free, limits)
            return isinstance(plan, spawnplan.Plan)

        await self._waiters.wait(f"{request.mig_profile}:{request.gpus}", self._log_name,
                                 limits.priority, self.gpu_wait_timeout, ready,
                                 lambda words: self._progress(20, words))

    async def stop(self, now: bool = False):
        try:
            await super().stop(now=now)
        except (docker.errors.DockerException, LedgerError, *_TRANSIENT) as exc:
            if isinstance(exc, docker.errors.APIError):
                raise  # the engine answered: its word stands
            # The engine does not answer. The Hub forgets the server whatever stop() says
            # (and its API answers the user 204 all the same); the container stays on its
            # host as Docker left it, and the server's next start finds it there (``_home``)
            # once the host answers. The admin reads it on the Events page.
            self._reconnect()
            self.event_log.write(events.CONTAINER_STOP, user=self.user.name, server=self.name,
                                 container=self.object_name, failed=str(exc),
                                 **host_field(self.host_name))
            where = (f"host {self.host_name}" if self.hosts and self.host_name
                     else "the Docker engine")
            self.log.warning("%s could not be stopped: %s does not answer (%s). Its container "
                             "stays there as Docker left it; its next start finds it.",
                             self._log_name, where, exc)
            return
        if self.object_id:
            self.ledger.forget(self.object_id)
        self.event_log.write(events.CONTAINER_STOP, user=self.user.name, server=self.name,
                             container=self.object_name, removed=bool(self.remove))
