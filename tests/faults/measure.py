"""The four columns of docs/reliability.md, measured the way another program would see them.

- **double holders**: devices that two running containers hold at the same moment, read from
  Docker alone (``HostConfig.DeviceRequests`` of every running container), where a whole GPU
  and any MIG device on it overlap. A sampler thread reads this every half second during the
  scenario, and once more after it settled; the column is the number of distinct devices
  ever seen held twice.
- **orphans**: after the scenario settled (see ``Scenario.settle``), running containers that
  hold a device and that no server of a hub owns: made by one of the scenario's hubs, for a
  user/server that hub's REST API lists neither as running nor as pending; or holding a
  device without any hub's labels and not made by the test itself.
- **servers lost**: servers a hub said were ready (and that the test did not stop) that,
  after the scenario, the hub no longer lists as ready or that do not answer
  ``/user/<name>/[<server>/]api/status`` through the proxy with 200. Where the fault itself
  stops every container (an engine restart, a power-cycle), the scenario's users press Start
  again once, as they would; a server counts as lost if that does not bring it back.
- **data lost**: marker files each user wrote into their container before the fault
  (``/home/jovyan/marker-<n>.txt`` as the notebook user, ``/opt/markers/marker-<n>.txt`` as
  root; both outside any volume), not read back with the same content from the user's
  container after it (running or stopped, possibly a replacement), or from the image
  gpuspawner saved it to when there is no container.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import docker
import requests

from gpuspawner import ledger as gledger

from ..hub import HubError, RunningHub

#: (hub id, user, server name) of one server.
Key = tuple[str, str, str]

#: Order of the rows in docs/reliability.md (the issue's numbering).
ORDER = {
    "two-hubs": 1, "churn": 2, "engine-restart": 3, "hub-kill": 4,
    "nvml-lost-gpu": 5.1, "nvml-absent": 5.2, "nvml-slow": 5.3,
    "log-disk-full": 6.1, "log-read-only": 6.2, "port-squatter": 7, "power-cycle": 8,
}


def show(key: Key) -> str:
    hub, user, server = key
    return f"{hub}:{user}" + (f"/{server}" if server else "")


# ------------------------------------------------------------------------- double holders


@dataclass
class _Held:
    name: str
    labels: dict[str, str]
    device_ids: tuple[str, ...]
    all_gpus: bool


class Holders:
    """Samples which running containers hold which devices, from Docker alone, on a thread of
    its own with its own Docker client (the engine may be restarted under it: a failed read
    is counted and retried, never fatal)."""

    def __init__(self, engine: Any, gpusim: Any, interval: float = 0.5) -> None:
        self.base_url = engine.base_url
        self.gpusim = gpusim
        self.interval = interval
        self.parents: dict[str, str] = {}  # MIG UUID -> GPU UUID, every one ever seen
        self.by_index: dict[str, str] = {}  # "0", "0:1" -> UUID, as of the last state read
        self.gpus: set[str] = set()
        self.cache: dict[str, _Held] = {}
        self.conflicts: dict[str, set[str]] = {}  # device -> "a+b" container name pairs
        self.samples = 0
        self.failed_reads = 0
        self._api: docker.APIClient | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _client(self) -> docker.APIClient:
        if self._api is None:
            self._api = docker.APIClient(base_url=self.base_url, timeout=10)
        return self._api

    def _learn_topology(self) -> None:
        try:
            state = self.gpusim.state()
        except (OSError, ValueError):
            return
        by_index: dict[str, str] = {}
        for gpu in state.get("gpus") or []:
            self.gpus.add(gpu["uuid"])
            by_index[str(gpu["index"])] = gpu["uuid"]
            for mig in gpu.get("mig_devices") or []:
                self.parents[mig["uuid"]] = gpu["uuid"]
                by_index[f"{gpu['index']}:{mig['index']}"] = mig["uuid"]
        self.by_index = by_index

    def _held(self, api: docker.APIClient, cid: str) -> _Held | None:
        if cid in self.cache:  # device requests never change after the create
            return self.cache[cid]
        try:
            attrs = api.inspect_container(cid)
        except docker.errors.NotFound:
            return None
        ids: list[str] = []
        everything = False
        for request in attrs["HostConfig"].get("DeviceRequests") or []:
            ids += request.get("DeviceIDs") or []
            if (request.get("Count") or 0) < 0 and not request.get("DeviceIDs"):
                everything = True
        held = _Held(attrs["Name"].lstrip("/"), dict(attrs["Config"].get("Labels") or {}),
                     tuple(ids), everything)
        self.cache[cid] = held
        return held

    def running(self) -> dict[str, _Held]:
        """Running container id -> what it holds (raises on a Docker failure)."""
        api = self._client()
        out = {}
        for summary in api.containers(filters={"status": "running"}):
            held = self._held(api, summary["Id"])
            if held is not None:
                out[summary["Id"]] = held
        return out

    def _split(self, held: _Held) -> tuple[set[str], dict[str, str | None]]:
        """(whole GPUs, MIG devices -> parent GPU) of one container."""
        whole: set[str] = set(self.gpus) if held.all_gpus else set()
        migs: dict[str, str | None] = {}
        for device in held.device_ids:
            device = self.by_index.get(device, device)
            if device.startswith("MIG-"):
                migs[device.split("/")[0]] = self.parents.get(device.split("/")[0])
            else:
                whole.add(device)
        return whole, migs

    def overlaps(self, running: dict[str, _Held]) -> dict[str, list[str]]:
        """Device -> names of the running containers that hold it at once (two or more)."""
        split = {cid: self._split(h) for cid, h in running.items()}
        found: dict[str, set[str]] = {}
        ids = sorted(split)
        for i, a in enumerate(ids):
            whole_a, migs_a = split[a]
            for b in ids[i + 1:]:
                whole_b, migs_b = split[b]
                shared = (whole_a & whole_b) | (set(migs_a) & set(migs_b))
                shared |= {m for m, p in migs_b.items() if p in whole_a}
                shared |= {m for m, p in migs_a.items() if p in whole_b}
                for device in shared:
                    found.setdefault(device, set()).update(
                        {running[a].name, running[b].name})
        return {device: sorted(names) for device, names in found.items()}

    def sample(self) -> dict[str, list[str]] | None:
        """One reading; None when Docker did not answer."""
        self._learn_topology()
        try:
            running = self.running()
        except (docker.errors.DockerException, requests.RequestException):
            self.failed_reads += 1
            self._api = None
            return None
        found = self.overlaps(running)
        with self._lock:
            self.samples += 1
            for device, names in found.items():
                self.conflicts.setdefault(device, set()).add("+".join(names))
        return found

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> Holders:
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="double-holders", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        if self._api is not None:
            self._api.close()

    def count(self) -> int:
        with self._lock:
            return len(self.conflicts)

    def report(self) -> dict[str, list[str]]:
        with self._lock:
            return {device: sorted(pairs) for device, pairs in self.conflicts.items()}


# ----------------------------------------------------------------------------- the hub side


def servers_of(hub: RunningHub) -> dict[tuple[str, str], dict[str, Any]]:
    """(user, server name) -> the server model, for every server the hub lists (running or
    pending), read from its REST API page by page."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    offset = 0
    while True:
        response = hub.api("GET", f"/users?limit=200&offset={offset}",
                           headers={"Accept": "application/jupyterhub-pagination+json"})
        response.raise_for_status()
        page = response.json()
        items = page["items"] if isinstance(page, dict) else page
        for user in items:
            for name, model in (user.get("servers") or {}).items():
                out[(user["name"], name)] = model
        if isinstance(page, dict) and page.get("_pagination", {}).get("next"):
            offset += len(items)
            continue
        return out


