"""The simulated NVIDIA runtime puts an ``nvidia-smi`` into every GPU container, as the real
toolkit mounts the host's: ``nvidia-smi -L`` in a student's terminal lists their slice (and
its GPU) and nothing else; a CPU container has none."""

from __future__ import annotations

from typing import Any

import docker
import pytest

pytestmark = pytest.mark.docker


def _run(engine: Any, image: str, device_ids: list[str] | None, env: dict[str, str]) -> str:
    api = engine.client.api
    requests = [docker.types.DeviceRequest(driver="nvidia", device_ids=device_ids,
                                           capabilities=[["gpu"]])] if device_ids else None
    created = api.create_container(
        image, command=["sleep", "300"], environment=env, labels={"gpuspawner-test": "smi"},
        host_config=api.create_host_config(device_requests=requests))
    api.start(created["Id"])
    return created["Id"]


def _exec(engine: Any, cid: str, command: str) -> tuple[int, str]:
    api = engine.client.api
    run = api.exec_create(cid, ["sh", "-c", command])
    out = api.exec_start(run["Id"]).decode()
    return api.exec_inspect(run["Id"])["ExitCode"], out


def test_nvidia_smi_lists_exactly_the_containers_devices(
    engine: Any, gpusim: Any, base_image: str
) -> None:
    state = gpusim.state()
    gpu0 = state["gpus"][0]
    mig = gpu0["mig_devices"][3]
    mine = _run(engine, base_image, [mig["uuid"]], {"NVIDIA_VISIBLE_DEVICES": mig["uuid"]})
    code, out = _exec(engine, mine, "nvidia-smi -L")
    assert code == 0, out
    assert out.splitlines() == [
        f"GPU 0: {gpu0['name']} (UUID: {gpu0['uuid']})",
        f"  MIG {mig['profile']:<11} Device  0: (UUID: {mig['uuid']})",
    ]
    others = {m["uuid"] for g in state["gpus"] for m in g["mig_devices"]} - {mig["uuid"]}
    assert not any(uuid in out for uuid in others)

    whole = state["gpus"][3]
    two = _run(engine, base_image, [whole["uuid"]], {})  # docker run --gpus: variable unset
    code, out = _exec(engine, two, "nvidia-smi -L")
    assert (code, out.splitlines()) == (0, [f"GPU 0: {whole['name']} (UUID: {whole['uuid']})"])

    cpu = _run(engine, base_image, None, {"NVIDIA_VISIBLE_DEVICES": "void"})
    code, out = _exec(engine, cpu, "command -v nvidia-smi || echo none")
    assert out.strip() == "none"


def test_a_saved_copy_started_without_devices_has_no_devices(
    engine: Any, gpusim: Any, base_image: str
) -> None:
    """The fake is written into the container (a hook cannot mount), so a copy of it saved
    to an image and started as a CPU server must not claim the old devices."""
    mig = gpusim.state()["gpus"][0]["mig_devices"][0]
    cid = _run(engine, base_image, [mig["uuid"]], {"NVIDIA_VISIBLE_DEVICES": mig["uuid"]})
    api = engine.client.api
    image = api.commit(cid, repository="gpuspawner-test-smi", tag="saved")["Id"]
    try:
        cpu = _run(engine, image, None, {"NVIDIA_VISIBLE_DEVICES": "void"})
        code, out = _exec(engine, cpu, "nvidia-smi -L")
        assert (code, out.strip()) == (6, "No devices were found")
    finally:
        for c in api.containers(all=True, filters={"ancestor": image}):
            api.remove_container(c["Id"], force=True)
        api.remove_image(image, force=True)
