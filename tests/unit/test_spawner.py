"""GPUSpawner's own logic without a hub: the form, the choice of profile, Docker retries.

The spawner is built with a stand-in user and its snapshot replaced by plain data, so these
tests say what a student sees for a given state of the world, in milliseconds.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from types import SimpleNamespace

import docker
import pytest
import requests
from dockerspawner import DockerSpawner
from tornado import web

from gpuspawner import allocator
from gpuspawner.allocator import Request
from gpuspawner.policy import Policy, parse_policy
from gpuspawner.records import Inventory
from gpuspawner.snapshot import Snapshot
from gpuspawner.spawner import GPUSpawner

from .hosts import holding, host

PROFILES = [
    {"display_name": "CPU only", "slug": "cpu"},
    {
        "display_name": "Small <GPU>",
        "slug": "mig-1g",
        "gpu": {"mig_profile": "1g.10gb"},
        "default": True,
    },
    {"display_name": "Big", "slug": "mig-3g", "gpu": {"mig_profile": "3g.40gb"}},
    {"display_name": "Whole", "slug": "gpu-1", "gpu": {"gpus": 1}},
]
HOST = host(["1g.10gb"] * 7, ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"], None)


def make_spawner(
    monkeypatch, inventory: Inventory = HOST, allocations=(), policy=None, **config
) -> GPUSpawner:
    user = SimpleNamespace(name="ann", groups=[], escaped_name="ann", url="/user/ann/", id=1)
    spawner = GPUSpawner(user=user, profile_list=PROFILES, **config)
    world = Snapshot(
        inventory,
        tuple(allocations),
        policy or Policy.default(),
        frozenset(),
        datetime.now(timezone.utc),
    )

    async def snapshot():
        return world

    monkeypatch.setattr(spawner, "snapshot", snapshot)
    if policy is not None:
        monkeypatch.setattr(spawner, "load_policy", lambda: policy)
    return spawner


def taken_3g():
    choice = allocator.choose(
        HOST, [], Policy.default().for_user("x").limits, Request("x", mig_profile="3g.40gb")
    )
    return [holding(choice, "x")]


async def test_form_shows_live_availability_and_disables_full_profiles(monkeypatch):
    spawner = make_spawner(monkeypatch, allocations=taken_3g())
    form = await spawner._render_options_form()
    assert "1g.10gb: 9 of 9 free" in form
    assert "3g.40gb: 0 of 1 free - full" in form
    assert "Small &lt;GPU&gt;" in form and "<GPU>" not in form  # escaped
    big = form[form.index('value="mig-3g"') :].split(">", 1)[0]
    assert "disabled" in big
    small = form[form.index('value="mig-1g"') :].split(">", 1)[0]
    assert "checked" in small and "disabled" not in small
    assert 'value="gpu-1"' not in form  # the default policy allows no whole GPUs


async def test_form_on_a_host_without_gpus(monkeypatch):
    spawner = make_spawner(monkeypatch, inventory=Inventory(source="none"))
    form = await spawner._render_options_form()
    assert form.count(">unavailable: no NVIDIA GPUs on this host<") == 2
    cpu = form[form.index('value="cpu"') :].split(">", 1)[0]
    assert "disabled" not in cpu


async def test_form_when_docker_does_not_answer(monkeypatch):
    spawner = make_spawner(monkeypatch)

    async def down():
        raise web.HTTPError(503, "The Docker engine is not answering")

    monkeypatch.setattr(spawner, "snapshot", down)
    form = await spawner._render_options_form()
    assert "availability unknown" in form and 'value="mig-1g"' in form


async def test_only_a_permitted_profile_slug_is_accepted(monkeypatch):
    policy = parse_policy("defaults: {allowed_profiles: [cpu, mig-1g]}\n")
    spawner = make_spawner(monkeypatch, policy=policy)
    spawner.user_options = {"profile": "mig-1g"}
    assert (await spawner.resolve_options()).profile.slug == "mig-1g"
    spawner.user_options = {}
    assert (await spawner.resolve_options()).profile.slug == "mig-1g"  # the default
    for bad in ({"profile": "mig-3g"}, {"profile": "nope"}):
        spawner.user_options = bad
        with pytest.raises(web.HTTPError) as info:
            await spawner.resolve_options()
        assert info.value.status_code == 400
        assert "Profiles you may choose: cpu, mig-1g." in info.value.log_message
    spawner.user_options = {"profile": "cpu", "image": "evil:latest", "device_ids": ["0"]}
    with pytest.raises(web.HTTPError, match="device_ids, image cannot be chosen") as info:
        await spawner.resolve_options()
    assert info.value.status_code == 400


def test_options_from_form():
    spawner = GPUSpawner(user=SimpleNamespace(name="ann"))
    assert spawner.options_from_form({"profile": ["mig-1g"]}) == {"profile": "mig-1g"}
    assert spawner.options_from_form({}) == {}
    assert spawner.options_from_form(
        {"profile": ["mig-1g"], "profile-option-mig-1g--image": ["4.0"]}
    ) == {"profile": "mig-1g", "image": "4.0"}


async def test_allowed_images_are_offered_inside_each_profile(monkeypatch):
    images = {"Lab <4.0>": "lab/singleuser:4.0", "4": "lab/singleuser:4"}
    spawner = make_spawner(monkeypatch, image="lab/singleuser:4", allowed_images=images)
    form = await spawner._render_options_form()
    assert 'name="profile-option-mig-1g--image"' in form
    assert '<option value="4" selected>4</option>' in form  # the configured image
    assert "Lab &lt;4.0&gt;" in form and "Lab <4.0>" not in form
    spawner.user_options = {"profile": "cpu", "image": "Lab <4.0>"}
    chosen = await spawner.resolve_options()
    assert chosen.image == "lab/singleuser:4.0"
    # The last choice is shown again next time.
    again = await spawner._render_options_form()
    assert '<option value="Lab &lt;4.0&gt;" selected>' in again


def test_without_profiles_the_form_is_dockerspawners():
    user = SimpleNamespace(name="ann")
    one = GPUSpawner(user=user, allowed_images={"1.0": "x:1.0"})
    assert one.options_form == ""  # one image: nothing to choose, as DockerSpawner
    two = GPUSpawner(user=user, allowed_images={"1.0": "x:1.0", "1.1": "x:1.1"})
    assert two.options_form == DockerSpawner(allowed_images=two.allowed_images).options_form
    assert callable(GPUSpawner(user=user, profile_list=PROFILES).options_form)


async def test_transient_docker_failures_are_retried_without_blocking(monkeypatch):
    """Retries wait with asyncio.sleep: the hub's loop (and the Docker threads) stay free."""
    spawner = GPUSpawner(user=SimpleNamespace(name="ann"), docker_retries=3)
    calls, naps = [], []

    def flaky(self, method, *args, **kwargs):
        calls.append(method)
        if len(calls) < 3:
            raise requests.exceptions.ConnectionError("engine restarting")
        return {"ok": True}

    real_sleep = asyncio.sleep

    async def nap(seconds):
        naps.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(DockerSpawner, "_docker", flaky)
    monkeypatch.setattr("gpuspawner.spawner.asyncio.sleep", nap)
    assert await spawner.docker("inspect_container", "x") == {"ok": True}
    assert calls == ["inspect_container"] * 3 and len(naps) == 2
    calls.clear()
    with pytest.raises(requests.exceptions.ConnectionError):
        await spawner.docker("create_container", image="x")  # never retried: it may have worked
    assert calls == ["create_container"]


