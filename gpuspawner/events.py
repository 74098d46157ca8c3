"""The operation log: one JSON line per decision, so an admin can answer "why did my
student get slice 1.3, and who released it?" after the fact.

Writing. Each event is one ``os.write`` of one whole line on a file opened with
``O_APPEND``, which the kernel keeps whole even with several hub processes (and the admin
service, and the CLI) appending to the same file. The write is made in the caller's thread,
under a lock: it costs a few tens of microseconds (open, fstat, write, close; measured in
tests/unit/test_events_rotation.py), far below anything the hub's event loop would notice, it
leaves nothing in flight when the process dies, and the next reader sees it at once. A
background writer with a queue would make the common case no cheaper and add a way to lose
events (a queue not yet drained at exit) and a lag for readers.

Rotation. When a line would take the file past ``max_bytes``, the file is renamed to
``<file>.1`` (``.1`` to ``.2``, … up to ``keep_files``; the oldest is dropped) and a new one is
started. The rename is made under ``flock`` on the old file and re-checked after the lock is
taken, so two processes sharing the log rotate it once, not twice.

Failures. A log that cannot be written (disk full, read-only, no permission, a file where its
folder should be) never raises: one warning, the events stay in memory (the newest ``keep``
of them) and are written, in order, as soon as a later write succeeds; a ``log.gap`` line
then says how many were dropped, if any. A line a failed write left without its newline (a
disk that filled up mid-line) is ended before the next line is written, so no event is glued
onto it. A line torn by another process that died mid-write (rare: a line is one ``write``)
cannot be told from one being written, and is left as it is; readers skip it.

Reading. ``tail`` reads from the end of the file in blocks, so its cost is that of the lines
asked for, not of the file, and continues into ``<file>.1``, ``.2``, … when the current file
has fewer lines than asked.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import logging
import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from .records import _jsonable

log = logging.getLogger(__name__)

#: Event names (stable: the admin page, metrics and people's scripts read them).
GPU_ALLOCATE = "gpu.allocate"
GPU_REFUSE = "gpu.refuse"
GPU_REALLOCATE = "gpu.reallocate"
GPU_KEEP = "gpu.keep"
GPU_PREEMPT = "gpu.preempt"
GPU_BACKOFF = "gpu.backoff"
GPU_RELEASE = "gpu.release"
#: Two or more running containers hold one device (``Snapshot.conflicts``); written once per
#: conflict by whoever first sees it (the admin service), not on every look.
GPU_CONFLICT = "gpu.conflict"
#: A container's labels name other devices than Docker's device requests give it
#: (``Snapshot.disagreements``); written once per container by the admin service.
GPU_DISAGREE = "gpu.disagree"
#: A device no running container holds has compute processes or memory in use
#: (``Snapshot.busy``): never given out; written once per device by the admin service.
GPU_BUSY = "gpu.busy"
#: A GPU server stopped by the admin service after ``gpu_idle_timeout`` without a compute
#: process on its devices; its user's next spawn page says so.
GPU_IDLE_STOP = "gpu.idle-stop"
PORT_ALLOCATE = "port.allocate"
PORT_TAKEN = "port.taken"  # Docker refused to bind a host port: chosen again without it
CONTAINER_CREATE = "container.create"
CONTAINER_REMOVE = "container.remove"
#: A container committed to an image before gpuspawner removed it (nothing the user made is
#: lost: the next container of that server starts from the image).
CONTAINER_SAVE = "container.save"
#: A stopped server moved to another host (its host had no device for it): ``from``,
#: ``to``, ``image``; or, with ``refused``, why it stays (a volume, its size, a failed copy).
SERVER_MOVE = "server.move"
CONTAINER_START = "container.start"
CONTAINER_STOP = "container.stop"
SERVER_STOP = "server.stop"
#: What Docker itself says happened to a container that holds a device, whoever made it (the
#: admin service follows Docker's event stream; gpuspawner.admin.dockerevents). The
#: ``container.*`` events above are gpuspawner's own actions; these are Docker's record,
#: so a ``docker rm`` by hand is in the log too.
DOCKER_CREATE = "docker.create"
DOCKER_START = "docker.start"
DOCKER_DIE = "docker.die"
DOCKER_STOP = "docker.stop"
DOCKER_DESTROY = "docker.destroy"
#: Docker action -> event name, for the actions that are logged.
DOCKER_ACTIONS: dict[str, str] = {
    "create": DOCKER_CREATE,
    "start": DOCKER_START,
    "die": DOCKER_DIE,
    "stop": DOCKER_STOP,
    "destroy": DOCKER_DESTROY,
}
#: Events were dropped while the log could not be written (``lost``: how many).
LOG_GAP = "log.gap"

#: Defaults of ``GPUSpawner.events_max_bytes`` / ``events_keep`` (and the admin service's
#: ``GPUSPAWNER_EVENTS_MAX_BYTES`` / ``GPUSPAWNER_EVENTS_KEEP``).
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_KEEP_FILES = 5

#: ``tail`` reads this much at a time from the end of a file.
BLOCK = 64 * 1024
#: ``LogReader`` (the metrics counter, ``follow``) reads this much at a time.
CHUNK = 1024 * 1024
#: A line longer than this is not an event (``tail`` and the metrics counter skip it without
#: holding it in memory).
MAX_LINE = 1024 * 1024


def rotated(path: str | os.PathLike[str], index: int) -> Path:
    """The ``index``-th rotated file of ``path`` (``events.jsonl.1``); 0 is ``path`` itself."""
    path = Path(path)
    return path if index == 0 else path.with_name(f"{path.name}.{index}")


class EventLog:
    """Append-only JSON lines; ``path=None`` keeps the last ``keep`` events in memory only.

    ``max_bytes``: rotate when a line would take the file past this (0: never);
    ``keep_files``: rotated files kept (``<path>.1`` … ``<path>.<keep_files>``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        keep: int = 1000,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        keep_files: int = DEFAULT_KEEP_FILES,
    ) -> None:
        self.path = Path(path) if path else None
        self.max_bytes = max(0, int(max_bytes))
        self.keep_files = max(0, int(keep_files))
        self._recent: deque[dict[str, Any]] = deque(maxlen=keep)
        #: Events not yet in the file (it could not be written): (entry, line), oldest first.
        self._pending: deque[tuple[dict[str, Any], bytes]] = deque()
        self._pending_max = max(1, keep)
        self._lost = 0  # pending events pushed out of ``_pending`` while failing
        self._failing: str | None = None  # why the last write failed; None when it worked
        self._failing_since: str | None = None
        self._rotate_warned = False
        self._torn = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------ writing

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        """Log ``event``; never raises for a log that cannot be written."""
        entry = {"time": _now(), "event": event}
        entry.update({k: _jsonable(v) for k, v in fields.items() if v is not None})
        line = (json.dumps(entry, sort_keys=False, default=str) + "\n").encode("utf-8")
        with self._lock:
            self._recent.append(entry)
            if self.path is None:
                return entry
            self._pending.append((entry, line))
            self._flush()
        return entry

    @property
    def failing(self) -> str | None:
        """Why the log cannot be written now (None when the last write worked)."""
        return self._failing

    def pending(self) -> list[dict[str, Any]]:
        """Events kept in memory because the file could not be written, oldest first."""
        with self._lock:
            return [entry for entry, _ in self._pending]

    def _flush(self) -> None:
        """Write every pending line (the lock is held). On failure keep them and warn once."""
        assert self.path is not None
        waiting, lost = len(self._pending) - 1, self._lost
        try:
            if self._failing is not None and self._lost:
                gap = {"time": _now(), "event": LOG_GAP, "lost": self._lost,
                       "since": self._failing_since, "reason": self._failing}
                self._append(0, [(json.dumps(gap) + "\n").encode()])
                self._lost = 0  # said: a failure from here on must not say it again
            lines = [line for _, line in self._pending]
            self._append(len(lines), lines)
        except OSError as exc:
            # A write that failed may have written part of its line (a disk filling up): the
            # next write that works ends that line first. Only after a failure of our own:
            # looking at the last byte before every write would race with other processes'
            # appends in flight.
            self._torn = True
            self._failed(exc)
            while len(self._pending) > self._pending_max:
                self._pending.popleft()
                self._lost += 1
            return
        if self._failing is not None:
            log.warning("operation log %s is written again; %d event(s) kept in memory were "
                        "written%s", self.path, waiting,
                        f"; {lost} could not be kept and are lost" if lost else "")
            self._failing = self._failing_since = None
        self._pending.clear()

    def _failed(self, exc: OSError) -> None:
        reason = f"{exc.strerror or exc}" + (f" ({errno.errorcode.get(exc.errno, exc.errno)})"
                                             if exc.errno else "")
        if self._failing is None:
            first = self._pending[-1][1].decode("utf-8", "replace").rstrip("\n")
            log.warning(
                "operation log %s cannot be written (%s): events are kept in memory (the "
                "newest %d) and written when it can be written again; not warning again "
                "until then. Event: %s", self.path, reason, self._pending_max, first)
            self._failing_since = _now()
        else:
            log.debug("operation log %s still cannot be written: %s", self.path, reason)
        self._failing = reason

    def _append(self, written: int, lines: list[bytes]) -> None:
        """Append ``lines`` one ``write`` each, rotating between them as needed. Lines
        written before an error are dropped from ``_pending`` (the first ``written`` lines
        of ``lines`` are pending ones)."""
        assert self.path is not None
        done = 0
        while done < len(lines):
            fd, size = self._open(len(lines[done]))
            try:
                if self._torn and size and _last_byte(fd, size) not in (b"\n", None):
                    _write_all(fd, b"\n")  # end the line a failed write tore
                    size += 1
                self._torn = False
                here = 0
                while done < len(lines):
                    line = lines[done]
                    if here and self._must_rotate(size, len(line)):
                        break  # this file is full: reopen (and rotate) for the next line
                    _write_all(fd, line)
                    size += len(line)
                    done += 1
                    here += 1
                    if written:
                        self._pending.popleft()
                        written -= 1
            finally:
                os.close(fd)

    def _must_rotate(self, size: int, adding: int) -> bool:
        return bool(self.max_bytes) and size > 0 and size + adding > self.max_bytes

    def _open(self, adding: int) -> tuple[int, int]:
        """The log open for appending (made with its folder if need be) and its size,
        rotated first when ``adding`` bytes would take it past ``max_bytes``."""
        assert self.path is not None
        for _ in range(5):
            fd = _open_append(self.path)
            size = os.fstat(fd).st_size
            if not self._must_rotate(size, adding):
                return fd, size
            try:
                if not self._rotate(fd):
                    return fd, size  # cannot rotate: keep appending (warned once)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # rotated (by us or by another process): open the new file
        fd = _open_append(self.path)
        return fd, os.fstat(fd).st_size

    def _rotate(self, fd: int) -> bool:
        """Rotate the file open as ``fd`` unless another process did; False when the files
        cannot be renamed."""
        assert self.path is not None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # a file system without locks: rotate anyway, a race costs one extra file
        mine = os.fstat(fd)
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return True  # renamed away by another process: open the new one
        if (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino) or now.st_size <= 0:
            return True
        try:
            if self.keep_files <= 0:
                os.unlink(self.path)
            else:
                for index in range(self.keep_files - 1, 0, -1):
                    older = rotated(self.path, index)
                    if older.exists():
                        os.replace(older, rotated(self.path, index + 1))
                os.replace(self.path, rotated(self.path, 1))
        except OSError as exc:
            if not self._rotate_warned:
                log.warning("operation log %s cannot be rotated (%s); it grows past %d bytes "
                            "until it can", self.path, exc, self.max_bytes)
                self._rotate_warned = True
            return False
        self._rotate_warned = False
        return True

    # ------------------------------------------------------------------------ reading

    def read(self, limit: int = 200) -> list[dict[str, Any]]:
        """The newest ``limit`` events, oldest first: from the file when there is one (with
        the events still waiting to be written after them), else from memory."""
        if limit <= 0:
            return []
        if self.path is None:
            with self._lock:
                return list(self._recent)[-limit:]
        found = list(tail(self.path, limit))
        waiting = self.pending()
        return (found + waiting)[-limit:] if waiting else found


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _open_append(path: Path) -> int:
    """``path`` opened for appending (and for reading its last byte, when allowed)."""
    flags = os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    try:
        try:
            return os.open(path, flags | os.O_RDWR, 0o666)
        except PermissionError:
            return os.open(path, flags | os.O_WRONLY, 0o666)  # a write-only log
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, flags | os.O_RDWR, 0o666)


