"""The admin page's rendering from a hand-made Snapshot: 50 GPUs, 500 containers.

No hub, no engine: the view model and the templates are pure, so the colours, the escaping
and the size the page is built for are checked here in milliseconds. What a browser shows
is checked by tests/e2e/test_admin_browser.py.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import yaml
from traitlets.config import Config

from gpuspawner import admin, hosts
from gpuspawner.admin import views
from gpuspawner.admin.app import ROUTES, access_of
from gpuspawner.admin.hubapi import HubUser, parse_users
from gpuspawner.admin.render import Page, Renderer
from gpuspawner.admin.settings import Settings, SettingsError
from gpuspawner.policy import parse_policy
from gpuspawner.records import CREATED, EXPIRED, HELD, RUNNING, Allocation
from gpuspawner.snapshot import Snapshot

from .hosts import NOW, host

EVIL_USER = '<script>alert("u")</script>'
EVIL_SERVER = '"><img src=x onerror=alert(1)>'
EVIL_PROFILE = "</script><b>p</b>"
MISSING_UUID = "MIG-deadbeef-0000-0000-0000-000000000000"
ORPHAN_UUID = "MIG-0ddba11-0000-0000-0000-000000000000"
CYCLE = (RUNNING, HELD, EXPIRED, CREATED)


def big_snapshot(containers: int = 500) -> Snapshot:
    """50 GPUs (40 with seven 1g.10gb slices, 5 mixed, 5 whole) and ``containers`` containers:
    MIG holders in every state, unmanaged holders, labels naming vanished UUIDs, CPU servers,
    and one user whose name, server name and profile are HTML."""
    inventory = host(*([["1g.10gb"] * 7] * 40), *([["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"]]
                                                  * 5), *([None] * 5))
    policy = parse_policy("defaults: {gpu_hold_after_stop: 1h, max_gpu_equivalents: 1}\n")
    allocations: list[Allocation] = []

    def add(**fields: Any) -> None:
        n = len(allocations)
        base: dict[str, Any] = dict(
            container_id=f"{n:064x}", container_name=f"jupyter-c{n}", managed=True,
            state=RUNNING, docker_status="running", user=f"student{n % 300:03d}",
            server="", profile="mig-1g", hub="lab", interface="jupyterhub", schema="1",
            created_at=NOW - timedelta(hours=3),
            allocated_at=NOW - timedelta(hours=3), ports=(("ssh", 40000 + n),),
        )
        base.update(fields)
        allocations.append(Allocation(**base))

    for i, mig in enumerate(inventory.migs[:280]):
        if i % 5 == 4:
            continue  # leave some free
        state = CYCLE[i % len(CYCLE)]
        finished = None
        if state == HELD:
            finished = NOW - timedelta(minutes=10)
        elif state == EXPIRED:
            finished = NOW - timedelta(hours=2)
        add(state=state, docker_status={RUNNING: "running", CREATED: "created"}.get(state,
                                                                                   "exited"),
            uuids=(mig.uuid,), slots=(mig.slot,), parent_uuids=(mig.parent_uuid,),
            gis=(mig.gi,), gpu_profile=mig.profile, equivalents=mig.equivalents,
            finished_at=finished, user=f"student{i:03d}")
    evil_mig = inventory.migs[280]  # GPU 40's 3g.40gb
    add(user=EVIL_USER, server=EVIL_SERVER, profile=EVIL_PROFILE, uuids=(evil_mig.uuid,),
        slots=(evil_mig.slot,), parent_uuids=(evil_mig.parent_uuid,),
        gpu_profile=evil_mig.profile, equivalents=evil_mig.equivalents)
    for gpu in inventory.gpus[45:47]:
        add(managed=False, user=None, profile=None, container_name=f"rogue-{gpu.index}",
            uuids=(gpu.uuid,), ports=())
    add(uuids=(MISSING_UUID,), slots=("0.9",), parent_uuids=(inventory.gpus[0].uuid,),
        gpu_profile="1g.10gb", equivalents=0.1429, state=HELD, docker_status="exited",
        finished_at=NOW - timedelta(minutes=5), user="lost")
    add(uuids=(ORPHAN_UUID,), slots=("9.0",), parent_uuids=("GPU-gone",),
        gpu_profile="2g.20gb", equivalents=0.2857, user="orphan")
    whole = inventory.gpus[47]
    add(uuids=(whole.uuid,), slots=(whole.slot,), parent_uuids=(whole.uuid,),
        gpu_profile=whole.name, equivalents=1.0, profile="gpu-1", user="bigjob")
    while len(allocations) < containers:
        add(profile="cpu", ports=(), server=f"s{len(allocations)}")
    return Snapshot(inventory, tuple(allocations), policy, frozenset(), NOW, hub_id="lab")


class Slices(HTMLParser):
    """Collects the attributes of every device block and the page's embedded JSON."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks: list[dict[str, str]] = []
        self.totals: dict[str, tuple[int, int]] = {}
        self.tags: list[str] = []
        self.handlers: list[str] = []  # onerror=, onclick=...: never in this page
        self._json = False
        self.json_text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        self.tags.append(tag)
        self.handlers.extend(k for k in found if k.startswith("on"))
        if "slice" in found.get("class", "").split():
            self.blocks.append(found)
        if "total" in found.get("class", "").split() and "data-profile" in found:
            self.totals[found["data-profile"]] = (int(found["data-free"]),
                                                  int(found["data-total"]))
        self._json = tag == "script" and found.get("id") == "initial"

    def handle_data(self, data: str) -> None:
        if self._json:
            self.json_text += data

    def handle_endtag(self, tag: str) -> None:
        self._json = False


