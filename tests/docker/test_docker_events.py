"""Everything that happens to a GPU container is in the operation log: the admin service's
Docker event follower (gpuspawner/admin/dockerevents.py) against the private engine, with
containers made and removed by hand (``docker run --gpus`` style, not by gpuspawner).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from gpuspawner import inventory
from gpuspawner.admin.dockerevents import DockerEvents
from gpuspawner.events import EventLog
from gpuspawner.ledger import connect

from .test_ledger import make

pytestmark = pytest.mark.docker


def docker_lines(log: EventLog) -> list[dict[str, Any]]:
    return [e for e in log.read(10_000) if str(e.get("event", "")).startswith("docker.")]


def wait_for(log: EventLog, done: Callable[[list[dict[str, Any]]], bool],
             timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        lines = docker_lines(log)
        if done(lines):
            return lines
        if time.monotonic() > deadline:
            raise AssertionError(f"the log did not get there in {timeout:.0f}s: "
                                 f"{[(e['event'], e.get('container')) for e in lines]}")
        time.sleep(0.1)


def of(lines: list[dict[str, Any]], name: str) -> list[str]:
    return [e["event"].removeprefix("docker.") for e in lines if e.get("container") == name]


@pytest.fixture
def follow(engine) -> Iterator[Callable[[EventLog], DockerEvents]]:
    """``follow(log)`` -> a started follower of the private engine; stopped at the end."""
    started: list[DockerEvents] = []

    def start(log: EventLog, resume: bool = True) -> DockerEvents:
        follower = DockerEvents(log, partial(connect, engine.base_url), backoff=(0.2, 2.0),
                                resume=resume)
        follower.start()
        started.append(follower)
        assert follower.following.wait(30), follower.failure
        return follower

    yield start
    for follower in started:
        thread = follower._thread
        follower.stop()
        assert thread is None or not thread.is_alive()  # stop() ends the stream's thread


@pytest.fixture
def gpus(gpusim) -> list[str]:
    inv = inventory.read("file", topology_file=gpusim.state_path)
    return [gpu.uuid for gpu in inv.gpus]


def test_a_gpu_container_made_and_removed_by_hand_is_logged_in_order(
    engine, gpus, base_image, follow, tmp_path: Path
):
    log = EventLog(tmp_path / "events.jsonl")
    follow(log, resume=False)
    api = engine.client.api
    cid = make(engine, base_image, "by-hand", device_ids=[gpus[3]],
               labelset={"ds01.user": "ann"})
    plain = make(engine, base_image, "no-gpu")
    every = make(engine, base_image, "all-gpus", count=-1)
    api.stop(cid, timeout=0)
    api.remove_container(cid)  # docker rm by hand
    api.remove_container(every, force=True)  # docker rm -f of a running one
    api.remove_container(plain, force=True)
    lines = wait_for(log, lambda ls: of(ls, "by-hand")[-1:] == ["destroy"]
                     and of(ls, "all-gpus")[-1:] == ["destroy"])
    assert of(lines, "by-hand") == ["create", "start", "die", "stop", "destroy"]
    assert of(lines, "all-gpus") == ["create", "start", "die", "destroy"]
    assert of(lines, "no-gpu") == []
    mine = [e for e in lines if e["container"] == "by-hand"]
    assert all(e["container_id"] == cid and e["user"] == "ann" and e["devices"] == [gpus[3]]
               and e["via"] == "docker-events" for e in mine)
    die = mine[2]
    assert die["exit_code"] == 137  # sleep ignores SIGTERM: killed
    assert [e["time_nano"] for e in mine] == sorted(e["time_nano"] for e in mine)
    assert [e for e in lines if e["container"] == "all-gpus"][0]["gpu_count"] == -1


def test_a_restarted_follower_loses_nothing_and_repeats_nothing(
    engine, gpus, base_image, follow, tmp_path: Path
):
    log = EventLog(tmp_path / "events.jsonl")
    first = follow(log, resume=False)
    api = engine.client.api
    one = make(engine, base_image, "first-gpu", device_ids=[gpus[0]])
    wait_for(log, lambda ls: of(ls, "first-gpu") == ["create", "start"])
    first.stop()
    # While no one follows: the container dies, another is made and started.
    api.stop(one, timeout=0)
    two = make(engine, base_image, "second-gpu", device_ids=[gpus[1]])
    follow(log)  # a new service process: resumes from the log
    api.remove_container(one)
    api.remove_container(two, force=True)
    lines = wait_for(log, lambda ls: of(ls, "first-gpu")[-1:] == ["destroy"]
                     and of(ls, "second-gpu")[-1:] == ["destroy"])
    assert of(lines, "first-gpu") == ["create", "start", "die", "stop", "destroy"]
    assert of(lines, "second-gpu") == ["create", "start", "die", "destroy"]
    # Docker still had every event: all came from the stream itself, none reconciled.
    assert {e["via"] for e in lines} == {"docker-events"}
    keys = [(e["container_id"], e["event"], e["time_nano"]) for e in lines]
    assert len(keys) == len(set(keys))


def test_an_engine_restart_loses_nothing_and_repeats_nothing(
    engine, gpus, base_image, follow, tmp_path: Path
):
    """The follower sees the stream drop, retries until the engine is back, and goes on:
    the die of the container the shutdown kills is written once (by the stream, when dockerd
    still sends it, or by the reconcile from the container's state when it does not)."""
    log = EventLog(tmp_path / "events.jsonl")
    follower = follow(log, resume=False)
    cid = make(engine, base_image, "through-restart", device_ids=[gpus[2]])
    wait_for(log, lambda ls: of(ls, "through-restart") == ["create", "start"])
    engine.stop()
    try:
        deadline = time.monotonic() + 30
        while follower.following.is_set() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not follower.following.is_set()
    finally:
        engine.start()
    assert follower.following.wait(60), follower.failure
    engine.client.api.remove_container(cid, force=True)
    lines = wait_for(log, lambda ls: of(ls, "through-restart")[-1:] == ["destroy"])
    seen = of(lines, "through-restart")
    assert seen[:3] == ["create", "start", "die"] and seen[-1] == "destroy", seen
    assert seen.count("die") == 1 and seen.count("stop") <= 1, seen
    die = next(e for e in lines if e["event"] == "docker.die")
    assert die["exit_code"] in (137, 143) and die["devices"] == [gpus[2]]


def test_events_the_restarted_engine_forgot_are_written_from_the_state(
    engine, gpus, base_image, follow, tmp_path: Path
):
    """The service is down while the engine restarts: the new dockerd has no memory of the
    die of the container its predecessor stopped. The next follower, resuming from the log,
    writes it from Docker's state (``via: docker-reconcile``, ``at``: Docker's FinishedAt)."""
    log = EventLog(tmp_path / "events.jsonl")
    first = follow(log, resume=False)
    cid = make(engine, base_image, "forgotten", device_ids=[gpus[1]])
    wait_for(log, lambda ls: of(ls, "forgotten") == ["create", "start"])
    first.stop()
    engine.stop()
    engine.start()
    follow(log)
    state = engine.client.api.inspect_container(cid)["State"]
    engine.client.api.remove_container(cid)
    lines = wait_for(log, lambda ls: of(ls, "forgotten")[-1:] == ["destroy"])
    assert of(lines, "forgotten") == ["create", "start", "die", "destroy"]
    die = next(e for e in lines if e["event"] == "docker.die")
    assert die["via"] == "docker-reconcile" and die["exit_code"] == state["ExitCode"]
    assert die["at"][:19] == state["FinishedAt"][:19] and die["devices"] == [gpus[1]]
    assert [e["via"] for e in lines if e["event"] == "docker.destroy"] == ["docker-events"]
