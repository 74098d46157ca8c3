"""The simulated NVIDIA hook enforces an image's ``NVIDIA_REQUIRE_CUDA`` as the real one does.

On the private engine with a real DeviceRequest: Docker runs the fake hook at the start, the
hook reads the container's environment (the image's ``ENV`` plus the container's) and the
simulated host's driver, and fails the start with ``nvidia-container-cli``'s own message when
the driver is too old. That is the failure gpuspawner must foresee (gpuspawner/cuda.py), so
the simulator has to produce it exactly; what the product decides is tested elsewhere.
"""

from __future__ import annotations

import copy

import docker
import pytest

from ..engine import PrivateEngine
from ..gpusim import Simulator, load_topology
from ..images import ensure_env_image

pytestmark = pytest.mark.docker

LABELS = {"gpuspawner-test": "cuda"}
#: nvidia/cuda:12.4.1-base-ubuntu22.04's requirement: CUDA 12.4, or the 470/525/535 branches.
_BRANDS = ("tesla", "unknown", "nvidia", "nvidiartx", "geforce", "geforcertx", "quadro",
           "quadrortx", "titan", "titanrtx")
CUDA_12_4_1 = "cuda>=12.4 " + " ".join(
    f"brand={b},driver>={d},driver<{d + 1}" for d in (470, 525, 535) for b in _BRANDS)
MESSAGE_12_9 = ("nvidia-container-cli: requirement error: unsatisfied condition: cuda>=12.9, "
                "please update your driver to a newer version, or use an earlier cuda container")


def _create(engine: PrivateEngine, image: str, *, device_ids: list[str] | None = None,
            environment: dict[str, str] | None = None) -> str:
    api = engine.client.api
    requests = [docker.types.DeviceRequest(driver="nvidia", device_ids=device_ids,
                                           capabilities=[["gpu"]])] if device_ids else None
    created = api.create_container(
        image, command=["sleep", "300"], labels=LABELS, environment=environment,
        host_config=api.create_host_config(device_requests=requests),
    )
    return created["Id"]


def _slice(gpusim: Simulator) -> str:
    return gpusim.state()["gpus"][0]["mig_devices"][0]["uuid"]


def _running(engine: PrivateEngine, cid: str) -> bool:
    return bool(engine.client.api.inspect_container(cid)["State"]["Running"])


def _host(gpusim: Simulator, driver: str, cuda_version: str) -> None:
    topology = copy.deepcopy(load_topology("a100x4"))
    topology.update(driver_version=driver, cuda_version=cuda_version)
    gpusim.install(topology)


def test_an_image_needing_a_newer_cuda_fails_to_start_with_the_real_message(
    engine: PrivateEngine, gpusim: Simulator, base_image: str
) -> None:
    image = ensure_env_image(engine.client, base_image, {"NVIDIA_REQUIRE_CUDA": "cuda>=12.9"})
    cid = _create(engine, image, device_ids=[_slice(gpusim)])
    with pytest.raises(docker.errors.APIError) as caught:
        engine.client.api.start(cid)
    text = str(caught.value)
    assert "requirement error: unsatisfied condition: cuda>=12.9" in text
    assert MESSAGE_12_9 in text and "exit status 1" in text
    assert not _running(engine, cid)
    [call] = [c for c in gpusim.hook_calls() if c["id"] == cid]
    assert call["ok"] is False and call["error"] == MESSAGE_12_9
    assert call["requirements"] == ["cuda>=12.9"]


def test_images_that_fit_or_opt_out_start(
    engine: PrivateEngine, gpusim: Simulator, base_image: str
) -> None:
    client = engine.client
    fits = ensure_env_image(client, base_image, {"NVIDIA_REQUIRE_CUDA": CUDA_12_4_1})
    needs_12_9 = ensure_env_image(client, base_image, {"NVIDIA_REQUIRE_CUDA": "cuda>=12.9"})
    opted_out = ensure_env_image(client, base_image, {"NVIDIA_REQUIRE_CUDA": "cuda>=12.9",
                                                      "NVIDIA_DISABLE_REQUIRE": "1"})
    device = [gpusim.state()["gpus"][3]["uuid"]]
    started = [
        _create(engine, fits, device_ids=device),
        _create(engine, opted_out, device_ids=device),
        # The container's environment counts too (Docker puts it over the image's).
        _create(engine, needs_12_9, device_ids=device,
                environment={"NVIDIA_DISABLE_REQUIRE": "true"}),
        # No device request: no hook, nothing checked, as on a real host.
        _create(engine, needs_12_9),
    ]
    for cid in started:
        client.api.start(cid)
        assert _running(engine, cid)
    calls = {c["id"]: c for c in gpusim.hook_calls()}
    assert calls[started[0]]["ok"] and calls[started[0]]["requirements"] == [CUDA_12_4_1]
    assert calls[started[1]]["requirements"] == []  # disabled: nothing passed on
    assert started[3] not in calls


def test_the_forward_compatibility_branches_follow_the_simulated_driver(
    engine: PrivateEngine, gpusim: Simulator, base_image: str
) -> None:
    """CUDA 12.2 on a 535 driver runs the 12.4.1 image (brand=nvidia on its 535 branch, as
    an A100 reports itself); CUDA 12.1 on 530 does not."""
    image = ensure_env_image(engine.client, base_image, {"NVIDIA_REQUIRE_CUDA": CUDA_12_4_1})
    _host(gpusim, "535.183.01", "12.2")
    branch = _create(engine, image, device_ids=[_slice(gpusim)])
    engine.client.api.start(branch)
    assert _running(engine, branch)
    _host(gpusim, "530.30.02", "12.1")
    refused = _create(engine, image, device_ids=[_slice(gpusim)])
    with pytest.raises(docker.errors.APIError, match="unsatisfied condition: cuda>=12.4"):
        engine.client.api.start(refused)
