"""A log that lives for years: rotation, reading the end of big files, full disks, and the
refusal counter across rotations (gpuspawner/events.py, gpuspawner/admin/metrics.py).

Disk-full and read-only are simulated two ways: by making ``os.write`` / ``os.open`` raise
(always), and by a real tiny or read-only tmpfs (the tests run as root, as scripts/test.sh
requires, and mount it).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import statistics
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuspawner import events
from gpuspawner.admin.metrics import EventCounter
from gpuspawner.events import EventLog, rotated, tail


def numbers(entries) -> list[int]:
    return [e["n"] for e in entries]


def lines_in(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def line_size(tmp_path: Path, **fields) -> int:
    """Bytes of one line with these fields (the time stamp has a fixed width)."""
    probe = EventLog(tmp_path / "probe.jsonl", max_bytes=0)
    probe.write(events.GPU_ALLOCATE, **fields)
    return len((tmp_path / "probe.jsonl").read_bytes())


# ------------------------------------------------------------------------------ rotation


def test_rotates_when_a_line_would_pass_max_bytes_not_at_it(tmp_path: Path):
    size = line_size(tmp_path, n=0)
    path = tmp_path / "e.jsonl"
    log = EventLog(path, max_bytes=3 * size, keep_files=5)
    for n in range(3):
        log.write(events.GPU_ALLOCATE, n=n)
    assert path.stat().st_size == 3 * size  # exactly full: not rotated yet
    assert not rotated(path, 1).exists()
    log.write(events.GPU_ALLOCATE, n=3)  # would pass it: rotated first
    assert numbers(lines_in(rotated(path, 1))) == [0, 1, 2]
    assert numbers(lines_in(path)) == [3]
    for n in range(4, 10):
        log.write(events.GPU_ALLOCATE, n=n)
    assert numbers(lines_in(rotated(path, 3))) == [0, 1, 2]
    assert numbers(lines_in(rotated(path, 2))) == [3, 4, 5]
    assert numbers(lines_in(rotated(path, 1))) == [6, 7, 8]
    assert numbers(lines_in(path)) == [9]
    assert all(p.stat().st_size <= 3 * size for p in tmp_path.glob("e.jsonl*"))


def test_keeps_only_keep_files_rotated_files(tmp_path: Path):
    size = line_size(tmp_path, n=0)
    path = tmp_path / "e.jsonl"
    log = EventLog(path, max_bytes=size, keep_files=2)  # one line per file
    for n in range(6):
        log.write(events.GPU_ALLOCATE, n=n)
    assert sorted(p.name for p in tmp_path.glob("e.jsonl*")) == [
        "e.jsonl", "e.jsonl.1", "e.jsonl.2"]
    assert [numbers(lines_in(rotated(path, i))) for i in (2, 1, 0)] == [[3], [4], [5]]
    assert numbers(tail(path, 10)) == [3, 4, 5]  # the dropped ones are gone for good


def test_keep_zero_starts_over_and_zero_bytes_never_rotates(tmp_path: Path):
    size = line_size(tmp_path, n=0)
    path = tmp_path / "e.jsonl"
    log = EventLog(path, max_bytes=2 * size, keep_files=0)
    for n in range(5):
        log.write(events.GPU_ALLOCATE, n=n)
    assert numbers(lines_in(path)) == [4] and not rotated(path, 1).exists()
    endless = EventLog(tmp_path / "endless.jsonl", max_bytes=0)
    for n in range(50):
        endless.write(events.GPU_ALLOCATE, n=n)
    assert len(lines_in(tmp_path / "endless.jsonl")) == 50
    assert not rotated(tmp_path / "endless.jsonl", 1).exists()


def test_a_line_bigger_than_max_bytes_gets_a_file_of_its_own(tmp_path: Path):
    path = tmp_path / "e.jsonl"
    log = EventLog(path, max_bytes=200)
    log.write(events.GPU_ALLOCATE, n=0, pad="x" * 500)  # into the empty file: no rotation
    assert not rotated(path, 1).exists()
    log.write(events.GPU_ALLOCATE, n=1)
    log.write(events.GPU_ALLOCATE, n=2, pad="y" * 500)
    assert numbers(lines_in(rotated(path, 2))) == [0]
    assert numbers(lines_in(rotated(path, 1))) == [1]
    assert numbers(lines_in(path)) == [2]


def test_two_logs_on_one_file_rotate_it_once(tmp_path: Path):
    """Two hubs (or a hub and the admin service) share no lock: the second, finding the
    file already rotated under its feet, writes to the new file instead of rotating again."""
    size = line_size(tmp_path, n=0)
    path = tmp_path / "e.jsonl"
    one = EventLog(path, max_bytes=2 * size, keep_files=10)
    two = EventLog(path, max_bytes=2 * size, keep_files=10)
    for n in range(8):
        (one if n % 2 else two).write(events.GPU_ALLOCATE, n=n)
    files = [rotated(path, i) for i in range(3, -1, -1)]
    assert [numbers(lines_in(f)) for f in files] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_concurrent_writers_lose_nothing_and_duplicate_nothing(tmp_path: Path):
    path = tmp_path / "e.jsonl"
    logs = [EventLog(path, max_bytes=20_000, keep_files=1000) for _ in range(4)]
    start = threading.Barrier(8)

    def work(w: int) -> None:
        start.wait()
        for n in range(150):
            logs[w % 4].write(events.GPU_ALLOCATE, w=w, n=n, pad="x" * (n % 300))

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    seen = [(e["w"], e["n"]) for f in tmp_path.glob("e.jsonl*") for e in lines_in(f)]
    assert sorted(seen) == sorted((w, n) for w in range(8) for n in range(150))
    # A writer that opened the file just before another renamed it may add its line there.
    biggest_line = line_size(tmp_path, w=7, n=149, pad="x" * 299)
    assert all(f.stat().st_size <= 20_000 + 8 * biggest_line for f in tmp_path.glob("e.j*"))
    assert sum(1 for f in tmp_path.glob("e.jsonl.*") if f.stat().st_size == 0) == 0


def test_a_folder_that_cannot_be_renamed_in_keeps_growing_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    size = line_size(tmp_path, n=0)
    path = tmp_path / "e.jsonl"
    log = EventLog(path, max_bytes=size)

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(events.os, "replace", refuse)
    with caplog.at_level(logging.WARNING, logger="gpuspawner.events"):
        for n in range(5):
            log.write(events.GPU_ALLOCATE, n=n)
    assert numbers(lines_in(path)) == [0, 1, 2, 3, 4]  # nothing lost for want of a rename
    assert caplog.text.count("cannot be rotated") == 1


# ------------------------------------------------------------------------------ tail


def test_tail_continues_into_the_rotated_files(tmp_path: Path):
    size = line_size(tmp_path, n=0)
    path = tmp_path / "e.jsonl"
    log = EventLog(path, max_bytes=4 * size, keep_files=3)
    for n in range(10):
        log.write(events.GPU_ALLOCATE, n=n)
    # e.jsonl.2: 0-3, e.jsonl.1: 4-7, e.jsonl: 8, 9
    assert numbers(tail(path, 2)) == [8, 9]
    assert numbers(tail(path, 3)) == [7, 8, 9]
    assert numbers(tail(path, 7)) == [3, 4, 5, 6, 7, 8, 9]
    assert numbers(tail(path, 100)) == list(range(10))
    assert numbers(log.read(5)) == [5, 6, 7, 8, 9]


def test_tail_across_rotation_with_torn_last_lines(tmp_path: Path):
    """A hub that died mid-line before the rotation left ``.1`` with a torn last line; the
    current file ends torn too (a writer died just now). Both are skipped, nothing else."""
    path = tmp_path / "e.jsonl"
    older = rotated(path, 1)
    EventLog(older, max_bytes=0).write(events.GPU_ALLOCATE, n=1)
    EventLog(older, max_bytes=0).write(events.GPU_ALLOCATE, n=2)
    with older.open("a") as out:
        out.write('{"time": "2026-11-24T09:30:05.000+00:00", "event": "gpu.al')
    EventLog(path, max_bytes=0).write(events.GPU_ALLOCATE, n=3)
    with path.open("a") as out:
        out.write('{"time": "2026-11-24T09:31:00.000+00:00", "ev')
    assert numbers(tail(path, 10)) == [1, 2, 3]
    assert numbers(tail(path, 2)) == [2, 3]
    assert numbers(tail(path, 1)) == [3]


def test_tail_with_only_rotated_files_mid_rotation(tmp_path: Path):
    """Between the rename and the next write there is no current file: ``.1`` is newest."""
    path = tmp_path / "e.jsonl"
    log = EventLog(rotated(path, 1))
    for n in range(3):
        log.write(events.GPU_ALLOCATE, n=n)
    assert numbers(tail(path, 2)) == [1, 2]


def test_tail_reading_the_same_file_under_two_names_counts_it_once(tmp_path: Path):
    """A rotation while tail reads moves the file it just read to the next name: tail sees
    the same file again (same inode), reads again, and never returns an event twice."""
    path = tmp_path / "e.jsonl"
    log = EventLog(path)
    for n in range(3):
        log.write(events.GPU_ALLOCATE, n=n)
    os.link(path, rotated(path, 1))  # the state a reader sees mid-rotation, frozen
    assert numbers(tail(path, 10)) == [0, 1, 2]


def test_tail_of_lines_across_block_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(events, "BLOCK", 7)  # every line spans several blocks
    path = tmp_path / "e.jsonl"
    log = EventLog(path)
    for n in range(20):
        log.write(events.GPU_ALLOCATE, n=n, pad="é" * (n % 5))
    assert numbers(tail(path, 30)) == list(range(20))
    lines = list(events._lines_backwards(path.open("rb"), path.stat().st_size, block=7))
    assert [json.loads(line)["n"] for line in lines] == list(range(19, -1, -1))


def test_a_line_longer_than_max_line_is_skipped_in_bounded_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(events, "MAX_LINE", 10_000)
    path = tmp_path / "e.jsonl"
    log = EventLog(path, max_bytes=0)
    log.write(events.GPU_ALLOCATE, n=1)
    with path.open("a") as out:
        out.write('{"event": "huge", "pad": "' + "x" * 300_000 + '"}\n')
    log.write(events.GPU_ALLOCATE, n=2)
    assert numbers(tail(path, 10)) == [1, 2]
    with path.open("a") as out:
        out.write("y" * 300_000)  # torn and huge, at the very end
    assert numbers(tail(path, 10)) == [1, 2]


@pytest.fixture(scope="module")
def big_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 200 MB operation log (about 800,000 events), made without the writer for speed."""
    path = tmp_path_factory.mktemp("big") / "events.jsonl"
    entry = {"time": "2026-11-24T09:30:05.123+00:00", "event": events.GPU_ALLOCATE,
             "user": "student042", "server": "", "container": "jupyter-student042",
             "uuids": ["MIG-0a1b2c3d-1111-2222-3333-444455556666"], "slots": ["1.3"],
             "profile": "1g.10gb", "via": "spawner"}
    block = "".join(json.dumps({**entry, "n": n}) + "\n" for n in range(1000)).encode()
    with path.open("wb") as out:
        while out.tell() < 200 * 1024 * 1024:
            out.write(block)
    yield path
    path.unlink()