def status_path(user: str, server: str = "") -> str:
    return f"/user/{quote(user)}/" + (f"{quote(server, safe='')}/" if server else "") + \
        "api/status"


def answers(hub: RunningHub, user: str, server: str = "", timeout: float = 20) -> int:
    """The status code of the server's ``api/status`` through the proxy (0: no answer);
    retried for ``timeout`` seconds while it is not 200 (a proxy route being re-added)."""
    deadline = time.monotonic() + timeout
    code = 0
    while True:
        try:
            code = hub.get(status_path(user, server), timeout=10,
                           allow_redirects=False).status_code
        except requests.RequestException:
            code = 0
        if code == 200 or time.monotonic() > deadline:
            return code
        time.sleep(1)


# --------------------------------------------------------------------------------- Docker side


def containers_of(engine: Any, key: Key, running_only: bool = False) -> list[dict[str, Any]]:
    """Container summaries of one server (by gpuspawner's labels), the canonical one first:
    running before stopped, a replacement in progress (``-replaced-``) last, newest first."""
    hub_id, user, server = key
    found = [
        c for c in engine.client.api.containers(
            all=not running_only, filters={"label": [f"ds01.hub={hub_id}", f"ds01.user={user}"]})
        if (c.get("Labels") or {}).get("ds01.server", "") == server
    ]
    found.sort(key=lambda c: (c["State"] != "running",
                              any("-replaced-" in n for n in c.get("Names") or []),
                              -int(c.get("Created") or 0)))
    return found


