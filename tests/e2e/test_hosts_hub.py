"""One hub, three GPU hosts, each its own Docker engine (issue "several hosts"): the hub's own
engine (a100x4, NVML), a second reached over TCP with TLS client certificates the test made
(h100x2, read through its probe container), and a third without the NVIDIA runtime (CPU
servers only).

What a student and the lab observe: each server runs on the host its ``ds01.host`` label
names, is published on that host's address and answers through the hub's proxy; the device
each engine holds for a container is never held by another, on any host; twenty servers
started at once spread as ``spread`` says; a host whose engine stops is told to the user of a
server there, while new servers go to the others and the servers elsewhere keep answering;
when it is back, its server starts there again. The same for a GPU host: while its engine is
gone new GPU servers go to the other, and when it is back each of its servers starts again in
its own container on its own slice. A MIG re-creation on the far host is found through its
probe, and the server's files come along to its new slice; a server whose host has no device
for it moves to another host with its files, unless a volume keeps it there.
"""

from __future__ import annotations

import concurrent.futures
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import requests
import yaml

from .. import gpusim as gpusim_package
from ..engine import EnginePaths, PrivateEngine, start_sleeper
from ..gpusim import Simulator
from ..hub import HubError, RunningHub, free_port
from ..images import ensure_singleuser_image
from .conftest import MakeHub
from .test_admin import Tokens, admin_config, url, with_token
from .test_admin_browser import browser, open_as_admin  # noqa: F401 - the fixture
from .test_promises import run_in
from .test_spawn import STREAM

pytestmark = pytest.mark.docker

#: Where each host's servers are published and reached (the hub's own: DockerSpawner's
#: ``host_ip``, 127.0.0.1).
ADDRESS = {"gpu1": "127.0.0.1", "gpu2": "127.0.0.2", "cpu3": "127.0.0.3"}


def _running(engine: PrivateEngine) -> Iterator[PrivateEngine]:
    """A host's engine for the module, with the servers' image."""
    engine.start()
    try:
        ensure_singleuser_image(engine.client)
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def far_engine() -> Iterator[PrivateEngine]:
    yield from _running(PrivateEngine(EnginePaths.from_env().beside("remote-h100"),
                                      nvidia_runtime=True, tls_port=free_port()))


@pytest.fixture(scope="module")
def cpu_engine() -> Iterator[PrivateEngine]:
    yield from _running(PrivateEngine(EnginePaths.from_env().beside("cpu-host")))


@pytest.fixture
def far(far_engine: PrivateEngine) -> Iterator[Simulator]:
    far_engine.remove_containers()
    sim = Simulator(far_engine.state_path, far_engine.hook_log)
    sim.install("h100x2")
    yield sim
    far_engine.remove_containers()


@pytest.fixture
def cpu(cpu_engine: PrivateEngine) -> Iterator[PrivateEngine]:
    cpu_engine.remove_containers()
    yield cpu_engine
    if cpu_engine._client is None:  # the test stopped it and failed before it was back
        cpu_engine.start()
    cpu_engine.remove_containers()


def hosts_config(engine: PrivateEngine, far: PrivateEngine | None,
                 cpu: PrivateEngine | None) -> dict[str, Any]:
    hosts: dict[str, Any] = {"gpu1": engine.base_url}
    if far is not None:
        tls = far.tls_dir
        hosts["gpu2"] = {"url": far.tls_url, "address": ADDRESS["gpu2"],
                         "tls_ca": str(tls / "ca.pem"), "tls_cert": str(tls / "cert.pem"),
                         "tls_key": str(tls / "key.pem")}
    if cpu is not None:
        hosts["cpu3"] = {"url": cpu.base_url, "address": ADDRESS["cpu3"]}
    return hosts


def where(user: str, engines: dict[str, PrivateEngine]) -> tuple[str, Any]:
    """The host whose engine has ``user``'s container, and that container."""
    found = [(name, c) for name, e in engines.items()
             for c in e.client.containers.list(all=True, filters={"label": f"ds01.user={user}"})]
    assert len(found) == 1, (user, found)
    return found[0]


def held(engines: dict[str, PrivateEngine]) -> list[tuple[str, str]]:
    """(host, device) for every device every engine's running containers hold."""
    return [(name, device) for name, e in engines.items() for c in e.client.containers.list()
            for r in c.attrs["HostConfig"].get("DeviceRequests") or []
            for device in r.get("DeviceIDs") or []]


