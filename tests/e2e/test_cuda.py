"""An image the driver cannot run is refused before any container exists, with the reason.

A real hub on the simulated host (driver 550.90.07, CUDA 12.4). A profile whose image says
``NVIDIA_REQUIRE_CUDA=cuda>=12.9`` would be made into a container that the NVIDIA runtime
then refuses to start (the simulator's hook does what ``nvidia-container-cli`` does), and the
student would see a bare 500. gpuspawner reads the image's requirement first
(gpuspawner/cuda.py) and refuses at once with one sentence that names both sides; an image
that fits, and a CPU server (no GPU, so the runtime checks nothing), start as before.
"""

from __future__ import annotations

import time

import pytest

from ..hub import login
from ..images import ensure_env_image
from .conftest import MakeHub

pytestmark = pytest.mark.docker

#: A refusal is a decision on data already read, so the student hears it at once.
PROMPT_S = 1.0
_BRANDS = ("tesla", "unknown", "nvidia", "nvidiartx", "geforce", "geforcertx", "quadro",
           "quadrortx", "titan", "titanrtx")
#: nvidia/cuda:12.4.1-base-ubuntu22.04's requirement.
CUDA_12_4_1 = "cuda>=12.4 " + " ".join(
    f"brand={b},driver>={d},driver<{d + 1}" for d in (470, 525, 535) for b in _BRANDS)


def _profiles(new: str, fits: str) -> str:
    extra = [
        {"display_name": "CUDA 12.9 (1g.10gb)", "slug": "cuda-129",
         "gpu": {"mig_profile": "1g.10gb"}, "overrides": {"image": new}},
        {"display_name": "CUDA 12.4 (1g.10gb)", "slug": "cuda-124",
         "gpu": {"mig_profile": "1g.10gb"}, "overrides": {"image": fits}},
        {"display_name": "CUDA 12.9 on CPU", "slug": "cpu-129", "overrides": {"image": new}},
    ]
    return f"c.GPUSpawner.profile_list = c.GPUSpawner.profile_list + {extra!r}\n"


@pytest.fixture
def images(engine, singleuser_image: str) -> tuple[str, str]:
    new = ensure_env_image(engine.client, singleuser_image, {"NVIDIA_REQUIRE_CUDA": "cuda>=12.9"})
    fits = ensure_env_image(engine.client, singleuser_image, {"NVIDIA_REQUIRE_CUDA": CUDA_12_4_1})
    return new, fits


def test_an_image_needing_a_newer_cuda_is_refused_at_once_and_one_that_fits_spawns(
    make_hub: MakeHub, engine, gpusim, images: tuple[str, str]
):
    new, fits = images
    hub = make_hub(config_extra=_profiles(new, fits))
    hub.ensure_user("ann")
    started = time.monotonic()
    response = hub.spawn("ann", "cuda-129")
    took = time.monotonic() - started
    assert 400 <= response.status_code < 500, response.text
    assert (f"The image {new} needs CUDA 12.9 (cuda>=12.9); this host's driver 550.90.07 "
            "supports CUDA 12.4. Choose another image or ask an admin to update the driver."
            ) in response.text
    assert took < PROMPT_S, f"refusal took {took:.2f} s"
    # Refused before the create: no container, so no hook ran and no device was held.
    assert hub.container("ann") is None
    assert engine.client.containers.list(all=True, filters={"label": "ds01.user=ann"}) == []
    assert gpusim.hook_calls() == []
    refusals = [e for e in hub.events() if e["event"] == "gpu.refuse"]
    assert refusals and refusals[-1]["user"] == "ann" and refusals[-1]["code"] == "cuda"
    assert not [e for e in hub.events() if e["event"] == "container.create"]

    # The form says so before anyone presses Start: that profile cannot be chosen.
    page = login(hub, "cy").get(f"{hub.url}/hub/spawn", timeout=30).text
    row = page[page.index('value="cuda-129"'):page.index('value="cuda-124"')]
    assert "disabled" in row and "the image needs a newer driver" in row
    assert f"The image {new} needs CUDA 12.9" in row

    # The same student picks the profile whose image fits: it starts, and the runtime agrees.
    assert hub.spawn("ann", "cuda-124").status_code in (201, 202)
    assert hub.get("/user/ann/api/status").status_code == 200
    container = hub.container("ann")
    assert container is not None and container.attrs["Config"]["Image"] == fits
    [call] = [c for c in gpusim.hook_calls() if c["id"] == container.id]
    assert call["ok"] and call["requirements"] == [CUDA_12_4_1]


def test_a_cpu_server_is_not_checked(make_hub: MakeHub, engine, gpusim, images: tuple[str, str]):
    """No GPU, no NVIDIA runtime check: the same image starts as a CPU server."""
    new, fits = images
    hub = make_hub(config_extra=_profiles(new, fits))
    assert hub.spawn("bo", "cpu-129").status_code in (201, 202)
    assert hub.get("/user/bo/api/status").status_code == 200
    container = hub.container("bo")
    assert container is not None and container.attrs["Config"]["Image"] == new
    assert not container.attrs["HostConfig"]["DeviceRequests"]
