"""The Docker event follower's bookkeeping (gpuspawner/admin/dockerevents.py), on a fake
engine: which containers are logged, what a line says, and that replays, reconciles and
restarts neither lose nor repeat an event. The same against a real engine:
tests/docker/test_docker_events.py."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from gpuspawner import events
from gpuspawner.admin import dockerevents as de
from gpuspawner.admin.dockerevents import DockerEvents, nanos, stamp
from gpuspawner.events import EventLog

T0 = 1_764_400_000_000_000_000  # ns since the epoch (2025-11-29)
ZERO = "0001-01-01T00:00:00Z"


def at(ns: int) -> str:
    """ns -> Docker's RFC 3339 with nanoseconds."""
    return de.iso(ns)


class FakeAPI:
    """What the follower asks of ``docker.APIClient``: info, containers, inspect, events."""

    def __init__(self) -> None:
        self.now = T0
        self.containers_: dict[str, dict[str, Any]] = {}
        self.history: list[dict[str, Any]] = []  # what the engine still has (its buffer)
        self.live: list[dict[str, Any]] = []  # what the next live stream delivers

    # ---- making the world

    def create(self, cid: str, name: str, devices: list[str] | None, labels=None) -> None:
        self.now += 1000
        requests = [{"Driver": "nvidia", "DeviceIDs": devices, "Capabilities": [["gpu"]]}]
        self.containers_[cid] = {
            "Id": cid, "Name": "/" + name, "Created": at(self.now),
            "Config": {"Labels": labels or {}, "Image": "img", "Env": []},
            "HostConfig": {"DeviceRequests": requests if devices else None},
            "State": {"Status": "created", "StartedAt": ZERO, "FinishedAt": ZERO,
                      "ExitCode": 0},
        }
        self._event(cid, "create")

    def start(self, cid: str) -> None:
        self.now += 1000
        state = self.containers_[cid]["State"]
        state.update(Status="running", StartedAt=at(self.now), ExitCode=0)
        self._event(cid, "start")

    def die(self, cid: str, code: int = 137, event: bool = True) -> None:
        self.now += 1000
        state = self.containers_[cid]["State"]
        state.update(Status="exited", FinishedAt=at(self.now), ExitCode=code)
        if event:
            self._event(cid, "die", exitCode=str(code))

    def destroy(self, cid: str) -> None:
        self.now += 1000
        gone = self.containers_.pop(cid)
        self._event(cid, "destroy", labels=gone["Config"]["Labels"])

    def _event(self, cid: str, action: str, labels=None, **attributes: str) -> None:
        self.now += 10  # the event comes just after the state changed
        name = self.containers_.get(cid, {}).get("Name", "/gone").lstrip("/")
        if labels is None:  # Docker puts the container's labels in every event
            labels = self.containers_.get(cid, {}).get("Config", {}).get("Labels")
        record = {"Type": "container", "Action": action, "id": cid, "timeNano": self.now,
                  "time": self.now // 1_000_000_000,
                  "Actor": {"ID": cid, "Attributes": {"name": name, **(labels or {}),
                                                      **attributes}}}
        self.history.append(record)
        self.live.append(record)

    # ---- the API

    def info(self) -> dict[str, Any]:
        self.now += 1000
        return {"SystemTime": at(self.now)}

    def containers(self, all: bool = False) -> list[dict[str, Any]]:
        return [{"Id": cid, "State": c["State"]["Status"]} for cid, c in self.containers_.items()]

    def inspect_container(self, cid: str) -> dict[str, Any]:
        if cid not in self.containers_:
            raise docker.errors.NotFound(f"no such container: {cid}")
        return self.containers_[cid]

    def events(self, since=None, until=None, filters=None, decode=False) -> Iterator[dict]:
        assert decode and filters == de.FILTERS
        low = nanos_of(since)
        if until is not None:
            high = nanos_of(until)
            return iter([e for e in self.history if low <= e["timeNano"] <= high])
        live, self.live = self.live, []
        return iter([e for e in live if e["timeNano"] >= low])


def nanos_of(text: str) -> int:
    seconds, _, fraction = text.partition(".")
    return int(seconds) * 1_000_000_000 + int(fraction.ljust(9, "0"))


def pump(follower: DockerEvents, api: FakeAPI) -> None:
    """The live stream delivers what happened since the last pump."""
    live, api.live = api.live, []
    for event in live:
        follower.handle(api, event)