def oracle(spawns: int, strategy: str, slices: tuple[int, int] = (9, 4)) -> dict[str, int]:
    """Where ``spawns`` 1g.10gb servers go, one after another, by the documented rule: among
    the hosts with a free slice, ``spread`` takes the one whose GPUs are least held
    (GPU-equivalents over its GPUs; a 1g.10gb slice is 1/7), ``pack`` the most held; the
    first of the hub's hosts on a tie. gpu1 has four GPUs, gpu2 two; ``slices``: their
    1g.10gb slices (a100x4 has nine, h100x2 four)."""
    gpus, count = {"gpu1": 4, "gpu2": 2}, {"gpu1": 0, "gpu2": 0}
    free = {"gpu1": slices[0], "gpu2": slices[1]}
    sign = 1 if strategy == "spread" else -1
    for _ in range(spawns):
        fits = [h for h in ("gpu1", "gpu2") if free[h]]
        host = min(fits, key=lambda h: (sign * count[h] / 7 / gpus[h], fits.index(h)))
        count[host] += 1
        free[host] -= 1
    return count


def with_whole_gpu_sliced(name: str, index: int, uuid_stem: str) -> dict[str, Any]:
    """Topology ``name`` with its GPU ``index`` (whole, MIG off) cut into seven 1g.10gb
    slices: room for twenty servers at once on two hosts."""
    topology = yaml.safe_load((Path(gpusim_package.__file__).parent / "topologies"
                               / f"{name}.yaml").read_text())
    gpu = next(g for g in topology["gpus"] if g["index"] == index)
    assert gpu["mig_mode"] == "disabled"
    gpu["mig_mode"] = "enabled"
    gpu["mig_devices"] = [
        {"index": i, "profile": "1g.10gb", "uuid": f"MIG-{uuid_stem}-0000-5000-8000-00000000000{i}",
         "gi": 7 + i, "ci": 0, "memory_mib": 9728}
        for i in range(7)]
    return topology


def start_at_once(hub: RunningHub, users: list[str], profile: str) -> None:
    for user in users:
        hub.ensure_user(user)

    def press_start(user: str) -> tuple[str, int, str]:
        try:
            response = hub.spawn(user, profile, timeout=300)
            return user, response.status_code, response.text
        except HubError as exc:
            return user, 599, str(exc)

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(users)) as pool:
        results = list(pool.map(press_start, users))
    assert all(code in (201, 202) for _, code, _ in results), results


def published(container: Any) -> str:
    container.reload()
    return container.attrs["NetworkSettings"]["Ports"]["8888/tcp"][0]["HostIp"]


def answers(hub: RunningHub, user: str) -> bool:
    return hub.get(f"/user/{user}/api/status").status_code == 200


