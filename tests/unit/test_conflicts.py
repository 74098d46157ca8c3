"""Conflicts (two running holders of one device) and the admin's release rule, on hand-made
Snapshots: no engine, no NVML.

The real NVIDIA runtime lets two containers use one device, so ``Snapshot.conflicts`` is the
only thing that notices; every window on the world (``gpuspawner gpus``, the admin page,
``doctor``, ``/metrics``, the operation log) must show the same conflicts from that one rule.
The release rule (only this hub's containers, only exited or dead ones, checked again on a
fresh read) and the start time-out the tools read Docker with are checked here too.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from jupyterhub.spawner import Spawner
from prometheus_client import generate_latest
from traitlets.config import Config

from gpuspawner import admin, cli, events, health
from gpuspawner.admin import views
from gpuspawner.admin.app import Admin
from gpuspawner.admin.metrics import registry
from gpuspawner.admin.render import Page, Renderer
from gpuspawner.admin.settings import Settings, SettingsError
from gpuspawner.admin.world import World as AdminWorld
from gpuspawner.policy import Policy
from gpuspawner.records import CREATED, EXPIRED, HELD, RUNNING, Allocation
from gpuspawner.snapshot import CONFLICT, Snapshot
from gpuspawner.world import DEFAULT_START_TIMEOUT, ReleaseRefused, World, release_refusal

from .hosts import NOW, host

_ids = itertools.count()

#: Two A100s: GPU 0 cut into seven 1g.10gb slices, GPU 1 whole.
HOST = host(["1g.10gb"] * 7, None)
GPU0, GPU1 = HOST.gpus[0].uuid, HOST.gpus[1].uuid
MIG00, MIG01 = HOST.migs[0].uuid, HOST.migs[1].uuid
HUB = "lab"


def ours(uuids: tuple[str, ...] = (), state: str = RUNNING, *, status: str | None = None,
         hub: str = HUB, user: str | None = None, minutes_ago: int = 0) -> Allocation:
    """A container this hub's spawner made (or another hub's, with ``hub``)."""
    n = next(_ids)
    default = {RUNNING: "running", CREATED: "created"}.get(state, "exited")
    return Allocation(
        container_id=f"{n:064x}", container_name=f"jupyter-u{n}", managed=True, state=state,
        docker_status=status or default, user=user or f"u{n}", hub=hub,
        interface="jupyterhub", schema="1", uuids=uuids,
        created_at=NOW - timedelta(minutes=minutes_ago),
    )


def outside(uuids: tuple[str, ...] = (), state: str = RUNNING, count: int = 0,
            minutes_ago: int = 0) -> Allocation:
    """A ``docker run --gpus`` container without gpuspawner's labels."""
    n = next(_ids)
    return Allocation(
        container_id=f"{n:064x}", container_name=f"outside-{n}", managed=False, state=state,
        docker_status="running" if state == RUNNING else "exited", uuids=uuids,
        gpu_count=count, created_at=NOW - timedelta(minutes=minutes_ago),
    )


def snap(*allocations: Allocation) -> Snapshot:
    return Snapshot(HOST, tuple(allocations), Policy.default(), frozenset(), NOW)


def states(s: Snapshot) -> dict[str, str]:
    return {d.uuid: d.state for d in s.devices()}


# ------------------------------------------------------------------------------ the rule


def test_two_running_holders_of_one_slice_are_a_conflict_that_wins_over_every_state():
    first, second = ours((MIG00,), minutes_ago=5), outside((MIG00,), minutes_ago=1)
    world = snap(second, first)
    found = world.conflicts()
    assert list(found) == [MIG00]
    assert found[MIG00] == (first, second)  # oldest first, whoever made them
    view = next(d for d in world.devices() if d.uuid == MIG00)
    assert view.state == CONFLICT == "conflict"  # not "running", not "unmanaged"
    assert view.holders == (first.container_id, second.container_id)
    assert states(world)[MIG01] == "free"
    assert world.to_json()["conflicts"] == {MIG00: [first.container_id, second.container_id]}
    json.dumps(world.to_json(), default=str)


