"""A private Docker engine for the tests, beside any other engine on the machine.

Why private: the tests create, start, break and remove containers freely, and list "every
container" to check the ledger. On a shared machine that must never touch anyone else's
containers, so the tests run their own ``dockerd`` with its own socket, data root, exec root,
pid file and bridge. Its PATH starts with the simulator's ``bin/``, so Docker registers its
NVIDIA device driver (it looks for ``nvidia-container-runtime-hook`` at daemon start) and runs
the fake hook at every GPU container start, against ``$GPUSIM_STATE``. On request it also
registers the simulator's ``nvidia-container-runtime``, and can make it the default runtime,
as DGX-style hosts do; such an engine usually runs beside the main one (``EnginePaths.beside``).

The data root is kept between runs so built test images are reused; everything else is made
fresh. One test session at a time owns the engine (a lock file): a second session waits
rather than restarting the daemon under the first one's feet.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import docker

from .gpusim import BIN_DIR

DEFAULT_RUN_DIR = Path("/run/gpuspawner-test")
DEFAULT_LIB_DIR = Path("/var/lib/gpuspawner-test")
DEFAULT_BRIDGE = "gpsim0"
DEFAULT_GATEWAY = "172.31.250.1/24"
#: The engines a test session may start beside its own, by name (``EnginePaths.beside``).
BESIDE = ("nvidia-default", "remote-h100", "cpu-host")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class EngineError(RuntimeError):
    """The private engine could not be started or stopped; the message has the log's tail."""


@dataclass(frozen=True)
class EnginePaths:
    """Where the private engine keeps its files. ``GPUSPAWNER_TEST_ROOT`` moves all of them.

    A moved engine also gets its own bridge and subnet (derived from the root), so two
    engines can run side by side without one removing the other's bridge at its end.
    """

    run_dir: Path
    data_root: Path
    bridge: str = DEFAULT_BRIDGE
    gateway_cidr: str = DEFAULT_GATEWAY

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EnginePaths:
        """The session's engine. Under pytest-xdist (``scripts/test.sh`` runs two workers)
        each worker gets its own engine: ``<root>-gw<n>``, with a bridge and subnets numbered
        by the worker, so no two engines of one run can meet whatever their roots hash to."""
        environ = os.environ if environ is None else environ
        root = environ.get("GPUSPAWNER_TEST_ROOT")
        worker = environ.get("PYTEST_XDIST_WORKER", "")
        if worker:
            number = int(worker.removeprefix("gw"))
            base = Path(root) if root else DEFAULT_LIB_DIR
            top = base.with_name(f"{base.name}-{worker}")
            return cls(top / "run", top / "lib" / "docker", bridge=f"gpsimw{number}",
                       gateway_cidr=f"172.30.{10 + 4 * number}.1/24")
        if not root:
            return cls(DEFAULT_RUN_DIR, DEFAULT_LIB_DIR / "docker")
        return cls.under(Path(root))

    @classmethod
    def under(cls, root: Path, beside: EnginePaths | None = None) -> EnginePaths:
        """Every path under ``root``, with a bridge and subnet derived from it; never the same
        bridge or subnet as ``beside``, the engine this one runs next to."""
        digest = int(hashlib.sha256(str(root.resolve()).encode()).hexdigest(), 16)
        bridge, subnet = digest % 997, digest % 50
        if beside is not None and beside.bridge == f"gpsim{bridge + 1}":
            bridge = (bridge + 1) % 997
        if beside is not None and beside.gateway_cidr == f"172.31.{200 + subnet}.1/24":
            subnet = (subnet + 1) % 50
        return cls(
            root / "run",
            root / "lib" / "docker",
            bridge=f"gpsim{bridge + 1}",
            gateway_cidr=f"172.31.{200 + subnet}.1/24",
        )

    def beside(self, name: str) -> EnginePaths:
        """Paths for a second engine next to this one (``name`` under the same root), e.g. one
        with another default runtime: its own socket, data root, bridge and subnet."""
        offset = BESIDE.index(name) + 1 if name in BESIDE else len(BESIDE) + 1
        third = int(str(ipaddress.ip_interface(self.gateway_cidr).ip).split(".")[2])
        if self.bridge.startswith("gpsimw"):  # a worker's engine: the next subnets are its own
            third += offset
        else:  # 172.31.200-250: another of that range, never this engine's nor a sibling's
            third = 200 + (third - 200 + 17 * offset) % 50
        top = self.data_root.parent / name
        return EnginePaths(top / "run", top / "lib" / "docker",
                           bridge=f"{self.bridge}{'bcd'[offset - 1]}",
                           gateway_cidr=f"{self.gateway_cidr.split('.')[0]}."
                                        f"{self.gateway_cidr.split('.')[1]}.{third}.1/24")

    @property
    def socket(self) -> Path:
        return self.run_dir / "docker.sock"

    @property
    def exec_root(self) -> Path:
        return self.run_dir / "exec"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "docker.pid"

    @property
    def log(self) -> Path:
        return self.run_dir / "dockerd.log"

    @property
    def state_path(self) -> Path:
        return self.run_dir / "gpusim-state.json"

    @property
    def hook_log(self) -> Path:
        return self.run_dir / "hook.log"

    @property
    def lock(self) -> Path:
        return self.run_dir / "session.lock"


