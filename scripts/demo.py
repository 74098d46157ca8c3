"""The demo: JupyterHub with gpuspawner on a simulated A100 x4 host, on this machine.

With ``--hosts 2``, a second simulated host (H100 x2) with a Docker engine of its own, reached
the way a hub reaches another GPU server (docs/scaling.md); new servers spread over both.

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

import docker

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.engine import (  # noqa: E402
    EnginePaths,
    PrivateEngine,
    alive,
    end_process,
    start_sleeper,
    terminate,
)
from tests.gpusim import FAKE_DIR, Simulator  # noqa: E402
from tests.images import load_builder  # noqa: E402

#: The demo's single-user image: docker/singleuser/Dockerfile (JupyterLab), built offline on
#: the local Debian base by docker/build_images.py, as ``scripts/build-images.sh --local``.
DEMO_IMAGE = "gpuspawner/singleuser:demo"
#: Where the second host's servers are published and reached (``--hosts 2``).
SECOND_ADDRESS = "127.0.0.2"
#: The name a simulated training run has in its container (``ps``, ``docker top``).
TRAINING = "/tmp/train.py"


def build_image(client: docker.DockerClient) -> str:
    """The JupyterLab image of docker/singleuser, built offline (cached after the first run)."""
    return str(load_builder().build_singleuser_local(client, tag=DEMO_IMAGE, log=say).name)

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


def say(text: str = "") -> None:
    """Print, even when the output pipe is gone (``demo.sh | tee demo.log`` and Ctrl-C ends
    ``tee`` first): the demo must still stop everything it started."""
    try:
        print(text, flush=True)
    except (BrokenPipeError, OSError):
        try:  # from now on, write nowhere instead of failing on every line
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass


def cli_environment(engine: PrivateEngine, work: Path) -> dict[str, str]:
    """What the ``gpuspawner`` command needs to see the demo's engine and simulated host."""
    return {
        "DOCKER_HOST": engine.base_url,
        "GPUSIM_STATE": str(engine.state_path),
        "PYTHONPATH": str(FAKE_DIR),
        "GPUSPAWNER_INVENTORY": "nvml",
        "GPUSPAWNER_POLICY": str(work / "policy.yaml"),
        "GPUSPAWNER_EVENTS": str(work / "events.jsonl"),
    }


def training(argv: list[str]) -> int:
    """``demo.py train USER [--mib N]`` / ``demo.py stop-training USER``: a simulated training
    process on the devices of USER's running server (or its end), so the admin page, NVML
    and ``nvidia-smi`` show it; as the demo's own engine and host see it."""
    parser = argparse.ArgumentParser(prog="demo.py train|stop-training")
    parser.add_argument("action", choices=["train", "stop-training"])
    parser.add_argument("user")
    parser.add_argument("--mib", type=int, default=6000, help="GPU memory it uses")
    args = parser.parse_args(argv)
    engine = PrivateEngine(EnginePaths.from_env({"GPUSPAWNER_TEST_ROOT": str(DEMO_ROOT)}))
    sim = Simulator(engine.state_path, engine.hook_log)
    try:  # the demo's running engine, from its socket (this process did not start it)
        client = docker.DockerClient(base_url=engine.base_url, version="auto")
        found = client.containers.list(filters={"label": f"ds01.user={args.user}"})
    except Exception as exc:
        print(f"demo: the demo's engine does not answer ({exc}); is the demo running?")
        return 3
    devices = [d for c in found for r in c.attrs["HostConfig"].get("DeviceRequests") or []
               for d in r.get("DeviceIDs") or []]
    if not devices:
        print(f"demo: {args.user} has no running GPU server; start one with a GPU profile")
        return 1
    state = sim.state()
    holder = next(c for c in found if c.attrs["HostConfig"].get("DeviceRequests"))
    if args.action == "train":
        # A real process in the user's container, which NVML lists by its host pid: the
        # admin page maps it back to the container and so to the user.
        pid = start_sleeper(client, holder.id, TRAINING)
        sim.start_process(devices[0], args.mib, pid=pid)
        print(f"demo: training process {pid} runs in {holder.name} on {args.user}'s "
              f"{devices[0]} ({args.mib} MiB); see the admin page, or 'nvidia-smi' in "
              "their terminal")
        return 0
    pids = {p["pid"] for g in state["gpus"] for d in [g, *g.get("mig_devices", [])]
            if d["uuid"] in devices for p in d.get("processes") or []}
    for pid in sorted(pids):
        sim.end_process(pid)
        end_process(pid, TRAINING.encode())  # the real process in the container, by host pid
    print(f"demo: ended {len(pids)} training process(es) of {args.user}")
    return 0


