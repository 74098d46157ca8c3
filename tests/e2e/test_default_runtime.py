"""A CPU server on a host whose Docker default runtime is ``nvidia`` gets no GPU.

On such (DGX-style) hosts the NVIDIA runtime hands GPUs to any container whose environment
names them, DeviceRequest or not, and images built on CUDA bases set
``NVIDIA_VISIBLE_DEVICES=all``. A "CPU only" server from such an image would quietly get every
GPU, shared with whoever gpuspawner gave them to, and nothing in Docker's records would show
it. The guard is gpuspawner's: a CPU server's container says ``NVIDIA_VISIBLE_DEVICES=void``.
This test looks at what any other program would see: the container Docker stores, and what
the NVIDIA hook handed over.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ..engine import PrivateEngine
from ..gpusim import Simulator
from ..hub import RunningHub
from ..images import ensure_env_image

pytestmark = pytest.mark.docker


def test_cpu_server_from_an_all_gpus_image_gets_none(
    nvidia_default_engine: PrivateEngine, nvidia_default_gpusim: Simulator,
    nvidia_default_singleuser_image: str, tmp_path: Path,
) -> None:
    engine = nvidia_default_engine
    cuda_like = ensure_env_image(engine.client, nvidia_default_singleuser_image,
                                 {"NVIDIA_VISIBLE_DEVICES": "all"})
    # Stopped before nvidia_default_gpusim removes the containers (a `with`, inside the test).
    with RunningHub(engine, cuda_like, tmp_path / "hub") as hub:
        response = hub.spawn("ann", "cpu")
        assert response.status_code in (201, 202), response.text
        container = hub.container("ann")
        assert container is not None
        attrs = engine.client.api.inspect_container(container.id)
    env_values = [entry.partition("=")[2] for entry in attrs["Config"]["Env"] or []
                  if entry.startswith("NVIDIA_VISIBLE_DEVICES=")]
    handed = [call["devices"] for call in nvidia_default_gpusim.hook_calls()
              if call["id"] == container.id]
    seen = {
        "DeviceRequests": attrs["HostConfig"]["DeviceRequests"] or [],
        "NVIDIA_VISIBLE_DEVICES": env_values,
        "devices handed": [device for devices in handed for device in devices],
    }
    assert seen == {"DeviceRequests": [], "NVIDIA_VISIBLE_DEVICES": ["void"],
                    "devices handed": []}