def docker_lines(log: EventLog) -> list[tuple[str, str]]:
    return [(e["event"], e["container"]) for e in log.read(1000)
            if e["event"].startswith("docker.")]


@pytest.fixture
def api() -> FakeAPI:
    return FakeAPI()


@pytest.fixture
def log(tmp_path: Path) -> EventLog:
    return EventLog(tmp_path / "events.jsonl")


def test_times_parse_as_docker_writes_them():
    assert nanos("2025-11-29T07:06:40.123456789Z") == 1_764_400_000_123_456_789
    assert nanos("2025-11-29T08:06:40.123456789+01:00") == 1_764_400_000_123_456_789
    assert nanos("2025-11-29T07:06:40Z") == 1_764_400_000_000_000_000
    assert nanos(ZERO) == 0 and nanos("") == 0 and nanos("yesterday") == 0
    assert stamp(1_764_400_000_000_000_001) == "1764400000.000000001"
    assert nanos(at(T0 + 123)) == T0 + 123


def test_only_device_holders_are_logged_with_who_and_what(api: FakeAPI, log: EventLog):
    follower = DockerEvents(log, lambda: None)
    api.create("a" * 64, "jupyter-ann", ["MIG-1"], {"ds01.user": "ann", "ds01.server": ""})
    api.start("a" * 64)
    api.create("b" * 64, "plain", None)
    api.start("b" * 64)
    api.die("a" * 64, code=0)
    pump(follower, api)
    api.destroy("a" * 64)  # after this it cannot be inspected: attributed from memory
    api.destroy("b" * 64)
    pump(follower, api)
    lines = [e for e in log.read() if e["event"].startswith("docker.")]
    assert [e["event"] for e in lines] == [events.DOCKER_CREATE, events.DOCKER_START,
                                           events.DOCKER_DIE, events.DOCKER_DESTROY]
    first = lines[0]
    assert first["container"] == "jupyter-ann" and first["container_id"] == "a" * 64
    assert first["user"] == "ann" and first["server"] == "" and first["devices"] == ["MIG-1"]
    assert first["via"] == "docker-events" and isinstance(first["time_nano"], int)
    assert first["at"].endswith("Z")
    assert lines[2]["exit_code"] == 0 and "exit_code" not in lines[1]
    assert lines[3]["devices"] == ["MIG-1"] and lines[3]["user"] == "ann"
    assert follower.since == api.history[-1]["timeNano"]


def test_the_same_event_twice_is_written_once(api: FakeAPI, log: EventLog):
    follower = DockerEvents(log, lambda: None)
    api.create("c1", "gpu", ["GPU-1"])
    api.start("c1")
    for event in api.history + api.history:
        follower.handle(api, event)
    assert docker_lines(log) == [("docker.create", "gpu"), ("docker.start", "gpu")]


def test_a_container_gone_before_inspection_is_attributed_from_its_labels(
    api: FakeAPI, log: EventLog
):
    follower = DockerEvents(log, lambda: None)
    labels = {"ds01.user": "bo", "ds01.gpu.uuids": "MIG-7"}
    api.create("c2", "jupyter-bo", ["MIG-7"], labels)
    api.destroy("c2")
    for event in api.history:
        follower.handle(api, event)
    lines = [e for e in log.read() if e["event"].startswith("docker.")]
    assert [e["event"] for e in lines] == ["docker.create", "docker.destroy"]
    assert lines[0]["devices"] == ["MIG-7"] and lines[0]["devices_from"] == "labels"
    assert lines[0]["user"] == "bo"


def test_first_connection_learns_and_writes_nothing_old(api: FakeAPI, log: EventLog):
    api.create("old", "before-us", ["GPU-0"])
    api.start("old")
    api.live.clear()
    follower = DockerEvents(log, lambda: None)
    follower.follow(api)  # no since: reconcile quietly, then the (empty) live stream
    assert docker_lines(log) == []
    api.die("old")
    api.destroy("old")
    follower.follow(api)
    assert docker_lines(log) == [("docker.die", "before-us"), ("docker.destroy", "before-us")]


def test_a_dropped_stream_is_replayed_from_the_last_event_without_repeats(
    api: FakeAPI, log: EventLog
):
    follower = DockerEvents(log, lambda: None)
    api.live.clear()
    follower.follow(api)  # learns an empty engine
    api.create("g", "gpu", ["GPU-1"])
    api.start("g")
    first = api.live[:1]
    api.live = first  # the stream drops after the create
    follower.follow(api)
    api.die("g", code=3)
    api.live.clear()  # ... and nothing more comes live: only the replay has them
    follower.follow(api)
    assert docker_lines(log) == [("docker.create", "gpu"), ("docker.start", "gpu"),
                                 ("docker.die", "gpu")]
    assert [e.get("via") for e in log.read() if e["event"].startswith("docker.")] == [
        "docker-events"] * 3