async def test_an_engine_answering_5xx_is_not_a_stopped_server(monkeypatch):
    """DockerSpawner reads a 500 from inspect as "the container is gone"; a poll must say
    "still running" (None) instead, so the hub keeps the server."""
    spawner = GPUSpawner(user=SimpleNamespace(name="ann"), docker_retries=0)
    response = SimpleNamespace(status_code=500, reason="Internal Server Error", url="x")

    def broken(self, method, *args, **kwargs):
        raise docker.errors.APIError("500 Server Error", response=response)

    monkeypatch.setattr(DockerSpawner, "_docker", broken)
    assert await spawner.poll() is None
    with pytest.raises(docker.errors.APIError):
        await spawner.get_object()

    def gone(self, method, *args, **kwargs):
        raise docker.errors.NotFound("no such container")

    monkeypatch.setattr(DockerSpawner, "_docker", gone)
    assert await spawner.poll() == 0  # Docker says it is gone: stopped


def test_dockers_port_refusals_name_the_port():
    from gpuspawner.spawnplan import taken_port

    assert taken_port(
        "500 Server Error: driver failed programming external connectivity on endpoint "
        "jupyter-ann (0a1b): Bind for 127.0.0.1:41000 failed: port is already allocated"
    ) == 41000
    assert taken_port(
        "driver failed programming external connectivity on endpoint x (y): Error starting "
        "userland proxy: listen tcp4 0.0.0.0:40007: bind: address already in use"
    ) == 40007
    assert taken_port("unknown device MIG-x") is None


def test_inventory_errors_leave_cpu_servers_working(monkeypatch, tmp_path):
    spawner = GPUSpawner(
        user=SimpleNamespace(name="ann"),
        inventory_source="file",
        topology_file=str(tmp_path / "missing.yaml"),
    )
    inv = spawner.read_inventory()
    assert inv.source == "none" and "cannot be read" in inv.problems[0]
    refusal = allocator.choose(
        inv, [], Policy.default().for_user("ann").limits, Request("ann", mig_profile="1g.10gb")
    )
    assert refusal.code == allocator.NO_GPUS and "cannot be read" in refusal.message


def test_docker_times_compare_in_time_order():
    from gpuspawner.spawnplan import nanotime

    a = nanotime("2026-11-24T13:50:18.12Z")
    b = nanotime("2026-11-24T13:50:18.123Z")
    c = nanotime("2026-11-24T13:50:18Z")
    assert c < a < b
    assert nanotime("2026-11-24T13:50:18.123456789Z") == "2026-11-24T13:50:18.123456789"


def test_each_spawn_starts_from_the_configured_image_and_limits(monkeypatch):
    """The spawner object lives on between a server's spawns: a profile's (or a saved
    copy's) image must not stick to the next spawn with another profile, and what a
    pre-spawn hook sets since is kept."""
    spawner = make_spawner(monkeypatch, image="lab/base:1", mem_limit="2G")
    spawner._apply_overrides({"image": "lab/cuda:12", "mem_limit": "32G"})
    assert (spawner.image, spawner.mem_limit) == ("lab/cuda:12", 32 * 1024**3)
    spawner._apply_overrides({})
    assert (spawner.image, spawner.mem_limit) == ("lab/base:1", 2 * 1024**3)
    spawner._apply_overrides({"image": "lab/cuda:12"})
    spawner.image = "lab/from-a-hook:3"  # a pre_spawn_hook's own choice
    spawner._apply_overrides({})
    assert spawner.image == "lab/from-a-hook:3"
