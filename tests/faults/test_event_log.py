"""Row 6: the operation log (``events_file``) cannot be written: its disk is full (a tiny
tmpfs, filled), or it is read-only. Spawns keep working; the log is not the record."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from . import sizes
from .conftest import POLL_INTERVAL, MakeHub, MakeScenario
from .test_nvml import judge, spawn_during, start_residents

pytestmark = pytest.mark.docker

POLICY = "defaults: {allow_full_gpu: true}\n"


def _mount(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


@contextmanager
def tiny_disk(where: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs at ``where``, unmounted (lazily: the hub may hold the log open)."""
    where.mkdir(parents=True, exist_ok=True)
    _mount("mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(where))
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def fill(disk: Path, log: Path) -> int:
    """Write zeros until the file system says it is full, then blank lines onto the log
    until it cannot grow either (its last page may have had room; readers skip blank
    lines); returns the bytes written."""
    written = 0
    with open(disk / "filler", "wb", buffering=0) as handle:
        while True:
            try:
                written += handle.write(b"\0" * 4096)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    with open(log, "ab", buffering=0) as handle:
        for _ in range(4096):
            try:
                written += handle.write(b"\n")
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    return written


@pytest.mark.parametrize("how", ["disk-full", "read-only"])
@pytest.mark.parametrize("size", [sizes.EVENT_LOG], ids=lambda s: s.id)
def test_the_operation_log_cannot_be_written(
    size: sizes.Size, how: str, fault_hub: MakeHub, scenario: MakeScenario, gpusim: Any,
    engine: Any, tmp_path: Path,
) -> None:
    hub_id = f"faults-log-{how}"
    scn = scenario(f"log-{how}", size)
    with tiny_disk(tmp_path / "logdisk") as disk:
        events = disk / "events.jsonl"
        hub = scn.add_hub(hub_id, fault_hub(
            hub_id, policy=POLICY, config_extra=f"c.GPUSpawner.events_file = {str(events)!r}\n"))
        scn.begin()
        start_residents(scn, hub_id, 2)
        assert events.exists() and events.stat().st_size > 0  # it was being written
        scn.fault()
        if how == "disk-full":
            scn.details["filled_bytes"] = fill(disk, events)
        else:
            _mount("mount", "-o", "remount,ro", str(disk))
        before = events.stat().st_size
        outcomes = spawn_during(scn, hub_id, size)
        broken = judge(scn, outcomes, engine, gpusim, hub_id)
        scn.details["log_bytes_during_fault"] = events.stat().st_size - before
        grown = scn.details["log_bytes_during_fault"]
        said = [line[:240] for line in hub.log_text().splitlines()
                if "operation log" in line and "cannot be written" in line]
        scn.details["log_failure_in_hub_log"] = said[-2:]
        scn.expect(not broken, f"spawns did not work: {broken}")
        scn.expect(grown == 0, f"the log still grew by {grown} bytes: the fault did not strike")
        scn.expect(bool(said), "the hub did not say that its operation log cannot be written")
        row = scn.finish(POLL_INTERVAL)
    assert row.ok(), row.explain()