def test_a_whole_gpu_holder_and_a_slice_holder_conflict_on_that_slice_only():
    whole, slice_ = outside((GPU0,)), ours((MIG01,))
    world = snap(whole, slice_)
    assert list(world.conflicts()) == [MIG01]
    shown = states(world)
    assert shown[MIG01] == CONFLICT
    assert shown[MIG00] == "mig-parent"  # taken through its parent, by one container
    assert shown[GPU0] == "unmanaged"  # the GPU itself has one holder of its own
    # "--gpus all" (count=-1) takes every GPU, so it conflicts with GPU 1's holder too.
    everything = outside(count=-1)
    assert set(snap(everything, ours((GPU1,)), ours((MIG00,))).conflicts()) == {GPU1, MIG00}


def test_different_slices_of_one_gpu_and_stopped_or_starting_holders_are_no_conflict():
    assert snap(ours((MIG00,)), ours((MIG01,))).conflicts() == {}
    for other in (ours((MIG00,), HELD), ours((MIG00,), CREATED), ours((MIG00,), EXPIRED),
                  outside((MIG00,), EXPIRED)):
        world = snap(ours((MIG00,)), other)
        assert world.conflicts() == {}, other.state
        assert states(world)[MIG00] != CONFLICT
    assert snap().to_json()["conflicts"] == {}


def test_three_holders_are_one_conflict_naming_all_three():
    trio = [ours((GPU1,), minutes_ago=3), outside((GPU1,), minutes_ago=2),
            ours((GPU1,), hub="other", minutes_ago=1)]
    assert snap(*trio).conflicts() == {GPU1: tuple(trio)}


# ------------------------------------------------------------------------------ shown everywhere


def test_the_overview_block_is_red_names_both_holders_and_is_in_the_legend():
    first = ours((MIG01,), user="ann", minutes_ago=5)
    second = outside((MIG01,))
    model = views.overview(snap(first, second), HUB)
    block = next(b for b in model.cards[0].blocks if b.uuid == MIG01)
    assert block.state == views.CONFLICT == "conflict"
    assert block.label == f"ann, {second.container_name}"
    assert [h.container for h in block.holders] == [first.container_name, second.container_name]
    assert "two running holders" in block.title and "user ann" in block.title
    assert f"unmanaged container {second.container_name}" in block.title
    counts = {state: count for state, _, count in model.counts}
    assert counts[CONFLICT] == 1 and (CONFLICT, "two running holders") in views.STATES
    assert model.cards[0].used == 1  # a conflict is in use, once

    text = Renderer().overview(Page(prefix="/p/", hub_prefix="/hub/", user="admin",
                                    can_act=True, xsrf="x"), snap(first, second), HUB)
    assert f'data-state="conflict"\n                  data-slot="0.1" data-uuid="{MIG01}"' in text
    assert 'class="slice state-conflict"' in text and 'class="swatch state-conflict"' in text
    css = (Path(admin.__file__).parent / "static/admin.css").read_text()
    assert "--gs-conflict: #dc3545" in css and ".state-conflict { background: var(--gs-conflict)" \
        in css


def test_doctor_fails_naming_the_device_and_the_containers():
    first, second = ours((MIG00,)), outside((MIG00,))
    checks = {c.name: c for c in health.snapshot_checks(snap(first, second))}
    found = checks["conflicts"]
    assert found.status == health.FAIL and health.worst(list(checks.values())) == health.FAIL
    assert found.message == (
        f"1 device(s) held by two or more running containers: MIG slice 0.0 ({MIG00}) held by "
        f"{first.container_name}, {second.container_name}; stop all but one of them")
    whole = {c.name: c for c in health.snapshot_checks(snap(outside((GPU1,)), ours((GPU1,))))}
    assert f"GPU 1 ({GPU1})" in whole["conflicts"].message
    fine = {c.name: c for c in health.snapshot_checks(snap(ours((MIG00,)), ours((MIG01,))))}
    assert fine["conflicts"] == health.Check("conflicts", health.OK,
                                             "no device is held by two running containers")


def test_many_conflicts_are_named_ten_at_a_time():
    pairs = [a for mig in HOST.migs for a in (ours((mig.uuid,)), outside((mig.uuid,)))]
    pairs += [ours((GPU1,)), outside((GPU1,))]
    found = {c.name: c for c in health.snapshot_checks(snap(*pairs))}["conflicts"]
    assert found.message.startswith("8 device(s)") and "(and 0 more)" not in found.message
    many = host(*([["1g.10gb"] * 7] * 2))
    crowd = [a for mig in many.migs for a in (ours((mig.uuid,)), outside((mig.uuid,)))]
    message = health.conflicts_check(
        Snapshot(many, tuple(crowd), Policy.default(), frozenset(), NOW)).message
    assert message.startswith("14 device(s)") and "(and 4 more)" in message