def _last_byte(fd: int, size: int) -> bytes | None:
    try:
        return os.pread(fd, 1, size - 1)
    except OSError:
        return None  # opened write-only: cannot tell


def _write_all(fd: int, data: bytes) -> None:
    """One ``write`` for the whole line; a short write (a disk filling up) raises ENOSPC after
    writing what fits (the line is then ended by the next successful write)."""
    view = memoryview(data)
    while view:
        count = os.write(fd, view)
        if count <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[count:]


# ----------------------------------------------------------------------------- reading


class _Rotated(Exception):
    """The files were rotated while ``tail`` read them; read them again."""


def tail(path: str | os.PathLike[str], limit: int = 200) -> Iterator[dict[str, Any]]:
    """The last ``limit`` parseable lines of a log (and of its rotated files, newest first,
    when it has fewer), oldest first; a torn or foreign line is skipped.

    Reads blocks from the end of each file: memory is bounded by ``limit`` events plus one
    block and one line (at most ``MAX_LINE``; longer lines are skipped), whatever the size of
    the file.
    """
    if limit <= 0:
        return
    for attempt in range(3):
        try:
            found = _tail_once(Path(path), limit, strict=attempt < 2)
            break
        except _Rotated:
            continue
    yield from found


def _tail_once(path: Path, limit: int, strict: bool = True) -> list[dict[str, Any]]:
    newest_first: list[dict[str, Any]] = []
    seen: set[tuple[int, int]] = set()
    index = 0
    while len(newest_first) < limit:
        name = rotated(path, index)
        try:
            source = open(name, "rb")
        except FileNotFoundError:
            if index == 0:  # mid-rotation, or rotated files only: look at .1
                index += 1
                continue
            break
        except OSError as exc:
            log.warning("operation log %s cannot be read: %s", name, exc)
            break
        with source:
            stat = os.fstat(source.fileno())
            key = (stat.st_dev, stat.st_ino)
            if key in seen:  # a file we read moved to the next name while we read
                if strict:
                    raise _Rotated
                break
            seen.add(key)
            for entry in _entries_backwards(source, stat.st_size):
                newest_first.append(entry)
                if len(newest_first) >= limit:
                    break
        index += 1
    newest_first.reverse()
    return newest_first


