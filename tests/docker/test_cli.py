"""The ``gpuspawner`` command against the private engine with the simulated NVIDIA host.

An admin reaches for the command when something is wrong, often while the hub is down, so it
must read the same world the spawner decides on (Docker + inventory + policy), print it both
for people and for scripts (``--json``), and say through its exit code what kind of trouble
it found: 1 a failing check or an unknown user/profile, 2 a configuration error, 3 no engine.

Most tests call ``gpuspawner.cli.main`` in-process (fast, output through ``capsys``); one runs
the installed console script to prove the entry point and the environment variables work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import docker
import pytest

from gpuspawner import cli, inventory, labels
from gpuspawner.allocator import Choice, Request, choose
from gpuspawner.events import EventLog

from ..gpusim import BIN_DIR
from ..unit.hosts import limits

pytestmark = pytest.mark.docker

CONSOLE_SCRIPT = Path(sys.executable).parent / "gpuspawner"
#: a100x4: seven 1g.10gb slices on GPU 0, 3g+2g+1g+1g on GPU 1, 3g+3g on GPU 2, GPU 3 whole.
GPU3 = "GPU-f0e1d2c3-b4a5-4968-8776-655443322110"


def make(engine: Any, image: str, name: str, *, labelset: dict[str, str] | None = None,
         device_ids: list[str] | None = None, start: bool = True) -> str:
    """A container as ``docker run`` makes it: labels and an NVIDIA device request by UUID."""
    api = engine.client.api
    requests = [docker.types.DeviceRequest(driver="nvidia", device_ids=device_ids,
                                           capabilities=[["gpu"]])] if device_ids else None
    created = api.create_container(
        image, command=["sleep", "300"], name=name, labels=labelset or {},
        host_config=api.create_host_config(device_requests=requests),
    )
    if start:
        api.start(created["Id"])
    return created["Id"]


def spawn_like(engine: Any, image: str, gpusim: Any, user: str, mig_profile: str = "1g.10gb",
               start: bool = True) -> tuple[str, Choice]:
    """A container exactly as the spawner makes one: the allocator's choice in its labels."""
    inv = inventory.read("file", topology_file=gpusim.state_path)
    choice = choose(inv, [], limits(), Request(user, "", "mig-1g", mig_profile, 0))
    assert isinstance(choice, Choice), choice
    labelset = labels.encode(
        hub="test", user=user, server="", profile="mig-1g",
        created_at=datetime.now(timezone.utc), slots=choice.slots, uuids=choice.uuids,
        parent_uuids=choice.parent_uuids, gis=choice.gis, gpu_profile=choice.gpu_profile,
        equivalents=choice.equivalents, ports={"ssh": 40022},
    )
    cid = make(engine, image, f"jupyter-{user}", labelset=labelset,
               device_ids=list(choice.uuids), start=start)
    return cid, choice


Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def gpuspawner(engine: Any, gpusim: Any, capsys: pytest.CaptureFixture[str]) -> Run:
    """``gpuspawner(*args)`` -> (exit code, stdout, stderr), on the private engine and the
    simulated host's topology (a file inventory: it reads the simulator's state each time)."""

    def run(*args: str, docker_host: str | None = None, policy: str | None = None) -> tuple[
            int, str, str]:
        capsys.readouterr()
        argv = ["--docker-host", docker_host or engine.base_url, "--inventory", "file",
                "--topology", str(gpusim.state_path), "--ports", "40000-40099",
                "--hub-id", "test"]  # spawn_like's hub: its users' usage counts
        if policy:
            argv += ["--policy", policy]
        code = cli.main([*argv, *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def missing_socket(tmp_path: Path) -> str:
    return f"unix://{tmp_path / 'no-dockerd-here.sock'}"


# ------------------------------------------------------------------------------ the world


def test_status(gpuspawner: Run, engine: Any, gpusim: Any, base_image: str):
    spawn_like(engine, base_image, gpusim, "ann")
    make(engine, base_image, "outside", device_ids=[GPU3])
    code, out, _ = gpuspawner("status")
    assert code == 0
    assert out.splitlines()[:3] == [
        "inventory: file, 4 GPU(s), 13 MIG device(s)",
        "allocations: 2 holding devices, 1 unmanaged",
        "free: 1g.10gb 8/9, 2g.20gb 1/1, 3g.40gb 3/3, gpu 0/1",
    ]
    code, out, _ = gpuspawner("status", "--json")
    data = json.loads(out)
    assert code == 0
    assert data["holding"] == 2 and data["unmanaged"] == 1
    assert data["free"]["1g.10gb"] == {"free": 8, "total": 9}
    assert data["free"]["gpu"] == {"free": 0, "total": 1}
    assert data["inventory"]["source"] == "file" and len(data["inventory"]["migs"]) == 13


def test_status_reads_the_simulated_gpus_by_default(
    engine: Any, gpusim: Any, capsys: pytest.CaptureFixture[str]
):
    """``auto`` without a topology file: NVML, else the (fake) nvidia-smi on PATH, answers.
    (Here no real NVIDIA library loads, so it is normally nvidia-smi.)"""
    assert cli.main(["--docker-host", engine.base_url, "--inventory", "auto", "status"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first in ("inventory: nvidia-smi, 4 GPU(s), 13 MIG device(s)",
                     "inventory: nvml, 4 GPU(s), 13 MIG device(s)")


def test_gpus(gpuspawner: Run, engine: Any, gpusim: Any, base_image: str):
    cid, choice = spawn_like(engine, base_image, gpusim, "ann")
    outside = make(engine, base_image, "outside", device_ids=[GPU3])
    code, out, _ = gpuspawner("gpus")
    assert code == 0
    rows = out.splitlines()
    assert rows[0].split() == ["slot", "kind", "profile", "uuid", "state", "memory",
                               "processes", "holder"]
    assert len(rows) == 2 + 4 + 13  # header, rule, 4 GPUs and 13 MIG devices
    mine = next(r for r in rows if choice.uuids[0] in r)
    # A topology file says nothing of activity: "n/a", never a made-up 0.
    assert mine.split()[0] == choice.slots[0]
    assert mine.split()[-4:] == ["running", "n/a", "n/a", "ann"]
    assert next(r for r in rows if GPU3 in r).split()[-4:] == [
        "unmanaged", "n/a", "n/a", "outside"]
    code, out, _ = gpuspawner("gpus", "--json")
    devices = {d["uuid"]: d for d in json.loads(out)}
    assert code == 0 and len(devices) == 17
    assert devices[choice.uuids[0]]["holders"] == [cid]
    assert devices[choice.uuids[0]]["state"] == "running"
    assert devices[choice.uuids[0]]["slot"] == choice.slots[0]
    assert devices[choice.parent_uuids[0]]["state"] == "mig-parent"  # not whole any more
    assert devices[GPU3]["holders"] == [outside] and devices[GPU3]["state"] == "unmanaged"
    assert sum(d["state"] == "free" for d in devices.values()) == 17 - 3


def test_gpus_shows_memory_and_processes_as_nvml_reports_them(
    engine: Any, gpusim: Any, base_image: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
):
    """Through NVML: memory in use of total and the compute processes of each device; a
    zombie on a slice no container holds shows as busy."""
    monkeypatch.setattr(inventory, "_load_nvml", lambda: gpusim.nvml())
    state = gpusim.state()
    slice_ = state["gpus"][0]["mig_devices"][1]
    gpusim.start_process(slice_["uuid"], 3072)
    gpusim.start_process(slice_["uuid"], 1024)
    argv = ["--docker-host", engine.base_url, "--inventory", "nvml", "gpus"]
    capsys.readouterr()
    assert cli.main(argv) == 0
    row = next(r for r in capsys.readouterr().out.splitlines() if slice_["uuid"] in r)
    assert row.split()[-4:] == ["busy", "4.0/9.5", "GiB", "2"], row
    assert cli.main([*argv, "--json"]) == 0
    seen = {d["uuid"]: d for d in json.loads(capsys.readouterr().out)}[slice_["uuid"]]
    assert seen["memory_used_mib"] == 4096 and len(seen["processes"]) == 2


def test_allocations(gpuspawner: Run, engine: Any, gpusim: Any, base_image: str):
    cid, choice = spawn_like(engine, base_image, gpusim, "ann")
    make(engine, base_image, "outside", device_ids=[GPU3])
    make(engine, base_image, "no-gpu")  # holds nothing: not an allocation
    code, out, _ = gpuspawner("allocations")
    assert code == 0
    rows = out.splitlines()
    assert rows[0].split() == ["user", "server", "profile", "slots", "state", "kind", "ports",
                               "container"]
    assert len(rows) == 4
    ann = next(r for r in rows if r.endswith("jupyter-ann")).split()
    assert ann == ["ann", "-", "mig-1g", choice.slots[0], "running", "managed", "ssh=40022",
                   "jupyter-ann"]
    assert next(r for r in rows if r.endswith("outside")).split()[4:6] == [
        "running", "unmanaged"]
    code, out, _ = gpuspawner("allocations", "--json")
    found = {a["container_name"]: a for a in json.loads(out)}
    assert code == 0 and set(found) == {"jupyter-ann", "outside"}
    ann_json = found["jupyter-ann"]
    assert ann_json["container_id"] == cid and ann_json["managed"] is True
    assert ann_json["user"] == "ann" and ann_json["hub"] == "test"
    assert ann_json["uuids"] == list(choice.uuids) and ann_json["slots"] == list(choice.slots)
    assert ann_json["parent_uuids"] == list(choice.parent_uuids)
    assert ann_json["gpu_profile"] == "1g.10gb" and ann_json["equivalents"] == 0.1429
    assert ann_json["ports"] == [["ssh", 40022]] and ann_json["label_problems"] == []
    assert found["outside"]["managed"] is False and found["outside"]["uuids"] == [GPU3]


def test_allocations_count_holds_with_the_policy(
    gpuspawner: Run, engine: Any, gpusim: Any, base_image: str, tmp_path: Path
):
    cid, _ = spawn_like(engine, base_image, gpusim, "ann")
    engine.client.api.stop(cid, timeout=0)
    hold = tmp_path / "policy.yaml"
    hold.write_text("defaults:\n  gpu_hold_after_stop: 1h\n")
    code, out, _ = gpuspawner("allocations", "--json", policy=str(hold))
    assert code == 0 and json.loads(out)[0]["state"] == "held"
    code, out, _ = gpuspawner("allocations", "--json")  # built-in policy: no hold
    assert code == 0 and json.loads(out)[0]["state"] == "expired"
    code, out, _ = gpuspawner("available", "--json", "--profile", "1g.10gb")
    assert json.loads(out) == {"1g.10gb": {"free": 9, "total": 9}}


def test_available(gpuspawner: Run, engine: Any, gpusim: Any, base_image: str):
    spawn_like(engine, base_image, gpusim, "ann")
    spawn_like(engine, base_image, gpusim, "bo", mig_profile="3g.40gb")
    code, out, _ = gpuspawner("available")
    assert code == 0
    rows = [r.split() for r in out.splitlines()]
    assert rows[0] == ["profile", "free", "total"]
    assert rows[2:] == [["1g.10gb", "8", "9"], ["2g.20gb", "1", "1"], ["3g.40gb", "2", "3"],
                        ["gpu", "1", "1"]]
    code, out, _ = gpuspawner("available", "--json")
    assert code == 0 and json.loads(out) == {
        "1g.10gb": {"free": 8, "total": 9}, "2g.20gb": {"free": 1, "total": 1},
        "3g.40gb": {"free": 2, "total": 3}, "gpu": {"free": 1, "total": 1}}
    code, out, _ = gpuspawner("available", "--profile", "3g.40gb")
    assert code == 0 and [r.split() for r in out.splitlines()][2:] == [["3g.40gb", "2", "3"]]
    code, out, _ = gpuspawner("available", "--profile", "gpu", "--json")
    assert code == 0 and json.loads(out) == {"gpu": {"free": 1, "total": 1}}


def test_available_of_a_profile_the_host_lacks(gpuspawner: Run):
    code, out, err = gpuspawner("available", "--profile", "7g.80gb")
    assert code == 1 and out == ""
    assert err.strip() == "no 7g.80gb devices on this host (have: 1g.10gb, 2g.20gb, 3g.40gb, gpu)"


def test_user(gpuspawner: Run, engine: Any, gpusim: Any, base_image: str, tmp_path: Path):
    cid, choice = spawn_like(engine, base_image, gpusim, "ann")
    code, out, _ = gpuspawner("user", "ann")
    assert code == 0
    assert out.splitlines() == [
        "ann: 0.1429 of 1.0 GPU-equivalents (policy: defaults)",
        f"  (default): mig-1g {choice.slots[0]} running jupyter-ann",
    ]
    staff = tmp_path / "policy.yaml"
    staff.write_text("groups:\n  staff:\n    members: [ann]\n    max_gpu_equivalents: null\n")
    code, out, _ = gpuspawner("user", "ann", "--json", policy=str(staff))
    data = json.loads(out)
    assert code == 0
    assert data["user"] == "ann" and data["equivalents"] == 0.1429
    assert data["limits"]["max_gpu_equivalents"] is None
    assert data["policy_sources"] == ["defaults", "group staff"]
    assert [a["container_id"] for a in data["allocations"]] == [cid]
    code, out, _ = gpuspawner("user", "ann", policy=str(staff))
    assert out.startswith("ann: 0.1429 of unlimited GPU-equivalents (policy: defaults, group ")


def test_unknown_user_exits_1(gpuspawner: Run, engine: Any, gpusim: Any, base_image: str):
    spawn_like(engine, base_image, gpusim, "ann")
    code, out, _ = gpuspawner("user", "nobody")
    assert code == 1
    assert out.strip() == "nobody: 0.0 of 1.0 GPU-equivalents (policy: defaults)"
    code, out, _ = gpuspawner("user", "nobody", "--json")
    assert code == 1 and json.loads(out)["allocations"] == []


# ------------------------------------------------------------------------------ doctor


def test_doctor_on_a_healthy_host(gpuspawner: Run, engine: Any, gpusim: Any, base_image: str):
    spawn_like(engine, base_image, gpusim, "ann")
    code, out, _ = gpuspawner("doctor")
    assert code == 0
    assert out.splitlines()[0].startswith("[ok  ] docker: Docker ")
    assert "[ok  ] missing-uuids: every labelled device exists" in out
    assert "FAIL" not in out
    code, out, _ = gpuspawner("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(out)}
    assert code == 0
    assert list(checks) == ["docker", "nvidia-runtime", "nvml", "mig-pending", "missing-uuids",
                            "unmanaged", "conflicts", "busy", "ports"]
    assert {c["status"] for c in checks.values()} == {"ok"}
    # The label's promised ssh port is reserved in the range while ann holds her slot.
    assert checks["ports"]["message"] == "99 of 100 ports free in 40000-40099"


def test_doctor_checks_every_gpu_image_of_the_hubs_profiles(
    gpuspawner: Run, engine: Any, gpusim: Any, base_image: str, tmp_path: Path
):
    """``doctor --config jupyterhub_config.py``: the image of each GPU profile and of each
    listed image choice is checked against the simulated driver's CUDA (12.4 here); the one
    that needs 12.9 is named, the one that fits is fine, a CPU profile's image is not asked."""
    from ..images import ensure_env_image

    fits = ensure_env_image(engine.client, base_image, {"NVIDIA_REQUIRE_CUDA": "cuda>=12.0"})
    newer = ensure_env_image(engine.client, base_image, {"NVIDIA_REQUIRE_CUDA": "cuda>=12.9"})
    config = tmp_path / "jupyterhub_config.py"
    config.write_text(f"""c = get_config()  # noqa
c.GPUSpawner.image = {base_image!r}
c.GPUSpawner.profile_list = [
    {{"display_name": "CPU", "slug": "cpu", "overrides": {{"image": {newer!r}}}}},
    {{"display_name": "GPU", "slug": "gpu", "gpu": {{"mig_profile": "1g.10gb"}},
     "profile_options": {{"image": {{"choices": {{
        "a": {{"display_name": "A", "overrides": {{"image": {fits!r}}}}},
        "b": {{"display_name": "B", "overrides": {{"image": {newer!r}}}}}}}}}}}}},
]
""")
    code, out, _ = gpuspawner("doctor", "--config", str(config), "--json")
    checks = {c["name"]: c for c in json.loads(out)}
    assert checks["cuda-images"]["status"] == "warn", checks["cuda-images"]
    message = checks["cuda-images"]["message"]
    assert newer in message and "12.9" in message, message
    code, _, err = gpuspawner("doctor", "--config", str(tmp_path / "nowhere.py"))
    assert code == 2 and "no such hub configuration file" in err
    only_cpu = tmp_path / "cpu_config.py"
    only_cpu.write_text(f"c = get_config()  # noqa\nc.GPUSpawner.image = {newer!r}\n")
    assert cli.hub_images(str(only_cpu)) == []
    assert cli.hub_images(str(config)) == [fits, newer]


def test_doctor_warnings_do_not_fail(gpuspawner: Run, engine: Any, gpusim: Any,
                                     base_image: str):
    make(engine, base_image, "outside", device_ids=[GPU3])
    code, out, _ = gpuspawner("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(out)}
    assert code == 0
    assert checks["unmanaged"]["status"] == "warn" and "outside" in checks["unmanaged"]["message"]


def test_doctor_fails_when_a_running_server_lost_its_device(
    gpuspawner: Run, engine: Any, gpusim: Any, base_image: str
):
    _, choice = spawn_like(engine, base_image, gpusim, "ann")
    gpusim.reboot(seed=7)  # MIG devices come back with new UUIDs; ann's container still runs
    assert choice.uuids[0] not in gpusim.mig_uuids()
    code, out, _ = gpuspawner("doctor")
    assert code == 1
    assert "[FAIL] missing-uuids: 1 labelled device(s) no longer exist" in out
    assert "jupyter-ann" in out
    code, out, _ = gpuspawner("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(out)}
    assert code == 1
    assert checks["missing-uuids"]["status"] == "fail"
    assert "jupyter-ann" in checks["missing-uuids"]["message"]
    assert checks["docker"]["status"] == "ok"


def test_doctor_with_the_engine_down_exits_1(gpuspawner: Run, tmp_path: Path):
    code, out, err = gpuspawner("doctor", docker_host=missing_socket(tmp_path))
    assert code == 1
    assert out.startswith("[FAIL] docker: cannot reach the Docker engine")
    assert "DOCKER_HOST" in out and err == ""


def test_doctor_json_with_the_engine_down_is_json(gpuspawner: Run, tmp_path: Path):
    code, out, _ = gpuspawner("doctor", "--json", docker_host=missing_socket(tmp_path))
    assert code == 1
    checks = json.loads(out)
    assert checks[0]["name"] == "docker" and checks[0]["status"] == "fail"


@pytest.mark.parametrize(
    "command",
    [["status"], ["gpus"], ["allocations"], ["available"], ["available", "--profile", "gpu"],
     ["user", "ann"]],
)
@pytest.mark.parametrize("as_json", [False, True])
def test_other_commands_exit_3_when_the_engine_is_down(
    gpuspawner: Run, tmp_path: Path, command: list[str], as_json: bool
):
    args = [*command, "--json"] if as_json else command
    code, out, err = gpuspawner(*args, docker_host=missing_socket(tmp_path))
    assert code == 3 and out == ""
    assert err.startswith("gpuspawner: cannot reach the Docker engine")


# ------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize(
    "command", [["status"], ["gpus"], ["allocations"], ["available"], ["user", "ann"],
                ["doctor"]],
)
def test_a_malformed_policy_exits_2_naming_file_and_line(
    gpuspawner: Run, tmp_path: Path, command: list[str]
):
    bad = tmp_path / "gpu-policy.yaml"
    bad.write_text("# lab policy\ndefaults:\n  max_gpu_equivalents: 1\n  max_gpus: 2\n")
    code, out, err = gpuspawner(*command, "--json", policy=str(bad))
    assert code == 2 and out == ""
    message = err.strip()
    assert len(message.splitlines()) == 1  # one sentence, one line
    assert message.startswith(f"gpuspawner: {bad} line 4: unknown key 'max_gpus' in defaults")
    assert message.endswith("; fix the spelling or remove it")


def test_a_missing_policy_file_exits_2(gpuspawner: Run, tmp_path: Path):
    code, _, err = gpuspawner("status", policy=str(tmp_path / "nope.yaml"))
    assert code == 2 and "the policy file does not exist" in err


def test_a_broken_topology_exits_2(engine: Any, gpusim: Any, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]):
    broken = tmp_path / "topology.yaml"
    broken.write_text("gpus: [{index: 0}]\n")  # no uuid
    code = cli.main(["--docker-host", engine.base_url, "--inventory", "file", "--topology",
                     str(broken), "status"])
    assert code == 2 and str(broken) in capsys.readouterr().err


# ------------------------------------------------------------------------------ events


def _log(path: Path) -> list[dict[str, Any]]:
    log = EventLog(path)
    written = [
        log.write("gpu.allocate", user="ann", server="", devices=["0.0"]),
        log.write("container.start", user="ann", container="jupyter-ann"),
    ]
    with path.open("a", encoding="utf-8") as out:
        out.write("not json at all\n")
    written.append(log.write("gpu.refuse", user="bo", code="full", reason="all in use"))
    with path.open("a", encoding="utf-8") as out:
        out.write('{"time": "2026-11-24T09:30:05.000+00:00", "ev')  # a writer died here
    return written


def test_events(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "events.jsonl"
    written = _log(path)
    assert cli.main(["--events", str(path), "events"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 3
    assert rows[0].startswith(written[0]["time"] + " gpu.allocate ")
    assert rows[0].endswith("user=ann server= devices=['0.0']")
    assert rows[2].split()[1:] == ["gpu.refuse", "user=bo", "code=full", "reason=all", "in",
                                   "use"]
    assert cli.main(["--events", str(path), "events", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == written  # one JSON object per line
    assert cli.main(["--events", str(path), "events", "--json", "--limit", "2"]) == 0
    # The limit counts the last events that can be read; a torn line does not use it up.
    assert [json.loads(x)["event"] for x in capsys.readouterr().out.splitlines()] == [
        written[-2]["event"], "gpu.refuse"]


def test_events_from_the_environment_and_without_a_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("GPUSPAWNER_EVENTS", raising=False)
    assert cli.main(["events"]) == 2
    assert "no operation log" in capsys.readouterr().err
    path = tmp_path / "events.jsonl"
    monkeypatch.setenv("GPUSPAWNER_EVENTS", str(path))
    assert cli.main(["events", "--json"]) == 0  # not written yet: nothing, not an error
    assert capsys.readouterr().out == ""
    written = _log(path)
    assert cli.main(["events", "--json"]) == 0
    assert [json.loads(x) for x in capsys.readouterr().out.splitlines()] == written


# ------------------------------------------------------------------------------ the script


def test_the_console_script(engine: Any, gpusim: Any, base_image: str, tmp_path: Path):
    """The installed entry point, configured the way an admin's shell would configure it."""
    assert CONSOLE_SCRIPT.exists(), "pip install -e . makes .venv/bin/gpuspawner"
    cid, _ = spawn_like(engine, base_image, gpusim, "ann")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSPAWNER_")}
    env.update(DOCKER_HOST=engine.base_url, GPUSPAWNER_INVENTORY="file",
               GPUSPAWNER_TOPOLOGY=str(gpusim.state_path),
               PATH=f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}")

    def script(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(CONSOLE_SCRIPT), *args], env={**env, **extra},
                              capture_output=True, text=True, timeout=60, check=False)

    done = script("allocations", "--json")
    assert done.returncode == 0, done.stderr
    assert [a["container_id"] for a in json.loads(done.stdout)] == [cid]
    assert script("user", "nobody").returncode == 1
    down = missing_socket(tmp_path)
    assert script("doctor", DOCKER_HOST=down).returncode == 1
    assert script("gpus", DOCKER_HOST=down).returncode == 3
    bad = tmp_path / "policy.yaml"
    bad.write_text("defaults:\n  priority: 1.5\n")
    broken = script("status", GPUSPAWNER_POLICY=str(bad))
    assert broken.returncode == 2
    assert f"{bad} line 2: defaults.priority must be a whole number" in broken.stderr
    assert script("--help").returncode == 0


def test_wait_returns_when_the_mig_devices_are_made(gpuspawner: Run, gpusim: Any):
    """After a power-cycle: MIG mode survived, the devices are not made yet."""
    state = gpusim.state()
    for gpu in state["gpus"]:
        gpu["mig_devices"] = []
    gpusim.install(state)
    code, out, err = gpuspawner("wait", "--timeout", "3", "--mig", "1g.10gb")
    assert code == 1
    assert "The GPU host is still starting (waiting for MIG devices (1g.10gb))" in out
    assert "still waiting after 3 s: MIG devices (1g.10gb)" in err
    gpusim.install("a100x4")
    code, out, _ = gpuspawner("wait", "--timeout", "3", "--mig", "1g.10gb")
    assert (code, out.strip()) == (0, "the GPU host is ready")


def test_wait_for_docker_and_the_driver(gpuspawner: Run, gpusim: Any, tmp_path: Path):
    code, out, _ = gpuspawner("wait", "--timeout", "1", docker_host=missing_socket(tmp_path))
    assert code == 1 and "waiting for the Docker engine" in out
    gpusim.install({"driver_version": "550.90.07", "cuda_version": "12.4", "gpus": []})
    code, out, _ = gpuspawner("wait", "--timeout", "1", "--gpus")
    assert code == 1 and "waiting for the NVIDIA driver" in out
    code, out, _ = gpuspawner("wait", "--timeout", "1")  # a host without GPUs: nothing to wait
    assert code == 0