def test_metrics_gauge_counts_conflicting_devices():
    world = snap(ours((MIG00,)), outside((MIG00,)), outside((GPU0,)), ours((GPU1,)))
    text = generate_latest(registry(lambda: world, None)).decode()
    # Slice 0.0 has three running holders (two of its own, one of its parent GPU); the other
    # slices of GPU 0 have only the whole-GPU holder, GPU 1 has one holder: one conflict.
    assert "gpuspawner_device_conflicts 1.0" in text
    assert "gpuspawner_device_conflicts 0.0" in generate_latest(
        registry(lambda: snap(ours((MIG00,))), None)).decode()


class FakeWorld:
    """What ``Admin`` asks of the world: a snapshot (here: whatever the test set)."""

    def __init__(self, current: Snapshot) -> None:
        self.current = current

    def snapshot(self, fresh: bool = False) -> Snapshot:
        return self.current


def test_the_admin_service_logs_each_conflict_once(tmp_path: Path):
    log = tmp_path / "events.jsonl"
    first, second = ours((MIG00,), user="ann", minutes_ago=2), outside((MIG00,))
    world = FakeWorld(snap(first, second))
    service = Admin(Settings(events=str(log), hub_id=HUB), world, hub=None)  # type: ignore[arg-type]

    def logged() -> list[dict[str, Any]]:
        return [e for e in events.tail(log, 100) if e["event"] == events.GPU_CONFLICT]

    for _ in range(3):  # pages refresh, metrics are scraped: one line
        service.take()
    generate_latest(service.registry)
    assert len(logged()) == 1
    entry = logged()[0]
    assert entry["uuid"] == MIG00 and entry["slot"] == "0.0"
    assert entry["containers"] == [first.container_name, second.container_name]
    assert entry["container_ids"] == [first.container_id, second.container_id]
    assert entry["users"] == ["ann", None] and entry["via"] == "admin-page"
    third = outside((GPU1,))
    world.current = snap(first, second, third, ours((GPU1,)))
    service.take()
    assert [e["uuid"] for e in logged()] == [MIG00, GPU1]  # only the new one
    world.current = snap(first)  # settled
    service.take()
    world.current = snap(first, second)  # and back: a new occurrence
    service.take()
    assert [e["uuid"] for e in logged()] == [MIG00, GPU1, MIG00]


class CountingWorld(FakeWorld):
    """A world that counts its reads and what ``Admin._readers`` asks of it."""

    def __init__(self, current: Snapshot) -> None:
        super().__init__(current)
        self.reads: list[bool] = []

    def snapshot(self, fresh: bool = False) -> Snapshot:
        self.reads.append(fresh)
        return self.current

    def policy(self) -> Policy:
        return Policy.default()

    def read_inventory(self) -> Any:
        return HOST


def test_the_read_of_every_host_reads_the_services_own_engine_through_its_own_snapshot(
    tmp_path: Path,
):
    """On a hub of several hosts the service's own engine is read once per refresh, by its
    own snapshot (which keeps GPU activity), never a second time for the read of every
    host: the own engine's socket here does not exist, so any other read would fail."""
    nowhere = f"unix://{tmp_path}/no-docker.sock"
    world = CountingWorld(snap(ours((MIG00,), user="ann")))
    service = Admin(Settings(events=str(tmp_path / "events.jsonl"), hub_id=HUB,
                             docker_host=nowhere, hosts=json.dumps({"gpu1": nowhere})),
                    world, hub=None)  # type: ignore[arg-type]
    found, rows = service._read_all_hosts()
    assert [(v.name, v.up) for v in found] == [("gpu1", True)], rows
    assert [a.user for a in found[0].snapshot.allocations] == ["ann"]
    assert world.reads == [False]
    service._read_all_hosts()  # within HOSTS_MAX_AGE: the same read
    assert world.reads == [False]
    service._read_all_hosts(fresh=True)  # an activity round: read now
    assert world.reads == [False, True]


def test_a_conflict_on_another_host_is_logged_once_with_its_host(tmp_path: Path):
    """The same problem seen on two hosts' reads is two problems (each host's own), each
    logged once and naming its host; the own engine's lines name none."""
    log = tmp_path / "events.jsonl"
    first, second = ours((MIG00,), user="ann", minutes_ago=2), outside((MIG00,))
    service = Admin(Settings(events=str(log), hub_id=HUB), FakeWorld(snap(first, second)),
                    hub=None)  # type: ignore[arg-type]
    for _ in range(3):
        service.note_problems(snap(first, second), "gpu2")
        service.take()
    logged = [e for e in events.tail(log, 100) if e["event"] == events.GPU_CONFLICT]
    assert sorted(e.get("host", "") for e in logged) == ["", "gpu2"], logged