def _entries_backwards(source: BinaryIO, size: int) -> Iterator[dict[str, Any]]:
    """The events of ``source``'s first ``size`` bytes, last first."""
    for line in _lines_backwards(source, size):
        entry = parse_line(line)
        if entry is not None:
            yield entry


def _lines_backwards(source: BinaryIO, size: int, block: int = BLOCK) -> Iterator[bytes]:
    """The lines of ``source``'s first ``size`` bytes, last first (the last one may lack its
    newline), reading ``block`` bytes at a time; lines over ``MAX_LINE`` are skipped."""
    position = size
    carry = b""  # the start of a line whose beginning is further left
    skipping = False  # inside a line too long to keep: drop bytes up to its beginning
    while position > 0:
        step = min(block, position)
        position -= step
        source.seek(position)
        chunk = source.read(step)
        if skipping:
            cut = chunk.rfind(b"\n")
            if cut < 0:
                continue
            chunk, skipping = chunk[: cut + 1], False
            carry = b""
        data = chunk + carry
        parts = data.split(b"\n")
        carry = parts[0]
        for line in reversed(parts[1:]):
            if line:
                yield line
        if len(carry) > MAX_LINE:
            carry, skipping = b"", True
    if carry and not skipping:
        yield carry


class LogReader:
    """The lines appended to a log since the last call, across rotations, in bounded chunks:
    what the metrics counter and ``follow`` read.

    The file is kept open between calls, so a rotation (the file renamed to ``<file>.1``)
    loses nothing: what was appended to it since the last call is read through the open
    file, then every rotated file newer than it (several rotations between two calls), then
    the new file from its start. Nothing is read twice. A file truncated in place (logrotate's
    ``copytruncate``) is read again from its start: what is in it now was written after the
    truncation. ``from_end``: the first call starts at the current end (only what is written
    after it); else at the start of the current file.
    """

    def __init__(self, path: str | os.PathLike[str], *, chunk: int | None = None,
                 from_end: bool = False) -> None:
        self.path = Path(path)
        self.chunk = chunk or CHUNK
        self._from_end = from_end
        self._file: BinaryIO | None = None
        self._id: tuple[int, int] | None = None  # (device, inode) of the open file
        self._offset = 0
        self._carry = b""  # the start of a line not yet ended
        self._skipping = False  # inside a line longer than MAX_LINE

    def new_lines(self) -> Iterator[bytes]:
        """Every whole line written since the last call, oldest first (consume it whole).
        A line not yet ended waits for the next call; lines over ``MAX_LINE`` are skipped."""
        if self._file is None and not self._open_current(at_end=self._from_end):
            return
        self._from_end = False
        assert self._file is not None
        mine = os.fstat(self._file.fileno())
        if mine.st_size < self._offset:  # truncated in place: what is there now is new
            self._restart()
        yield from self._read_on(self._file)
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return  # between the rename and the next write: the next call opens it
        if (now.st_dev, now.st_ino) == self._id:
            return
        # Rotated: ours is done. The rotated files written after ours, oldest first, then
        # the new current file from its start.
        finished, finished_mtime = self._id, mine.st_mtime_ns
        ours, where = self._file, (self._offset, self._carry, self._skipping)
        while True:
            self._file = None
            if not self._open_current():
                # Renamed, and the new file not made yet: stay on ours (read to its end), so
                # the next call finds this rotation again and reads every file since.
                self._file, self._id = ours, finished
                self._offset, self._carry, self._skipping = where
                return
            newer = self._rotated_since(finished, finished_mtime)
            try:
                now = os.stat(self.path)
            except FileNotFoundError:
                break
            if (now.st_dev, now.st_ino) == self._id:
                break
            # Rotated again while the files were looked at (they move up one by one): look
            # again, from the new current file. Nothing was read yet.
            self._file.close()
        ours.close()
        current = self._file
        for name in reversed(newer):
            with open(name, "rb") as whole:
                self._restart()
                yield from self._read_on(whole)
        self._restart()
        yield from self._read_on(current)

    def _rotated_since(self, finished: tuple[int, int] | None,
                       finished_mtime: int) -> list[Path]:
        """The rotated files written after ``finished`` (newest first), the current one
        left out. Every rotated file there is looked at, gaps included: a rotation moves
        them up one rename at a time, so ``<file>.1`` can be missing for an instant while
        ``<file>.2`` already holds what was ``.1``."""
        numbers = sorted(int(p.name.rsplit(".", 1)[1]) for p in
                         self.path.parent.glob(f"{glob.escape(self.path.name)}.*")
                         if p.name.rsplit(".", 1)[1].isdigit())
        skip, newer = {self._id}, []
        for index in numbers:
            name = rotated(self.path, index)
            try:
                stat = os.stat(name)
            except FileNotFoundError:
                continue
            ident = (stat.st_dev, stat.st_ino)
            if ident == finished:
                break
            # A stale file of an earlier configuration (more files kept) is older than ours.
            if ident not in skip and stat.st_mtime_ns >= finished_mtime:
                newer.append(name)
            skip.add(ident)
        return newer

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self._id = None, None

    def _restart(self) -> None:
        self._offset, self._carry, self._skipping = 0, b"", False

    def _open_current(self, at_end: bool = False) -> bool:
        try:
            self._file = open(self.path, "rb")
        except FileNotFoundError:
            return False
        stat = os.fstat(self._file.fileno())
        self._id = (stat.st_dev, stat.st_ino)
        self._restart()
        if at_end:
            self._offset = stat.st_size
        return True

    def _read_on(self, source: BinaryIO) -> Iterator[bytes]:
        """The whole lines from ``_offset`` to the end of ``source``, a chunk at a time."""
        source.seek(self._offset)
        while chunk := source.read(self.chunk):
            self._offset += len(chunk)
            if self._skipping:
                cut = chunk.find(b"\n")
                if cut < 0:
                    continue
                chunk, self._skipping = chunk[cut + 1:], False
            lines = (self._carry + chunk).split(b"\n")
            self._carry = lines.pop()
            if len(self._carry) > MAX_LINE:
                self._carry, self._skipping = b"", True
            yield from (line for line in lines if line)


