"""What a student feels when pressing Start, in a real hub on a simulated MIG host.

Distinct devices per user, ports, immediate refusals, holds, re-allocation after a hold or a
reboot, and 20 students pressing Start at the same moment.
"""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Any

import pytest

from ..hub import PORT_RANGE, HubError
from .conftest import MakeHub

pytestmark = pytest.mark.docker

#: One GPU: a 3g.40gb slice and a 1g.10gb slice; a second GPU with two 3g.40gb slices.
SCARCE = {
    "driver_version": "550.90.07",
    "cuda_version": "12.4",
    "gpus": [
        {
            "index": 0,
            "uuid": "GPU-aaaaaaaa-0000-4000-8000-000000000000",
            "name": "NVIDIA A100-SXM4-80GB",
            "memory_mib": 81920,
            "mig_mode": "enabled",
            "total_slices": 7,
            "mig_devices": [
                {
                    "index": 0,
                    "profile": "3g.40gb",
                    "gi": 2,
                    "ci": 0,
                    "uuid": "MIG-aaaaaaaa-0000-4000-8000-000000000001",
                },
                {
                    "index": 1,
                    "profile": "1g.10gb",
                    "gi": 9,
                    "ci": 0,
                    "uuid": "MIG-aaaaaaaa-0000-4000-8000-000000000002",
                },
            ],
        }
    ],
}


#: The API answers 202 at once, so the spawn page's steps can be read as they stream.
STREAM = 'c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 0}\n'


def policy(tmp_path: Path, text: str) -> str:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return f"c.GPUSpawner.policy_file = {str(path)!r}\n"


def uuid_of(container: Any) -> str:
    return container.labels["ds01.gpu.uuids"]


def given(gpusim: Any, container: Any) -> list[str]:
    """The devices the (simulated) NVIDIA hook handed the container at its last start."""
    calls = [c["devices"] for c in gpusim.hook_calls() if c["id"] == container.id]
    return calls[-1] if calls else []


def test_users_get_distinct_devices_ports_and_labels(make_hub: MakeHub, tmp_path: Path, gpusim):
    hub = make_hub(
        config_extra=policy(tmp_path, "defaults: {allow_full_gpu: true}\n")
        + 'c.GPUSpawner.ports = {"ssh": 22}\n'
        + STREAM
    )
    wanted = {"ann": "mig-1g", "bo": "mig-1g", "cy": "mig-3g", "dan": "gpu-1", "eve": "cpu"}
    for user, profile in wanted.items():
        response = hub.spawn(user, profile)
        assert response.status_code == 202, response.text
    containers = {user: hub.container(user) for user in wanted}
    gpu_users = [u for u in wanted if wanted[u] != "cpu"]
    uuids = [uuid_of(containers[u]) for u in gpu_users]
    assert len(set(uuids)) == len(uuids), uuids
    for user in gpu_users:
        c = containers[user]
        request = c.attrs["HostConfig"]["DeviceRequests"][0]
        assert request["DeviceIDs"] == [uuid_of(c)]
        assert request["Driver"] == "nvidia" and request["Capabilities"] == [["gpu"]]
        # What the (simulated) NVIDIA hook really gave the container at its start.
        given = [call["devices"] for call in gpusim.hook_calls() if call["id"] == c.id]
        assert given[-1:] == [[uuid_of(c)]], given
        assert c.labels["ds01.profile"] == wanted[user]
    assert containers["dan"].labels["ds01.gpu.uuid"].startswith("GPU-")
    assert containers["dan"].labels["ds01.gpu.equivalents"] == "1.0000"
    assert containers["eve"].attrs["HostConfig"].get("DeviceRequests") in (None, [])
    assert containers["eve"].labels["ds01.gpu.allocated"] == ""
    # Ports: distinct, from the range, published as labelled, and told to the server.
    ports = [int(containers[u].labels["ds01.port.ssh"]) for u in wanted]
    assert len(set(ports)) == len(ports) and all(PORT_RANGE[0] <= p <= PORT_RANGE[1] for p in ports)
    for user in wanted:
        c = containers[user]
        c.reload()
        # Published, as Docker shows it (not only asked for), on 127.0.0.1 only.
        binding = c.attrs["NetworkSettings"]["Ports"]["22/tcp"][0]
        assert binding == {"HostIp": "127.0.0.1", "HostPort": c.labels["ds01.port.ssh"]}
        assert f"GPUSPAWNER_PORT_SSH={c.labels['ds01.port.ssh']}" in c.attrs["Config"]["Env"]
        assert hub.get(f"/user/{user}/api/status").status_code == 200
    # JupyterHub's admin panel shows the chosen profile, also for a default spawn.
    assert hub.server_model("ann")["user_options"] == {"profile": "mig-1g"}
    hub.spawn("fay")
    assert hub.server_model("fay")["user_options"] == {"profile": "cpu"}
    # The spawn page told the last user what was chosen.
    hub.spawn("gus", "mig-3g")
    assert any(m.startswith("Host ports: ssh 4") for m in hub.last_progress), hub.last_progress
    assert any(m.startswith("Device chosen: MIG 3g.40gb") for m in hub.last_progress)


