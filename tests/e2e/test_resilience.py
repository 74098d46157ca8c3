"""When things are not as they should be: a full profile with a queue, no NVIDIA driver, no
Docker engine, and a second hub racing for the same slice."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from pathlib import Path

import pytest

from ..hub import HubError
from .conftest import MakeHub
from .test_spawn import SCARCE, STREAM, uuid_of

pytestmark = pytest.mark.docker


def test_waiting_in_the_queue_for_a_device(make_hub: MakeHub, gpusim):
    gpusim.install(SCARCE)
    hub = make_hub(config_extra="c.GPUSpawner.gpu_wait_timeout = 90\n" + STREAM)
    hub.spawn("ann", "mig-3g")
    slot = uuid_of(hub.container("ann"))
    seen: list[str] = []

    def bo_presses_start() -> None:
        hub.spawn("bo", "mig-3g", timeout=120)
        seen.extend(hub.last_progress)

    waiting = threading.Thread(target=bo_presses_start)
    waiting.start()
    time.sleep(6)
    assert hub.container("bo") is None  # still queued
    hub.stop_server("ann")  # no hold by default: the slice is free at once
    waiting.join(timeout=120)
    assert not waiting.is_alive()
    assert any("number 1 in the queue" in m for m in seen), seen
    assert uuid_of(hub.container("bo")) == slot


def test_without_nvidia_cpu_servers_still_spawn(make_hub: MakeHub, tmp_path: Path):
    hub = make_hub(env_extra={"GPUSIM_STATE": str(tmp_path / "no-driver.json")})
    assert hub.spawn("ann", "cpu").status_code in (201, 202)
    response = hub.spawn("bo", "mig-1g")
    assert response.status_code == 503, response.text
    assert "no NVIDIA GPUs available" in response.text
    assert "NVML could not be initialised" in response.text
    assert hub.get("/user/ann/api/status").status_code == 200


def test_hub_starts_without_docker_and_says_so(make_hub: MakeHub, tmp_path: Path):
    hub = make_hub(env_extra={"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"})
    response = hub.spawn("ann", "cpu")
    assert response.status_code == 503, response.text
    assert "The Docker engine is not answering" in response.text
    assert "the Docker engine does not answer" in hub.log_text()
    assert hub.api("GET", "/").status_code == 200  # the hub itself is fine


def test_two_hubs_racing_for_one_slice(make_hub: MakeHub, gpusim, engine):
    gpusim.install(SCARCE)
    first = make_hub(config_extra='c.GPUSpawner.hub_id = "hub-a"\n')
    second = make_hub(config_extra='c.GPUSpawner.hub_id = "hub-b"\n')
    for hub, user in ((first, "ann"), (second, "bo")):
        hub.ensure_user(user)

    def press(hub, user):
        try:
            return hub.spawn(user, "mig-3g").status_code
        except HubError as exc:
            return str(exc)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(press, (first, second), ("ann", "bo")))
    winners = [r for r in results if r in (201, 202)]
    assert len(winners) == 1, results
    running = engine.client.containers.list(filters={"label": "ds01.gpu.profile=3g.40gb"})
    assert len(running) == 1, [c.name for c in running]


def test_a_container_that_cannot_start_does_not_keep_its_slice(
    make_hub: MakeHub, gpusim, base_image, engine
):
    broken = {"display_name": "Broken image", "slug": "broken",
              "gpu": {"mig_profile": "3g.40gb"}, "overrides": {"image": base_image}}
    gpusim.install(SCARCE)
    hub = make_hub(config_extra=(
        f"c.GPUSpawner.profile_list = c.GPUSpawner.profile_list + [{broken!r}]\n"
    ))
    failed = hub.spawn("ann", "broken")  # the base image has no jupyterhub-singleuser
    assert failed.status_code >= 500, failed.text
    assert engine.client.containers.list(all=True, filters={"label": "ds01.user=ann"}) == []
    removed = [e for e in hub.events() if e["event"] == "container.remove"]
    assert removed and removed[-1]["reason"] == "start-failed"
    assert hub.spawn("bo", "mig-3g").status_code in (201, 202)  # the slice is free at once


def test_another_hubs_container_is_never_removed(make_hub: MakeHub, engine, base_image):
    from ..docker.test_ledger import make

    theirs = make(engine, base_image, "jupyter-ann", start=False, labelset={
        "ds01.managed": "true", "ds01.hub": "other-hub", "ds01.user": "ann",
        "ds01.server": "", "ds01.profile": "mig-1g",
    })
    hub = make_hub()
    response = hub.spawn("ann", "mig-1g")
    assert response.status_code == 409, response.text
    assert "belongs to hub 'other-hub'" in response.text and "DockerSpawner.prefix" in response.text
    assert engine.client.containers.get(theirs).id == theirs
