"""The README's demo command, run as a person would: start it, log in, spawn, look at the
admin page's JSON, press Ctrl-C, and check that nothing it started is left."""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
import requests

from ..hub import free_port

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[2]
#: A demo root of its own (its own engine, bridge and image cache), kept between runs.
DEMO_ROOT = Path("/var/lib/gpuspawner-demo-test")


def login(session: requests.Session, url: str, user: str, password: str) -> None:
    page = session.get(f"{url}/hub/login")
    xsrf = session.cookies.get("_xsrf") or re.search(r'name="_xsrf" value="([^"]+)"', page.text)[1]
    done = session.post(f"{url}/hub/login?next=/hub/home",
                        data={"username": user, "password": password, "_xsrf": xsrf})
    assert done.status_code == 200 and "/hub/login" not in done.url, done.url


def demo_processes(root: Path) -> list[str]:
    """Processes that belong to this demo run: its hub, proxy, engine, service."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = (proc / "environ").read_bytes()
        except OSError:
            continue
        if str(root) in cmd or str(root).encode() in env:
            if "pytest" not in cmd:
                found.append(f"{proc.name}: {cmd[:120]}")
    return found


class Output:
    """The demo's stdout through a pipe, as ``demo.sh | tee demo.log`` gives it, read by a
    thread until ``cut()`` closes the reading end (``tee`` ended by the same Ctrl-C)."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self.text = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.read_fd], [], [], 0.2)
            if ready:
                chunk = os.read(self.read_fd, 65536)
                if not chunk:
                    return
                self.text += chunk.decode(errors="replace")

    def cut(self) -> None:
        self._stop.set()
        self._thread.join(5)
        os.close(self.read_fd)