def test_full_profile_is_refused_at_once_with_the_reason(make_hub: MakeHub, gpusim):
    gpusim.install(SCARCE)
    hub = make_hub()
    hub.spawn("ann", "mig-3g")
    started = time.monotonic()
    response = hub.spawn("bo", "mig-3g")
    took = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert "All 1 3g.40gb slices are in use (1/1)" in response.text
    assert "1g.10gb has 1 free" in response.text
    assert took < 10, f"refusal took {took:.1f} s"
    assert hub.container("bo") is None
    refusals = [e for e in hub.events() if e["event"] == "gpu.refuse"]
    assert refusals and refusals[-1]["user"] == "bo" and refusals[-1]["code"] == "full"
    assert refusals[-1]["holders"][0]["user"] == "ann"


def test_after_the_hold_another_user_takes_it_and_the_owner_reallocates(
    make_hub: MakeHub, gpusim, tmp_path: Path, engine
):
    state = dict(SCARCE)
    gpu = dict(state["gpus"][0])
    gpu["mig_devices"] = [
        {
            "index": 0,
            "profile": "3g.40gb",
            "gi": 1,
            "ci": 0,
            "uuid": "MIG-bbbbbbbb-0000-4000-8000-000000000001",
        },
        {
            "index": 1,
            "profile": "3g.40gb",
            "gi": 2,
            "ci": 0,
            "uuid": "MIG-bbbbbbbb-0000-4000-8000-000000000002",
        },
    ]
    state["gpus"] = [gpu]
    gpusim.install(state)
    hub = make_hub(
        config_extra=policy(tmp_path, "defaults: {gpu_hold_after_stop: 3s}\n")
        + 'c.DockerSpawner.volumes = {"e2e-home-{username}": "/home/jovyan/work"}\n'
        + STREAM
    )
    hub.spawn("ann", "mig-3g")
    first = hub.container("ann")
    slot = uuid_of(first)
    wrote = engine.client.api.exec_start(
        engine.client.api.exec_create(
            first.id,
            ["sh", "-c", "echo precious > /home/jovyan/work/notes.txt && echo ok"],
            user="root",
        )
    )
    assert wrote.strip() == b"ok", wrote
    hub.stop_server("ann")
    time.sleep(4)  # the hold ends
    hub.spawn("bo", "mig-3g")
    assert given(gpusim, hub.container("bo")) == [slot]  # packing gives bo the freed slice

    hub.spawn("ann", "mig-3g")
    again = hub.container("ann")
    assert again.id != first.id
    assert given(gpusim, again) != [slot] and len(given(gpusim, again)) == 1
    assert again.labels["ds01.gpu.parent_uuids"] == first.labels["ds01.gpu.parent_uuids"]
    assert any("given to someone else" in m for m in hub.last_progress), hub.last_progress
    moved = [e for e in hub.events() if e["event"] == "gpu.reallocate"]
    assert moved and moved[-1]["old"] == [slot]
    # The old container is gone, the user's files are not.
    ids = {c.id for c in engine.client.containers.list(all=True)}
    assert first.id not in ids
    out = engine.client.api.exec_start(
        engine.client.api.exec_create(again.id, ["cat", "/home/jovyan/work/notes.txt"])
    )
    assert out.strip() == b"precious"