def run_in(engine: Any, container_id: str, script: str, user: str = "root") -> str:
    api = engine.client.api
    out = api.exec_start(api.exec_create(container_id, ["sh", "-c", script], user=user))
    return out.decode(errors="replace").strip()


def read_file(engine: Any, container_id: str, path: str) -> str | None:
    """A file's text from a container, running or not (Docker's archive API); None: absent."""
    try:
        stream, _ = engine.client.api.get_archive(container_id, path)
    except docker.errors.NotFound:
        return None
    data = b"".join(stream)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.next()
        if member is None:
            return None
        handle = tar.extractfile(member)
        return handle.read().decode(errors="replace") if handle else None


# -------------------------------------------------------------------------------- the row


@dataclass
class Row:
    scenario: str
    size: str
    double_holders: int
    orphans: int
    servers_lost: int
    data_lost: int
    seconds: float
    test: str = ""
    full: bool = False
    details: dict[str, Any] = field(default_factory=dict)
    #: The scenario's own checks beyond the four columns that failed (a spawn that should
    #: have worked, a device that does not exist): the row is not good with any of them.
    failed_checks: list[str] = field(default_factory=list)

    def zero(self) -> bool:
        return not (self.double_holders or self.orphans or self.servers_lost or self.data_lost)

    def ok(self) -> bool:
        return self.zero() and not self.failed_checks

    def explain(self) -> str:
        return json.dumps(asdict(self), indent=1, default=str)[:6000]


def out_dir(default: Path) -> Path:
    """Where rows are written: ``$GPUSPAWNER_RELIABILITY_OUT``, else ``default``."""
    path = Path(os.environ.get("GPUSPAWNER_RELIABILITY_OUT") or default)
    path.mkdir(parents=True, exist_ok=True)
    return path