def test_servers_spread_over_three_hosts_answer_there_and_a_host_down_is_told(
    make_hub: MakeHub, engine: PrivateEngine, gpusim: Any, far: Simulator,
    far_engine: PrivateEngine, cpu: PrivateEngine,
) -> None:
    # Sixteen 1g.10gb slices on gpu1 and eleven on gpu2: twenty fit either way, so where
    # they land is the strategy's doing (pack would fill gpu1 first).
    gpusim.install(with_whole_gpu_sliced("a100x4", 3, "3a3a3a3a"))
    far.install(with_whole_gpu_sliced("h100x2", 1, "4b4b4b4b"))
    hosts = hosts_config(engine, far_engine, cpu)
    # Twenty Jupyter servers boot at once on the two cores CI has, beside the other
    # worker's tests: give each more than the usual minute to answer.
    hub = make_hub(config_extra=f"c.GPUSpawner.hosts = {hosts!r}\n"
                                'c.GPUSpawner.allocation_strategy = "spread"\n'
                                "c.Spawner.http_timeout = 240\n")
    engines = {"gpu1": engine, "gpu2": far_engine, "cpu3": cpu}
    users = [f"s{n:02d}" for n in range(20)]
    start_at_once(hub, users, "mig-1g")

    count = {"gpu1": 0, "gpu2": 0, "cpu3": 0}
    for user in users:
        host, container = where(user, engines)
        count[host] += 1
        assert container.labels["ds01.host"] == host
        assert published(container) == ADDRESS[host]
        assert answers(hub, user), user
    # What the engines hold: twenty devices, none twice, each one of its own host's.
    devices = held(engines)
    assert len(devices) == 20 and len({d for _, d in devices}) == 20, devices
    own = {"gpu1": set(gpusim.gpu_uuids()) | {m["uuid"] for g in gpusim.state()["gpus"]
                                              for m in g.get("mig_devices", [])},
           "gpu2": {m["uuid"] for g in far.state()["gpus"] for m in g.get("mig_devices", [])}}
    assert all(device in own[host] for host, device in devices), devices
    # Twenty at once spread as one after another would: each choice counts the spawns on
    # their way that Docker does not show yet.
    assert count == {**oracle(20, "spread", (16, 11)), "cpu3": 0}
    assert oracle(20, "pack", (16, 11)) != oracle(20, "spread", (16, 11))

    # The hub restarts: its state says which host each server is on, so every one is still
    # running there, as Docker says (a poll on the wrong engine would drop it).
    hub.restart()
    for user in users:
        model = hub.server_model(user)
        assert model and model.get("ready"), (user, model)
        assert answers(hub, user), user

    # A CPU server: the host with the fewest of this hub's servers, the one without GPUs.
    hub.spawn("cpu-a", "cpu")
    host, first = where("cpu-a", engines)
    assert host == "cpu3" and first.labels["ds01.host"] == "cpu3"
    assert published(first) == ADDRESS["cpu3"] and answers(hub, "cpu-a")
    hub.stop_server("cpu-a")

    cpu.stop()  # the third host's engine goes away
    response = hub.spawn("cpu-a", "cpu")
    assert response.status_code == 503, response.text
    assert "host cpu3, which does not answer" in response.text, response.text
    assert "files are safe" in response.text
    hub.spawn("cpu-b", "cpu")  # a new server goes where an engine answers
    host_b, _ = where("cpu-b", {"gpu1": engine, "gpu2": far_engine})
    assert host_b == ("gpu2" if count["gpu2"] < count["gpu1"] else "gpu1")
    assert all(answers(hub, user) for user in users)  # the others' servers are untouched

    cpu.start()
    hub.spawn("cpu-a", "cpu")
    host, again = where("cpu-a", engines)
    assert host == "cpu3" and again.id == first.id  # its own container, started again
    assert published(again) == ADDRESS["cpu3"] and answers(hub, "cpu-a")

    # A GPU host's engine goes away, and its servers with it (no live-restore).
    on_far = {user: where(user, engines)[1] for user in users
              if where(user, engines)[0] == "gpu2"}
    far_engine.stop()
    hub.spawn("late", "mig-1g")  # a new GPU server goes where an engine answers
    host_late, _ = where("late", {"gpu1": engine})
    assert host_late == "gpu1"
    assert all(answers(hub, user) for user in users if user not in on_far)
    # A user presses Stop meanwhile: the Hub forgets the server whatever its spawner says
    # (its API answers as for any stop); the log says the stop did not reach gpu2, and the
    # next start (below, once gpu2 is back) finds the same container there.
    stopper = next(iter(on_far))
    assert hub.stop_server(stopper).status_code in (202, 204)
    assert hub.server_model(stopper) is None
    [failed] = [e for e in hub.events() if e["event"] == "container.stop"
                and e["user"] == stopper]
    assert failed["host"] == "gpu2" and "host gpu2" in failed["failed"], failed
    far_engine.start()
    for user, container in on_far.items():
        hub.stop_server(user)  # the Hub learns what Docker says: it exited with its engine
        hub.spawn(user, "mig-1g")
        host, again = where(user, engines)
        # Back on its own host, in its own container, on its own slice, which is still there.
        assert host == "gpu2" and again.id == container.id, (user, host)
        assert again.labels["ds01.gpu.uuids"] == container.labels["ds01.gpu.uuids"]
        assert answers(hub, user), user
    devices = held(engines)
    assert len(devices) == 21 and len({d for _, d in devices}) == 21, devices


def test_two_servers_of_one_user_started_at_once_on_two_hosts_keep_her_limit(
    make_hub: MakeHub, engine: PrivateEngine, gpusim: Any, far: Simulator,
    far_engine: PrivateEngine, tmp_path: Path,
) -> None:
    """ann may hold 0.2 GPU-equivalents (one 1g.10gb slice is 1/7) and presses Start on two
    named servers at once. With ``spread`` the second goes to the other host (the first is
    counted on its way), where the read chosen from shows nothing of hers: her plans take
    her lock in turn, and the later one reads the first one's host again. One server runs,
    the other is refused by her limit naming its host, and the engines hold one device of
    hers."""
    from .test_admin import policy

    hosts = hosts_config(engine, far_engine, None)
    hub = make_hub(config_extra=policy(tmp_path, "defaults: {max_gpu_equivalents: 0.2}\n")
                   + f"c.GPUSpawner.hosts = {hosts!r}\n"
                   + 'c.GPUSpawner.allocation_strategy = "spread"\n')
    hub.ensure_user("ann")

    def press_start(server: str) -> tuple[str, int, str]:
        try:
            response = hub.spawn("ann", "mig-1g", server=server, timeout=180)
            return server, response.status_code, response.text
        except HubError as exc:
            return server, 599, str(exc)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(press_start, ["a", "b"]))
    started = [r for r in results if r[1] in (201, 202)]
    assert len(started) == 1, results
    [(_server, _code, said)] = [r for r in results if r not in started]
    held_by_ann = [(name, c) for name, e in {"gpu1": engine, "gpu2": far_engine}.items()
                   for c in e.client.containers.list(filters={"label": "ds01.user=ann"})
                   if c.attrs["HostConfig"].get("DeviceRequests")]
    assert len(held_by_ann) == 1, held_by_ann
    [(runs_on, _container)] = held_by_ann
    other = "gpu2" if runs_on == "gpu1" else "gpu1"
    assert f"On host {other}: this needs 0.14 GPU-equivalents and you already hold 0.14" \
        in said, said