def test_a_label_disagreeing_with_the_device_requests_is_shown_checked_and_logged_once(
    tmp_path: Path,
):
    sentence = f"labels name {MIG01} but Docker gives the container {MIG00}; it holds both"
    liar = replace(ours((MIG01, MIG00), user="ann"), hub="elsewhere", disagreement=sentence)
    log = tmp_path / "events.jsonl"
    world = FakeWorld(snap(liar))
    service = Admin(Settings(events=str(log), hub_id=HUB), world, hub=None)  # type: ignore[arg-type]
    for _ in range(3):
        service.take()
    logged = [e for e in events.tail(log, 100) if e["event"] == events.GPU_DISAGREE]
    assert len(logged) == 1 and logged[0]["reason"] == sentence
    assert logged[0]["container"] == liar.container_name
    overview = views.overview(world.current, HUB)
    assert any(sentence in p and liar.container_name in p for p in overview.problems)
    check = {c.name: c for c in health.snapshot_checks(world.current)}["device-requests"]
    assert check.status == health.WARN and sentence in check.message
    # Both devices are taken: what Docker gives and what the labels name.
    states = {d.uuid: d.state for d in world.current.devices()}
    assert states[MIG00] == states[MIG01] == RUNNING


# ------------------------------------------------------------------------------ release


def test_release_rule_only_this_hubs_exited_or_dead_containers():
    assert release_refusal(ours((MIG00,), EXPIRED), HUB) is None
    assert release_refusal(ours((MIG00,), HELD, status="dead"), HUB) is None
    running = release_refusal(ours((MIG00,), user="bo"), HUB)
    assert running == "the server bo/(default) is running; stop it first"
    for status in ("paused", "restarting"):
        assert "stop it first" in (release_refusal(ours((MIG00,), status=status), HUB) or "")
    assert "spawn in flight" in (release_refusal(ours((MIG00,), CREATED), HUB) or "")
    assert "belongs to hub other" in (release_refusal(ours((MIG00,), HELD, hub="other"), HUB)
                                      or "")
    assert "not made by gpuspawner" in (release_refusal(outside((MIG00,), EXPIRED), HUB) or "")
    hand_made = replace(ours((MIG00,), HELD), interface=None)  # labels without the interface
    assert release_refusal(hand_made, HUB) is not None
    assert release_refusal(ours((MIG00,), HELD), None) is not None  # no hub id: nothing is ours
    assert views.can_release(ours((MIG00,), HELD), HUB)
    assert not views.can_release(ours((MIG00,), CREATED), HUB)
    assert views.can_stop(ours((MIG00,)), HUB) and not views.can_stop(ours((MIG00,)), "other")
    assert not views.can_stop(outside((MIG00,)), HUB)