def _ping(path: Path, timeout: float = 2.0) -> bool:
    """Whether a Docker engine answers ``/_ping`` on the unix socket ``path``."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
    except OSError:
        return False
    return reply.startswith(b"HTTP/1.") and b" 200 " in reply.split(b"\r\n", 1)[0]


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def terminate(proc: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM a child, wait, then SIGKILL: how every process the test bed starts is ended."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def end_process(pid: int | None, name: bytes, timeout: float = 5.0) -> None:
    """End a process that is not our child (a proxy a dead hub left), only if it still runs
    the program ``name``: a pid file can outlive its process and be reused."""
    if pid is None or not alive(pid) or name not in "\0".join(_cmdline(pid)).encode():
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


def start_sleeper(client: docker.DockerClient, container_id: str, program: str) -> int:
    """Start a process named ``program`` (a copy of ``sleep``, so ``ps`` and NVML's pid name
    it) in the background in a running container; its host pid, found through Docker's
    ``top`` (host pids). What a user's training run is to the simulator."""
    api = client.api
    command = f"cp /bin/sleep {program} && exec {program} infinity"
    api.exec_start(api.exec_create(container_id, ["sh", "-c", command]), detach=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        top = api.top(container_id)
        column = top["Titles"].index("PID")
        found = [int(row[column]) for row in top["Processes"] if row[-1].startswith(program)]
        if found:
            return found[0]
        time.sleep(0.2)
    raise EngineError(f"{program} did not start in {container_id[:12]}")


def make_certificates(where: Path) -> None:
    """A CA, the engine's server certificate for 127.0.0.1, a client certificate from the same
    CA, and one from a CA the engine does not know (``other-``), with openssl; kept once
    made."""
    if (where / "other-cert.pem").exists():
        return
    where.mkdir(parents=True, exist_ok=True)

    def openssl(*argv: str) -> None:
        done = subprocess.run(["openssl", *argv], cwd=where, capture_output=True, text=True)
        if done.returncode != 0:
            raise EngineError(f"openssl {argv[0]} failed: {done.stderr.strip()}")

    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
                "-keyout", f"{ca}-key.pem", "-out", f"{ca}.pem", "-subj", f"/CN=gpuspawner {ca}")
    for name, ca, usage, subject in (
        ("server", "ca", "serverAuth\nsubjectAltName=IP:127.0.0.1", "/CN=127.0.0.1"),
        ("client", "ca", "clientAuth", "/CN=gpuspawner hub"),
        ("other", "other-ca", "clientAuth", "/CN=someone else"),
    ):
        (where / f"{name}.ext").write_text(f"extendedKeyUsage={usage}\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}-key.pem",
                "-out", f"{name}.csr", "-subj", subject)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey",
                f"{ca}-key.pem", "-CAcreateserial", "-days", "30", "-out",
                f"{name}-cert.pem", "-extfile", f"{name}.ext")
    (where / "cert.pem").write_bytes((where / "client-cert.pem").read_bytes())
    (where / "key.pem").write_bytes((where / "client-key.pem").read_bytes())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still "exists"; it is not alive.
    try:
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return status != "Z"