def test_pack_fills_the_busiest_host_first(
    make_hub: MakeHub, engine: PrivateEngine, gpusim: Any, far: Simulator,
    far_engine: PrivateEngine,
) -> None:
    hosts = hosts_config(engine, far_engine, None)
    hub = make_hub(config_extra=f"c.GPUSpawner.hosts = {hosts!r}\n")
    users = [f"p{n}" for n in range(6)]
    start_at_once(hub, users, "mig-1g")
    engines = {"gpu1": engine, "gpu2": far_engine}
    count = {"gpu1": 0, "gpu2": 0}
    for user in users:
        host, container = where(user, engines)
        count[host] += 1
        assert container.labels["ds01.host"] == host and answers(hub, user)
    assert count == oracle(6, "pack") == {"gpu1": 6, "gpu2": 0}


def test_a_mig_recreation_on_a_far_host_is_found_through_its_probe_and_files_come_along(
    make_hub: MakeHub, engine: PrivateEngine, gpusim: Any, far: Simulator,
    far_engine: PrivateEngine, tmp_path: Path,
) -> None:
    hosts = {"gpu2": hosts_config(engine, far_engine, None)["gpu2"]}
    hub = make_hub(config_extra=f"c.GPUSpawner.hosts = {hosts!r}\n" + STREAM)
    hub.spawn("ann", "mig-1g")
    first = far_engine.client.containers.get("jupyter-ann")
    assert first.labels["ds01.host"] == "gpu2"
    old = first.labels["ds01.gpu.uuids"]
    assert run_in(far_engine, first.id, "echo mine > /home/jovyan/notes.txt && echo ok") == "ok"
    hub.stop_server("ann")

    far.reboot(seed=11)  # the far host's MIG devices come back with new UUIDs
    present = {m["uuid"] for g in far.state()["gpus"] for m in g.get("mig_devices", [])}
    assert old not in present
    hub.spawn("ann", "mig-1g")
    now = far_engine.client.containers.get("jupyter-ann")
    assert now.id != first.id and now.status == "running"
    devices = [d for r in now.attrs["HostConfig"]["DeviceRequests"] for d in r["DeviceIDs"]]
    assert len(devices) == 1 and devices[0] in present, devices
    handed = [c["devices"] for c in far.hook_calls() if c["id"] == now.id]
    assert handed and handed[-1] == devices
    assert now.labels["ds01.gpu.parent_uuids"] == first.labels["ds01.gpu.parent_uuids"]
    # The probe's last reading still had the old slice: the start there failed, the probe
    # was read again, and the server moved to the new slice, as the user was told.
    said = hub.last_progress
    assert any("vanished at the start" in m for m in said), said
    assert any("no longer exists" in m for m in said), said
    assert run_in(far_engine, now.id, "cat /home/jovyan/notes.txt") == "mine"
    assert answers(hub, "ann")
    # Nothing of this hub on the hub's own engine: it is not one of its hosts.
    assert engine.client.containers.list(all=True, filters={"label": "ds01.hub=e2e"}) == []


