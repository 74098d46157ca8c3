"""Smoke tests of the whole path: REST API -> JupyterHub -> GPUSpawner -> Docker -> proxy.

A real hub spawns real containers on the private engine with simulated MIG devices; each test
checks what a lab relies on: the device lands in the container's labels and DeviceRequest,
the server answers through the proxy, a bad profile is refused with a useful message, a held
slice comes back to its owner in the same container, and servers survive a hub restart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ..hub import HubError, RunningHub
from .conftest import MakeHub

pytestmark = pytest.mark.docker


def _device_ids(container: Any) -> list[str]:
    requests = container.attrs["HostConfig"].get("DeviceRequests") or []
    assert len(requests) == 1, requests
    return list(requests[0]["DeviceIDs"])


def test_mig_spawn_through_the_api_and_proxy(hub: RunningHub) -> None:
    """A 1g.10gb slice is labelled, requested by UUID, and the server answers via the proxy."""
    response = hub.spawn("ann", "mig-1g")
    assert response.status_code in (201, 202), response.text

    container = hub.container("ann")
    assert container is not None
    labels = container.labels
    assert labels["ds01.user"] == "ann"
    assert labels["ds01.hub"] == "e2e"
    assert labels["ds01.profile"] == "mig-1g"
    uuid = labels["ds01.gpu.uuid"]
    assert uuid.startswith("MIG-"), labels
    assert _device_ids(container) == [uuid]
    assert container.status == "running"

    status = hub.get("/user/ann/api/status")
    assert status.status_code == 200, status.text


def test_unknown_profile_is_refused_with_the_choices(hub: RunningHub) -> None:
    """An unknown slug is a 400 at once that lists what the user may choose instead."""
    response = hub.spawn("bob", "nope")
    assert response.status_code == 400, response.text
    text = response.text
    assert "nope" in text
    for slug in ("cpu", "mig-1g", "mig-3g"):
        assert slug in text, text
    # The default policy allows no whole GPUs, so that profile is not offered.
    assert "gpu-1" not in text
    assert hub.container("bob") is None


def test_restart_inside_the_hold_keeps_the_slice_and_container(
    make_hub: MakeHub, tmp_path: Path
) -> None:
    """Stopped and started again within gpu_hold_after_stop: same UUID, same container."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("defaults:\n  gpu_hold_after_stop: 1h\n  allow_full_gpu: true\n")
    hub = make_hub(config_extra=f"c.GPUSpawner.policy_file = {str(policy)!r}\n")

    hub.spawn("cat", "mig-1g")
    first = hub.container("cat")
    uuid = first.labels["ds01.gpu.uuid"]

    hub.stop_server("cat")
    first.reload()
    assert first.status == "exited"

    hub.spawn("cat", "mig-1g")
    second = hub.container("cat")
    assert second.id == first.id
    assert second.labels["ds01.gpu.uuid"] == uuid
    assert _device_ids(second) == [uuid]
    assert second.status == "running"


def test_running_server_survives_a_hub_restart(hub: RunningHub) -> None:
    """Docker is the record: after the hub restarts, the server is still there and routed."""
    hub.spawn("dan", "mig-1g")
    before = hub.container("dan")

    hub.restart()

    model = hub.server_model("dan")
    assert model is not None and model["ready"], model
    after = hub.container("dan")
    assert after.id == before.id and after.status == "running"
    assert hub.get("/user/dan/api/status").status_code == 200


def test_progress_is_reported_and_late_failures_raise(make_hub: MakeHub) -> None:
    """With the API answering 202 at once, the spawn page's steps and refusals are streamed."""
    hub = make_hub(config_extra='c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 0}\n')

    response = hub.spawn("eve", "mig-1g")
    assert response.status_code == 202, response.text
    steps = hub.last_progress
    assert any(m.startswith("Device chosen") for m in steps), steps
    assert steps[-1].startswith("Server ready"), steps

    with pytest.raises(HubError, match="Profiles you may choose: cpu, mig-1g, mig-3g"):
        hub.spawn("fay", "nope")
