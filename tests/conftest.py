"""Shared pytest fixtures. Each block below belongs to one part of the test bed."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

# ===================================================================================
# GPU simulator and private Docker engine (logic: tests/gpusim, tests/engine.py,
# tests/images.py). Fixtures:
#   engine            session   PrivateEngine, started once, stopped at the end
#   gpusim            function  Simulator on the engine's state (a100x4 installed);
#                               removes every container of the private engine afterwards
#   gpusim_local      function  Simulator on a tmp state file, no engine (unit tests)
#   base_image        session   "gpuspawner-test/base:bookworm"
#   singleuser_image  session   "gpuspawner-test/singleuser:<key>"
# The same on a second engine whose default runtime is nvidia (a DGX-style host), beside
# the first one (its own socket, data root and bridge under the same root), started only
# by the tests that ask for it:
#   nvidia_default_engine, nvidia_default_gpusim, nvidia_default_base_image,
#   nvidia_default_singleuser_image
# gpusim and gpusim_local also set GPUSIM_STATE and put the fake nvidia-smi first on PATH
# for the test's duration, so the product reads the simulated host.
# ===================================================================================
from .engine import EngineError, EnginePaths, PrivateEngine
from .gpusim import BIN_DIR, Simulator
from .images import ensure_base_image, ensure_singleuser_image


def _point_at(monkeypatch: pytest.MonkeyPatch, sim: Simulator) -> None:
    monkeypatch.setenv("GPUSIM_STATE", str(sim.state_path))
    if sim.hook_log:
        monkeypatch.setenv("GPUSIM_HOOK_LOG", str(sim.hook_log))
    monkeypatch.setenv("PATH", f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}")


def _running(private: PrivateEngine) -> Iterator[PrivateEngine]:
    """Start a private dockerd for the session. Where it cannot run the Docker tests fail,
    never skip: a green run without them would prove nothing (scripts/test.sh installs dockerd
    and runs as root)."""
    if os.geteuid() != 0:
        pytest.fail("the private Docker engine needs root: run bash scripts/test.sh as root")
    if not Path(private.dockerd).exists():
        pytest.fail("dockerd is not installed: bash scripts/setup.sh installs it")
    try:
        private.start()
    except EngineError as exc:
        pytest.fail(f"private Docker engine: {exc}")
    try:
        private.remove_containers()  # left by an earlier session that died
        yield private
    finally:
        private.stop()


def _simulating(engine: PrivateEngine, monkeypatch: pytest.MonkeyPatch) -> Iterator[Simulator]:
    sim = Simulator(engine.state_path, engine.hook_log)
    sim.install("a100x4")
    sim.clear_hook_log()
    _point_at(monkeypatch, sim)
    try:
        yield sim
    finally:
        engine.remove_containers()


@pytest.fixture(scope="session")
def engine() -> Iterator[PrivateEngine]:
    yield from _running(PrivateEngine())


@pytest.fixture
def gpusim(engine: PrivateEngine, monkeypatch: pytest.MonkeyPatch) -> Iterator[Simulator]:
    yield from _simulating(engine, monkeypatch)


@pytest.fixture
def gpusim_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Simulator:
    sim = Simulator(tmp_path / "gpusim-state.json", tmp_path / "hook.log")
    sim.install("a100x4")
    _point_at(monkeypatch, sim)
    return sim


@pytest.fixture(scope="session")
def base_image(engine: PrivateEngine) -> str:
    return ensure_base_image(engine.client)


@pytest.fixture(scope="session")
def singleuser_image(engine: PrivateEngine, base_image: str) -> str:
    return ensure_singleuser_image(engine.client)


@pytest.fixture(scope="session")
def nvidia_default_engine() -> Iterator[PrivateEngine]:
    """A DGX-style engine: ``"default-runtime": "nvidia"``, so the (fake) NVIDIA runtime
    hands GPUs to any container whose environment names them, DeviceRequest or not."""
    paths = EnginePaths.from_env().beside("nvidia-default")
    yield from _running(PrivateEngine(paths, default_runtime="nvidia"))


@pytest.fixture
def nvidia_default_gpusim(
    nvidia_default_engine: PrivateEngine, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Simulator]:
    yield from _simulating(nvidia_default_engine, monkeypatch)


# The images are made in the second engine from the same offline cache as in the first (a
# rootfs import, an offline pip install): that needs no first engine running, and the second
# engine's data root keeps them, so only its very first session pays for the build.
@pytest.fixture(scope="session")
def nvidia_default_base_image(nvidia_default_engine: PrivateEngine) -> str:
    return ensure_base_image(nvidia_default_engine.client)


@pytest.fixture(scope="session")
def nvidia_default_singleuser_image(
    nvidia_default_engine: PrivateEngine, nvidia_default_base_image: str
) -> str:
    return ensure_singleuser_image(nvidia_default_engine.client)


# ============================================================ end of simulator / engine block


# ===================================================================================
# Two workers (pytest-xdist, scripts/test.sh): each worker runs its own private engine
# (tests/engine.py, ``EnginePaths.from_env``) and publishes from its own port range
# (tests/hub.py, ``PORT_RANGE``). A test file runs whole on one worker, so its module
# fixtures are made once; the files that need the nvidia-default engine share a worker, so
# only one such engine is built per run.
# ===================================================================================
def pytest_configure(config: pytest.Config) -> None:
    """What the test bed starts (hubs, their services, the demo) is stopped as in life, with
    SIGINT first: where this run came in with SIGINT ignored (started in the background of a
    script), its children would inherit that and outlive every stop."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


#: Files that run on the same worker as each other: one scope for the scheduler.
SHARED_WORKER = {"test_default_runtime.py": "nvidia-default-engine"}


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    from xdist.scheduler import LoadFileScheduling

    class ByFile(LoadFileScheduling):
        """``--dist loadfile``, with the files of ``SHARED_WORKER`` as one."""

        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return SHARED_WORKER.get(path.rsplit("/", 1)[-1], path)

    return ByFile(config, log)