def test_the_admin_page_its_api_and_metrics_show_every_host_and_one_down(
    make_hub: MakeHub, engine: PrivateEngine, gpusim: Any, far: Simulator,
    far_engine: PrivateEngine, cpu: PrivateEngine, browser: Any,  # noqa: F811
) -> None:
    tokens = Tokens()
    hosts = hosts_config(engine, far_engine, cpu)
    hub = make_hub(config_extra=admin_config(tokens, before=f"c.GPUSpawner.hosts = {hosts!r}\n"))
    hub.spawn("ann", "mig-1g")  # pack: the first host

    def read(path: str) -> requests.Response:
        deadline = time.monotonic() + 30
        while True:  # the hub starts the service; the proxy answers 503 until it listens
            response = with_token(hub, tokens.ops, path)
            if response.status_code not in (502, 503) or time.monotonic() > deadline:
                return response
            time.sleep(0.3)

    rows = {row["name"]: row for row in read("api/hosts").json()}
    assert list(rows) == ["gpu1", "gpu2", "cpu3"]
    assert all(row["up"] for row in rows.values()), rows
    assert (rows["gpu1"]["gpus"], rows["gpu1"]["holders"]) == (4, ["jupyter-ann"])
    assert (rows["gpu2"]["gpus"], rows["gpu2"]["migs"], rows["gpu2"]["holders"]) == (2, 5, [])
    assert rows["gpu2"]["free"]["1g.10gb"] == {"free": 4, "total": 4}
    assert rows["cpu3"]["gpus"] == 0 and rows["cpu3"]["problems"], rows["cpu3"]
    assert rows["gpu2"]["url"] == far_engine.tls_url
    # Every host's GPU cards, each naming its host; actions only on the hub's own engine.
    model = read("api/overview").json()
    assert Counter(card["host"] for card in model["cards"]) == {"gpu1": 4, "gpu2": 2}
    holders = [(card["host"], h) for card in model["cards"] for b in card["blocks"]
               for h in b["holders"]]
    assert [(host, h["user"], h["can_stop"]) for host, h in holders] == [("gpu1", "ann", True)]
    free = {t["profile"]: (t["free"], t["total"]) for t in model["totals"]}
    assert free["1g.10gb"] == (8 + 4, 9 + 4)

    cpu.stop()
    time.sleep(2.5)  # past the service's two-second read of every host
    rows = {row["name"]: row for row in read("api/hosts").json()}
    assert rows["cpu3"]["up"] is False and rows["cpu3"]["down"].startswith("host cpu3 (")
    assert rows["gpu1"]["up"] and rows["gpu2"]["up"]
    metrics = with_token(hub, tokens.prometheus, "metrics").text
    assert 'gpuspawner_host_up{host="cpu3"} 0.0' in metrics
    assert 'gpuspawner_host_up{host="gpu2"} 1.0' in metrics
    assert 'gpuspawner_host_profile_free{host="gpu2",profile="1g.10gb"} 4.0' in metrics
    # Per host, GPU and profile: gpu2's GPU 0 has four 1g.10gb slices, none held; ann holds
    # one 1g.10gb slice (1/7 of a GPU) on gpu1.
    assert 'gpuspawner_host_gpu_slots{gpu="0",host="gpu2",profile="1g.10gb"} 4.0' in metrics
    assert 'gpuspawner_host_gpu_slots_used{gpu="0",host="gpu2",profile="1g.10gb"} 0.0' in metrics
    held_by_ann = re.search(r'gpuspawner_host_user_gpu_equivalents\{host="gpu1",user="ann"\} '
                            r'([0-9.]+)', metrics)
    assert held_by_ann and abs(float(held_by_ann.group(1)) - 1 / 7) < 1e-3, metrics
    page = read("")
    assert page.status_code == 200
    assert re.search(r'<li class="host host-down" data-host="cpu3"', page.text), page.text[:3000]
    assert re.search(r'<li class="host host-up" data-host="gpu2"', page.text)
    assert any("host cpu3 (" in p for p in read("api/overview").json()["problems"])
    assert answers(hub, "ann")  # a host down leaves the others' servers alone

    # In a browser: after the page's script refreshed the cards from the JSON API, every
    # card still names its host, and the host that is down is red.
    tab = browser.new_page()
    open_as_admin(tab, hub)
    before = tab.evaluate("document.body.dataset.refreshed || ''")
    tab.wait_for_function(f"(document.body.dataset.refreshed || '') !== {before!r}",
                          timeout=30000)
    shown = tab.eval_on_selector_all(
        "article.gpu-card", "cards => cards.map(c => [c.dataset.host, "
        "(c.querySelector('.gpu-host') || {}).textContent])")
    assert Counter(host for host, _ in shown) == {"gpu1": 4, "gpu2": 2}, shown
    assert all(host == text for host, text in shown), shown
    red = tab.eval_on_selector('li.host-down[data-host="cpu3"]',
                               "node => getComputedStyle(node).backgroundColor")
    assert red == "rgb(248, 215, 218)", red

    # The allocations and users pages read every host that answers: a container run by hand
    # on gpu2 shows beside ann's on gpu1, each row naming its host.
    mig = far.state()["gpus"][0]["mig_devices"][0]["uuid"]
    far_engine.client.containers.run(
        ensure_singleuser_image(far_engine.client), ["sleep", "300"], name="by-hand",
        detach=True, device_requests=[docker.types.DeviceRequest(
            driver="nvidia", device_ids=[mig], capabilities=[["gpu"]])])
    time.sleep(2.5)
    listed = {(r["host"], r["container_name"], r["managed"])
              for r in read("api/allocations").json()}
    assert {("gpu1", "jupyter-ann", True), ("gpu2", "by-hand", False)} <= listed, listed
    [ann] = [u for u in read("api/users").json() if u["user"] == "ann"]
    assert [s["host"] for s in ann["servers"]] == ["gpu1"] and ann["equivalents"] > 0
    table = read("allocations").text
    assert '<th data-key="host">Host</th>' in table and '<td class="host">gpu2</td>' in table
    tab.goto(url(hub, "allocations"))
    tab.wait_for_selector("td.host")
    before = tab.evaluate("document.body.dataset.refreshed || ''")
    tab.wait_for_function(f"(document.body.dataset.refreshed || '') !== {before!r}",
                          timeout=30000)
    hosts_shown = tab.eval_on_selector_all("td.host", "cells => cells.map(c => c.textContent)")
    assert {"gpu1", "gpu2"} <= set(hosts_shown), hosts_shown
    cpu.start()