def test_reboot_makes_a_restart_reallocate_instead_of_failing(
    make_hub: MakeHub, gpusim, tmp_path: Path
):
    hub = make_hub(config_extra=policy(tmp_path, "defaults: {gpu_hold_after_stop: 1h}\n") + STREAM)
    hub.spawn("ann", "mig-1g")
    first = hub.container("ann")
    hub.stop_server("ann")
    gpusim.reboot(seed=3)  # MIG devices come back with new UUIDs
    hub.spawn("ann", "mig-1g")
    again = hub.container("ann")
    present = {m["uuid"] for g in gpusim.state()["gpus"] for m in g.get("mig_devices", [])}
    assert uuid_of(first) not in present
    assert given(gpusim, again)[0] in present and given(gpusim, again) == [uuid_of(again)]
    assert again.labels["ds01.gpu.profile"] == "1g.10gb"
    assert again.labels["ds01.gpu.parent_uuids"] == first.labels["ds01.gpu.parent_uuids"]
    assert again.labels["ds01.gpu.gi"] == first.labels["ds01.gpu.gi"]  # the same slice
    assert any("no longer exists" in m for m in hub.last_progress), hub.last_progress
    assert hub.get("/user/ann/api/status").status_code == 200


def test_on_gpu_lost_fail_refuses_and_keeps_the_container(
    make_hub: MakeHub, gpusim, tmp_path: Path
):
    hub = make_hub(
        config_extra=policy(tmp_path, "defaults: {gpu_hold_after_stop: 1h}\n")
        + 'c.GPUSpawner.on_gpu_lost = "fail"\n'
    )
    hub.spawn("ann", "mig-1g")
    first = hub.container("ann")
    hub.stop_server("ann")
    gpusim.reboot(seed=5)
    response = hub.spawn("ann", "mig-1g")
    assert response.status_code == 409, response.text
    assert "no longer exists" in response.text and "files are safe" in response.text
    still = hub.container("ann")
    assert still is not None and still.id == first.id


def test_remove_true_frees_the_slot_on_stop(make_hub: MakeHub, gpusim):
    gpusim.install(SCARCE)
    hub = make_hub(config_extra="c.DockerSpawner.remove = True\n")
    hub.spawn("ann", "mig-3g")
    hub.stop_server("ann")
    # The slot is free at once: bo gets it while Docker may still be removing ann's container
    # (remove=True is Docker's auto-removal, which finishes after the stop returns).
    assert hub.spawn("bo", "mig-3g").status_code in (201, 202)
    deadline = time.monotonic() + 10
    while hub.container("ann") is not None:
        assert time.monotonic() < deadline, "ann's container was never removed"
        time.sleep(0.2)


def test_twenty_users_at_the_same_moment(make_hub: MakeHub, engine, gpusim):
    """a100x4 has nine 1g.10gb slices: nine students get one each, eleven are told why not."""
    hub = make_hub()
    users = [f"s{n:02d}" for n in range(20)]
    for user in users:
        hub.ensure_user(user)

    def press_start(user: str) -> tuple[str, int, str]:
        try:
            response = hub.spawn(user, "mig-1g", timeout=240)
            return user, response.status_code, response.text
        except HubError as exc:
            return user, 599, str(exc)

    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(press_start, users))
    started = [u for u, code, _ in results if code in (201, 202)]
    refused = [(u, text) for u, code, text in results if code == 503]
    assert len(started) == 9, results
    assert len(refused) == 11, results
    assert all("1g.10gb slices are in use" in text for _, text in refused)
    # What the engine holds for the running containers, and what the hook handed over.
    holders = engine.client.containers.list()
    held = [d for c in holders for r in c.attrs["HostConfig"].get("DeviceRequests") or []
            for d in r["DeviceIDs"]]
    assert len(held) == 9 and len(set(held)) == 9, held
    handed = [d for c in holders for d in given(gpusim, c)]
    assert sorted(handed) == sorted(held)
    assert {c.labels["ds01.user"] for c in holders} == set(started)
