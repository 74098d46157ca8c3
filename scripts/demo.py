"""The demo: JupyterHub with gpuspawner on a simulated A100 x4 host, on this machine.

Started by ``bash scripts/demo.sh`` (which installs what it needs first). It runs a private
Docker engine whose NVIDIA device driver is the simulator's (tests/gpusim), builds the
single-user image offline, and starts JupyterHub with the repository's own
``jupyterhub_config.py``: the same file a real GPU host uses, pointed at the simulator by
environment variables. Ctrl-C stops everything it started; nothing is left running.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.engine import EnginePaths, PrivateEngine, end_process, terminate  # noqa: E402
from tests.gpusim import FAKE_DIR, Simulator  # noqa: E402
from tests.images import ensure_singleuser_image  # noqa: E402

DEMO_ROOT = Path(os.environ.get("GPUSPAWNER_DEMO_ROOT", "/var/lib/gpuspawner-demo"))
USERS = {"admin": "the lab admin", "ann": "a student", "bo": "a student", "cy": "a TA (staff)"}
POLICY = """\
# The demo's policy (docs/policy.md): students get one small slice; staff get more.
defaults:
  max_gpu_equivalents: 0.5
  allow_full_gpu: false
  gpu_hold_after_stop: 10m
  max_servers: 2
groups:
  staff:
    members: [admin, cy]
    max_gpu_equivalents: 2
    allow_full_gpu: true
    priority: 10
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]




def proxy_pid(pid_file: Path) -> int | None:
    """The proxy a hub that died while starting leaves behind, from its pid file."""
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def wait_for(url: str, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"demo: JupyterHub exited ({process.returncode}); see its log above")
        try:
            with opener.open(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"demo: JupyterHub did not answer at {url} within {timeout:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000, help="public port (127.0.0.1)")
    parser.add_argument("--topology", default="a100x4", help="simulated host (tests/gpusim)")
    parser.add_argument("--password", default="demo", help="password of every demo user")
    args = parser.parse_args()

    engine = PrivateEngine(EnginePaths.from_env({"GPUSPAWNER_TEST_ROOT": str(DEMO_ROOT)}))
    hub: subprocess.Popen | None = None
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    try:
        print("demo: starting a private Docker engine with the simulated NVIDIA host ...")
        engine.start()
        Simulator(engine.state_path, engine.hook_log).install(args.topology)
        print("demo: building the single-user image (offline; cached after the first run) ...")
        image = ensure_singleuser_image(engine.client)
        work = DEMO_ROOT / "hub"
        work.mkdir(parents=True, exist_ok=True)
        (work / "policy.yaml").write_text(POLICY)
        env = dict(os.environ)
        for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
            env.pop(proxy, None)
        env.update(engine.environment())
        env.update({
            "PYTHONPATH": os.pathsep.join(filter(None, [str(FAKE_DIR), env.get("PYTHONPATH")])),
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
            "GPUSPAWNER_IMAGE": image,
            "GPUSPAWNER_INVENTORY": "nvml",
            "GPUSPAWNER_POLICY": str(work / "policy.yaml"),
            "GPUSPAWNER_EVENTS": str(work / "events.jsonl"),
            "GPUSPAWNER_HUB_CONNECT_IP": engine.gateway,
            "GPUSPAWNER_BIND_URL": f"http://127.0.0.1:{args.port}",
            "GPUSPAWNER_ADMINS": "admin",
            "GPUSPAWNER_DEMO_USERS": ",".join(USERS),
            "GPUSPAWNER_DEMO_PASSWORD": args.password,
            "GPUSPAWNER_VOLUMES": "0",
            "GPUSPAWNER_CULL_IDLE": "3600",
        })
        jupyterhub = str(Path(sys.executable).parent / "jupyterhub")
        config = str(ROOT / "jupyterhub_config.py")
        # Free ports for the hub and the proxy's API, so the demo runs beside anything else.
        hub = subprocess.Popen(
            [jupyterhub, "-f", config, f"--JupyterHub.hub_port={free_port()}",
             f"--ConfigurableHTTPProxy.api_url=http://127.0.0.1:{free_port()}",
             f"--ConfigurableHTTPProxy.pid_file={work / 'proxy.pid'}"],
            cwd=work, env=env,
        )
        url = f"http://127.0.0.1:{args.port}"
        wait_for(f"{url}/hub/api/", hub)
        print(f"\ndemo: JupyterHub with gpuspawner is up at {url}")
        print(f"demo: users (password '{args.password}'): "
              + ", ".join(f"{name} ({what})" for name, what in USERS.items()))
        print(f"demo: admin page: {url}/services/gpu-allocations/ (log in as admin)")
        print("demo: Ctrl-C stops everything\n", flush=True)
        while not stopping and hub.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        print("\ndemo: stopping ...", flush=True)
        terminate(hub, 60)  # the hub stops its proxy and its servers
        end_process(proxy_pid(DEMO_ROOT / "hub" / "proxy.pid"), b"configurable-http-proxy")
        try:
            removed = engine.remove_containers()
            engine.stop()
            print(f"demo: removed {removed} container(s), stopped the engine; nothing left running")
        except Exception as exc:  # the engine never started
            print(f"demo: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