def test_gpu_work_on_another_host_keeps_its_server_and_an_idle_one_there_is_stopped(
    make_hub: MakeHub, engine: PrivateEngine, gpusim: Any, far: Simulator,
    far_engine: PrivateEngine, tmp_path: Path,
) -> None:
    """GPU activity on a host the hub reaches only through its engine: bo computes on his
    gpu2 slice, ann does nothing on hers. The admin service reads gpu2's processes through
    its probe every round: bo's slice shows one process and no idle time in the metrics, and
    ann's server is stopped past ``gpu_idle_timeout`` (logged with its host), bo's is not."""
    from .test_admin import policy

    tokens = Tokens()
    both = hosts_config(engine, far_engine, None)
    hosts = {"gpu2": both["gpu2"], "gpu1": both["gpu1"]}  # pack: the first host on a tie
    hub = make_hub(
        config_extra=policy(tmp_path, "defaults: {gpu_idle_timeout: 12s}\n")
        + admin_config(tokens, before=f"c.GPUSpawner.hosts = {hosts!r}\n"),
        env_extra={"GPUSPAWNER_ADMIN_ACTIVITY_INTERVAL": "1s"})
    engines = {"gpu1": engine, "gpu2": far_engine}
    hub.spawn("bo", "mig-1g")
    host, bo = where("bo", engines)
    assert host == "gpu2"
    [bo_slice] = bo.attrs["HostConfig"]["DeviceRequests"][0]["DeviceIDs"]
    # A training run in bo's terminal: a real process in his container on gpu2.
    pid = start_sleeper(far_engine.client, bo.id, "/tmp/train.py")
    far.start_process(bo_slice, 4000, pid=pid)
    hub.spawn("ann", "mig-1g")
    host, ann = where("ann", engines)
    assert host == "gpu2"
    [ann_slice] = ann.attrs["HostConfig"]["DeviceRequests"][0]["DeviceIDs"]

    def metric(name: str, device: str, user: str) -> float | None:
        scraped = with_token(hub, tokens.prometheus, "metrics").text
        found = re.search(rf'{name}\{{device="{device}",host="gpu2",slot="[^"]+",'
                          rf'user="{user}"\}} ([0-9.e+]+)', scraped)
        return float(found.group(1)) if found else None

    deadline = time.monotonic() + 60
    while metric("gpuspawner_host_device_processes", bo_slice, "bo") != 1.0:
        assert time.monotonic() < deadline, "bo's process on gpu2 never showed"
        time.sleep(0.5)
    assert metric("gpuspawner_host_device_processes", ann_slice, "ann") == 0.0
    assert metric("gpuspawner_host_device_memory_used_bytes", bo_slice, "bo") == 4000 * 2**20
    bo_idle = metric("gpuspawner_host_device_idle_seconds", bo_slice, "bo")
    # At most the age of the probe that saw his process: far below the time-out.
    assert bo_idle is not None and bo_idle < 12, bo_idle
    # The probe names the process's container from its cgroup: the card says it is bo's.
    [block] = [b for card in with_token(hub, tokens.ops, "api/overview").json()["cards"]
               for b in card["blocks"] if b["uuid"] == bo_slice]
    assert f"pid {pid} · bo · 3.9 GiB" in block["title"], block["title"]
    while hub.server_model("ann") is not None:
        assert time.monotonic() < deadline, "ann's idle GPU server on gpu2 was never stopped"
        time.sleep(1)
    [stop] = [e for e in hub.events() if e["event"] == "gpu.idle-stop"]
    assert (stop["user"], stop["host"], stop["timeout"]) == ("ann", "gpu2", 12)
    assert stop["idle"] >= 12
    assert hub.server_model("bo") is not None
    bo.reload()
    assert bo.status == "running" and answers(hub, "bo")
    ann.reload()
    assert ann.status == "exited"  # stopped, not removed: her files are in it