def test_an_engine_restart_loses_its_events_and_the_reconcile_writes_them(
    api: FakeAPI, log: EventLog
):
    """Docker closes its API before it stops the containers: their die events reach no one,
    and the restarted engine has no memory of them. The state still says when and how."""
    follower = DockerEvents(log, lambda: None)
    api.live.clear()
    follower.follow(api)
    api.create("g", "gpu", ["GPU-1"], {"ds01.user": "ann"})
    api.start("g")
    api.create("h", "gone-gpu", ["GPU-2"])
    follower.follow(api)
    api.die("g", code=143, event=False)  # the engine stopping it
    api.containers_.pop("h")  # removed while the follower was away, event lost
    api.history.clear()  # a new engine: no buffered events
    follower.follow(api)
    lines = [e for e in log.read() if e["event"].startswith("docker.")]
    assert [(e["event"], e["container"]) for e in lines] == [
        ("docker.create", "gpu"), ("docker.start", "gpu"), ("docker.create", "gone-gpu"),
        ("docker.die", "gpu"), ("docker.destroy", "gone-gpu")]
    die = lines[3]
    assert die["via"] == "docker-reconcile" and die["exit_code"] == 143
    assert die["user"] == "ann" and "time_nano" not in die
    assert nanos(api.containers_["g"]["State"]["FinishedAt"]) == nanos(die["at"])
    # Done: a later reconnect says nothing again.
    follower.follow(api)
    assert len(docker_lines(log)) == 5


def test_a_transition_just_before_t_is_written_once(api: FakeAPI, log: EventLog):
    """Docker's state time of a die is just before the reconnect's T and its event just after:
    the reconcile writes it, and the live event of the same die is skipped."""
    follower = DockerEvents(log, lambda: None)
    api.live.clear()
    follower.follow(api)
    api.create("g", "gpu", ["GPU-1"])
    api.start("g")
    follower.follow(api)
    api.die("g", event=False)
    until = api.now + 500

    def info() -> dict[str, Any]:
        api.now = until + 1
        api._event("g", "die", exitCode="137")  # its event, just after T
        return {"SystemTime": at(until)}

    api.info = info  # type: ignore[method-assign]
    follower.follow(api)
    assert docker_lines(log) == [("docker.create", "gpu"), ("docker.start", "gpu"),
                                 ("docker.die", "gpu")]
    api.start("g")  # a new run is a new start
    follower.handle(api, api.live.pop())
    assert docker_lines(log)[-1] == ("docker.start", "gpu")


def test_a_restart_resumes_from_the_log(api: FakeAPI, log: EventLog):
    first = DockerEvents(log, lambda: None)
    api.live.clear()
    first.follow(api)
    api.create("g", "gpu", ["GPU-1"])
    api.start("g")
    first.follow(api)
    # The service stops; meanwhile the container dies and another is created.
    api.die("g", code=1)
    api.create("k", "gpu2", ["GPU-2"])
    api.live.clear()
    second = DockerEvents(log, lambda: None)
    second.resume_from_log()
    assert second.since == api.history[1]["timeNano"]
    second.follow(api)
    assert docker_lines(log) == [("docker.create", "gpu"), ("docker.start", "gpu"),
                                 ("docker.die", "gpu"), ("docker.create", "gpu2")]


def test_docker_down_is_one_warning_and_retries_until_it_answers(
    api: FakeAPI, log: EventLog, caplog: pytest.LogCaptureFixture
):
    attempts = []
    up = threading.Event()

    def connect() -> Any:
        attempts.append(time.monotonic())
        if len(attempts) < 4:
            raise docker.errors.DockerException("connection refused")
        up.set()
        client = type("Client", (), {"api": api, "close": lambda self: None})()
        return client

    api.live.clear()
    follower = DockerEvents(log, connect, backoff=(0.01, 0.05), resume=False)
    with caplog.at_level(logging.DEBUG, logger="gpuspawner.admin.docker-events"):
        follower.start()
        assert up.wait(10)
        deadline = time.monotonic() + 10
        while follower.failure is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        follower.stop()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "connection refused" in warnings[0].getMessage()
    assert "following Docker's events again" in caplog.text
    assert len(attempts) >= 4
