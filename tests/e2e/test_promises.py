"""The two promises, each tried the way it was once broken, in a real hub on the private engine.

No device is ever used by two containers; nothing a user made is ever lost. Every test looks
at what another program would see: which devices the engine holds for each running container
(``HostConfig.DeviceRequests``), what the simulated NVIDIA hook handed over at the start, the
file read back from the new container, the port that answers.
"""

from __future__ import annotations

import concurrent.futures
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests

from ..docker.test_ledger import make
from ..hub import HubError, RunningHub
from .conftest import MakeHub
from .test_admin_conflict import doctor
from .test_spawn import STREAM, policy

pytestmark = pytest.mark.docker


def mig_host(profiles: list[str]) -> dict[str, Any]:
    """One A100 cut into ``profiles``, with UUIDs the test can name."""
    return {
        "driver_version": "550.90.07",
        "cuda_version": "12.4",
        "gpus": [{
            "index": 0, "uuid": "GPU-cccccccc-0000-4000-8000-000000000000",
            "name": "NVIDIA A100-SXM4-80GB", "memory_mib": 81920, "mig_mode": "enabled",
            "total_slices": 7,
            "mig_devices": [
                {"index": n, "profile": profile, "gi": n + 1, "ci": 0,
                 "uuid": f"MIG-cccccccc-0000-4000-8000-00000000000{n}"}
                for n, profile in enumerate(profiles)
            ],
        }],
    }


def held_by_running(engine) -> Counter[str]:
    """Device id -> number of running containers Docker gives it to (their device requests)."""
    held: Counter[str] = Counter()
    for container in engine.client.api.containers():
        attrs = engine.client.api.inspect_container(container["Id"])
        for request in attrs["HostConfig"].get("DeviceRequests") or []:
            held.update(request.get("DeviceIDs") or [])
    return held


def handed(gpusim, container_id: str) -> list[str]:
    """The devices the NVIDIA hook gave the container at its last start."""
    calls = [c for c in gpusim.hook_calls() if c["id"] == container_id]
    return calls[-1]["devices"] if calls else []


def run_in(engine, container_id: str, script: str, user: str = "root") -> str:
    api = engine.client.api
    out = api.exec_start(api.exec_create(container_id, ["sh", "-c", script], user=user))
    return out.decode().strip()


def test_a_label_that_lies_does_not_give_its_device_away(
    make_hub: MakeHub, gpusim, engine, base_image, tmp_path: Path
):
    gpusim.install(mig_host(["1g.10gb", "1g.10gb", "1g.10gb"]))
    a, b, c = (f"MIG-cccccccc-0000-4000-8000-00000000000{n}" for n in range(3))
    # Labelled as holding slice C for "ann" with 1,000 GPU-equivalents and priority 999;
    # Docker gives it slice B.
    liar = make(engine, base_image, "liar", device_ids=[b], labelset={
        "ds01.managed": "true", "ds01.schema": "1", "ds01.interface": "cli",
        "ds01.user": "ann", "ds01.gpu.uuids": c, "ds01.gpu.allocated": "0.2",
        "ds01.gpu.equivalents": "1000", "ds01.gpu.priority": "999",
    })
    hub = make_hub(config_extra=policy(tmp_path, "defaults: {max_gpu_equivalents: 0.5}\n"))
    # The lie grants nothing: ann's quota is untouched by it.
    assert hub.spawn("ann", "mig-1g").status_code in (201, 202)
    response = hub.spawn("bo", "mig-1g")
    # B (Docker's truth) and C (the label) both count as taken: only A was free.
    assert response.status_code == 503, response.text
    ann = hub.container("ann")
    assert handed(gpusim, ann.id) == [a]
    held = held_by_running(engine)
    assert held[a] == 1 and held[b] == 1 and held[c] == 0, held
    assert engine.client.containers.get(liar).status == "running"
    # The admin's shell sees the lie.
    code, checks = doctor(hub)
    found = {c["name"]: c for c in checks}["device-requests"]
    assert found["status"] == "warn" and "liar" in found["message"] and b in found["message"]


def test_an_aime_container_holds_its_device(make_hub: MakeHub, gpusim, engine, base_image):
    gpusim.install(mig_host(["3g.40gb", "3g.40gb"]))
    first, second = (f"MIG-cccccccc-0000-4000-8000-00000000000{n}" for n in range(2))
    old = make(engine, base_image, "aime-old", device_ids=[first],
               labelset={"aime.mlc.USER": "olduser", "aime.mlc.GPUS": "0:0"})
    hub = make_hub()
    hub.spawn("ann", "mig-3g")
    assert handed(gpusim, hub.container("ann").id) == [second]
    refused = hub.spawn("bo", "mig-3g")
    assert refused.status_code == 503 and "in use" in refused.text, refused.text
    assert held_by_running(engine)[first] == 1
    assert engine.client.containers.get(old).status == "running"


