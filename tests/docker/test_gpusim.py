"""The simulated NVIDIA host inside a real Docker engine behaves like a real GPU server.

These are the facts the spawner's design stands on, checked against the engine itself:
Docker accepts NVIDIA DeviceRequests naming MIG UUIDs, stores them exactly, hands them to the
container as NVIDIA_VISIBLE_DEVICES through the runtime hook, and refuses to start a container
whose MIG device was re-created at a reboot. And the test images work offline.
"""

from __future__ import annotations

import time
from typing import Any

import docker
import pytest

from ..engine import PrivateEngine
from ..gpusim import Simulator
from ..images import host_jupyterhub_version

pytestmark = pytest.mark.docker

LABELS = {"gpuspawner-test": "1"}


def _create(
    engine: PrivateEngine, image: str, *, device_ids: list[str] | None = None, count: int = 0,
    command: list[str] | None = None,
) -> str:
    request = docker.types.DeviceRequest(
        driver="nvidia", device_ids=device_ids, count=count, capabilities=[["gpu"]]
    )
    api = engine.client.api
    created = api.create_container(
        image, command=command or ["/bin/sh", "-c", "env; exec sleep 300"], labels=LABELS,
        host_config=api.create_host_config(device_requests=[request]),
    )
    return created["Id"]


def _pid1_env(engine: PrivateEngine, cid: str, timeout: float = 20.0) -> dict[str, str]:
    """The container's main process environment, as printed by its ``env`` command.

    Not ``docker exec env`` nor ``Config.Env``: Docker adds NVIDIA_VISIBLE_DEVICES to the OCI
    spec only, so neither of those shows it.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = engine.client.api.logs(cid).decode()
        if "PATH=" in text:
            return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        time.sleep(0.1)
    raise AssertionError(f"container {cid[:12]} printed no environment")


def _first_mig(sim: Simulator, gpu: int = 0) -> dict[str, Any]:
    return sim.state()["gpus"][gpu]["mig_devices"][0]


def test_mig_uuid_request_starts_and_runs_the_hook(
    engine: PrivateEngine, gpusim: Simulator, base_image: str
) -> None:
    uuid = _first_mig(gpusim, 1)["uuid"]
    cid = _create(engine, base_image, device_ids=[uuid])
    engine.client.api.start(cid)
    env = _pid1_env(engine, cid)
    assert env["NVIDIA_VISIBLE_DEVICES"] == uuid
    calls = gpusim.hook_calls()
    assert [(c["devices"], c["ok"]) for c in calls] == [([uuid], True)]
    assert calls[0]["id"] == cid
    attrs = engine.client.api.inspect_container(cid)
    assert attrs["State"]["Running"]
    assert attrs["HostConfig"]["DeviceRequests"] == [
        {"Driver": "nvidia", "Count": 0, "DeviceIDs": [uuid], "Capabilities": [["gpu"]],
         "Options": {}}
    ]
    assert "NVIDIA_VISIBLE_DEVICES" not in " ".join(attrs["Config"]["Env"] or [])


def test_stale_uuid_after_reboot_fails_to_start(
    engine: PrivateEngine, gpusim: Simulator, base_image: str
) -> None:
    old = _first_mig(gpusim)["uuid"]
    before = _create(engine, base_image, device_ids=[old])
    engine.client.api.start(before)
    engine.client.api.stop(before, timeout=0)
    gpusim.reboot()
    assert old not in gpusim.mig_uuids()
    # A new container with the old UUID is created (Docker does not check devices then) ...
    after = _create(engine, base_image, device_ids=[old])
    with pytest.raises(docker.errors.APIError, match="unknown device") as caught:
        engine.client.api.start(after)
    assert f"device error: {old}: unknown device" in str(caught.value)
    # ... and the stopped one from before the reboot, reused as it is, fails the same way.
    with pytest.raises(docker.errors.APIError, match="unknown device"):
        engine.client.api.start(before)
    assert [c["ok"] for c in gpusim.hook_calls()] == [True, False, False]
    fresh = _create(engine, base_image, device_ids=[_first_mig(gpusim)["uuid"]])
    engine.client.api.start(fresh)


def test_count_all_and_slot_forms(
    engine: PrivateEngine, gpusim: Simulator, base_image: str
) -> None:
    everything = _create(engine, base_image, count=-1)
    engine.client.api.start(everything)
    assert _pid1_env(engine, everything)["NVIDIA_VISIBLE_DEVICES"] == "all"
    request = engine.client.api.inspect_container(everything)["HostConfig"]["DeviceRequests"][0]
    assert request["Count"] == -1 and not request["DeviceIDs"]
    slot = _create(engine, base_image, device_ids=["1:2", "3"])
    engine.client.api.start(slot)
    assert _pid1_env(engine, slot)["NVIDIA_VISIBLE_DEVICES"] == "1:2,3"
    assert [c["ok"] for c in gpusim.hook_calls()] == [True, True]


def test_no_device_request_no_hook(engine: PrivateEngine, gpusim: Simulator, base_image: str
                                   ) -> None:
    created = engine.client.api.create_container(base_image, command=["true"], labels=LABELS)
    engine.client.api.start(created["Id"])
    assert engine.client.api.wait(created["Id"], timeout=30)["StatusCode"] == 0
    assert gpusim.hook_calls() == []


def test_gpusim_fixture_cleans_up(engine: PrivateEngine, gpusim: Simulator) -> None:
    # Runs after the tests above: their containers are gone; the engine is private.
    assert engine.client.api.containers(all=True) == []
    assert gpusim.state()["gpus"][0]["mig_devices"][0]["uuid"] == (
        gpusim.topology["gpus"][0]["mig_devices"][0]["uuid"]
    )


def test_singleuser_image(engine: PrivateEngine, gpusim: Simulator, singleuser_image: str
                          ) -> None:
    out = engine.client.containers.run(
        singleuser_image, ["sh", "-c", "id -u; jupyterhub-singleuser --version"], remove=True,
        labels=LABELS,
    ).decode().split()
    assert out[0] == "1000"
    assert out[-1] == host_jupyterhub_version()
    attrs = engine.client.api.inspect_image(singleuser_image)["Config"]
    assert attrs["Cmd"] == ["jupyterhub-singleuser"] and attrs["User"] == "jovyan"


def test_published_port_on_loopback(
    engine: PrivateEngine, gpusim: Simulator, base_image: str
) -> None:
    import urllib.request

    api = engine.client.api
    created = api.create_container(
        base_image, command=["python3", "-m", "http.server", "8000", "-d", "/etc"],
        labels=LABELS, ports=[8000],
        host_config=api.create_host_config(port_bindings={8000: ("127.0.0.1", None)}),
    )
    api.start(created["Id"])
    port = int(api.port(created["Id"], 8000)[0]["HostPort"])
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/hostname", timeout=2) as reply:
                assert reply.status == 200
                break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_containers_reach_the_host_through_the_gateway(
    engine: PrivateEngine, gpusim: Simulator, base_image: str
) -> None:
    import socket
    import threading

    server = socket.socket()
    server.bind((engine.gateway, 0))
    server.listen(1)
    port = server.getsockname()[1]
    threading.Thread(target=lambda: server.accept()[0].sendall(b"hello\n"), daemon=True).start()
    try:
        out = engine.client.containers.run(
            base_image,
            ["python3", "-c", f"import socket; s=socket.create_connection(('{engine.gateway}',"
             f" {port}), 5); print(s.recv(10).decode())"],
            remove=True, labels=LABELS,
        )
    finally:
        server.close()
    assert out.decode().strip() == "hello"