def page(can_act: bool = True) -> Page:
    return Page(prefix="/services/gpu-allocations/", hub_prefix="/hub/", user="admin",
                can_act=can_act, xsrf="2|abc|def")


@pytest.fixture(scope="module")
def snap() -> Snapshot:
    return big_snapshot()


@pytest.fixture(scope="module")
def rendered(snap: Snapshot) -> tuple[str, Slices, float]:
    renderer = Renderer()
    renderer.overview(page(), snap)  # templates compiled once, as in the service
    started = time.perf_counter()
    text = renderer.overview(page(), snap, "lab")
    took = time.perf_counter() - started
    parsed = Slices()
    parsed.feed(text)
    return text, parsed, took


def by_uuid(parsed: Slices) -> dict[str, dict[str, str]]:
    return {b["data-uuid"]: b for b in parsed.blocks}


def test_one_block_per_device_and_each_state_has_its_colour(snap, rendered):
    _, parsed, _ = rendered
    blocks = by_uuid(parsed)
    # 280 + 20 MIG slices, 5 whole GPUs with MIG off, 2 labelled UUIDs that are gone.
    assert len(parsed.blocks) == 280 + 20 + 5 + 2
    for block in parsed.blocks:
        assert block["data-state"] in dict(views.STATES)
        assert f"state-{block['data-state']}" in block["class"].split()
    migs = snap.inventory.migs
    assert blocks[migs[0].uuid]["data-state"] == "running"
    assert blocks[migs[1].uuid]["data-state"] == "held"
    assert blocks[migs[2].uuid]["data-state"] == "expired"
    assert blocks[migs[3].uuid]["data-state"] == "starting"
    assert blocks[migs[4].uuid]["data-state"] == "free"
    assert blocks[snap.inventory.gpus[45].uuid]["data-state"] == "unmanaged"
    assert blocks[snap.inventory.gpus[47].uuid]["data-state"] == "running"
    assert blocks[snap.inventory.gpus[48].uuid]["data-state"] == "free"
    assert blocks[MISSING_UUID]["data-state"] == "missing"
    assert blocks[ORPHAN_UUID]["data-state"] == "missing"


def test_tooltips_say_who_since_when_until_when_and_ports(snap, rendered):
    _, parsed, _ = rendered
    blocks = by_uuid(parsed)
    held = blocks[snap.inventory.migs[1].uuid]["title"]
    assert "user student001" in held and "held until 2026-11-24 12:50 UTC" in held
    assert "ports ssh=" in held and "profile mig-1g" in held and "since 2026-11-24 09:00" in held
    assert "hold ended 2026-11-24 11:00 UTC" in blocks[snap.inventory.migs[2].uuid]["title"]
    assert "unmanaged container rogue-45" in blocks[snap.inventory.gpus[45].uuid]["title"]
    assert "UUID gone" in blocks[MISSING_UUID]["title"]


