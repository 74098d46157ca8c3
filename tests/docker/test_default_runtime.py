"""What a host whose Docker default runtime is ``nvidia`` (DGX-style) does to containers.

There the NVIDIA runtime wraps every container, DeviceRequest or not, and hands over whatever
the container's environment names in ``NVIDIA_VISIBLE_DEVICES``; CUDA base images set ``all``.
So a container that asked Docker for nothing still gets every GPU, and nothing in its
HostConfig says so. These tests pin that down on the simulator (the fake runtime and hook in
tests/gpusim/bin), because it is the hole that gpuspawner's ``NVIDIA_VISIBLE_DEVICES=void``
for CPU servers closes.
"""

from __future__ import annotations

from typing import Any

import docker
import pytest

from ..engine import PrivateEngine
from ..gpusim import BIN_DIR, Simulator
from ..images import ensure_env_image

pytestmark = pytest.mark.docker

LABELS = {"gpuspawner-test": "1"}


def _run(
    engine: PrivateEngine, image: str, *, environment: dict[str, str] | None = None,
    device_ids: list[str] | None = None, runtime: str | None = None,
) -> str:
    """Create and start a container that exits at once; its id, once it exited with 0."""
    api = engine.client.api
    requests = [docker.types.DeviceRequest(driver="nvidia", device_ids=device_ids,
                                           capabilities=[["gpu"]])] if device_ids else None
    created = api.create_container(
        image, command=["true"], labels=LABELS, environment=environment,
        host_config=api.create_host_config(device_requests=requests, runtime=runtime),
    )
    api.start(created["Id"])
    assert api.wait(created["Id"], timeout=30)["StatusCode"] == 0
    return created["Id"]


def _handed(sim: Simulator, cid: str) -> list[list[str]]:
    """The devices the hook handed to the container ``cid``, one list per hook run."""
    calls = [call for call in sim.hook_calls() if call["id"] == cid]
    assert all(call["ok"] for call in calls), calls
    return [call["devices"] for call in calls]


def _host_config(engine: PrivateEngine, cid: str) -> dict[str, Any]:
    return engine.client.api.inspect_container(cid)["HostConfig"]


def test_the_engine_runs_nvidia_by_default(nvidia_default_engine: PrivateEngine) -> None:
    info = nvidia_default_engine.client.api.info()
    assert info["DefaultRuntime"] == "nvidia"
    assert info["Runtimes"]["nvidia"] == {"path": str(BIN_DIR / "nvidia-container-runtime")}


@pytest.mark.parametrize("source", ["container", "image"])
def test_nvidia_visible_devices_all_gets_every_gpu_without_asking(
    nvidia_default_engine: PrivateEngine, nvidia_default_gpusim: Simulator,
    nvidia_default_base_image: str, source: str,
) -> None:
    """From the container's own env or its image's (as a CUDA base sets it): every GPU."""
    engine = nvidia_default_engine
    wanted = {"NVIDIA_VISIBLE_DEVICES": "all"}
    if source == "image":
        image = ensure_env_image(engine.client, nvidia_default_base_image, wanted)
        cid = _run(engine, image)
    else:
        cid = _run(engine, nvidia_default_base_image, environment=wanted)
    assert _handed(nvidia_default_gpusim, cid) == [["all"]]
    host = _host_config(engine, cid)
    # What another program sees: no device request, and Docker records the default runtime
    # by name in the container.
    assert not host["DeviceRequests"]
    assert host["Runtime"] == "nvidia"


@pytest.mark.parametrize("environment", [{"NVIDIA_VISIBLE_DEVICES": "void"}, None],
                         ids=["void", "unset"])
def test_void_or_unset_gets_nothing(
    nvidia_default_engine: PrivateEngine, nvidia_default_gpusim: Simulator,
    nvidia_default_base_image: str, environment: dict[str, str] | None,
) -> None:
    cid = _run(nvidia_default_engine, nvidia_default_base_image, environment=environment)
    assert _handed(nvidia_default_gpusim, cid) == []


@pytest.mark.parametrize("environment", [None, {"NVIDIA_VISIBLE_DEVICES": "all"}],
                         ids=["plain", "env-says-all"])
def test_a_device_request_gets_exactly_its_device(
    nvidia_default_engine: PrivateEngine, nvidia_default_gpusim: Simulator,
    nvidia_default_base_image: str, environment: dict[str, str] | None,
) -> None:
    """One hook run (Docker's; the runtime adds none beside it) with just the requested MIG
    device, also when the environment said ``all``: Docker's variable comes last and wins."""
    uuid = nvidia_default_gpusim.mig_uuids()[0]
    cid = _run(nvidia_default_engine, nvidia_default_base_image, environment=environment,
               device_ids=[uuid])
    assert _handed(nvidia_default_gpusim, cid) == [[uuid]]
    assert _host_config(nvidia_default_engine, cid)["DeviceRequests"][0]["DeviceIDs"] == [uuid]


def test_runc_asked_for_by_name_ignores_the_environment(
    nvidia_default_engine: PrivateEngine, nvidia_default_gpusim: Simulator,
    nvidia_default_base_image: str,
) -> None:
    cid = _run(nvidia_default_engine, nvidia_default_base_image, runtime="runc",
               environment={"NVIDIA_VISIBLE_DEVICES": "all"})
    assert _handed(nvidia_default_gpusim, cid) == []
    assert _host_config(nvidia_default_engine, cid)["Runtime"] == "runc"
