"""The operation log (gpuspawner/events.py): what an admin reads after the fact.

The log is the only answer to "why did my student get slice 1.3, and who released it?", so
it must keep every event it was given, as one whole JSON line, even with several hub threads
(or several hubs) appending to one file; and its readers (``gpuspawner events``, the admin
page) must survive whatever else ends up in the file: a line torn by a crash mid-write, a
line another tool wrote, a blank line.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest

from gpuspawner import events
from gpuspawner.allocator import Request
from gpuspawner.events import EventLog, tail


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


# ------------------------------------------------------------------------------ writing


def test_write_appends_one_json_line_per_event(tmp_path: Path):
    path = tmp_path / "log" / "events.jsonl"  # the folder is made on the first write
    log = EventLog(path)
    first = log.write(events.GPU_ALLOCATE, user="ann", server="", devices=["1.2"])
    second = log.write(events.CONTAINER_START, user="ann", container="jupyter-ann")
    raw = lines_of(path)
    assert len(raw) == 2
    assert [json.loads(line) for line in raw] == [first, second]
    assert first["event"] == "gpu.allocate" and first["user"] == "ann"
    assert first["server"] == ""  # falsy values are kept: the default server is ""
    assert first["devices"] == ["1.2"]
    assert list(first)[:2] == ["time", "event"]  # the reader's eye finds these first


def test_time_is_utc_iso_with_milliseconds(tmp_path: Path):
    before = datetime.now(timezone.utc)
    entry = EventLog(tmp_path / "e.jsonl").write(events.GPU_REFUSE, user="bo")
    after = datetime.now(timezone.utc)
    stamp = datetime.fromisoformat(entry["time"])
    assert stamp.tzinfo is not None and stamp.utcoffset().total_seconds() == 0
    assert len(entry["time"].split(".")[1].split("+")[0]) == 3  # milliseconds, no more
    assert before.replace(microsecond=before.microsecond // 1000 * 1000) <= stamp <= after


def test_fields_are_made_json_and_none_is_left_out(tmp_path: Path):
    path = tmp_path / "e.jsonl"
    when = datetime(2026, 11, 24, 9, 30, 5, tzinfo=timezone.utc)
    request = Request("ann", mig_profile="1g.10gb")
    entry = EventLog(path).write(
        events.GPU_REALLOCATE, user="ann", old=("MIG-a",), at=when, request=request,
        reason=None, extra={"when": when},
    )
    assert "reason" not in entry
    assert entry["old"] == ["MIG-a"]
    assert entry["at"] == "2026-11-24T09:30:05Z"
    assert entry["extra"] == {"when": "2026-11-24T09:30:05Z"}
    assert entry["request"] == request.to_json()
    assert json.loads(lines_of(path)[0]) == entry


def test_unserialisable_values_are_written_as_text(tmp_path: Path):
    path = tmp_path / "e.jsonl"
    entry = EventLog(path).write(events.GPU_BACKOFF, user="ann", path=Path("/x"))
    assert json.loads(lines_of(path)[0])["path"] == "/x"
    assert entry["path"] == Path("/x")  # the in-memory copy keeps the object


def test_read_returns_the_newest_events_oldest_first(tmp_path: Path):
    log = EventLog(tmp_path / "e.jsonl")
    for n in range(10):
        log.write(events.PORT_ALLOCATE, n=n)
    assert [e["n"] for e in log.read()] == list(range(10))
    assert [e["n"] for e in log.read(3)] == [7, 8, 9]
    # Another writer on the same file (a second hub) is seen: the file is the record.
    EventLog(tmp_path / "e.jsonl").write(events.PORT_ALLOCATE, n=10)
    assert [e["n"] for e in log.read(2)] == [9, 10]


def test_memory_log_keeps_the_last_events(tmp_path: Path):
    log = EventLog(None, keep=5)
    for n in range(8):
        log.write(events.CONTAINER_STOP, n=n)
    assert [e["n"] for e in log.read()] == [3, 4, 5, 6, 7]
    assert [e["n"] for e in log.read(2)] == [6, 7]
    assert list(tmp_path.iterdir()) == []  # nothing touched the disk


def test_memory_log_read_of_nothing_is_empty():
    log = EventLog()
    assert log.read() == []
    log.write(events.GPU_KEEP, user="ann")
    assert [e["event"] for e in log.read(1)] == ["gpu.keep"]


def test_read_of_zero_events_is_empty_for_memory_and_file(tmp_path: Path):
    for log in (EventLog(), EventLog(tmp_path / "e.jsonl")):
        log.write(events.GPU_KEEP, user="ann")
        assert log.read(0) == []


def test_an_unwritable_file_is_logged_and_the_event_kept_in_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the log's folder should be\n")
    log = EventLog(blocker / "events.jsonl")
    with caplog.at_level(logging.WARNING, logger="gpuspawner.events"):
        entry = log.write(events.GPU_ALLOCATE, user="ann")  # no exception: spawns go on
    assert entry["user"] == "ann"
    assert "cannot be written" in caplog.text and '"gpu.allocate"' in caplog.text
    assert log._recent[-1] == entry


def test_reading_an_unreadable_log_is_empty_not_an_exception(tmp_path: Path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the log's folder should be\n")
    assert list(tail(blocker / "events.jsonl")) == []
    assert EventLog(blocker / "events.jsonl").read() == []


# ------------------------------------------------------------------------------ reading


def test_tail_skips_torn_foreign_and_blank_lines(tmp_path: Path):
    path = tmp_path / "e.jsonl"
    log = EventLog(path)
    log.write(events.GPU_ALLOCATE, n=1)
    with path.open("a", encoding="utf-8") as out:
        out.write("\n")  # blank
        out.write("Nov 24 09:30:05 hub jupyterhub[12]: not ours\n")  # another tool's text
        out.write("[1, 2, 3]\n")  # JSON, but not an event
        out.write('"just a string"\n')
        out.write("null\n")
    log.write(events.GPU_RELEASE, n=2)
    with path.open("a", encoding="utf-8") as out:
        out.write('{"time": "2026-11-24T09:30:05.000+00:00", "event": "gpu.al')  # torn
    assert [e["n"] for e in tail(path)] == [1, 2]
    assert [e["n"] for e in log.read()] == [1, 2]


def test_tail_joins_a_line_completed_after_a_torn_write(tmp_path: Path):
    """A writer that died mid-line leaves no newline: the next event lands on the same line,
    which is then unreadable; the events before and after it are not lost."""
    path = tmp_path / "e.jsonl"
    log = EventLog(path)
    log.write(events.GPU_ALLOCATE, n=1)
    with path.open("a", encoding="utf-8") as out:
        out.write('{"event": "gpu.al')
    log.write(events.GPU_ALLOCATE, n=2)  # glued onto the torn line
    log.write(events.GPU_ALLOCATE, n=3)
    assert [e["n"] for e in tail(path)] == [1, 3]


def test_tail_survives_bytes_that_are_not_utf8(tmp_path: Path):
    path = tmp_path / "e.jsonl"
    EventLog(path).write(events.GPU_ALLOCATE, n=1)
    with path.open("ab") as out:
        out.write(b"\xff\xfe garbage \x80\n")
    EventLog(path).write(events.GPU_ALLOCATE, n=2)
    assert [e["n"] for e in tail(path)] == [1, 2]


def test_tail_limit_and_missing_file(tmp_path: Path):
    path = tmp_path / "e.jsonl"
    assert list(tail(path)) == []  # no log yet is not an error
    log = EventLog(path)
    for n in range(300):
        log.write(events.PORT_ALLOCATE, n=n)
    assert [e["n"] for e in tail(path)] == list(range(100, 300))  # default limit 200
    assert [e["n"] for e in tail(path, 5)] == [295, 296, 297, 298, 299]
    assert list(tail(path, 0)) == []


def test_tail_limit_counts_only_readable_lines(tmp_path: Path):
    path = tmp_path / "e.jsonl"
    log = EventLog(path)
    for n in range(3):
        log.write(events.PORT_ALLOCATE, n=n)
    with path.open("a", encoding="utf-8") as out:
        out.write('{"event": "torn')
    assert [e["n"] for e in tail(path, 2)] == [1, 2]


# ------------------------------------------------------------------------------ concurrency


def _hammer(logs: list[EventLog], writers: int, each: int, payload: int) -> None:
    """``writers`` threads, each appending ``each`` events of about ``payload`` characters,
    released together so their writes interleave as much as the scheduler lets them."""
    start = threading.Barrier(writers)

    def work(w: int) -> None:
        log = logs[w % len(logs)]
        start.wait()
        for n in range(each):
            # Sizes vary around the 8 KiB buffer of Python's text files, where a line would
            # be split over several write() calls if anything were going to split it.
            size = payload + (n * 977 + w * 131) % (payload + 1)
            log.write(events.GPU_ALLOCATE, writer=w, n=n, pad="x" * size)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive()


def _check_whole(path: Path, writers: int, each: int) -> None:
    raw = lines_of(path)
    assert len(raw) == writers * each
    seen: dict[int, list[int]] = {w: [] for w in range(writers)}
    for line in raw:
        entry = json.loads(line)  # a torn or interleaved line fails right here
        assert set(entry["pad"]) == {"x"}
        seen[entry["writer"]].append(entry["n"])
    # Each writer's events appear whole and in the order it wrote them.
    assert all(ns == list(range(each)) for ns in seen.values())


def test_threads_sharing_one_log_write_whole_lines(tmp_path: Path):
    path = tmp_path / "e.jsonl"
    log = EventLog(path, keep=10_000)
    _hammer([log], writers=8, each=60, payload=6000)
    _check_whole(path, 8, 60)
    assert len(log.read(10_000)) == 480
    assert len(log._recent) == 480


def test_separate_logs_on_one_file_write_whole_lines(tmp_path: Path):
    """Two hubs (or a hub and a CLI) share no lock: the append mode alone must keep lines
    whole, including lines longer than the text file's buffer."""
    path = tmp_path / "e.jsonl"
    logs = [EventLog(path) for _ in range(4)]
    _hammer(logs, writers=8, each=40, payload=12_000)
    _check_whole(path, 8, 40)