def test_tail_of_a_200mb_log_reads_only_its_end(big_log: Path):
    """Memory is asserted (it must not grow with the file); the time is measured and
    printed, not asserted (a shared test machine has no reliable clock for that)."""
    size = big_log.stat().st_size
    assert size >= 200 * 1024 * 1024
    results = {}
    for limit in (200, 500, 10_000):
        tracemalloc.start()
        began = time.perf_counter()
        found = list(tail(big_log, limit))
        took = time.perf_counter() - began
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert len(found) == limit and found[-1]["n"] == 999
        results[limit] = (took, peak)
        # The events kept (about 1.5 KiB each as dicts) plus a block and a line: never the
        # file (200 MB), whatever its size.
        assert peak < 2 * 1024 * 1024 + limit * 4 * 1024, (limit, peak)
    print(f"\ntail of a {size / 2**20:.0f} MiB log: " + ", ".join(
        f"{limit} events in {took * 1000:.1f} ms (peak {peak / 2**20:.2f} MiB)"
        for limit, (took, peak) in results.items()))


def test_the_cost_of_a_write_is_measured(tmp_path: Path):
    """Not asserted (shared machines): printed, for docs and reviews. See events.py for why
    writes are made in the caller's thread."""
    log = EventLog(tmp_path / "e.jsonl", max_bytes=1024 * 1024)
    took = []
    for n in range(3000):
        began = time.perf_counter_ns()
        log.write(events.GPU_ALLOCATE, n=n, user="student042", server="",
                  container="jupyter-student042",
                  uuids=["MIG-0a1b2c3d-1111-2222-3333-444455556666"], slots=["1.3"])
        took.append(time.perf_counter_ns() - began)
    took.sort()
    assert sum(len(lines_in(f)) for f in tmp_path.glob("e.jsonl*")) == 3000
    print(f"\nwrite: median {statistics.median(took) / 1000:.0f} us, "
          f"p99 {took[int(len(took) * 0.99)] / 1000:.0f} us, max {took[-1] / 1000:.0f} us")