def test_missing_uuid_sits_on_its_parent_gpu_card_or_a_card_of_its_own(snap):
    model = views.overview(snap)
    first = model.cards[0]
    assert first.index == 0 and first.blocks[-1].uuid == MISSING_UUID
    # 0.0 running, 0.1 held, 0.3 starting, 0.5 held; the gone one is not counted as a slot
    assert (first.used, first.total) == (4, 7)
    last = model.cards[-1]
    assert last.index is None and [b.uuid for b in last.blocks] == [ORPHAN_UUID]


def test_totals_per_profile_are_the_snapshots(snap, rendered):
    _, parsed, _ = rendered
    assert parsed.totals == snap.free_by_profile()
    assert set(parsed.totals) == {"1g.10gb", "2g.20gb", "3g.40gb", "gpu"}


def test_everything_from_users_and_labels_is_escaped(rendered):
    text, parsed, _ = rendered
    assert EVIL_USER not in text and EVIL_SERVER not in text and EVIL_PROFILE not in text
    assert "&lt;script&gt;alert(&#34;u&#34;)&lt;/script&gt;" in text
    assert parsed.tags.count("img") == 1 and not parsed.handlers  # the Hub's logo only
    assert parsed.tags.count("b") == len(parsed.totals)  # the profile names, no <b>p</b>
    # The only scripts are the page's own file and the JSON island, which stays inert.
    assert parsed.tags.count("script") == 2
    assert "</script" not in parsed.json_text.lower()
    model = json.loads(parsed.json_text)
    labels = {b["label"] for card in model["cards"] for b in card["blocks"]}
    assert f"{EVIL_USER}/{EVIL_SERVER}" in labels


def test_other_pages_escape_and_show_every_row(snap):
    renderer = Renderer()
    rows = views.allocation_rows(snap, {}, "lab")
    text = renderer.allocations(page(), rows)
    parsed = Slices()
    parsed.feed(text)
    assert text.count("<tr data-container=") == 500
    assert parsed.tags.count("img") == 1 and not parsed.handlers and EVIL_USER not in text
    # Actions: release for stopped managed containers, stop for running ones, nothing else.
    assert text.count('action="/services/gpu-allocations/api/release"') == sum(
        1 for r in rows if r["can_release"])
    assert text.count('action="/services/gpu-allocations/api/stop"') == sum(
        1 for r in rows if r["can_stop"])
    assert 'name="_xsrf" value="2|abc|def"' in text
    readonly = renderer.allocations(page(can_act=False), rows)
    assert "<form" not in readonly
    users = renderer.users(page(), views.user_rows([(None, snap)], {}, 3600), 3600)
    assert EVIL_USER not in users and "&lt;script&gt;" in users
    entries = [{"time": "2026-11-24T12:00:00+00:00", "event": "gpu.refuse", "user": EVIL_USER,
                "code": "full", "message": EVIL_SERVER}]
    events = renderer.events(page(), views.event_rows(entries), "/var/log/x")
    assert EVIL_USER not in events and EVIL_SERVER not in events and "code=full" in events


def test_rows_carry_the_cli_records_and_the_page_additions(snap):
    activity = {"student001": HubUser("student001", ("tas",), NOW - timedelta(hours=2),
                                      (("", NOW - timedelta(minutes=1)),))}
    rows = views.allocation_rows(snap, activity, "lab")
    assert len(rows) == len(snap.allocations)
    for row, allocation in zip(rows, snap.allocations, strict=True):
        assert {k: row[k] for k in allocation.to_json()} == allocation.to_json()
    held = next(r for r in rows if r["user"] == "student001")
    assert held["hold_until"] == "2026-11-24T12:50:00Z" and held["can_release"]
    assert held["last_activity"] == "2026-11-24T11:59:00Z"  # the server's, not the user's
    running = next(r for r in rows if r["user"] == "student000")
    assert running["can_stop"] and not running["can_release"]
    other_hub = replace(snap.allocations[1], hub="elsewhere")
    assert views.can_release(snap.allocations[1], "lab")
    # Another hub's container is never ours, and without a hub id nothing is.
    assert not views.can_release(other_hub, "lab") and not views.can_release(other_hub, None)
    assert not views.can_release(snap.allocations[1], None)


