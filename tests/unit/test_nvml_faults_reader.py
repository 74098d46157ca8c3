"""inventory.Reader: inventory reads off the event loop, on one thread, kept for a moment.

The spawner and the admin service read the GPUs many times a second under load (every form,
every spawn); NVML may be slow (a hung GPU) and must not be called twice at once. So reads run
on one NVML thread shared by every Reader, a result is kept ``ttl`` seconds, and callers that
arrive during a read share it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from types import ModuleType

import pytest

from gpuspawner import inventory
from gpuspawner.inventory import InventoryError, Reader
from tests import gpusim

GPU1 = "GPU-8d2e4f60-1a3b-4c5d-8e7f-90a1b2c3d4e5"  # a100x4's GPU 1


@pytest.fixture
def sim(tmp_path, monkeypatch) -> gpusim.Simulator:
    simulator = gpusim.Simulator(tmp_path / "state.json")
    monkeypatch.setenv("GPUSIM_STATE", str(simulator.state_path))
    monkeypatch.setenv("PATH", "/nonexistent")
    simulator.install("a100x4")
    return simulator


class Watched:
    """The fake NVML, counting reads (nvmlInit calls), the threads they ran on, and how many
    NVML calls were ever in flight at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.nvml: ModuleType = gpusim.load_fake_nvml()
        self.inits = 0
        self.threads: set[str] = set()
        self.busy = 0
        self.most = 0
        self._lock = threading.Lock()
        for name in ("nvmlInit", "nvmlDeviceGetCount", "nvmlDeviceGetUUID"):
            monkeypatch.setattr(self.nvml, name, self._watch(name, getattr(self.nvml, name)))

    def _watch(self, name, function):
        def call(*args):
            with self._lock:
                self.busy += 1
                self.most = max(self.most, self.busy)
                if name == "nvmlInit":
                    self.inits += 1
                    self.threads.add(threading.current_thread().name)
            try:
                return function(*args)
            finally:
                with self._lock:
                    self.busy -= 1

        return call


@pytest.fixture
def watched(sim, monkeypatch) -> Watched:
    return Watched(monkeypatch)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_read_is_kept_for_ttl_seconds(watched):
    clock = Clock()
    reader = Reader("nvml", nvml=watched.nvml, ttl=2.0, clock=clock)
    first = await reader.read()
    assert len(first.gpus) == 4 and watched.inits == 1
    clock.now += 1.9
    assert await reader.read() is first and reader.read_blocking() is first
    assert watched.inits == 1
    clock.now += 0.2  # 2.1 s after the read: read again
    assert await reader.read() is not first and watched.inits == 2


async def test_a_read_begun_early_is_the_one_a_later_caller_gets(watched):
    """``begin`` starts the read and returns at once (a spawn lists Docker meanwhile); the
    caller then shares that read instead of starting its own. ``latest`` is the last good
    read whatever its age (the driver's versions), and None before any."""
    clock = Clock()
    reader = Reader("nvml", nvml=watched.nvml, ttl=2.0, clock=clock)
    assert reader.latest() is None
    reader.begin()
    reader.begin()  # a read runs: nothing more
    got = reader.read_blocking()
    assert len(got.gpus) == 4 and watched.inits == 1
    clock.now += 3600  # long past ``ttl``
    assert reader.latest() is got and watched.inits == 1


async def test_invalidate_reads_again(watched):
    reader = Reader("nvml", nvml=watched.nvml)
    first = await reader.read()
    reader.invalidate()
    second = await reader.read()
    assert second is not first and watched.inits == 2


async def test_reads_run_on_the_nvml_thread_never_the_callers(watched):
    reader = Reader("nvml", nvml=watched.nvml)
    await reader.read()
    reader.invalidate()
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="docker") as docker:
        blocking = docker.submit(reader.read_blocking).result(timeout=10)
    assert len(blocking.gpus) == 4
    assert watched.threads and all(t.startswith("gpuspawner-nvml") for t in watched.threads)
    assert threading.current_thread().name not in watched.threads


async def test_callers_during_a_read_share_it(sim, watched):
    sim.set_nvml_delay(0.002)
    reader = Reader("nvml", nvml=watched.nvml)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(reader.read() for _ in range(5)),
            *(loop.run_in_executor(pool, reader.read_blocking) for _ in range(2)),
        )
    assert watched.inits == 1
    assert all(r is results[0] for r in results)


async def test_nvml_is_never_called_twice_at_once(sim, watched):
    sim.set_nvml_delay(0.002)
    readers = [Reader("nvml", nvml=watched.nvml) for _ in range(3)]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(r.read() for r in readers),
                             *(loop.run_in_executor(pool, r.read_blocking) for r in readers))
    assert watched.inits == 3 and watched.most == 1