class FakeAPI:
    """The calls ``ledger.save`` and ``ledger.remove_stopped`` make, recorded in order."""

    def __init__(self, status: dict[str, str]) -> None:
        self.status = status
        self.removed: list[str] = []
        self.calls: list[tuple[str, str]] = []
        self.base_url = "unix://fake"

    def inspect_container(self, cid: str) -> dict[str, Any]:
        return {"State": {"Status": self.status[cid]}, "Name": f"/c-{cid[:6]}",
                "Config": {"Labels": {}}}

    def commit(self, cid: str, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(("commit", cid))
        return {"Id": "sha256:saved"}

    def remove_container(self, cid: str, v: bool = False) -> None:
        assert v is False  # volumes are kept
        self.removed.append(cid)
        self.calls.append(("remove", cid))


class ReadWorld(World):
    """A World whose reads of Docker return the snapshot the test set (and count them)."""

    def __init__(self, current: Snapshot, api: FakeAPI) -> None:
        super().__init__(client=api, hub_id=HUB)
        self.current = current
        self.reads: list[bool] = []

    def snapshot(self, fresh: bool = False) -> Snapshot:
        self.reads.append(fresh)
        return self.current


def test_world_release_refuses_running_created_and_other_hubs_on_a_fresh_read():
    held = ours((MIG00,), HELD, user="ann")
    running = ours((MIG01,), user="bo")
    starting = ours((GPU1,), CREATED, user="cy")
    foreign = ours((MIG00,), HELD, hub="other", user="dee")
    api = FakeAPI({a.container_id: a.docker_status for a in (held, running, starting, foreign)})
    world = ReadWorld(snap(held, running, starting, foreign), api)
    for refused, words in ((running, "stop it first"), (starting, "spawn in flight"),
                           (foreign, "belongs to hub other")):
        with pytest.raises(ReleaseRefused, match=words) as caught:
            world.release(refused.container_id)
        assert not caught.value.gone
    with pytest.raises(ReleaseRefused, match="removed already") as gone:
        world.release("f" * 64)
    assert gone.value.gone
    assert api.removed == [] and all(world.reads)  # every decision on a fresh read

    # The page showed it stopped; the fresh read says it was started since: refused.
    world.current = snap(replace(held, state=RUNNING, docker_status="running"))
    with pytest.raises(ReleaseRefused, match="stop it first"):
        world.release(held.container_id)
    world.current = snap(held)
    assert world.release(held.container_id) == held
    assert api.removed == [held.container_id]
    # Saved to an image first: nothing the user made is lost.
    assert api.calls == [("commit", held.container_id), ("remove", held.container_id)]


# ------------------------------------------------------------------------------ one world


def test_the_hubs_start_timeout_and_hub_id_reach_the_service_and_the_cli(
    monkeypatch: pytest.MonkeyPatch,
):
    assert DEFAULT_START_TIMEOUT == Spawner.class_traits()["start_timeout"].default_value
    c = Config()
    c.Spawner.start_timeout = 180  # as the shipped jupyterhub_config.py
    env = admin.service(c)["environment"]
    assert env["GPUSPAWNER_START_TIMEOUT"] == "180" and env["GPUSPAWNER_HUB_ID"] == "jupyterhub"
    c.GPUSpawner.start_timeout = 240  # the spawner's own section wins
    assert admin.service(c)["environment"]["GPUSPAWNER_START_TIMEOUT"] == "240"
    assert "GPUSPAWNER_START_TIMEOUT" not in admin.service(Config())["environment"]

    settings = Settings.from_env(env)
    assert settings.start_timeout == 180.0 and settings.hub_id == "jupyterhub"
    plain = Settings.from_env({})
    assert plain.start_timeout == 60.0 and plain.hub_id == admin.DEFAULT_HUB_ID == "jupyterhub"
    assert Settings.from_env({"GPUSPAWNER_START_TIMEOUT": "3m"}).start_timeout == 180.0
    with pytest.raises(SettingsError, match="GPUSPAWNER_START_TIMEOUT"):
        Settings.from_env({"GPUSPAWNER_START_TIMEOUT": "soon"})

    world = AdminWorld(settings, client=FakeAPI({}))
    assert world.ledger.start_timeout == 180.0 and world.hub_id == "jupyterhub"
    assert World(client=FakeAPI({})).ledger.start_timeout == 60.0

    monkeypatch.setenv("GPUSPAWNER_START_TIMEOUT", "180")
    monkeypatch.setenv("GPUSPAWNER_HUB_ID", "lab")
    args = cli.parser().parse_args(["status"])
    assert (args.start_timeout, args.hub_id) == (180.0, "lab")
    assert cli.parser().parse_args(["--start-timeout", "2m", "gpus"]).start_timeout == 120.0
    monkeypatch.delenv("GPUSPAWNER_START_TIMEOUT")
    monkeypatch.delenv("GPUSPAWNER_HUB_ID")
    args = cli.parser().parse_args(["status"])
    assert (args.start_timeout, args.hub_id) == (60.0, "jupyterhub")


def test_a_container_docker_is_removing_holds_nothing():
    """``remove=True`` is Docker's auto-removal, still running when the stop returns: such
    a container never runs again, so its devices are free at once, never a hold."""
    from datetime import datetime, timedelta, timezone

    from gpuspawner.ledger import classify
    from gpuspawner.records import EXPIRED, HELD

    now = datetime(2026, 11, 29, 9, 0, tzinfo=timezone.utc)
    facts = {"managed": True, "created_at": now - timedelta(minutes=5),
             "finished_at": now - timedelta(seconds=1), "hold_seconds": 600.0,
             "start_timeout": 120.0, "now": now}
    assert classify("exited", **facts) == HELD  # the rule for a stop: held
    assert classify("removing", **facts) == EXPIRED