def test_users_table_flags_idle_holders_and_limits():
    snap = big_snapshot(320)
    hub = {"student000": HubUser("student000", (), NOW - timedelta(hours=3),
                                 (("", NOW - timedelta(hours=2)),)),
           "student005": HubUser("student005", (), NOW - timedelta(minutes=5),
                                 (("", NOW - timedelta(minutes=5)),))}
    rows = {r["user"]: r for r in views.user_rows([(None, snap)], hub, idle_after=3600, now=NOW)}
    assert rows["student000"]["idle"] and rows["student000"]["idle_for"] == "2h"
    assert not rows["student005"]["idle"]
    assert rows["student001"]["holding"] == 1 and not rows["student001"]["idle"]  # held 10 min
    assert rows["bigjob"]["equivalents"] == 1.0 and rows["bigjob"]["limit"] == 1.0
    assert rows["bigjob"]["share"] == 1.0


def test_render_50_gpus_500_containers_is_fast(rendered):
    _, _, took = rendered
    assert took < 1.5, f"overview took {took:.3f} s"


# --------------------------------------------------------------------------- access, config


@pytest.mark.parametrize(
    ("model", "view", "act", "metrics"),
    [
        ({"name": "root", "admin": True,
          "scopes": ["access:services!service=gpu-allocations"]}, True, True, True),
        ({"name": "ta", "admin": False,
          "scopes": ["access:services!service=gpu-allocations", admin.VIEW_SCOPE]},
         True, False, True),
        ({"name": "ann", "admin": False, "scopes": ["read:users:name!user=ann"]},
         False, False, False),
        ({"name": "root", "admin": True, "scopes": ["read:users:name!user=root"]},
         False, False, False),  # an admin's token without access to this service
        ({"name": "prometheus", "kind": "service", "admin": False,
          "scopes": ["read:metrics"]}, False, False, True),
        ({"name": "ta2", "admin": False,
          "scopes": ["access:services", f"{admin.VIEW_SCOPE}!user=ta2"]}, False, False, False),
    ],
)
def test_access_rule(model, view, act, metrics):
    scopes = {"access:services", "access:services!service=gpu-allocations"}
    found = access_of(model, scopes)
    assert (found.view, found.act, found.metrics) == (view, act, metrics)


def test_service_and_role_helpers_read_the_spawner_config():
    c = Config()
    c.GPUSpawner.policy_file = "/etc/jupyterhub/gpu-policy.yaml"
    c.GPUSpawner.events_file = "/var/log/gpuspawner.jsonl"
    c.GPUSpawner.port_range = (41000, 41099)
    c.GPUSpawner.hub_id = "lab"
    entry = admin.service(c, port=12345, environment={"EXTRA": "1"})
    assert entry["url"] == "http://127.0.0.1:12345" and entry["name"] == "gpu-allocations"
    assert entry["command"][1:] == ["-m", "gpuspawner.admin"]
    env = entry["environment"]
    assert env["GPUSPAWNER_POLICY"] == "/etc/jupyterhub/gpu-policy.yaml"
    assert env["GPUSPAWNER_EVENTS"] == "/var/log/gpuspawner.jsonl"
    assert env["GPUSPAWNER_PORTS"] == "41000-41099" and env["GPUSPAWNER_HUB_ID"] == "lab"
    assert env["EXTRA"] == "1" and entry["oauth_client_allowed_scopes"] == []
    assert "DockerSpawner" not in c and "inventory_source" not in c.GPUSpawner  # untouched
    assert "GPUSPAWNER_INVENTORY" not in env  # the service's default is the spawner's: auto
    assert admin.service(viewers=True)["oauth_client_allowed_scopes"] == [admin.VIEW_SCOPE]
    c.DockerSpawner.client_kwargs = {"base_url": "unix:///run/lab-docker.sock"}
    assert admin.service(c)["environment"]["DOCKER_HOST"] == "unix:///run/lab-docker.sock"
    role = admin.role()
    assert role["services"] == ["gpu-allocations"] and "admin:users" not in role["scopes"]
    assert "delete:servers" in role["scopes"] and "admin:servers" not in role["scopes"]
    viewer = admin.viewer_role(groups=["tas"])
    assert admin.VIEW_SCOPE in viewer["scopes"] and viewer["groups"] == ["tas"]
    assert admin.VIEW_SCOPE in admin.custom_scopes()