# ------------------------------------------------------------------------------ failures


class FullDisk:
    """``os.write`` of the events module, failing with ENOSPC while ``full``; ``partial``
    lets the first failing write put half its bytes down first, as a filling disk does."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, partial: bool = False) -> None:
        self.full = True
        self.partial = partial
        self.real = os.write
        monkeypatch.setattr(events.os, "write", self)

    def __call__(self, fd: int, data) -> int:
        if not self.full:
            return self.real(fd, data)
        if self.partial:
            self.partial = False
            return self.real(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_warns_once_keeps_events_and_writes_them_when_it_can(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    path = tmp_path / "e.jsonl"
    log = EventLog(path)
    log.write(events.GPU_ALLOCATE, n=0)
    disk = FullDisk(monkeypatch, partial=True)
    with caplog.at_level(logging.DEBUG, logger="gpuspawner.events"):
        for n in range(1, 6):
            entry = log.write(events.GPU_ALLOCATE, n=n)  # never raises: spawns go on
            assert entry["n"] == n
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "No space left on device (ENOSPC)" in warnings[0].message
    assert log.failing and "ENOSPC" in log.failing
    assert numbers(log.pending()) == [1, 2, 3, 4, 5]
    assert numbers(log.read()) == [0, 1, 2, 3, 4, 5]  # the file, then what waits
    assert path.read_bytes().endswith(b"\n") is False  # half a line went down
    caplog.clear()
    disk.full = False
    with caplog.at_level(logging.WARNING, logger="gpuspawner.events"):
        log.write(events.GPU_ALLOCATE, n=6)
    assert "written again" in caplog.text
    assert log.failing is None and log.pending() == []
    # The torn half line is ended, not glued to the next: every event is there, in order.
    assert numbers(tail(path, 100)) == [0, 1, 2, 3, 4, 5, 6]
    assert all(e["event"] != events.LOG_GAP for e in tail(path, 100))


def test_events_beyond_what_memory_keeps_are_counted_in_a_gap_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    path = tmp_path / "e.jsonl"
    log = EventLog(path, keep=3)
    disk = FullDisk(monkeypatch)
    for n in range(10):
        log.write(events.GPU_ALLOCATE, n=n)
    assert numbers(log.pending()) == [7, 8, 9]
    disk.full = False
    log.write(events.GPU_ALLOCATE, n=10)
    written = lines_in(path)
    assert written[0]["event"] == events.LOG_GAP and written[0]["lost"] == 7
    assert "ENOSPC" in written[0]["reason"] and written[0]["since"]
    assert numbers(written[1:]) == [7, 8, 9, 10]


def test_permission_denied_on_open_is_one_warning_then_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    path = tmp_path / "e.jsonl"
    log = EventLog(path)
    real_open = os.open
    denied = {"on": True}

    def guarded(name, flags, mode=0o777):
        if denied["on"]:
            raise PermissionError(errno.EACCES, "Permission denied", str(name))
        return real_open(name, flags, mode)

    monkeypatch.setattr(events.os, "open", guarded)
    with caplog.at_level(logging.WARNING, logger="gpuspawner.events"):
        for n in range(4):
            log.write(events.GPU_ALLOCATE, n=n)
    assert caplog.text.count("cannot be written") == 1 and "EACCES" in caplog.text
    denied["on"] = False
    log.write(events.GPU_ALLOCATE, n=4)
    assert numbers(lines_in(path)) == [0, 1, 2, 3, 4]


def test_a_file_where_the_folder_should_be_resumes_when_it_is_moved(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    blocker = tmp_path / "logs"
    blocker.write_text("not a folder\n")
    log = EventLog(blocker / "e.jsonl")
    with caplog.at_level(logging.WARNING, logger="gpuspawner.events"):
        for n in range(3):
            log.write(events.GPU_ALLOCATE, n=n)
    assert caplog.text.count("cannot be written") == 1
    blocker.unlink()  # the admin fixes it; the folder is made by the next write
    log.write(events.GPU_ALLOCATE, n=3)
    assert numbers(lines_in(blocker / "e.jsonl")) == [0, 1, 2, 3]


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator:
    """``mount(options)`` -> a fresh tmpfs folder; unmounted at the end. Fails where the test
    may not mount (not root, no CAP_SYS_ADMIN): scripts/test.sh runs as root."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.fail(f"cannot mount a tmpfs here (the tests run as root): {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_real_full_disk(mount_tmpfs, caplog: pytest.LogCaptureFixture):
    disk = mount_tmpfs("size=64k")
    path = disk / "e.jsonl"
    log = EventLog(path, max_bytes=0)
    filler = disk / "filler"
    with pytest.raises(OSError) as full, filler.open("wb") as out:
        while True:
            out.write(b"\0" * 4096)
            out.flush()
    assert full.value.errno == errno.ENOSPC
    with caplog.at_level(logging.WARNING, logger="gpuspawner.events"):
        for n in range(20):
            log.write(events.GPU_ALLOCATE, n=n, pad="x" * 100)
    assert caplog.text.count("cannot be written") == 1 and "ENOSPC" in caplog.text
    assert numbers(log.read(100)) == list(range(20))
    filler.unlink()
    log.write(events.GPU_ALLOCATE, n=20)
    assert numbers(tail(path, 100)) == list(range(21))


def test_a_real_read_only_folder(mount_tmpfs, caplog: pytest.LogCaptureFixture):
    disk = mount_tmpfs("size=64k,ro")
    log = EventLog(disk / "e.jsonl")
    with caplog.at_level(logging.WARNING, logger="gpuspawner.events"):
        for n in range(3):
            log.write(events.GPU_ALLOCATE, n=n)
    assert caplog.text.count("cannot be written") == 1 and "EROFS" in caplog.text
    remount = subprocess.run(["mount", "-o", "remount,rw", str(disk)], capture_output=True,
                             text=True, check=False)
    assert remount.returncode == 0, remount.stderr
    log.write(events.GPU_ALLOCATE, n=3)
    assert numbers(lines_in(disk / "e.jsonl")) == [0, 1, 2, 3]


# ------------------------------------------------------------------------------ the counter


def refuse(log: EventLog, code: str, count: int = 1) -> None:
    for _ in range(count):
        log.write(events.GPU_REFUSE, user="ann", code=code)


def test_counter_reads_only_new_lines_and_never_counts_twice_across_a_rotation(tmp_path: Path):
    path = tmp_path / "e.jsonl"
    log = EventLog(path, max_bytes=600, keep_files=10)
    counter = EventCounter(str(path), chunk=100)  # chunks smaller than a line
    refuse(log, "full", 3)
    log.write(events.GPU_ALLOCATE, user="bo")
    assert counter.counts() == {"full": 3}
    refuse(log, "full", 10)  # rotates on the way
    refuse(log, "quota", 2)
    assert rotated(path, 1).exists()
    assert counter.counts() == {"full": 13, "quota": 2}
    assert counter.counts() == {"full": 13, "quota": 2}  # nothing new: nothing counted


def test_counter_across_several_rotations_between_two_scrapes(tmp_path: Path):
    path = tmp_path / "e.jsonl"
    log = EventLog(path, max_bytes=1000, keep_files=20)
    counter = EventCounter(str(path))
    refuse(log, "full", 2)
    assert counter.counts() == {"full": 2}
    refuse(log, "full", 40)  # several files' worth
    assert len(list(tmp_path.glob("e.jsonl.*"))) >= 3
    assert counter.counts() == {"full": 42}


def test_counter_with_files_dropped_between_scrapes(tmp_path: Path):
    """More rotations than files kept: the file counted last is gone; every file there is
    newer and is counted, the rest is lost with the files (nothing counted twice)."""
    path = tmp_path / "e.jsonl"
    size = line_size(tmp_path, user="ann", code="full")
    log = EventLog(path, max_bytes=size, keep_files=2)  # one event per file
    counter = EventCounter(str(path))
    refuse(log, "full", 1)
    assert counter.counts() == {"full": 1}
    refuse(log, "full", 6)  # events 2-4 are dropped with their files; 5, 6, 7 are kept
    assert counter.counts() == {"full": 1 + 3}


def test_counter_ignores_stale_rotated_files_of_an_earlier_configuration(tmp_path: Path):
    path = tmp_path / "e.jsonl"
    stale = rotated(path, 3)
    refuse(EventLog(stale, max_bytes=0), "stale", 5)
    os.utime(stale, (1, 1))  # written long ago
    log = EventLog(path, max_bytes=1000, keep_files=1)  # keeps .1 only; .3 is left over
    counter = EventCounter(str(path))
    refuse(log, "full", 2)
    assert counter.counts() == {"full": 2}
    refuse(log, "full", 20)
    assert counter.counts() == {"full": 22}


def test_counter_after_truncation_in_place_counts_the_new_lines_only(tmp_path: Path):
    path = tmp_path / "e.jsonl"
    log = EventLog(path, max_bytes=0)
    counter = EventCounter(str(path))
    refuse(log, "full", 5)
    assert counter.counts() == {"full": 5}
    with path.open("r+b") as handle:  # logrotate's copytruncate
        handle.truncate(0)
    refuse(log, "quota", 2)
    assert counter.counts() == {"full": 5, "quota": 2}


def test_counter_skips_torn_huge_and_foreign_lines(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(events, "MAX_LINE", 1000)
    path = tmp_path / "e.jsonl"
    log = EventLog(path, max_bytes=0)
    counter = EventCounter(str(path), chunk=64)
    refuse(log, "full")
    with path.open("a") as out:
        out.write('{"event": "gpu.refuse", "code": "huge", "pad": "' + "x" * 5000 + '"}\n')
        out.write('not json "gpu.refuse"\n')
    refuse(log, "full")
    with path.open("a") as out:
        out.write('{"event": "gpu.refuse", "code": "wait')  # being written: not yet
    assert counter.counts() == {"full": 2}
    with path.open("a") as out:
        out.write('ing"}\n')
    assert counter.counts() == {"full": 2, "waiting": 1}


def test_counter_of_a_missing_or_unset_log(tmp_path: Path):
    assert EventCounter(None).counts() == {}
    counter = EventCounter(str(tmp_path / "later.jsonl"))
    assert counter.counts() == {}
    refuse(EventLog(tmp_path / "later.jsonl"), "full")
    assert counter.counts() == {"full": 1}


# ------------------------------------------------------------------------------ following


def test_reader_from_the_end_reads_each_new_line_once_across_rotations(tmp_path: Path):
    path = tmp_path / "e.jsonl"
    log = EventLog(path, max_bytes=500, keep_files=10)
    for n in range(3):
        log.write(events.GPU_ALLOCATE, n=n)  # before the reader: not read
    reader = events.LogReader(path, from_end=True, chunk=50)
    assert list(reader.new_lines()) == []
    got = []
    for n in range(3, 40):
        log.write(events.GPU_ALLOCATE, n=n)
        if n % 7 == 0:  # a look now and then, with rotations in between
            got += [json.loads(line)["n"] for line in reader.new_lines()]
    got += [json.loads(line)["n"] for line in reader.new_lines()]
    assert got == list(range(3, 40))
    assert len(list(tmp_path.glob("e.jsonl.*"))) >= 4
    reader.close()


def test_follow_prints_what_comes_across_a_rotation(tmp_path: Path):
    path = tmp_path / "e.jsonl"
    log = EventLog(path, max_bytes=400, keep_files=10)
    log.write(events.GPU_ALLOCATE, n=-1)  # already there: not followed
    stop = threading.Event()
    got: list[int] = []

    def run() -> None:
        for entry in events.follow(path, poll=0.01, stop=stop):
            got.append(entry["n"])

    thread = threading.Thread(target=run)
    thread.start()
    # The follower starts at the end of the file as it first opens it: write a ready mark
    # until one comes across (a fixed sleep was too short on a loaded machine).
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        log.write(events.GPU_ALLOCATE, n=-2)
        time.sleep(0.05)
    for n in range(20):
        log.write(events.GPU_ALLOCATE, n=n)
    deadline = time.monotonic() + 10
    while len([n for n in got if n >= 0]) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join(5)
    assert set(got[:1]) == {-2}  # nothing from before the follower began
    assert [n for n in got if n >= 0] == list(range(20)) and rotated(path, 2).exists()