def test_two_hubs_with_the_same_user_never_share_or_touch(
    make_hub: MakeHub, gpusim, engine, tmp_path: Path
):
    gpusim.install(mig_host(["1g.10gb", "1g.10gb"]))
    hold = policy(tmp_path, "defaults: {gpu_hold_after_stop: 1h}\n")
    one = make_hub(config_extra=hold)
    two = make_hub(config_extra=hold + 'c.GPUSpawner.hub_id = "e2e-two"\n'
                   'c.DockerSpawner.prefix = "two"\n')
    one.spawn("ann", "mig-1g")
    first = one.container("ann")
    one.stop_server("ann")  # held for an hour: its slice stays ann's on hub one
    two.spawn("ann", "mig-1g")
    theirs = engine.client.containers.get("two-ann")
    assert theirs.labels["ds01.hub"] == "e2e-two"
    assert handed(gpusim, theirs.id) != handed(gpusim, first.id)
    # Hub one restarts its own container: same device, untouched by hub two.
    one.spawn("ann", "mig-1g")
    again = engine.client.containers.get(first.id)
    assert again.status == "running" and engine.client.containers.get(theirs.id).id == theirs.id
    assert all(count == 1 for count in held_by_running(engine).values())


def test_a_restart_racing_another_hubs_create_never_shares(
    make_hub: MakeHub, gpusim, engine, tmp_path: Path
):
    """ann's stopped container (hold over) restarts on hub one while bo's fresh spawn on hub
    two goes for the same, only slice: whoever wins, one running container holds it."""
    gpusim.install(mig_host(["3g.40gb"]))
    one = make_hub()
    two = make_hub(config_extra='c.GPUSpawner.hub_id = "e2e-two"\nc.DockerSpawner.prefix = "two"\n')
    for round_ in range(3):
        user = f"ann{round_}"
        one.spawn(user, "mig-3g")
        one.stop_server(user)  # no hold: the slice is free for anyone

        def start(hub: RunningHub, who: str) -> int:
            try:
                return hub.spawn(who, "mig-3g", timeout=120).status_code
            except HubError:
                return 599

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            codes = list(pool.map(lambda args: start(*args),
                                  [(one, user), (two, f"bo{round_}")]))
        assert sorted(codes)[0] in (201, 202), codes
        held = held_by_running(engine)
        assert all(count == 1 for count in held.values()), (codes, held)
        assert sum(held.values()) == 1, held
        for hub, who in ((one, user), (two, f"bo{round_}")):
            if hub.server_model(who):
                hub.stop_server(who)


def test_preemption_never_touches_another_hubs_held_container(
    make_hub: MakeHub, gpusim, engine, base_image, tmp_path: Path
):
    gpusim.install(mig_host(["3g.40gb", "3g.40gb"]))
    slice0, slice1 = (f"MIG-cccccccc-0000-4000-8000-00000000000{n}" for n in range(2))
    rules = policy(tmp_path, "defaults: {gpu_hold_after_stop: 1h}\n"
                             "user_overrides: {bo: {priority: 5}}\n")
    hub = make_hub(config_extra=rules + STREAM)
    # Another hub's held container on slice 0, its labels claiming priority 0.
    other = make(engine, base_image, "other-zed", device_ids=[slice0], start=False,
                 labelset={"ds01.managed": "true", "ds01.schema": "1",
                           "ds01.interface": "jupyterhub", "ds01.hub": "other",
                           "ds01.user": "zed", "ds01.gpu.uuids": slice0,
                           "ds01.gpu.priority": "0"})
    engine.client.api.start(other)
    engine.client.api.stop(other, timeout=1)
    hub.spawn("ann", "mig-3g")
    ann = hub.container("ann")
    assert handed(gpusim, ann.id) == [slice1]
    assert run_in(engine, ann.id, "echo mine > /opt/outside-volumes.txt && echo ok") == "ok"
    hub.stop_server("ann")  # held, priority 0
    hub.spawn("bo", "mig-3g")  # priority 5 takes a held slot: ann's, never the other hub's
    bo = hub.container("bo")
    assert handed(gpusim, bo.id) == [slice1]
    assert engine.client.containers.get(other).status == "exited"
    assert hub.container("ann") is None
    saved = [e for e in hub.events() if e["event"] == "container.save"]
    assert saved and saved[-1]["user"] == "ann" and saved[-1]["reason"] == "preempted"
    # Nothing ann made is lost: her next start (CPU: the GPU is taken) is made from the copy.
    hub.spawn("ann", "cpu")
    assert run_in(engine, hub.container("ann").id, "cat /opt/outside-volumes.txt") == "mine"