def test_settings_from_env_and_their_errors():
    settings = Settings.from_env({
        "JUPYTERHUB_SERVICE_NAME": "gpus", "JUPYTERHUB_SERVICE_PREFIX": "/lab/services/gpus/",
        "JUPYTERHUB_SERVICE_URL": "http://127.0.0.1:9999", "JUPYTERHUB_BASE_URL": "/lab/",
        "GPUSPAWNER_PORTS": "41000-41099", "GPUSPAWNER_ADMIN_IDLE": "30m",
    })
    assert (settings.bind_port, settings.hub_prefix, settings.idle_after) == (9999, "/lab/hub/",
                                                                              1800.0)
    assert settings.ports == (41000, 41099) and settings.prefix == "/lab/services/gpus/"
    with pytest.raises(SettingsError, match="GPUSPAWNER_PORTS"):
        Settings.from_env({"GPUSPAWNER_PORTS": "many"})
    with pytest.raises(SettingsError, match="GPUSPAWNER_INVENTORY"):
        Settings.from_env({"GPUSPAWNER_INVENTORY": "guess"})


def test_hub_user_models_are_read_defensively():
    users = parse_users([
        {"name": "ann", "groups": ["tas"], "last_activity": "2026-11-24T11:00:00.123456Z",
         "servers": {"": {"last_activity": "2026-11-24T11:30:00Z"}}},
        {"name": "bo"},  # fields the token may not read are absent
        {"kind": "user"},
    ])
    assert set(users) == {"ann", "bo"}
    assert users["ann"].activity("") == NOW - timedelta(minutes=30)
    assert users["ann"].activity("other") == NOW - timedelta(hours=1) + timedelta(
        microseconds=123456)
    assert users["bo"].activity() is None


def test_openapi_documents_every_api_route():
    spec = yaml.safe_load((Path(__file__).parents[2] / "docs/api/openapi.yaml").read_text())
    served = {"/" + path for path, _ in ROUTES if path.startswith("api/") or path == "metrics"}
    assert set(spec["paths"]) == served
    text = json.dumps(spec)
    for ref in set(re.findall(r'"#/components/(\w+)/(\w+)"', text)):
        assert ref[1] in spec["components"][ref[0]], ref


def test_a_gpu_nvml_fails_on_is_shown_unavailable_with_the_reason():
    """Its free slices are not free (never given out): grey, with NVML's reason, escaped."""
    inv = host(["1g.10gb"] * 2, None)
    gpu = inv.gpus[0]
    lost = replace(inv, gpus=(replace(gpu, unavailable="GPU is lost <nvml>"), *inv.gpus[1:]))
    snap = Snapshot(lost, (), parse_policy(""), frozenset(), NOW, "lab")
    text = Renderer().overview(page(), snap, "lab")
    parsed = Slices()
    parsed.feed(text)
    blocks = by_uuid(parsed)
    for mig in inv.migs:
        assert blocks[mig.uuid]["data-state"] == "unavailable"
        assert "unavailable: GPU is lost <nvml>" in blocks[mig.uuid]["title"]
    assert blocks[inv.gpus[1].uuid]["data-state"] == "free"
    assert "GPU is lost &lt;nvml&gt;" in text and "GPU is lost <nvml>" not in text