@contextlib.contextmanager
def running_demo(
    ports: str, *args: str, timeout: float = 400
) -> Iterator[tuple[dict[str, str], Output, str]]:
    """``scripts/demo.py --port P *args`` until it says "Ctrl-C stops everything"; yields its
    environment, its output and its URL; then Ctrl-C, as a person ends it."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["GPUSPAWNER_DEMO_ROOT"] = str(DEMO_ROOT)
    env["GPUSPAWNER_PORTS"] = ports  # clear of the test hubs' ranges and test_cli's
    out = Output()
    demo = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts/demo.py"), "--port", str(port), *args],
        stdout=out.write_fd, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
    )
    os.close(out.write_fd)
    try:
        deadline = time.monotonic() + timeout
        while "Ctrl-C stops everything" not in out.text:
            assert demo.poll() is None, out.text[-3000:]
            assert time.monotonic() < deadline, "demo did not come up"
            time.sleep(1)
        yield env, out, f"http://127.0.0.1:{port}"
    finally:
        out.cut()  # tee is gone: every line the demo writes from now on meets a closed pipe
        demo.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            demo.wait(timeout=120)
        except subprocess.TimeoutExpired:
            demo.kill()
            raise
    time.sleep(1)
    assert demo_processes(DEMO_ROOT) == []
    assert not (DEMO_ROOT / "run" / "docker.sock").exists()


def start_and_wait(admin: requests.Session, url: str, user: str, profile: str) -> None:
    """Start ``user``'s server as the admin, through the hub's API, until it is ready."""
    xsrf = {"X-XSRFToken": admin.cookies.get("_xsrf")}
    started = admin.post(f"{url}/hub/api/users/{user}/server", json={"profile": profile},
                         headers=xsrf)
    assert started.status_code in (201, 202), started.text
    for _ in range(240):
        model = admin.get(f"{url}/hub/api/users/{user}", headers=xsrf).json()
        if (model.get("servers") or {}).get("", {}).get("ready"):
            return
        time.sleep(0.5)
    raise AssertionError(f"{user}'s server did not become ready")


def test_demo_command_starts_spawns_shows_and_cleans_up(tmp_path: Path):
    with running_demo("45000-45099") as (env, out, url):
        text = out.text
        assert f"{url}/services/gpu-allocations/" in text

        admin = requests.Session()
        admin.trust_env = False
        login(admin, url, "admin", "demo")
        start_and_wait(admin, url, "ann", "mig-1g")

        # A newcomer lands in JupyterLab (docker/singleuser's image), and a terminal there
        # sees exactly the one MIG slice the spawner gave, through the toolkit's nvidia-smi.
        student = requests.Session()
        student.trust_env = False
        login(student, url, "ann", "demo")
        lab = student.get(f"{url}/user/ann/lab")
        assert lab.status_code == 200 and "JupyterLab" in lab.text, lab.text[:500]
        client = docker.DockerClient(base_url=f"unix://{DEMO_ROOT}/run/docker.sock")
        [ann] = client.containers.list(filters={"label": "ds01.user=ann"})
        assert ann.image.tags == ["gpuspawner/singleuser:demo"], ann.image.tags
        listed = ann.exec_run(["nvidia-smi", "-L"]).output.decode().splitlines()
        [given] = ann.attrs["HostConfig"]["DeviceRequests"][0]["DeviceIDs"]
        assert len(listed) == 2 and given in listed[1], listed

        page = admin.get(f"{url}/services/gpu-allocations/")  # OAuth with the hub, as a browser
        assert page.status_code == 200 and "ann" in page.text, page.text[:500]
        allocations = admin.get(f"{url}/services/gpu-allocations/api/allocations")
        assert allocations.status_code == 200, allocations.text[:500]
        rows = allocations.json()
        rows = rows.get("allocations", rows) if isinstance(rows, dict) else rows
        mine = [a for a in rows if a.get("user") == "ann"]
        assert mine and mine[0]["gpu_profile"] == "1g.10gb" and mine[0]["state"] == "running"

        # The demo's training command lights up ann's slice ...
        trained = subprocess.run([sys.executable, str(ROOT / "scripts/demo.py"), "train", "ann"],
                                 env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert trained.returncode == 0 and "training process" in trained.stdout, trained
        slice_uuid = mine[0]["uuids"][0]
        for _ in range(20):  # the page's snapshot is kept a second; NVML read again after
            gpus = admin.get(f"{url}/services/gpu-allocations/api/gpus").json()
            [seen] = [d for d in gpus if d["uuid"] == slice_uuid]
            if seen["processes"]:
                break
            time.sleep(0.5)
        assert len(seen["processes"]) == 1 and seen["memory_used_mib"] == 6000, seen
        # A real process in ann's container: the page says whose it is.
        [process] = seen["processes"]
        assert (process["user"], process["container"], process["holder"]) == (
            "ann", ann.name, True), process
        assert any(row[-1].startswith("/tmp/train.py") for row in ann.top()["Processes"])
        # ... and the gpuspawner command the demo printed sees the same, on its engine.
        line = text.split("simulated GPUs:\n", 1)[1].splitlines()[0].strip()
        cli = subprocess.run(["bash", "-c", line], cwd=ROOT, capture_output=True, text=True,
                             timeout=120, env={"PATH": os.environ["PATH"]})
        assert cli.returncode == 0, cli.stderr
        row = next(r for r in cli.stdout.splitlines() if slice_uuid in r)
        assert row.split()[-5:] == ["running", "5.9/9.5", "GiB", "1", "ann"], row
        # stop-training ends it: gone from NVML's list and from ann's container.
        stopped = subprocess.run(
            [sys.executable, str(ROOT / "scripts/demo.py"), "stop-training", "ann"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert stopped.returncode == 0 and "ended 1 training" in stopped.stdout, stopped
        deadline = time.monotonic() + 10
        while any(r[-1].startswith("/tmp/train.py") for r in ann.top()["Processes"]):
            assert time.monotonic() < deadline, ann.top()
            time.sleep(0.2)


def test_demo_with_two_hosts_spreads_servers_over_both_and_cleans_up(tmp_path: Path):
    """``scripts/demo.sh --hosts 2``: a second simulated host (H100 x2) with an engine of its
    own; a second student's server goes there, answers through the hub, and the
    ``gpuspawner hosts`` line the demo printed reads both hosts."""
    second_socket = DEMO_ROOT / "lib" / "remote-h100" / "run" / "docker.sock"
    with running_demo("45100-45199", "--hosts", "2", timeout=600) as (_env, out, url):
        text = out.text
        admin = requests.Session()
        admin.trust_env = False
        login(admin, url, "admin", "demo")
        for user in ("ann", "bo"):  # one after the other: spread sends bo to the empty host
            start_and_wait(admin, url, user, "mig-1g")
        first = docker.DockerClient(base_url=f"unix://{DEMO_ROOT}/run/docker.sock")
        second = docker.DockerClient(base_url=f"unix://{second_socket}")
        [ann] = first.containers.list(filters={"label": "ds01.user=ann"})
        [bo] = second.containers.list(filters={"label": "ds01.user=bo"})
        assert (ann.labels["ds01.host"], bo.labels["ds01.host"]) == ("gpu1", "gpu2")
        assert bo.attrs["NetworkSettings"]["Ports"]["8888/tcp"][0]["HostIp"] == "127.0.0.2"
        listed = bo.exec_run(["nvidia-smi", "-L"]).output.decode()
        assert "H100" in listed and bo.labels["ds01.gpu.uuids"] in listed, listed
        student = requests.Session()
        student.trust_env = False
        login(student, url, "bo", "demo")
        lab = student.get(f"{url}/user/bo/lab")
        assert lab.status_code == 200 and "JupyterLab" in lab.text, lab.text[:500]

        line = text.split("Both at once:\n", 1)[1].splitlines()[0].strip()
        cli = subprocess.run(["bash", "-c", line], cwd=ROOT, capture_output=True, text=True,
                             timeout=180, env={"PATH": os.environ["PATH"]})
        assert cli.returncode == 0, cli.stdout + cli.stderr
        rows = cli.stdout.splitlines()
        assert rows[0].startswith("gpu1 (") and "4 GPU(s)" in rows[0] and "1 holder(s)" in rows[0]
        assert rows[1].startswith("gpu2 (") and "2 GPU(s)" in rows[1] and "1 holder(s)" in rows[1]
    assert not second_socket.exists()