def test_an_admin_releases_a_hold_on_another_host_and_the_server_comes_back_there(
    make_hub: MakeHub, engine: PrivateEngine, gpusim: Any, far: Simulator,
    far_engine: PrivateEngine, tmp_path: Path,
) -> None:
    """A hold on the far host is released from the admin page: the container is saved to an
    image on that host and removed there; the user's next start finds the saved copy on that
    host, stays there, and has the file back."""
    tokens = Tokens()
    policy = tmp_path / "policy.yaml"
    policy.write_text("defaults: {gpu_hold_after_stop: 1h}\n")
    hosts = hosts_config(engine, far_engine, None)
    hub = make_hub(config_extra=admin_config(tokens, before=(
        f"c.GPUSpawner.hosts = {hosts!r}\n"
        'c.GPUSpawner.allocation_strategy = "spread"\n'
        f"c.GPUSpawner.policy_file = {str(policy)!r}\n")))
    hub.spawn("ann", "mig-1g")  # spread: the first host, then the emptier one
    hub.spawn("bo", "mig-1g")
    host, first = where("bo", {"gpu1": engine, "gpu2": far_engine})
    assert host == "gpu2"
    assert run_in(far_engine, first.id, "echo mine > /home/jovyan/notes.txt && echo ok") == "ok"
    hub.stop_server("bo")

    deadline = time.monotonic() + 30
    while True:  # the hub starts the service; the proxy answers 503 until it listens
        model = with_token(hub, tokens.ops, "api/overview")
        if model.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    holders = [h for card in model.json()["cards"] for b in card["blocks"]
               for h in b["holders"] if h["user"] == "bo"]
    assert [(h["host"], h["state"], h["can_release"]) for h in holders] == [
        ("gpu2", "held", True)], holders
    released = with_token(hub, tokens.ops, "api/release", method="POST",
                          data={"container": holders[0]["container_id"], "host": "gpu2"})
    assert released.status_code == 200, released.text
    assert far_engine.client.containers.list(all=True, filters={"name": "jupyter-bo"}) == []
    saved = [i for i in far_engine.client.images.list() if i.labels.get("ds01.user") == "bo"]
    assert saved, "no saved copy on the far host"
    logged = [e for e in hub.events() if e.get("event") == "gpu.release"]
    assert [(e["user"], e["host"]) for e in logged] == [("bo", "gpu2")]

    hub.spawn("bo", "mig-1g")
    host, again = where("bo", {"gpu1": engine, "gpu2": far_engine})
    assert host == "gpu2" and again.id != first.id
    assert run_in(far_engine, again.id, "cat /home/jovyan/notes.txt") == "mine"
    assert answers(hub, "bo")