def test_a_busy_slice_and_a_slice_at_work_show_what_runs_on_them(snap):
    """Activity as the server renders it (escaped): a zombie slice is ``busy`` with the
    words and the pids in its tooltip; a held slice at work shows its memory bar and
    process count; a device NVML says nothing of shows neither."""
    from gpuspawner.records import GpuProcess

    running = next(a for a in snap.allocations if a.state == RUNNING and a.uuids
                   and a.uuids[0].startswith("MIG-"))
    taken = {u for a in snap.allocations for u in a.uuids}
    idle = next(m for m in snap.inventory.migs if m.uuid not in taken)
    work = {running.uuids[0]: (GpuProcess(31337, 6000, running.container_id),),
            idle.uuid: (GpuProcess(666, 2048),)}
    inv = replace(snap.inventory, migs=tuple(
        replace(m, processes=work[m.uuid], memory_used_mib=sum(p.used_mib for p in work[m.uuid]))
        if m.uuid in work else m for m in snap.inventory.migs))
    text = Renderer().overview(page(), replace(snap, inventory=inv), "lab")
    parsed = Slices()
    parsed.feed(text)
    blocks = by_uuid(parsed)
    assert blocks[idle.uuid]["data-state"] == "busy"
    assert "pid 666 · no container · 2.0 GiB" in blocks[idle.uuid]["title"]
    assert "busy: 1 process, 2.0 GiB in use, no running container holds it" in (
        blocks[idle.uuid]["title"])
    assert blocks[running.uuids[0]]["data-state"] == "running"
    at_work = re.search(
        rf'data-uuid="{running.uuids[0]}".*?</button>', text, re.S).group(0)  # type: ignore
    memory = next(m for m in inv.migs if m.uuid == running.uuids[0]).memory_mib
    assert f'class="mem-bar" style="width: {round(100 * 6000 / memory)}%"' in at_work
    assert f"5.9/{memory / 1024:.1f} GiB · 1 process" in at_work
    # The process is the holder's (its cgroup names the holder's container): its user shows.
    assert f"pid 31337 · {running.user} · 5.9 GiB" in blocks[running.uuids[0]]["title"]
    quiet = re.search(
        rf'data-uuid="{snap.inventory.gpus[48].uuid}".*?</button>', text, re.S).group(0)  # type: ignore
    assert "mem-bar" not in quiet and "activity" not in quiet


def test_a_held_slice_without_a_process_says_how_long_it_has_been_idle(snap):
    """The idle clock (``Snapshot.work_since``, kept by the admin service) shows on a held
    device that runs nothing, to the minute; a free device shows no idle time."""
    running = next(a for a in snap.allocations if a.state == RUNNING and a.uuids
                   and a.uuids[0].startswith("MIG-"))
    taken = {u for a in snap.allocations for u in a.uuids}
    free = next(m for m in snap.inventory.migs if m.uuid not in taken)
    quiet = {running.uuids[0], free.uuid}
    inv = replace(snap.inventory, migs=tuple(
        replace(m, memory_used_mib=0) if m.uuid in quiet else m for m in snap.inventory.migs))
    since = {uuid: snap.taken_at - timedelta(hours=2, minutes=5, seconds=17) for uuid in quiet}
    text = Renderer().overview(page(), replace(snap, inventory=inv, work_since=since), "lab")
    parsed = Slices()
    parsed.feed(text)
    blocks = by_uuid(parsed)
    assert "idle 2h5m" in blocks[running.uuids[0]]["title"]
    assert "idle" not in blocks[free.uuid]["title"]
    views = {v.uuid: v for v in replace(snap, inventory=inv, work_since=since).devices()}
    assert views[running.uuids[0]].idle_seconds == 2 * 3600 + 5 * 60 + 17