def record(row: Row, directory: Path) -> Path:
    data = asdict(row)
    data["order"] = ORDER.get(row.scenario, 99)
    data["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path = directory / f"{row.scenario}.json"
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return path


# --------------------------------------------------------------------------- one scenario


class Scenario:
    """One scenario's bookkeeping: the hubs it drives, the servers they said were ready, the
    marker files written, the double-holder sampler; ``finish()`` settles and measures."""

    def __init__(self, name: str, size: Any, engine: Any, gpusim: Any, directory: Path,
                 test: str = "", full: bool = False, server: str = "jupyter") -> None:
        self.name, self.size, self.engine, self.gpusim = name, size, engine, gpusim
        self.directory, self.test, self.full, self.server = directory, test, full, server
        self.hubs: dict[str, RunningHub] = {}
        self.ready: dict[Key, str] = {}  # servers the hub said ready -> profile
        self.markers: dict[Key, list[tuple[str, str]]] = {}
        self.by_hand: set[str] = set()  # container ids the test made itself
        self.details: dict[str, Any] = {}
        self.notes: list[str] = []
        self.counter = 0
        self.lock = threading.Lock()
        self.holders = Holders(engine, gpusim)
        self.started = time.monotonic()
        self.last_fault = time.monotonic()
        self.row: Row | None = None
        self.lost_during: list[str] = []  # servers found lost at a check during the scenario
        self.orphans_during: list[str] = []  # orphans found at a check during the scenario
        self.failed_checks: list[str] = []

    def add_hub(self, hub_id: str, hub: RunningHub) -> RunningHub:
        self.hubs[hub_id] = hub
        return hub

    def begin(self) -> Scenario:
        self.holders.start()
        self.started = time.monotonic()
        return self

    def note(self, text: str) -> None:
        with self.lock:
            self.notes.append(text)

    def count(self, what: str, by: int = 1) -> None:
        with self.lock:
            self.details[what] = self.details.get(what, 0) + by

    def expect(self, good: bool, what: str) -> None:
        """One of the scenario's own checks (beyond the four columns), kept in the row."""
        if not good:
            with self.lock:
                self.failed_checks.append(what)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a step of the scenario into ``details["phase_seconds"]``."""
        began = time.monotonic()
        try:
            yield
        finally:
            with self.lock:
                phases = self.details.setdefault("phase_seconds", {})
                phases[name] = round(phases.get(name, 0) + time.monotonic() - began, 1)

    def fault(self) -> None:
        """Mark the moment a fault happened (the settle waits out the hub's polls after it)."""
        self.last_fault = time.monotonic()

    # ------------------------------------------------------------------ driving the hub

    def spawn(self, hub_id: str, user: str, profile: str, server: str = "",
              timeout: float = 150) -> str:
        """Start a server and wait. Returns ``ready``, ``refused`` (the hub said no at once or
        with a reason), or ``failed`` (with the reason in the details)."""
        hub = self.hubs[hub_id]
        try:
            response = hub.spawn(user, profile, server=server, timeout=timeout)
        except HubError as exc:
            text = str(exc).split("\n")[0]  # the reason, without the hub's log tail
            if any(w in text for w in ("in use", "are taken", "quota", "full", "free")):
                self.count("refused")
                self._refusal(f"{show((hub_id, user, server))} {profile}: {text[:200]}")
                return "refused"
            self.count("failed")
            with self.lock:
                self.details.setdefault("failures", []).append(
                    f"{show((hub_id, user, server))} {profile}: {text[:300]}")
            return "failed"
        except requests.RequestException as exc:
            self.count("failed")
            with self.lock:
                self.details.setdefault("failures", []).append(
                    f"{show((hub_id, user, server))} {profile}: {exc}")
            return "failed"
        if response.status_code >= 400:
            try:
                said = response.json().get("message")
            except ValueError:
                said = None
            if not said:  # not the hub's answer: the proxy's, with the hub down
                self.count("failed")
                with self.lock:
                    self.details.setdefault("failures", []).append(
                        f"{show((hub_id, user, server))} {profile}: {response.status_code} "
                        f"{response.text[:200]}")
                return "failed"
            self.count("refused")
            self._refusal(f"{show((hub_id, user, server))} {profile}: {response.status_code} "
                          f"{said[:160]}")
            return "refused"
        with self.lock:
            self.ready[(hub_id, user, server)] = profile
        self.count("ready")
        return "ready"

    def _refusal(self, text: str) -> None:
        with self.lock:
            seen = self.details.setdefault("refusals", [])
            if len(seen) < 12:
                seen.append(text)

    def stop(self, hub_id: str, user: str, server: str = "", remove: bool = False) -> None:
        """Stop a server through the API (the test stopped it: it is not expected to run)."""
        hub = self.hubs[hub_id]
        with self.lock:
            self.ready.pop((hub_id, user, server), None)
        if remove and server:
            response = hub.api("DELETE", f"/users/{quote(user)}/servers/{quote(server, safe='')}",
                               json={"remove": True})
            response.raise_for_status()
            deadline = time.monotonic() + 60
            while (user, server) in servers_of(hub) and time.monotonic() < deadline:
                time.sleep(0.3)
        else:
            hub.stop_server(user, server, timeout=90)

    def forget_data(self, key: Key) -> None:
        """The user removed the server's container on purpose: its files are not expected."""
        with self.lock:
            self.markers.pop(key, None)

    # ------------------------------------------------------------------ data

    def write_markers(self, key: Key) -> bool:
        """Write the next marker pair into the server's running container and read it back."""
        found = containers_of(self.engine, key, running_only=True)
        if not found:
            self.note(f"{show(key)}: no running container to write markers into")
            return False
        with self.lock:
            self.counter += 1
            n = self.counter
        text = f"{self.name}:{show(key)}:{n}"
        cid = found[0]["Id"]
        home, opt = f"/home/jovyan/marker-{n}.txt", f"/opt/markers/marker-{n}.txt"
        run_in(self.engine, cid, f"printf %s '{text}' > {home}", user="jovyan")
        run_in(self.engine, cid, f"mkdir -p /opt/markers && printf %s '{text}' > {opt}")
        if read_file(self.engine, cid, home) != text or read_file(self.engine, cid, opt) != text:
            self.note(f"{show(key)}: marker {n} could not be written")
            return False
        with self.lock:
            self.markers.setdefault(key, []).extend([(home, text), (opt, text)])
        return True

    def _saved_copy(self, key: Key) -> str | None:
        image = gledger.saved_image(self.engine.client, hub=key[0], user=key[1], server=key[2])
        if image is None:
            return None
        made = self.engine.client.api.create_container(image, command=["true"])
        return made["Id"]

    def data_lost(self) -> list[str]:
        lost: list[str] = []
        for key, files in sorted(self.markers.items()):
            found = containers_of(self.engine, key)
            temporary = None
            if found:
                cid = found[0]["Id"]
            else:
                cid = temporary = self._saved_copy(key)
            try:
                for path, text in files:
                    got = read_file(self.engine, cid, path) if cid else None
                    if got != text:
                        where = "no container and no saved image" if cid is None else cid[:12]
                        lost.append(f"{show(key)} {path}: {got!r} ({where})")
            finally:
                if temporary:
                    self.engine.client.api.remove_container(temporary, force=True)
        return lost

    # ------------------------------------------------------------------ settle and measure

    def _picture(self) -> tuple[Any, ...]:
        hubs = {hub_id: sorted((k, bool(m.get("ready")), bool(m.get("pending")))
                               for k, m in servers_of(hub).items())
                for hub_id, hub in self.hubs.items()}
        running = sorted(cid for cid, h in self.holders.running().items()
                         if h.device_ids or h.all_gpus)
        return hubs, running

    def settle(self, poll_interval: float, timeout: float = 240) -> float:
        """Wait until the scenario settled, and return how long that took.

        Settled: no server of any hub is pending; at least two of the hubs' poll intervals
        (plus two seconds) passed since the last fault, so every hub polled every server it
        lists at least once after it; and two readings two seconds apart (every hub's
        servers with their ready/pending flags, and the running containers that hold a
        device) agree.
        """
        began = time.monotonic()
        deadline = began + timeout
        while True:
            pending = [k for hub in self.hubs.values()
                       for k, m in servers_of(hub).items() if m.get("pending")]
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(1)
        if pending:
            self.note(f"still pending after {timeout:.0f} s: {pending}")
        quiet = self.last_fault + 2 * poll_interval + 2
        while time.monotonic() < quiet:
            time.sleep(0.5)
        last = self._picture()
        while time.monotonic() < deadline:
            time.sleep(2)
            now = self._picture()
            if now == last:
                break
            last = now
        return time.monotonic() - began

    def orphans(self) -> list[str]:
        lists = {hub_id: servers_of(hub) for hub_id, hub in self.hubs.items()}
        found = []
        for cid, held in self.holders.running().items():
            if not (held.device_ids or held.all_gpus) or cid in self.by_hand:
                continue
            hub_id = held.labels.get("ds01.hub")
            user = held.labels.get("ds01.user")
            server = held.labels.get("ds01.server", "")
            if hub_id in lists and user and (user, server) in lists[hub_id]:
                continue
            owner = f"{hub_id}:{user}/{server}" if hub_id else "no hub labels"
            found.append(f"{held.name} ({owner}) holds {', '.join(held.device_ids) or 'all'}")
        return found

    def servers_lost(self) -> list[str]:
        lost = []
        lists = {hub_id: servers_of(hub) for hub_id, hub in self.hubs.items()}
        for key in sorted(self.ready):
            hub_id, user, server = key
            model = lists[hub_id].get((user, server))
            if not model or not model.get("ready"):
                lost.append(f"{show(key)}: the hub lists it as {model and 'pending' or 'gone'}")
                continue
            code = answers(self.hubs[hub_id], user, server)
            if code != 200:
                lost.append(f"{show(key)}: api/status answers {code}")
        return lost

    def check_orphans(self) -> list[str]:
        """The orphans check now, on a settled moment during the scenario."""
        found = self.orphans()
        with self.lock:
            self.orphans_during += [x for x in found if x not in self.orphans_during]
        return found

    def check_servers(self) -> list[str]:
        """The servers-lost check now, during the scenario (each finding counts once)."""
        lost = self.servers_lost()
        with self.lock:
            self.lost_during += [x for x in lost if x not in self.lost_during]
        return lost

    def recover(self, keys: Iterable[Key] | None = None) -> list[Key]:
        """Users whose server the fault stopped press Start again (same profile), once.
        Returns the servers that had to be started again."""
        again = []
        lists = {hub_id: servers_of(hub) for hub_id, hub in self.hubs.items()}
        for key in sorted(keys if keys is not None else list(self.ready)):
            hub_id, user, server = key
            model = lists[hub_id].get((user, server))
            if model and (model.get("ready") or model.get("pending")):
                continue
            profile = self.ready[key]
            again.append(key)
            if self.spawn(hub_id, user, profile, server) != "ready":
                self.note(f"{show(key)}: did not come back at its user's restart")
        return again

    def finish(self, poll_interval: float) -> Row:
        """Settle, take the last double-holder reading, measure, and record the row."""
        settled = self.settle(poll_interval)
        self.holders.sample()
        self.holders.stop()
        orphans = self.orphans()
        orphans += [x for x in self.orphans_during if x not in orphans]
        lost = self.servers_lost()
        lost += [x for x in self.lost_during if x not in lost]
        data = self.data_lost()
        details = dict(self.details)
        details.update({
            "server": self.server,
            "poll_interval": poll_interval,
            "settle_seconds": round(settled, 1),
            "double_holder_samples": self.holders.samples,
            "double_holder_failed_reads": self.holders.failed_reads,
            "double_holders_seen": self.holders.report(),
            "orphans_seen": orphans, "servers_lost_seen": lost, "data_lost_seen": data,
            "marker_files": sum(len(f) for f in self.markers.values()),
            "servers_checked": len(self.ready), "notes": self.notes,
        })
        label = self.size.label if hasattr(self.size, "label") else str(self.size)
        self.row = Row(self.name, label, self.holders.count(), len(orphans), len(lost),
                       len(data), round(time.monotonic() - self.started, 1), self.test,
                       self.full, details, list(self.failed_checks))
        record(self.row, self.directory)
        return self.row
