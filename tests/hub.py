"""A real JupyterHub, run as a subprocess with GPUSpawner on the private test engine.

The end-to-end tests drive the product exactly as a lab would: ``jupyterhub -f config`` starts
``configurable-http-proxy`` itself, users and servers are made through the REST API with a
service token, and notebook servers are real containers on the private ``dockerd`` with
simulated GPUs. Nothing is mocked, so what passes here is what a lab gets.

Only 127.0.0.1 and the private engine's bridge are ever contacted: the hub listens on all
addresses so that containers reach it through the bridge gateway, and everything else (proxy,
proxy API, published container ports) is bound to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from .engine import end_process, terminate

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
JUPYTERHUB = VENV_BIN / "jupyterhub"

DEFAULT_PROFILES: list[dict[str, Any]] = [
    {"display_name": "CPU only", "slug": "cpu", "default": True},
    {"display_name": "Small GPU (1g.10gb)", "slug": "mig-1g", "gpu": {"mig_profile": "1g.10gb"}},
    {"display_name": "Medium GPU (3g.40gb)", "slug": "mig-3g", "gpu": {"mig_profile": "3g.40gb"}},
    {"display_name": "Whole GPU", "slug": "gpu-1", "gpu": {"gpus": 1}},
]

# Scopes of the test's service: everything the tests do to users and servers, plus access to
# the servers themselves (a request through the proxy to /user/<name>/api/status).
SERVICE_SCOPES = [
    "admin:users", "admin:servers", "access:servers", "read:users", "list:users",
    "read:servers", "servers", "users", "admin:groups",
]

_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
               "ALL_PROXY")


# Each pytest-xdist worker's hubs publish from a range of their own (gw0: 41000-41099, gw1:
# 42000-42099, ...), so two workers' servers never meet on a host port.
PORT_BASE = 41000 + 1000 * int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
PORT_RANGE = (PORT_BASE, PORT_BASE + 99)


class HubError(RuntimeError):
    """The hub did not start, or a spawn failed; the message carries the reason."""


def _children(pid: int) -> list[tuple[int, bytes]]:
    """The processes ``pid`` started and that still run, with the program each runs."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            numbers = (task / "children").read_text().split()
        except OSError:
            continue
        for number in numbers:
            try:
                argv = Path(f"/proc/{number}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            program = next((a for a in argv[1:] if a and not a.startswith(b"-")), argv[0])
            found.append((int(number), program))
    return found


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's pick, so parallel runs do not clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _fake_dir() -> Path:
    """Where the simulator's fake ``pynvml`` lives (``gpusim.FAKE_DIR`` when it says so)."""
    try:
        from .gpusim import FAKE_DIR

        return Path(FAKE_DIR)
    except (ImportError, AttributeError):
        return Path(__file__).resolve().parent / "gpusim" / "fake"




class RunningHub:
    """One JupyterHub process (and the proxy it starts) with its own ports, database and log.

    The work directory keeps the database, cookie secret and log, so ``restart()`` brings back
    the same hub: the tests check that running servers survive a hub restart, which is the
    promise of keeping all allocation state in Docker.
    """

    def __init__(
        self,
        engine: Any,
        image: str,
        workdir: str | os.PathLike[str],
        *,
        config_extra: str = "",
        env_extra: dict[str, str] | None = None,
    ) -> None:
        self.engine = engine
        self.image = image
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_extra = config_extra
        self.env_extra = dict(env_extra or {})
        self.token = secrets.token_hex(32)
        self.proxy_token = secrets.token_hex(32)
        # Chosen once: a restart keeps the same public URL, like a real hub.
        self.public_port = free_port()
        self.proxy_api_port = free_port()
        self.hub_port = free_port()
        self.url = f"http://127.0.0.1:{self.public_port}"
        self.config_path = self.workdir / "jupyterhub_config.py"
        self.log_path = self.workdir / "hub.log"
        self.events_path = self.workdir / "events.jsonl"
        self.process: subprocess.Popen[bytes] | None = None
        self._proxy_pid: int | None = None
        # Never send 127.0.0.1 traffic through an HTTP proxy the environment may name.
        self.session = requests.Session()
        self.session.trust_env = False
        self.last_progress: list[str] = []

    # ------------------------------------------------------------------ config and process

    def config_text(self) -> str:
        """The generated ``jupyterhub_config.py``: the defaults of the brief, then extras."""
        work = str(self.workdir)
        return f"""\
# Generated by tests/hub.py for one end-to-end test.
c = get_config()  # noqa: F821

c.JupyterHub.spawner_class = "gpu"
c.JupyterHub.bind_url = "http://127.0.0.1:{self.public_port}"
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{self.proxy_api_port}"
c.ConfigurableHTTPProxy.auth_token = {self.proxy_token!r}
c.ConfigurableHTTPProxy.pid_file = {str(self.workdir / "proxy.pid")!r}
c.JupyterHub.hub_ip = "0.0.0.0"
c.JupyterHub.hub_port = {self.hub_port}
c.JupyterHub.hub_connect_ip = {self.engine.gateway!r}
c.JupyterHub.db_url = {"sqlite:///" + work + "/jupyterhub.sqlite"!r}
c.JupyterHub.cookie_secret_file = {work + "/jupyterhub_cookie_secret"!r}
c.JupyterHub.pid_file = {work + "/jupyterhub.pid"!r}
# Servers outlive the hub: restart() checks they are still there afterwards.
c.JupyterHub.cleanup_servers = False
c.JupyterHub.log_level = "DEBUG"

c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = {secrets.token_hex(8)!r}
c.Authenticator.allow_all = True
c.Authenticator.admin_users = {{"admin"}}
c.JupyterHub.services = [{{"name": "e2e", "api_token": {self.token!r}}}]
c.JupyterHub.load_roles = [
    {{"name": "e2e-admin", "scopes": {SERVICE_SCOPES!r}, "services": ["e2e"]}},
]
c.JupyterHub.allow_named_servers = True

c.DockerSpawner.image = {self.image!r}
c.DockerSpawner.remove = False
c.DockerSpawner.host_ip = "127.0.0.1"
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 60
c.Spawner.cmd = ["jupyterhub-singleuser"]

c.GPUSpawner.hub_id = "e2e"
c.GPUSpawner.inventory_source = "nvml"
c.GPUSpawner.events_file = {str(self.events_path)!r}
c.GPUSpawner.port_range = {PORT_RANGE!r}
c.GPUSpawner.profile_list = {DEFAULT_PROFILES!r}

# ---- config_extra
{self.config_extra}
"""

    def env(self) -> dict[str, str]:
        """The hub's environment: the private engine, the simulator's state and fake NVML."""
        env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
        fake = str(_fake_dir())
        env["PYTHONPATH"] = os.pathsep.join(p for p in (fake, env.get("PYTHONPATH")) if p)
        env["DOCKER_HOST"] = self.engine.base_url
        env["GPUSIM_STATE"] = str(self.engine.state_path)
        env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "/usr/bin:/bin")])
        env.update(self.env_extra)
        return env

    def start(self, timeout: float = 60) -> RunningHub:
        """Start the hub and wait until its API answers through the proxy."""
        if self.process is not None and self.process.poll() is None:
            raise HubError("hub already running")
        self.config_path.write_text(self.config_text())
        log = open(self.log_path, "ab")  # the child gets its own copy of the fd
        try:
            log.write(f"\n===== start {time.strftime('%H:%M:%S')} =====\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [str(JUPYTERHUB), "-f", str(self.config_path)],
                cwd=self.workdir,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HubError(
                    f"jupyterhub exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                if self.session.get(f"{self.url}/hub/api/", timeout=2).status_code == 200:
                    self._proxy_pid = self._read_proxy_pid()
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise HubError(f"jupyterhub did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def _read_proxy_pid(self) -> int | None:
        try:
            return int((self.workdir / "proxy.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM the hub, wait, then make sure its proxy is gone too: nothing left running."""
        proc, self.process = self.process, None
        services = _children(proc.pid) if proc is not None else []
        terminate(proc, timeout)
        # The hub stops the proxy it started (cleanup_proxy); if it died too early to do so,
        # the proxy (its own session) is still ours to end.
        for pid in {self._proxy_pid, self._read_proxy_pid()} - {None}:
            end_process(pid, b"configurable-http-proxy")
        self._proxy_pid = None
        # Likewise its managed services (the admin service, an idle culler): a hub killed
        # before it stopped them would leave them running into the next test.
        for pid, program in services:
            end_process(pid, program)

    def restart(self) -> RunningHub:
        """Stop and start again with the same database, cookie secret, ports and work dir."""
        self.stop()
        return self.start()

    def __enter__(self) -> RunningHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        """The hub's (and proxy's) whole log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def events(self) -> list[dict[str, Any]]:
        """GPUSpawner's operation log (JSON lines), as records."""
        if not self.events_path.exists():
            return []
        return [json.loads(line) for line in self.events_path.read_text().splitlines() if line]

    # ------------------------------------------------------------------ REST API

    def api(self, method: str, path: str, **kw: Any) -> requests.Response:
        """A request to ``/hub/api<path>`` with the admin service token, sent to the hub's own
        port. Through the proxy, one CI run's spawn request came back as the proxy's bare 503
        ("Service Unavailable": the proxy lost its connection to the hub for that request);
        what the hub answers is the subject here, and the proxy is exercised by ``start``,
        ``get`` and the browser tests."""
        headers = {"Authorization": f"token {self.token}", **kw.pop("headers", {})}
        kw.setdefault("timeout", 30)
        return self.session.request(method, f"{self.hub_api_url}{path}", headers=headers, **kw)

    @property
    def hub_api_url(self) -> str:
        return f"http://127.0.0.1:{self.hub_port}/hub/api"

    def get(self, path: str, **kw: Any) -> requests.Response:
        """A request through the proxy (e.g. ``/user/ann/api/status``) with the service token."""
        headers = {"Authorization": f"token {self.token}", **kw.pop("headers", {})}
        kw.setdefault("timeout", 30)
        return self.session.get(f"{self.url}{path}", headers=headers, **kw)

    @staticmethod
    def _server_path(user: str, server: str) -> str:
        if server:
            return f"/users/{quote(user)}/servers/{quote(server, safe='')}"
        return f"/users/{quote(user)}/server"

    def ensure_user(self, user: str) -> None:
        response = self.api("POST", f"/users/{quote(user)}")
        if response.status_code not in (201, 409):
            raise HubError(f"cannot create user {user}: {response.status_code} {response.text}")

    def server_model(self, user: str, server: str = "") -> dict[str, Any] | None:
        """The user's server as the hub reports it (None: not running or pending)."""
        response = self.api("GET", f"/users/{quote(user)}")
        response.raise_for_status()
        return (response.json().get("servers") or {}).get(server)

    def spawn(
        self,
        user: str,
        profile: str | None = None,
        server: str = "",
        wait: bool = True,
        timeout: float = 120,
        options: dict[str, Any] | None = None,
    ) -> requests.Response:
        """Start a server through the API; with ``wait``, until it is ready. ``options``:
        more ``user_options`` beside the profile (an image choice, a site's own field).

        A refusal the hub answers at once (4xx/5xx) is returned for the test to inspect. A
        spawn accepted and failing later raises HubError with the hub's failure message. The
        progress messages seen while waiting are kept in ``last_progress``.
        """
        self.ensure_user(user)
        body = {"profile": profile} if profile is not None else None
        if options:
            body = {**(body or {}), **options}
        response = self.api("POST", self._server_path(user, server), json=body)
        self.last_progress = []
        if not wait or response.status_code >= 400:
            return response
        deadline = time.monotonic() + timeout
        try:
            self.last_progress = self.progress_messages(user, server, timeout=timeout)
        except requests.RequestException:
            pass  # the spawn may have finished before the stream opened; poll below
        while True:
            model = self.server_model(user, server)
            if model and model.get("ready"):
                return response
            if not model or not model.get("pending"):
                failure = self.progress_messages(user, server, timeout=10)
                raise HubError(
                    f"spawn of {user}/{server} failed: {failure or self.last_progress}\n"
                    f"{self.log_tail(30)}"
                )
            if time.monotonic() > deadline:
                raise HubError(f"spawn of {user}/{server} not ready in {timeout:.0f} s:\n"
                               f"{self.log_tail(30)}")
            time.sleep(0.3)

    def stop_server(
        self, user: str, server: str = "", wait: bool = True, timeout: float = 60
    ) -> requests.Response:
        """Stop a server through the API; with ``wait``, until the hub says it is stopped."""
        response = self.api("DELETE", self._server_path(user, server))
        if not wait or response.status_code >= 400:
            return response
        deadline = time.monotonic() + timeout
        while self.server_model(user, server) is not None:
            if time.monotonic() > deadline:
                raise HubError(f"{user}/{server} did not stop in {timeout:.0f} s")
            time.sleep(0.3)
        return response

    def progress_messages(self, user: str, server: str = "", timeout: float = 120) -> list[str]:
        """The messages of the server's progress event stream, read until it ends.

        While a spawn is pending this is every step the spawner reports; after it ended the
        hub sends only the outcome ("Server ready at ..." or "Spawn failed: ..."). An empty
        list: the server is neither starting nor failed.
        """
        path = self._server_path(user, server) + "/progress"
        messages: list[str] = []
        deadline = time.monotonic() + timeout
        with self.api("GET", path, stream=True, timeout=(5, timeout)) as response:
            if response.status_code != 200:
                return messages
            for line in response.iter_lines(decode_unicode=True):
                if line and line.startswith("data:"):
                    event = json.loads(line[5:])
                    if "message" in event:
                        messages.append(str(event["message"]))
                    if event.get("ready") or event.get("failed"):
                        break
                if time.monotonic() > deadline:
                    break
        return messages

    # ------------------------------------------------------------------ Docker

    def container(self, user: str, server: str = "") -> Any:
        """The Docker container of a server: by gpuspawner's labels, else DockerSpawner's name.

        Returns a ``docker.models.containers.Container`` or None.
        """
        client = self.engine.client
        found = [
            c for c in client.containers.list(all=True, filters={"label": f"ds01.user={user}"})
            if c.labels.get("ds01.server", "") == server
        ]
        if found:
            return found[0]
        name = f"jupyter-{user}--{server}" if server else f"jupyter-{user}"
        try:
            return client.containers.get(name)
        except Exception:  # docker.errors.NotFound, kept import-free
            return None




# ---------------------------------------------------------------- login helpers (admin page)


def hub_password(hub: RunningHub) -> str:
    """The DummyAuthenticator password of a started hub, read back from its generated config."""
    import re

    found = re.search(r"^c\.DummyAuthenticator\.password = '([0-9a-f]+)'$",
                      hub.config_path.read_text(), re.MULTILINE)
    if not found:
        raise HubError(f"no DummyAuthenticator password in {hub.config_path}")
    return found.group(1)


def login(hub: RunningHub, username: str) -> requests.Session:
    """A requests.Session logged in to the hub as ``username``, as a browser would be: the
    login form's ``_xsrf`` field is sent back with the password, and the cookies are kept."""
    import re

    session = requests.Session()
    session.trust_env = False
    form = session.get(f"{hub.url}/hub/login", timeout=30)
    form.raise_for_status()
    xsrf = re.search(r'name="_xsrf"\s+value="([^"]+)"', form.text)
    data = {"username": username, "password": hub_password(hub)}
    if xsrf:
        data["_xsrf"] = xsrf.group(1)
    response = session.post(f"{hub.url}/hub/login", data=data, timeout=30,
                            allow_redirects=False)
    if response.status_code not in (301, 302, 303):
        raise HubError(f"login of {username} failed: {response.status_code} {response.text[:300]}")
    return session