class Hosts(HTMLParser):
    """The hosts section: each host's attributes and its text."""

    def __init__(self) -> None:
        super().__init__()
        self.hosts: list[dict[str, str]] = []
        self.tags: list[str] = []
        self._in: dict[str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        self.tags.append(tag)
        if "host" in found.get("class", "").split():
            self._in = {**found, "text": ""}
            self.hosts.append(self._in)

    def handle_data(self, data: str) -> None:
        if self._in is not None:
            self._in["text"] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "li":
            self._in = None


def test_a_hub_of_several_hosts_shows_each_and_one_down_in_red_with_the_reason(snap):
    evil = '<img src=x onerror="alert(1)">'
    rows = [
        {"name": "gpu1", "url": "unix:///var/run/docker.sock", "up": True, "down": "",
         "gpus": 4, "migs": 13, "holders": ["jupyter-ann"],
         "free": {"1g.10gb": {"free": 8, "total": 9}, "gpu": {"free": 1, "total": 1}},
         "problems": []},
        {"name": "gpu3", "url": "tcp://gpu3:2376", "up": False,
         "down": f"host gpu3 (tcp://gpu3:2376): its Docker engine did not answer ({evil})"},
    ]
    text = Renderer().overview(page(), snap, "lab", rows)
    parsed = Hosts()
    parsed.feed(text)
    up, down = parsed.hosts
    assert (up["data-host"], up["data-up"], up["class"]) == ("gpu1", "true", "host host-up")
    assert "4 GPU(s), 13 MIG device(s), 1 holder(s)" in up["text"]
    assert "1g.10gb 8/9 free · gpu 1/1 free" in up["text"]
    assert (down["data-host"], down["data-up"], down["class"]) == ("gpu3", "false",
                                                                    "host host-down")
    assert "down: host gpu3 (tcp://gpu3:2376): its Docker engine did not answer" in down["text"]
    assert evil not in text and "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in text
    css = (Path(admin.__file__).parent / "static" / "admin.css").read_text()
    assert ".host-down {" in css and "#dc3545" in css.split(".host-down {", 1)[1].split("}")[0]
    # A one-host hub's page has no hosts section at all.
    assert 'id="hosts"' not in Renderer().overview(page(), snap, "lab")


def test_the_service_hands_the_hubs_hosts_on_as_json_and_reads_them_back():
    c = Config()
    c.GPUSpawner.hosts = {"gpu1": "unix:///var/run/docker.sock",
                          "gpu2": {"url": "ssh://hub@gpu2", "address": "10.0.0.2"}}
    c.DockerSpawner.image = "lab/notebook:1"
    env = admin.service(c)["environment"]
    settings = Settings.from_env({**env, "JUPYTERHUB_SERVICE_URL": "http://127.0.0.1:9000"})
    assert settings.probe_image == "lab/notebook:1"
    found = hosts.load_setting(settings.hosts or "")
    assert [(h.name, h.url, h.address) for h in found] == [
        ("gpu1", "unix:///var/run/docker.sock", None), ("gpu2", "ssh://hub@gpu2", "10.0.0.2")]
    assert "GPUSPAWNER_HOSTS" not in admin.service(Config())["environment"]


def test_allocations_and_users_of_several_hosts_name_each_host_and_sum_a_users_share(snap):
    """Two hosts, the same snapshot read on both (names and devices are per host): every
    container is a row naming its host, the release form sends that host, and a user's
    GPU-equivalents are the sum over the hosts, each server naming its host."""
    evil = '<b onmouseover="x()">gpu9</b>'
    parts = [("gpu1", snap), (evil, snap), ("gpu3", None)]  # gpu3 does not answer
    rows = views.allocation_rows_across(parts, {}, "lab")
    assert len(rows) == 2 * len(snap.allocations)
    assert [r["host"] for r in rows] == ["gpu1"] * len(snap.allocations) + [evil] * len(
        snap.allocations)
    one = views.allocation_rows(snap, {}, "lab")
    assert all("host" not in r for r in one)
    assert [{k: v for k, v in r.items() if k != "host"} for r in rows[:len(one)]] == one
    several = replace(page(), hosts=True)
    text = Renderer().allocations(several, rows)
    assert '<th data-key="host">Host</th>' in text
    assert text.count('<td class="host">gpu1</td>') == len(snap.allocations)
    assert evil not in text and "&lt;b onmouseover=&#34;x()&#34;&gt;gpu9&lt;/b&gt;" in text
    releasable = sum(1 for r in rows[:len(one)] if r["can_release"])
    assert text.count('<input type="hidden" name="host" value="gpu1">') == releasable
    assert "<th data-key=\"host\">" not in Renderer().allocations(page(), one)

    alone = {r["user"]: r for r in views.user_rows([(None, snap)], {}, 3600, now=NOW)}
    both = {r["user"]: r for r in views.user_rows(parts, {}, 3600, now=NOW)}
    assert set(both) == set(alone)
    for user, row in both.items():
        assert row["equivalents"] == pytest.approx(2 * alone[user]["equivalents"])
        assert row["holding"] == 2 * alone[user]["holding"]
        assert [s["host"] for s in row["servers"]] == (
            ["gpu1"] * len(alone[user]["servers"]) + [evil] * len(alone[user]["servers"]))
    users = Renderer().users(several, list(both.values()), 3600)
    assert " on gpu1</span>" in users and evil not in users
    assert views.user_rows([("gpu3", None)], {}, 3600) == []