def follow(path: str | os.PathLike[str], poll: float = 1.0,
           stop: threading.Event | None = None) -> Iterator[dict[str, Any]]:
    """The events written to a log from now on, as they come (``tail -F``), across
    rotations, until ``stop`` is set: for ``gpuspawner events --follow``."""
    reader = LogReader(path, from_end=True)
    stop = stop or threading.Event()
    try:
        while True:
            for line in reader.new_lines():
                entry = parse_line(line)
                if entry is not None:
                    yield entry
            if stop.wait(poll):
                return
    finally:
        reader.close()


def parse_line(line: bytes) -> dict[str, Any] | None:
    """An event from one line of the log, or None (torn, foreign, blank, not an object)."""
    try:
        entry = json.loads(line.decode("utf-8", "replace"))
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def idle_stopped(entries: Iterable[Mapping[str, Any]], user: str,
                 server: str) -> Mapping[str, Any] | None:
    """The ``gpu.idle-stop`` of this server since its last start (``entries`` oldest first),
    or None: what its next spawn page tells the user."""
    found = None
    for entry in entries:
        if entry.get("user") != user or (entry.get("server") or "") != server:
            continue
        if entry.get("event") == GPU_IDLE_STOP:
            found = entry
        elif entry.get("event") == CONTAINER_START:
            found = None
    return found