async def test_the_event_loop_runs_during_a_slow_read(sim, watched):
    sim.set_nvml_delay(0.003)
    reader = Reader("nvml", nvml=watched.nvml)
    ticks = 0

    async def tick():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    started = time.monotonic()
    inv = await reader.read()
    took = time.monotonic() - started
    ticker.cancel()
    assert len(inv.migs) == 13  # 7 + 4 + 2 in a100x4
    assert took > 0.2 and ticks >= 5  # the loop kept turning while NVML crawled


async def test_a_cancelled_caller_does_not_cancel_the_shared_read(sim, watched):
    sim.set_nvml_delay(0.002)
    reader = Reader("nvml", nvml=watched.nvml)
    impatient = asyncio.create_task(reader.read())
    patient = asyncio.create_task(reader.read())
    await asyncio.sleep(0.05)
    impatient.cancel()
    inv = await patient
    assert len(inv.gpus) == 4 and watched.inits == 1
    with pytest.raises(asyncio.CancelledError):
        await impatient


async def test_a_failed_read_is_not_kept(sim, watched, monkeypatch, tmp_path):
    reader = Reader("nvml", nvml=watched.nvml)
    monkeypatch.setenv("GPUSIM_STATE", str(tmp_path / "absent.json"))
    with pytest.raises(InventoryError, match="NVML could not be initialised"):
        await reader.read()
    with pytest.raises(InventoryError):
        reader.read_blocking()
    monkeypatch.setenv("GPUSIM_STATE", str(sim.state_path))
    assert len((await reader.read()).gpus) == 4


async def test_auto_never_raises(watched, monkeypatch, tmp_path):
    monkeypatch.setenv("GPUSIM_STATE", str(tmp_path / "absent.json"))
    inv = await Reader("auto", nvml=watched.nvml).read()
    assert inv.source == "none" and "NVML could not be initialised" in inv.problems[0]


async def test_a_gpu_lost_later_keeps_what_the_last_read_knew(sim, watched):
    reader = Reader("nvml", nvml=watched.nvml)
    before = await reader.read()
    sim.lose_gpu(1)
    reader.invalidate()
    after = await reader.read()
    assert after.gpus[1].uuid == GPU1 and after.gpus[1].unavailable
    assert {m.uuid for m in after.migs if m.parent_uuid == GPU1} == {
        m.uuid for m in before.migs if m.parent_uuid == GPU1}
    assert len([m for m in after.migs if m.parent_uuid == GPU1]) == 4


def test_read_blocking_from_the_nvml_thread_does_not_wait_for_itself(watched):
    reader = Reader("nvml", nvml=watched.nvml)
    inv = inventory._EXECUTOR.submit(reader.read_blocking).result(timeout=10)
    assert len(inv.gpus) == 4 and reader.read_blocking() is inv


def test_a_topology_file_reader(tmp_path):
    path = tmp_path / "topology.yaml"
    path.write_text("gpus:\n  - {index: 0, uuid: GPU-a, name: NVIDIA A100-SXM4-80GB}\n")
    reader = Reader("file", topology_file=path)
    assert [g.uuid for g in reader.read_blocking().gpus] == ["GPU-a"]


async def test_no_caller_waits_longer_than_patience_for_a_slow_nvml(sim, watched):
    """A hung GPU makes every NVML call slow: callers get the last good inventory after
    ``patience`` seconds, saying how old it is, on the loop and on a worker thread alike."""
    reader = Reader("nvml", nvml=watched.nvml, ttl=0.0, patience=0.5)
    good = await reader.read()
    sim.set_nvml_delay(0.5)  # dozens of calls: a read of this host takes many seconds
    try:
        began = time.monotonic()
        stale = await reader.read()
        blocking = await asyncio.get_running_loop().run_in_executor(None, reader.read_blocking)
        waited = time.monotonic() - began
    finally:
        sim.set_nvml_delay(0)
    assert waited < 2.0, waited
    for inv in (stale, blocking):
        assert [g.uuid for g in inv.gpus] == [g.uuid for g in good.gpus]
        assert "has not answered in" in inv.problems[-1]
        assert "reported" in inv.problems[-1]


async def test_a_slow_nvml_with_nothing_read_yet_is_an_error_that_says_so(sim, watched):
    reader = Reader("nvml", nvml=watched.nvml, ttl=0.0, patience=0.3)
    sim.set_nvml_delay(0.5)
    try:
        with pytest.raises(InventoryError, match="has not answered in .* CPU servers start"):
            await reader.read()
    finally:
        sim.set_nvml_delay(0)
