"""The admin service ends at once when its Hub stops it (SIGINT, then SIGTERM), even where
SIGINT came in ignored: a hub started in the background of a script passes that on to its
services, and a service that ignores it keeps the stopping hub waiting and then outlives it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..hub import free_port


def _start(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "DOCKER_"))}
    env.update({
        "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{port}",
        "JUPYTERHUB_API_URL": f"http://127.0.0.1:{free_port()}/hub/api",  # no hub there
        "JUPYTERHUB_API_TOKEN": "t" * 32,
        "GPUSPAWNER_INVENTORY": "none",
        "GPUSPAWNER_ADMIN_DOCKER_EVENTS": "no",
        "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock",
    })
    log = tmp_path / "admin.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "gpuspawner.admin"], env=env, stdin=subprocess.DEVNULL,
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 30
    while "listening on" not in log.read_text(errors="replace"):
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    return process, log


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_admin_service_stops_at_once_when_the_hub_stops_it(tmp_path: Path, number: int):
    process, log = _start(tmp_path)
    try:
        started = time.monotonic()
        process.send_signal(number)
        code = process.wait(10)
        took = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code == 0, log.read_text()
    assert took < 5, (took, log.read_text())
    assert "stopping: the Hub asked" in log.read_text()