def started_by_this_demo(marker: bytes) -> list[int]:
    """Processes whose environment carries ``marker`` (a variable only the demo's hub was
    given, so every process it started inherits it): the hub, its proxy, its services."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def sweep(marker: bytes) -> int:
    """End whatever the demo's hub started and left running (a service, a proxy), when the
    hub itself could not stop them: SIGTERM, then SIGKILL after 5 s."""
    left = [pid for pid in started_by_this_demo(marker) if alive(pid)]
    for pid in left:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in left) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return len(left)


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
    if sys.argv[1:2] in (["train"], ["stop-training"]):
        return training(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000, help="public port (127.0.0.1)")
    parser.add_argument("--topology", default="a100x4", help="simulated host (tests/gpusim)")
    parser.add_argument("--password", default="demo", help="password of every demo user")
    parser.add_argument("--hosts", type=int, choices=(1, 2), default=1,
                        help="simulated GPU hosts: 2 adds an H100 x2 host with its own engine")
    args = parser.parse_args()

    paths = EnginePaths.from_env({"GPUSPAWNER_TEST_ROOT": str(DEMO_ROOT)})
    engine = PrivateEngine(paths)
    #: The second host's engine (``--hosts 2``): its servers are published on 127.0.0.2.
    second = PrivateEngine(paths.beside("remote-h100")) if args.hosts == 2 else None
    hub: subprocess.Popen | None = None
    stopping = False
    #: Only the hub's environment has it: what the final sweep looks for.
    marker = f"GPUSPAWNER_DEMO_RUN={os.getpid()}-{time.time_ns()}".encode()

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)  # the terminal closed: stop as for Ctrl-C
    # Ctrl-C stops the demo even where it came in ignored (started in the background of a
    # script, which passes SIGINT on ignored): else nothing could stop it but a kill.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        say("demo: starting a private Docker engine with the simulated NVIDIA host ...")
        engine.start()
        Simulator(engine.state_path, engine.hook_log).install(args.topology)
        say("demo: building the JupyterLab image of docker/singleuser (offline; cached after "
            "the first run) ...")
        image = build_image(engine.client)
        work = DEMO_ROOT / "hub"
        work.mkdir(parents=True, exist_ok=True)
        (work / "policy.yaml").write_text(POLICY)
        hosts_file = work / "hosts.yaml"
        hosts_file.unlink(missing_ok=True)
        if second is not None:
            say("demo: starting a second host: its own Docker engine, a simulated H100 x2 ...")
            second.start()
            Simulator(second.state_path, second.hook_log).install("h100x2")
            build_image(second.client)
            hosts_file.write_text(
                f"gpu1: {engine.base_url}\n"
                f"gpu2: {{url: {second.base_url}, address: {SECOND_ADDRESS}}}\n")
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
        if second is not None:
            env.update({"GPUSPAWNER_HOSTS": str(hosts_file), "GPUSPAWNER_STRATEGY": "spread"})
        env["GPUSPAWNER_DEMO_RUN"] = marker.decode().partition("=")[2]
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
        say(f"\ndemo: JupyterHub with gpuspawner is up at {url}")
        say(f"demo: users (password '{args.password}'): "
            + ", ".join(f"{name} ({what})" for name, what in USERS.items()))
        say(f"demo: admin page: {url}/services/gpu-allocations/ (log in as admin)")
        cli = " ".join(f"{k}={v}" for k, v in cli_environment(engine, work).items())
        say(f"demo: the gpuspawner command on the demo's engine and simulated GPUs:\n"
            f"  {cli} {Path(sys.executable).parent / 'gpuspawner'} gpus")
        if second is not None:
            say("demo: two GPU hosts, gpu1 (A100 x4, servers on 127.0.0.1) and gpu2 (H100 x2, "
                f"servers on {SECOND_ADDRESS}); new servers spread over both. Both at once:\n"
                f"  {cli} GPUSPAWNER_HOSTS={hosts_file} GPUSPAWNER_PROBE_IMAGE={image} "
                f"{Path(sys.executable).parent / 'gpuspawner'} hosts")
        say(f"demo: a simulated training run on ann's slice (once her GPU server runs):\n"
            f"  {sys.executable} scripts/demo.py train ann   (and: stop-training ann)")
        say("demo: Ctrl-C stops everything\n")
        while not stopping and hub.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        say("\ndemo: stopping ...")
        terminate(hub, 60)  # the hub stops its proxy and its servers
        end_process(proxy_pid(DEMO_ROOT / "hub" / "proxy.pid"), b"configurable-http-proxy")
        swept = sweep(marker)  # what a hub that could not finish its stop left behind
        if swept:
            say(f"demo: ended {swept} process(es) the hub left running")
        for one in (engine, second):
            if one is None:
                continue
            try:
                removed = one.remove_containers()
                one.stop()
                say(f"demo: removed {removed} container(s), stopped the engine at "
                    f"{one.base_url}; nothing left running")
            except Exception as exc:  # the engine never started
                say(f"demo: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
