"""The spawner classes of bench_spawn.py's two hubs: GPUSpawner and DockerSpawner, each
under the same timing wrapper, so both are measured the same way inside the hub.

``TimedGPUSpawner`` and ``TimedDockerSpawner`` add nothing to what their spawner does; the
one mixin they share only takes times:

* ``start()``: from JupyterHub calling it to its return (the container runs and its address
  is known): the *inner* start time; and when, within it, Docker's start of the container
  returned (``started_s``);
* readiness: from that return to the server answering ``GET <base_url>api`` with a non-5xx
  status (what JupyterHub's own ``wait_up`` asks), tried every 20 ms (more widely apart while
  many spawns wait at once: 20 ms x the spawns waiting, at most 200 ms), on both hubs alike.
  By default (``GPUSPAWNER_BENCH_READY=wrapper``) ``start()`` returns only then, so
  JupyterHub's ``wait_up`` finds the server up at its first try: its exponential back-off with
  full jitter (waits drawn from 0-0.2 s, 0-0.4 s, ... 0-5 s) no longer adds a random delay of
  up to seconds to the end-to-end time. With ``GPUSPAWNER_BENCH_READY=hub`` the readiness is
  timed in the background and JupyterHub's back-off decides, as in a plain hub;
* the phases of the spawn: each method of the spawner in ``PHASES`` that it has, nested as
  called (``lock held/snapshot/take_snapshot/ledger.read``), the allocation lock's wait and
  hold, ``spawnplan.plan``, the ledger's list call, and every Docker call twice: awaited
  (``docker <method>``, queue and retries included) and in its thread
  (``docker.<method> (thread)``).

Each spawn appends one JSON line to the file named by ``GPUSPAWNER_BENCH_TIMINGS``.

Only bench_spawn.py's hubs import this module (their config names these classes); it patches
``spawnplan.plan`` and ``Ledger`` in that process only, to time them.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import json
import os
import threading
import time
from typing import Any
from urllib.parse import urlparse

from dockerspawner import DockerSpawner

from gpuspawner import spawnplan
from gpuspawner.ledger import Ledger
from gpuspawner.spawner import GPUSpawner

TIMINGS_ENV = "GPUSPAWNER_BENCH_TIMINGS"
READY_ENV = "GPUSPAWNER_BENCH_READY"  # wrapper (default) | hub
POLL_SECONDS = 0.02
POLL_MAX_SECONDS = 0.2

#: Methods timed when the spawner has them (async ones on the loop, the others where they
#: run: GPUSpawner runs them on its Docker pool).
PHASES = (
    "resolve_options", "_await_host", "pull_image", "_check_cuda", "load_policy",
    "snapshot", "take_snapshot", "read_inventory", "_spawn_request", "get_object",
    "_carry_out", "create_object", "remove_object", "_race", "_quiet", "_created",
    "_start_container", "start_object", "post_start_exec", "get_ip_and_port",
    "_wait_for_device", "_back_off",
)


class Record:
    """What one spawn measured: ``phases`` maps a call path to [calls, seconds]."""

    def __init__(self, side: str, user: str, server: str) -> None:
        self.side, self.user, self.server = side, user, server
        self.phases: dict[str, list[float]] = {}
        self.marks: dict[str, float] = {}  # method -> when its last call ended (perf_counter)
        self._lock = threading.Lock()

    def open(self, path: str) -> None:
        """Keep the order in which phases begin (the report lists them so)."""
        with self._lock:
            self.phases.setdefault(path, [0, 0.0])

    def add(self, path: str, seconds: float) -> None:
        with self._lock:
            entry = self.phases.setdefault(path, [0, 0.0])
            entry[0] += 1
            entry[1] += seconds


_current: contextvars.ContextVar[Record | None] = contextvars.ContextVar(
    "bench_record", default=None)
_parent: contextvars.ContextVar[str] = contextvars.ContextVar("bench_parent", default="")
_write_lock = threading.Lock()
_waiting = [0]  # spawns of this hub waiting for their server to answer


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _write(line: dict[str, Any]) -> None:
    path = os.environ.get(TIMINGS_ENV)
    if not path:
        return
    text = json.dumps(line) + "\n"
    with _write_lock, open(path, "a", encoding="utf-8") as out:
        out.write(text)


# ------------------------------------------------------------------ module-level timers


def _timed_module_function(fn: Any, name: str) -> Any:
    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        record = _current.get()
        if record is None:
            return fn(*args, **kwargs)
        path = _join(_parent.get(), name)
        record.open(path)
        token = _parent.set(path)
        began = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record.add(path, time.perf_counter() - began)
            _parent.reset(token)

    timed.__bench_timed__ = True  # type: ignore[attr-defined]
    return timed


def _patch_product() -> None:
    """Time ``spawnplan.plan`` and the ledger's read and list call (once per process)."""
    if getattr(spawnplan.plan, "__bench_timed__", False):
        return
    spawnplan.plan = _timed_module_function(spawnplan.plan, "plan")
    Ledger.read = _timed_module_function(Ledger.read, "ledger.read")
    original_call = Ledger._call

    @functools.wraps(original_call)
    def call(self: Ledger, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        record = _current.get()
        if record is None or what != "a container list":
            return original_call(self, what, fn, *args, **kwargs)
        path = _join(_parent.get(), "list call")
        began = time.perf_counter()
        try:
            return original_call(self, what, fn, *args, **kwargs)
        finally:
            record.add(path, time.perf_counter() - began)

    Ledger._call = call


_patch_product()


# ------------------------------------------------------------------ readiness


async def _answers(host: str, port: int, path: str) -> bool:
    """Whether the server answers ``GET path`` with a status below 500 (as ``wait_up``)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
    except (OSError, asyncio.TimeoutError):
        return False
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 5)
    except (OSError, asyncio.TimeoutError):
        return False
    finally:
        writer.close()
    parts = line.split()
    return (len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit()
            and int(parts[1]) < 500)


def _address(result: Any) -> tuple[str, int]:
    if isinstance(result, str):
        url = urlparse(result)
        return url.hostname or "127.0.0.1", url.port or 80
    ip, port = result
    return (ip or "127.0.0.1"), int(port)


# ------------------------------------------------------------------ the wrapper


class _TimedLock:
    """GPUSpawner's allocation lock, timed: the wait for it and the time it is held."""

    def __init__(self, lock: asyncio.Lock, spawner: TimingMixin) -> None:
        self.lock, self.spawner = lock, spawner
        self.path, self.token, self.began = "", None, 0.0
        self.record: Record | None = None

    async def __aenter__(self) -> _TimedLock:
        self.record = self.spawner._bench_record
        parent = _parent.get()
        began = time.perf_counter()
        await self.lock.acquire()
        self.began = time.perf_counter()
        if self.record is not None:
            self.record.add(_join(parent, "lock wait"), self.began - began)
            self.path = _join(parent, "lock held")
            self.record.open(self.path)
            self.token = _parent.set(self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self.record is not None:
                _parent.reset(self.token)
                self.record.add(self.path, time.perf_counter() - self.began)
        finally:
            self.lock.release()


class TimingMixin:
    """Times ``start()`` and its phases, then the server's readiness; changes nothing."""

    bench_label = "?"
    _bench_record: Record | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._bench_record = None
        for name in PHASES:
            method = getattr(self, name, None)
            if callable(method):
                setattr(self, name, self._bench_timed(name, method))
        self._bench_wrap_docker()
        run = getattr(self, "_run", None)
        if callable(run):
            async def run_in_context(fn: Any, *args: Any, **kwargs: Any) -> Any:
                # the pool's thread sees this spawn's record and the calling phase
                return await run(contextvars.copy_context().run, fn, *args, **kwargs)

            self._run = run_in_context
        lock = getattr(self, "_lock", None)
        if callable(lock):
            self._lock = lambda: _TimedLock(lock(), self)

    def _bench_timed(self, name: str, method: Any) -> Any:
        if inspect.iscoroutinefunction(method):
            @functools.wraps(method)
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                record = self._bench_record
                if record is None:
                    return await method(*args, **kwargs)
                path = _join(_parent.get(), name)
                record.open(path)
                token = _parent.set(path)
                began = time.perf_counter()
                try:
                    return await method(*args, **kwargs)
                finally:
                    ended = time.perf_counter()
                    record.add(path, ended - began)
                    record.marks[name] = ended
                    _parent.reset(token)

            return timed_async

        @functools.wraps(method)
        def timed(*args: Any, **kwargs: Any) -> Any:
            record = self._bench_record
            if record is None:
                return method(*args, **kwargs)
            path = _join(_parent.get(), name)
            record.open(path)
            token = _parent.set(path)
            began = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                record.add(path, time.perf_counter() - began)
                _parent.reset(token)

        return timed

    def _bench_wrap_docker(self) -> None:
        docker_call, in_thread = self.docker, self._docker

        def docker(method: str, *args: Any, **kwargs: Any) -> Any:
            future = docker_call(method, *args, **kwargs)
            record = self._bench_record
            if record is not None:
                path = _join(_parent.get(), f"docker {method}")
                record.open(path)
                began = time.perf_counter()
                future.add_done_callback(
                    lambda _f: record.add(path, time.perf_counter() - began))
            return future

        def thread_call(method: str, *args: Any, **kwargs: Any) -> Any:
            record = self._bench_record
            began = time.perf_counter()
            try:
                return in_thread(method, *args, **kwargs)
            finally:
                if record is not None:
                    record.add(f"docker.{method} (thread)", time.perf_counter() - began)

        self.docker, self._docker = docker, thread_call

    async def start(self) -> Any:
        record = Record(self.bench_label, self.user.name, self.name)
        line: dict[str, Any] = {"side": self.bench_label, "user": self.user.name,
                                "server": self.name, "called": time.time(), "ready_s": None}
        self._bench_record = record
        current, parent = _current.set(record), _parent.set("")
        began = time.perf_counter()
        try:
            result = await super().start()  # type: ignore[misc]
        except BaseException as exc:
            line.update(start_s=time.perf_counter() - began, error=repr(exc)[:300],
                        phases=record.phases)
            _write(line)
            raise
        finally:
            self._bench_record = None
            _parent.reset(parent)
            _current.reset(current)
        running = time.perf_counter()
        line.update(start_s=running - began, running=time.time(), phases=record.phases)
        if "start_object" in record.marks:  # Docker started the container (within start())
            line["started_s"] = record.marks["start_object"] - began
        mode = os.environ.get(READY_ENV, "wrapper")
        line["readiness"] = mode
        waiting = self._bench_ready(result, began, running, line)
        if mode == "hub":
            asyncio.ensure_future(waiting)
        else:
            await waiting
        return result

    async def _bench_ready(self, result: Any, started: float, running: float,
                           line: dict[str, Any]) -> None:
        host, port = _address(result)
        base = getattr(getattr(self, "server", None), "base_url", None) or self.user.url
        path = base.rstrip("/") + "/api"
        # JupyterHub's start_timeout covers this start() (readiness included): leave it 5 s
        deadline = min(running + float(self.http_timeout or 60),
                       started + float(self.start_timeout or 60) - 5)
        tries = 0
        _waiting[0] += 1
        try:
            while True:
                tries += 1
                if await _answers(host, port, path):
                    line.update(ready_s=time.perf_counter() - running, ready=time.time())
                    break
                if time.perf_counter() > deadline:
                    break
                await asyncio.sleep(min(POLL_MAX_SECONDS, POLL_SECONDS * _waiting[0]))
        finally:
            _waiting[0] -= 1
            line["ready_tries"] = tries
            _write(line)


class TimedGPUSpawner(TimingMixin, GPUSpawner):
    bench_label = "GPUSpawner"


class TimedDockerSpawner(TimingMixin, DockerSpawner):
    bench_label = "DockerSpawner"