def test_replace_after_reboot_keeps_files_and_installed_packages(
    make_hub: MakeHub, gpusim, engine, tmp_path: Path
):
    hub = make_hub(config_extra=policy(tmp_path, "defaults: {gpu_hold_after_stop: 1h}\n")
                   + STREAM)
    hub.spawn("ann", "mig-1g")
    first = hub.container("ann")
    # A file outside any volume, and a package installed into the container's file system.
    assert run_in(engine, first.id, (
        "echo precious > /home/jovyan/outside-volumes.txt && "
        "site=$(/opt/venv/bin/python -c 'import site; print(site.getsitepackages()[0])') && "
        "mkdir -p $site/labtool && echo 'ANSWER = 42' > $site/labtool/__init__.py && echo ok"
    )) == "ok"
    hub.stop_server("ann")
    gpusim.reboot(seed=11)  # the MIG slice comes back with a new UUID
    hub.spawn("ann", "mig-1g")
    again = hub.container("ann")
    assert again.id != first.id
    present = {m["uuid"] for g in gpusim.state()["gpus"] for m in g.get("mig_devices", [])}
    assert handed(gpusim, again.id)[0] in present
    assert run_in(engine, again.id, "cat /home/jovyan/outside-volumes.txt") == "precious"
    assert run_in(engine, again.id,
                  "/opt/venv/bin/python -c 'import labtool; print(labtool.ANSWER)'") == "42"
    ids = {c.id for c in engine.client.containers.list(all=True)}
    assert first.id not in ids  # replaced: the old one is gone, what it held is not
    assert any("your files are kept" in m for m in hub.last_progress), hub.last_progress


def test_a_dockerspawner_container_is_kept_when_switching(
    make_hub: MakeHub, gpusim, engine, singleuser_image
):
    """A lab switching from DockerSpawner: the stopped container of the same name, without
    gpuspawner labels, is replaced without loss, never simply removed."""
    api = engine.client.api
    made = api.create_container(singleuser_image, command=["sleep", "300"], name="jupyter-ann")
    api.start(made["Id"])
    run_in(engine, made["Id"], "echo from-dockerspawner > /home/jovyan/notes.txt")
    api.stop(made["Id"], timeout=1)
    hub = make_hub()
    hub.spawn("ann", "cpu")
    now = hub.container("ann")
    assert now.id != made["Id"] and now.labels["ds01.hub"] == "e2e"
    assert run_in(engine, now.id, "cat /home/jovyan/notes.txt") == "from-dockerspawner"


def test_cpu_servers_get_no_gpu_and_gpu_servers_exactly_theirs(make_hub: MakeHub, gpusim):
    hub = make_hub()
    hub.spawn("ann", "cpu")
    hub.spawn("bo", "mig-1g")
    cpu, gpu = hub.container("ann"), hub.container("bo")
    assert "NVIDIA_VISIBLE_DEVICES=void" in cpu.attrs["Config"]["Env"]
    assert not cpu.attrs["HostConfig"].get("DeviceRequests")
    assert handed(gpusim, cpu.id) == []
    uuid = gpu.labels["ds01.gpu.uuids"]
    assert f"NVIDIA_VISIBLE_DEVICES={uuid}" in gpu.attrs["Config"]["Env"]
    assert handed(gpusim, gpu.id) == [uuid]


def test_extra_ports_are_published_on_127_0_0_1_and_answer(make_hub: MakeHub, engine):
    hub = make_hub(config_extra='c.GPUSpawner.ports = {"web": 6006}\n'
                   "c.DockerSpawner.port = 9999\n")  # a Jupyter port the image does not EXPOSE
    hub.spawn("ann", "cpu")
    container = hub.container("ann")
    container.reload()
    published = container.attrs["NetworkSettings"]["Ports"]
    host_port = int(container.labels["ds01.port.web"])
    assert [b["HostIp"] for b in published["6006/tcp"]] == ["127.0.0.1"]
    assert int(published["6006/tcp"][0]["HostPort"]) == host_port
    assert [b["HostIp"] for b in published["9999/tcp"]] == ["127.0.0.1"]
    # A listener inside the container answers on the published host port.
    api = engine.client.api
    api.exec_start(api.exec_create(container.id, [
        "sh", "-c", "cd /tmp && echo served > index.html && "
        "nohup /opt/venv/bin/python -m http.server 6006 >/dev/null 2>&1 &"]), detach=True)
    deadline = time.monotonic() + 20
    while True:
        try:
            session = requests.Session()
            session.trust_env = False
            answer = session.get(f"http://127.0.0.1:{host_port}/index.html", timeout=2)
            break
        except requests.RequestException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    assert answer.text.strip() == "served"
    # Not on any other address of the host.
    with socket.socket() as probe:
        probe.settimeout(1)
        assert probe.connect_ex((engine.gateway, host_port)) != 0
    assert hub.get("/user/ann/api/status").status_code == 200