class PrivateEngine:
    """One private ``dockerd``; use as a context manager or call start() and stop()."""

    def __init__(
        self,
        paths: EnginePaths | None = None,
        dockerd: str | None = None,
        *,
        nvidia_runtime: bool = False,
        default_runtime: str | None = None,
        tls_port: int | None = None,
    ) -> None:
        """``nvidia_runtime`` registers the simulator's ``nvidia-container-runtime`` as the
        ``nvidia`` runtime; ``default_runtime`` makes a runtime Docker's default (``nvidia``
        registers it too), as DGX-style hosts do. Neither: Docker's own default, runc."""
        self.paths = paths or EnginePaths.from_env()
        self.nvidia_runtime = nvidia_runtime or default_runtime == "nvidia"
        self.default_runtime = default_runtime
        self.bridge = self.paths.bridge
        self.gateway_cidr = self.paths.gateway_cidr
        self.dockerd = dockerd or shutil.which("dockerd") or "/usr/sbin/dockerd"
        #: Also listen on tcp://127.0.0.1:<tls_port>, TLS-verified both ways, with a CA and
        #: certificates made for this engine (``tls_dir``): an engine as a remote host has it.
        self.tls_port = tls_port
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock_file: IO[str] | None = None
        self._client: docker.DockerClient | None = None

    # ------------------------------------------------------------------ what tests use

    @property
    def base_url(self) -> str:
        return f"unix://{self.paths.socket}"

    @property
    def tls_url(self) -> str:
        return f"tcp://127.0.0.1:{self.tls_port}"

    @property
    def tls_dir(self) -> Path:
        """ca.pem; server-cert.pem, server-key.pem (the engine's); cert.pem, key.pem (a
        client's, signed by the same CA); other-*.pem: a client signed by another CA."""
        return self.paths.run_dir / "tls"

    @property
    def gateway(self) -> str:
        """The bridge's address: where containers reach services on this host."""
        return str(ipaddress.ip_interface(self.gateway_cidr).ip)

    @property
    def state_path(self) -> Path:
        return self.paths.state_path

    @property
    def hook_log(self) -> Path:
        return self.paths.hook_log

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            raise EngineError("the private engine is not started")
        return self._client

    def environment(self) -> dict[str, str]:
        """Env for processes that should see the same simulated host as the engine."""
        return {"GPUSIM_STATE": str(self.state_path), "GPUSIM_HOOK_LOG": str(self.hook_log),
                "DOCKER_HOST": self.base_url}

    # ------------------------------------------------------------------------ start/stop

    def start(self, timeout: float = 60.0, lock_timeout: float = 1800.0) -> None:
        if os.geteuid() != 0:
            raise EngineError("the private Docker engine needs root (it makes a bridge)")
        if not Path(self.dockerd).exists():
            raise EngineError(f"dockerd not found ({self.dockerd}); run scripts/setup.sh")
        for directory in (self.paths.run_dir, self.paths.data_root, self.paths.exec_root):
            directory.mkdir(parents=True, exist_ok=True)
        self._acquire_lock(lock_timeout)
        try:
            self._stop_stale()
            self._ensure_bridge()
            self.paths.hook_log.write_text("")
            self._launch(timeout)
            if not self._bridge_addressed():
                # The data root remembers the bridge's subnet of an earlier run, and dockerd
                # puts that back on the bridge: this engine's paths changed since (another
                # subnet). Forget the remembered networks, once, and start again.
                terminate(self._proc, timeout)
                self._proc = None
                (self.paths.data_root / "network" / "files" / "local-kv.db").unlink(
                    missing_ok=True)
                self._remove_bridge()
                self._ensure_bridge()
                self._launch(timeout)
                if not self._bridge_addressed():
                    raise EngineError(f"dockerd did not keep {self.gateway_cidr} on "
                                      f"{self.bridge}:\n{self.log_tail()}")
            self._client = docker.DockerClient(base_url=self.base_url, timeout=300)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 30.0) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        proc, self._proc = self._proc, None
        terminate(proc, timeout)
        if proc is not None:
            self._remove_bridge()
        self._release_lock()

    def __enter__(self) -> PrivateEngine:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---------------------------------------------------------------------- housekeeping

    def remove_containers(self) -> int:
        """Force-remove every container (the engine is private) with its anonymous volumes."""
        api = self.client.api
        removed = 0
        for container in api.containers(all=True, quiet=True):
            try:
                api.remove_container(container["Id"], force=True, v=True)
                removed += 1
            except docker.errors.NotFound:
                pass
        # Images gpuspawner saved users' containers to: a later test must not start from them.
        saved = api.images(name="gpuspawner-saved/*") + api.images(name="gpuspawner-kept/*")
        for image in saved:
            for tag in image.get("RepoTags") or []:
                try:
                    api.remove_image(tag, force=True)
                except docker.errors.NotFound:
                    pass
        return removed

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.paths.log.read_text(errors="replace")
        except OSError:
            return "(no dockerd log)"
        return "\n".join(text.splitlines()[-lines:])

    # -------------------------------------------------------------------------- internals

    def _acquire_lock(self, lock_timeout: float) -> None:
        handle = open(self.paths.lock, "a+")  # held for the session
        deadline = time.monotonic() + lock_timeout
        told = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    handle.close()
                    raise EngineError(
                        f"another test session holds {self.paths.lock} for longer than "
                        f"{lock_timeout:.0f}s; set GPUSPAWNER_TEST_ROOT to run beside it"
                    ) from None
                if not told:
                    print(f"waiting for {self.paths.lock}: another test session uses the "
                          "private engine", file=sys.stderr)
                    told = True
                time.sleep(1)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock_file = handle

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def _stale_pids(self) -> list[int]:
        """dockerd processes of an earlier run of this engine (same socket or pid file)."""
        markers = {f"unix://{self.paths.socket}", str(self.paths.pidfile)}
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            argv = _cmdline(int(entry.name))
            if argv and Path(argv[0]).name == "dockerd" and markers & set(argv):
                pids.append(int(entry.name))
        return pids

    def _stop_stale(self) -> None:
        """Stop a daemon an earlier (crashed) session left: we cannot trust its env or PATH."""
        pids = self._stale_pids()
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)

    def _ensure_bridge(self) -> None:
        if _run("ip", "link", "show", "dev", self.bridge).returncode != 0:
            made = _run("ip", "link", "add", "name", self.bridge, "type", "bridge")
            if made.returncode != 0:
                raise EngineError(f"cannot make bridge {self.bridge}: {made.stderr.strip()}")
        shown = _run("ip", "-o", "addr", "show", "dev", self.bridge).stdout
        if f" {self.gateway_cidr} " not in shown:
            added = _run("ip", "addr", "add", self.gateway_cidr, "dev", self.bridge)
            if added.returncode != 0:
                raise EngineError(
                    f"cannot address bridge {self.bridge}: {added.stderr.strip()}"
                )
        _run("ip", "link", "set", "dev", self.bridge, "up")

    def _bridge_addressed(self) -> bool:
        """The bridge has this engine's gateway, and no other IPv4 address."""
        shown = _run("ip", "-o", "-4", "addr", "show", "dev", self.bridge).stdout.split()
        found = [shown[i + 1] for i, word in enumerate(shown[:-1]) if word == "inet"]
        return found == [self.gateway_cidr]

    def _remove_bridge(self) -> None:
        _run("ip", "link", "del", "dev", self.bridge)

    def _launch(self, timeout: float) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "GPUSIM_"))}
        env["PATH"] = f"{BIN_DIR}:{SYSTEM_PATH}"
        env["GPUSIM_STATE"] = str(self.state_path)
        env["GPUSIM_HOOK_LOG"] = str(self.hook_log)
        argv = [
            self.dockerd,
            "--host", self.base_url,
            "--data-root", str(self.paths.data_root),
            "--exec-root", str(self.paths.exec_root),
            "--pidfile", str(self.paths.pidfile),
            "--bridge", self.bridge,
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--shutdown-timeout", "2",
        ]
        if self.nvidia_runtime:
            argv += ["--add-runtime", f"nvidia={BIN_DIR / 'nvidia-container-runtime'}"]
        if self.default_runtime:
            argv += ["--default-runtime", self.default_runtime]
        if self.tls_port:
            make_certificates(self.tls_dir)
            argv += ["--host", self.tls_url, "--tlsverify",
                     "--tlscacert", str(self.tls_dir / "ca.pem"),
                     "--tlscert", str(self.tls_dir / "server-cert.pem"),
                     "--tlskey", str(self.tls_dir / "server-key.pem")]
        with open(self.paths.log, "wb") as log:
            self._proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not _ping(self.paths.socket):
            if self._proc.poll() is not None:
                raise EngineError(
                    f"dockerd exited with {self._proc.returncode} at start:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise EngineError(
                    f"dockerd did not answer on {self.paths.socket} within {timeout:.0f}s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.1)