def test_a_server_whose_host_is_full_is_refused_at_once_naming_its_host(
    make_hub: MakeHub, engine: PrivateEngine, gpusim: Any, far: Simulator,
    far_engine: PrivateEngine, tmp_path: Path,
) -> None:
    """ann's stopped server is on the far host; its only 3g.40gb slice went to bo after the
    hold. ann's restart plans on her own host (her files are there) and is refused at once,
    saying which host is full; her container is kept."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("defaults: {gpu_hold_after_stop: 0}\n")
    hosts = {"gpu2": hosts_config(engine, far_engine, None)["gpu2"]}
    hub = make_hub(config_extra=f"c.GPUSpawner.hosts = {hosts!r}\n"
                                f"c.GPUSpawner.policy_file = {str(policy)!r}\n")
    first = ann_stopped_and_her_slice_given_to_bo(hub, far_engine)
    began = time.monotonic()
    response = hub.spawn("ann", "mig-3g")
    assert response.status_code == 503, response.text
    assert "On host gpu2: all 1 3g.40gb slices are in use" in response.text, response.text
    assert time.monotonic() - began < 30
    kept = far_engine.client.containers.get("jupyter-ann")
    assert kept.id == first.id and kept.status == "exited"


def saved_images(*engines: PrivateEngine) -> list[str]:
    """Every ``gpuspawner-saved/`` tag on these engines."""
    return [tag for e in engines for image in e.client.images.list() for tag in image.tags
            if tag.startswith("gpuspawner-saved/")]


def moving_hub(make_hub: MakeHub, engine: PrivateEngine, far_engine: PrivateEngine,
               tmp_path: Path, extra: str = "") -> RunningHub:
    """gpu2 (the far host) and gpu1 (the hub's own engine), ``pack``: on a tie the first,
    gpu2. No hold after a stop, so a stopped server's slice can go to someone else."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("defaults: {gpu_hold_after_stop: 0}\n")
    both = hosts_config(engine, far_engine, None)
    hosts = {"gpu2": both["gpu2"], "gpu1": both["gpu1"]}
    return make_hub(config_extra=f"c.GPUSpawner.hosts = {hosts!r}\n"
                                 f"c.GPUSpawner.policy_file = {str(policy)!r}\n"
                                 "c.GPUSpawner.allocation_strategy = 'pack'\n" + extra)


def ann_stopped_and_her_slice_given_to_bo(hub: RunningHub, far_engine: PrivateEngine,
                                         note: str = "") -> Any:
    """ann's server starts on gpu2 (with ``note`` written in it), and stops; with no hold
    after a stop, bo's server then takes gpu2's only 3g.40gb slice. Returns ann's stopped
    container."""
    hub.spawn("ann", "mig-3g")
    first = far_engine.client.containers.get("jupyter-ann")
    assert first.labels["ds01.host"] == "gpu2"
    if note:
        assert run_in(far_engine, first.id,
                      f"echo {note} > /home/jovyan/notes.txt && echo ok") == "ok"
    hub.stop_server("ann")
    hub.spawn("bo", "mig-3g")
    bo = far_engine.client.containers.get("jupyter-bo")
    assert bo.labels["ds01.gpu.uuids"] == first.labels["ds01.gpu.uuids"]
    return first


def test_a_server_whose_host_has_no_device_for_it_moves_to_another_with_its_files(
    make_hub: MakeHub, engine: PrivateEngine, gpusim: Any, far: Simulator,
    far_engine: PrivateEngine, tmp_path: Path,
) -> None:
    """ann's stopped server is on gpu2; gpu2's only 3g.40gb slice went to bo, and gpu1 has
    one free. ann's restart moves her server: saved on gpu2, copied over TLS to gpu1's
    engine and checked, started there from the copy; only then do her old container and its
    image go from gpu2. The file she wrote is in her new container on gpu1, whose device the
    NVIDIA hook handed over is a gpu1 slice; bo's server on gpu2 is untouched."""
    hub = moving_hub(make_hub, engine, far_engine, tmp_path)
    ann_stopped_and_her_slice_given_to_bo(hub, far_engine, note="mine")
    bo = far_engine.client.containers.get("jupyter-bo")

    hub.spawn("ann", "mig-3g", timeout=240)
    now = engine.client.containers.get("jupyter-ann")
    assert now.labels["ds01.host"] == "gpu1" and now.status == "running"
    slices = {m["uuid"] for g in gpusim.state()["gpus"] for m in g.get("mig_devices", [])
              if m["profile"] == "3g.40gb"}
    devices = [d for r in now.attrs["HostConfig"]["DeviceRequests"] for d in r["DeviceIDs"]]
    assert len(devices) == 1 and devices[0] in slices, devices
    handed = [c["devices"] for c in gpusim.hook_calls() if c["id"] == now.id]
    assert handed and handed[-1] == devices
    assert published(now) == ADDRESS["gpu1"]
    assert run_in(engine, now.id, "cat /home/jovyan/notes.txt") == "mine"
    assert answers(hub, "ann")
    assert any("Moving your server from host gpu2 to host gpu1" in m
               for m in hub.last_progress), hub.last_progress
    # Gone from gpu2 only once it ran on gpu1; no saved copy is left on either host.
    assert [c.name for c in far_engine.client.containers.list(all=True)] == ["jupyter-bo"]
    assert saved_images(engine, far_engine) == []
    bo.reload()
    assert bo.status == "running" and answers(hub, "bo")
    engines = {"gpu1": engine, "gpu2": far_engine}
    assert len(held(engines)) == len(set(held(engines))) == 2
    [move] = [e for e in hub.events() if e["event"] == "server.move"]
    assert (move["user"], move["from"], move["to"]) == ("ann", "gpu2", "gpu1")
    assert "refused" not in move


def test_a_server_with_a_volume_stays_on_its_host_and_the_user_is_told_why(
    make_hub: MakeHub, engine: PrivateEngine, gpusim: Any, far: Simulator,
    far_engine: PrivateEngine, tmp_path: Path,
) -> None:
    """The same, with the lab's home volumes: a volume lives on its host, so ann's server
    cannot move with it. Her restart is refused at once with a sentence that names both
    hosts and the volume; nothing was saved, copied or removed, and the operation log says
    why (an admin reads it there)."""
    volume = "gpuspawner-e2e-home-ann"
    hub = moving_hub(make_hub, engine, far_engine, tmp_path, extra=(
        "c.DockerSpawner.volumes = {'gpuspawner-e2e-home-{username}': '/home/jovyan/work'}\n"))
    try:
        first = ann_stopped_and_her_slice_given_to_bo(hub, far_engine)
        began = time.monotonic()
        response = hub.spawn("ann", "mig-3g")
        assert response.status_code == 503, response.text
        assert time.monotonic() - began < 30
        text = response.json()["message"]
        assert ("Your server is on host gpu2, where all 1 3g.40gb slices are in use" in text
                and f"cannot move to host gpu1: its files in volume {volume} stay on that host"
                in text), text
        kept = far_engine.client.containers.get("jupyter-ann")
        assert kept.id == first.id and kept.status == "exited"
        assert engine.client.containers.list(all=True, filters={"name": "jupyter-ann"}) == []
        assert saved_images(engine, far_engine) == []
        [move] = [e for e in hub.events() if e["event"] == "server.move"]
        assert (move["from"], move["to"]) == ("gpu2", "gpu1")
        assert volume in move["refused"]
    finally:
        hub.stop_server("bo")
        far_engine.remove_containers()
        for e in (engine, far_engine):
            for v in e.client.volumes.list(filters={"name": "gpuspawner-e2e-home-"}):
                v.remove(force=True)
