"""The GPU simulator: NVIDIA hosts as topology files, and the fakes that answer from them.

No machine that runs these tests has a GPU, so the NVIDIA side of a host is a JSON state file
(``$GPUSIM_STATE``) written from a topology (``topologies/*.yaml``, the same schema as the
product's static topology file). Everything that would ask the driver reads that file instead:
the fake ``pynvml`` (``fake/``), the fake ``nvidia-smi`` and the fake
``nvidia-container-runtime-hook`` (``bin/``) that Docker runs at every GPU container start.
Changing the file is changing the host: :func:`reboot` re-creates MIG devices with new UUIDs
and applies pending MIG modes, as a real reboot does, so tests can prove the product survives
it.

The state is written fully expanded (every default filled in) so the fakes, which are
standard library only and run outside the test process, need no schema logic of their own.

Activity (what real NVML reports as in use): every GPU and MIG device carries ``processes``
(``[{"pid", "used_mib"}]``, compute processes) and ``memory_used_mib`` (memory held by no
listed process, as leaked or zombie allocations are); a GPU carries ``utilization``
(``{"gpu", "memory"}`` percent). :func:`start_process` and friends change them; a missing key
(a state file from before) means none.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import random
import re
import sys
import tempfile
import uuid as uuidlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
FAKE_DIR = HERE / "fake"
BIN_DIR = HERE / "bin"
TOPOLOGY_DIR = HERE / "topologies"

_PROFILE = re.compile(r"^(\d+)g\.(\d+)gb")
#: The first fake pid :func:`start_process` hands out: far above what a test host's own
#: processes use, so a fake pid never names a real process of the machine running the tests.
FIRST_PID = 400000
#: Compute slices of MIG-capable models whose total is not 7 (the product's rule, repeated so
#: the state file says explicitly what the product would assume).
_TOTAL_SLICES_BY_MODEL = {"A30": 4}


class TopologyError(ValueError):
    """A topology that no real host could have; the message says which GPU and why."""


# ------------------------------------------------------------------------------ topologies


def topology_path(name: str | os.PathLike[str]) -> Path:
    """A topology's file: a path as given, or a bare name (``a100x4``) from topologies/."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml", ".json") or path.parent != Path("."):
        return path
    return TOPOLOGY_DIR / f"{name}.yaml"


def load_topology(path_or_name: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a topology (YAML or JSON) by path or by name, validated and fully expanded."""
    path = topology_path(path_or_name)
    data = yaml.safe_load(path.read_text())
    return expand(data, source=str(path))


def _slices(profile: str) -> int:
    match = _PROFILE.match(profile)
    if not match:
        raise TopologyError(f"MIG profile {profile!r} does not read as <N>g.<M>gb")
    return int(match.group(1))


def _memory_mib(profile: str) -> int:
    match = _PROFILE.match(profile)
    if not match:
        raise TopologyError(f"MIG profile {profile!r} does not read as <N>g.<M>gb")
    return int(match.group(2)) * 1024


def _mode(value: Any, where: str) -> str:
    text = str(value).lower() if not isinstance(value, bool) else ("enabled" if value else "")
    if text in ("enabled", "on", "true", "1"):
        return "enabled"
    if text in ("disabled", "off", "false", "0", ""):
        return "disabled"
    raise TopologyError(f"{where}: MIG mode {value!r} is not 'enabled' or 'disabled'")


def _activity(entry: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A device's processes and memory in use, validated: a pid listed twice on one device or
    a negative size is a typo, not something a driver reports."""
    processes = []
    for process in entry.get("processes") or []:
        pid, used = int(process["pid"]), int(process.get("used_mib", 0))
        if pid <= 0 or used < 0:
            raise TopologyError(f"{where}: process {process!r} needs a pid > 0, used_mib >= 0")
        if any(p["pid"] == pid for p in processes):
            raise TopologyError(f"{where}: pid {pid} listed twice")
        processes.append({"pid": pid, "used_mib": used})
    memory_used = int(entry.get("memory_used_mib") or 0)
    if memory_used < 0:
        raise TopologyError(f"{where}: memory_used_mib {memory_used} is negative")
    return {"processes": processes, "memory_used_mib": memory_used}


def _percent(value: Any, where: str) -> int:
    percent = int(value or 0)
    if not 0 <= percent <= 100:
        raise TopologyError(f"{where}: utilization {percent}% is outside 0..100")
    return percent


def expand(data: Mapping[str, Any], source: str = "topology") -> dict[str, Any]:
    """Validate a topology and fill in every default, so readers need no schema logic.

    Checks what a real driver guarantees (unique UUIDs, MIG handle indexes below the maximum,
    instances only under a GPU whose MIG mode is on, slices that fit), so a typo in a test
    topology fails here and not as a puzzling product bug.
    """
    if not isinstance(data, Mapping) or not isinstance(data.get("gpus"), list):
        raise TopologyError(f"{source}: expected a mapping with a 'gpus' list")
    out: dict[str, Any] = {
        "driver_version": str(data.get("driver_version", "550.90.07")),
        "cuda_version": str(data.get("cuda_version", "12.4")),
        "root": bool(data.get("root", True)),
        "next_pid": max(int(data.get("next_pid") or FIRST_PID), FIRST_PID),
        "gpus": [],
    }
    if data.get("faults"):
        out["faults"] = copy.deepcopy(dict(data["faults"]))
    seen: set[str] = set()
    for position, entry in enumerate(data["gpus"]):
        where = f"{source}: GPU {entry.get('index', position)}"
        name = str(entry.get("name", "NVIDIA A100-SXM4-80GB"))
        capable = bool(entry.get("mig_capable", True))
        mode = _mode(entry.get("mig_mode", "disabled"), where) if capable else "disabled"
        pending = _mode(entry.get("mig_pending", mode), where) if capable else "disabled"
        default_total = next((n for k, n in _TOTAL_SLICES_BY_MODEL.items() if k in name), 7)
        total = int(entry.get("total_slices") or (default_total if capable else 0))
        gpu = {
            "index": int(entry.get("index", position)),
            "uuid": str(entry["uuid"]),
            "name": name,
            "memory_mib": int(entry.get("memory_mib", 81920)),
            "mig_capable": capable,
            "mig_mode": mode,
            "mig_pending": pending,
            "total_slices": total,
            "max_mig_devices": int(entry.get("max_mig_devices") or total) if capable else 0,
            "mig_devices": [],
            **_activity(entry, where),
            "utilization": {
                key: _percent((entry.get("utilization") or {}).get(key), where)
                for key in ("gpu", "memory")
            },
        }
        if gpu["processes"] and mode == "enabled":
            # CUDA sees only the MIG devices of a MIG-enabled GPU: nothing runs on the parent.
            raise TopologyError(f"{where}: processes on a MIG-enabled GPU; put them on its "
                                "MIG devices")
        if gpu["uuid"] in seen:
            raise TopologyError(f"{where}: UUID {gpu['uuid']} appears twice")
        seen.add(gpu["uuid"])
        devices = entry.get("mig_devices") or []
        if devices and mode != "enabled":
            raise TopologyError(f"{where}: MIG devices listed but MIG mode is {mode}")
        used_indexes: set[int] = set()
        used_gis: set[int] = set()
        for slot, mig in enumerate(devices):
            profile = str(mig["profile"])
            device = {
                "index": int(mig.get("index", slot)),
                "profile": profile,
                "uuid": str(mig["uuid"]),
                "gi": int(mig["gi"]),
                "ci": int(mig.get("ci", 0)),
                "memory_mib": int(mig.get("memory_mib") or _memory_mib(profile)),
                "slices": int(mig.get("slices") or _slices(profile)),
                **_activity(mig, f"{where} MIG {mig['uuid']}"),
            }
            if device["uuid"] in seen:
                raise TopologyError(f"{where}: UUID {device['uuid']} appears twice")
            seen.add(device["uuid"])
            if not 0 <= device["index"] < gpu["max_mig_devices"]:
                raise TopologyError(
                    f"{where}: MIG handle index {device['index']} is outside "
                    f"0..{gpu['max_mig_devices'] - 1}"
                )
            if device["index"] in used_indexes or device["gi"] in used_gis:
                raise TopologyError(f"{where}: MIG handle index or GPU-instance id used twice")
            used_indexes.add(device["index"])
            used_gis.add(device["gi"])
            gpu["mig_devices"].append(device)
        if sum(d["slices"] for d in gpu["mig_devices"]) > total:
            raise TopologyError(f"{where}: MIG devices need more than its {total} slices")
        gpu["mig_devices"].sort(key=lambda d: d["index"])
        out["gpus"].append(gpu)
    out["gpus"].sort(key=lambda g: g["index"])
    if [g["index"] for g in out["gpus"]] != list(range(len(out["gpus"]))):
        raise TopologyError(f"{source}: GPU indexes must be 0..N-1, as NVML numbers them")
    return out


# ----------------------------------------------------------------------------------- state


def _write(state_path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """Write atomically: the hook may read the file while a test rewrites it."""
    path = Path(state_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".gpusim-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(state, handle, indent=2)
        handle.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def install(
    topology: str | os.PathLike[str] | Mapping[str, Any], state_path: str | os.PathLike[str]
) -> dict[str, Any]:
    """Make ``topology`` (a name, a path or a mapping) the host's current state."""
    if isinstance(topology, Mapping):
        state = expand(topology)
    else:
        state = load_topology(topology)
    _write(state_path, state)
    return state


def read_state(state_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The host's current state, as the fakes see it."""
    return json.loads(Path(state_path).read_text())


def _new_uuid(prefix: str, rng: random.Random) -> str:
    return f"{prefix}-{uuidlib.UUID(int=rng.getrandbits(128), version=4)}"


def reboot(state_path: str | os.PathLike[str], seed: int | None = None) -> dict[str, Any]:
    """Simulate a host reboot, with the MIG layout re-created by the admin's boot script.

    As on a real host: every MIG device comes back with a NEW UUID (same profile, same
    GPU-instance id), its NVML handle index may differ, and pending MIG mode changes take
    effect (a GPU whose MIG turns on starts with no instances; one turning off loses them).
    GPU UUIDs never change. Every process ends and all memory is free again; the fake pid
    counter goes on (a test must not mistake a new process for an old one).
    """
    rng = random.Random(seed) if seed is not None else random.Random(os.urandom(16))
    state = read_state(state_path)
    for gpu in state["gpus"]:
        _idle(gpu)  # a reboot ends every process and frees all memory
        gpu["utilization"] = {"gpu": 0, "memory": 0}
        for device in gpu.get("mig_devices") or []:
            _idle(device)
        if gpu.get("mig_pending", gpu["mig_mode"]) != gpu["mig_mode"]:
            gpu["mig_mode"] = gpu["mig_pending"]
            gpu["mig_devices"] = []
            continue
        devices = list(gpu.get("mig_devices") or [])
        rng.shuffle(devices)
        for position, device in enumerate(devices):
            device["uuid"] = _new_uuid("MIG", rng)
            device["index"] = position
        gpu["mig_devices"] = sorted(devices, key=lambda d: d["index"])
    _write(state_path, state)
    return state


def remove_gpu(state_path: str | os.PathLike[str], index: int) -> dict[str, Any]:
    """A GPU falls off the bus. NVML numbers the rest 0..N-1 again, so later indexes shift."""
    state = read_state(state_path)
    gpus = [g for g in state["gpus"] if g["index"] != index]
    if len(gpus) == len(state["gpus"]):
        raise KeyError(f"no GPU with index {index}")
    for position, gpu in enumerate(gpus):
        gpu["index"] = position
    state["gpus"] = gpus
    _write(state_path, state)
    return state


def _gpu(state: Mapping[str, Any], index: int) -> dict[str, Any]:
    for gpu in state["gpus"]:
        if gpu["index"] == index:
            return gpu
    raise KeyError(f"no GPU with index {index}")


def set_mig(
    state_path: str | os.PathLike[str],
    index: int,
    devices: Iterable[str | Mapping[str, Any]],
    seed: int | None = None,
) -> list[dict[str, Any]]:
    """Replace GPU ``index``'s MIG devices, as an admin destroying and creating instances does.

    Each device is a profile name (``"1g.10gb"``: a new UUID, the next free GPU-instance id,
    the model's real memory size) or a mapping in the topology schema. Returns the devices
    as written, so a test knows the new UUIDs. The GPU's MIG mode must already be on: a real
    driver refuses instances otherwise. Every device written is a new instance: no processes,
    no memory in use.
    """
    rng = random.Random(seed) if seed is not None else random.Random(os.urandom(16))
    state = read_state(state_path)
    gpu = _gpu(state, index)
    if gpu["mig_mode"] != "enabled":
        raise TopologyError(f"GPU {index}: MIG mode is {gpu['mig_mode']}; enable it first")
    table = {row[2]: row for row in load_fake_nvml().profile_table(gpu)}
    wanted: list[dict[str, Any]] = []
    for position, device in enumerate(devices):
        if isinstance(device, str):
            row = table.get(device)
            used = {d.get("gi") for d in wanted}
            gi = next(i for i in range(1, 64) if i not in used)
            device = {
                "index": position,
                "profile": device,
                "uuid": _new_uuid("MIG", rng),
                "gi": gi,
                "ci": 0,
                "memory_mib": row[5] if row else _memory_mib(device),
            }
        # A created instance starts idle, whatever a mapping passed back in still carries.
        fresh = {k: v for k, v in device.items() if k not in ("processes", "memory_used_mib")}
        wanted.append(fresh)
    candidate = copy.deepcopy(state)
    _gpu(candidate, index)["mig_devices"] = wanted
    candidate = expand(candidate, source=str(state_path))
    _write(state_path, candidate)
    return _gpu(candidate, index)["mig_devices"]


def _idle(device: dict[str, Any]) -> None:
    device["processes"] = []
    device["memory_used_mib"] = 0


def _devices(state: Mapping[str, Any]) -> Iterable[dict[str, Any]]:
    """Every GPU and MIG device of the state."""
    for gpu in state["gpus"]:
        yield gpu
        yield from gpu.get("mig_devices") or []


def _device(state: Mapping[str, Any], uuid: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(gpu, device) for a GPU or MIG UUID; a KeyError naming the UUID, so a test that kept a
    UUID from before a reboot or set_mig learns why at once."""
    for gpu in state["gpus"]:
        if gpu["uuid"] == uuid:
            return gpu, gpu
        for mig in gpu.get("mig_devices") or []:
            if mig["uuid"] == uuid:
                return gpu, mig
    raise KeyError(f"no GPU or MIG device with UUID {uuid} (re-created or rebooted away?)")


def start_process(
    state_path: str | os.PathLike[str], device_uuid: str, used_mib: int, pid: int | None = None
) -> int:
    """A compute process starts on a GPU (MIG off) or a MIG device and holds ``used_mib``.

    ``pid`` defaults to a fresh fake one from a counter in the state (from FIRST_PID, never
    handed out twice, not even after a reboot), so tests can tell processes apart. One pid
    may run on several devices, as a multi-GPU process does, but only once on each. A
    MIG-enabled GPU refuses: CUDA sees only its MIG devices. Returns the pid.
    """
    state = read_state(state_path)
    gpu, device = _device(state, device_uuid)
    if device is gpu and gpu.get("mig_mode") == "enabled":
        raise ValueError(f"GPU {device_uuid} has MIG enabled: processes run on its MIG devices")
    if int(used_mib) < 0:
        raise ValueError(f"used_mib {used_mib} is negative")
    processes = device.setdefault("processes", [])
    if pid is None:
        running = {int(p["pid"]) for d in _devices(state) for p in d.get("processes") or []}
        pid = max(int(state.get("next_pid") or FIRST_PID), FIRST_PID)
        while pid in running:
            pid += 1
        state["next_pid"] = pid + 1
    elif any(int(p["pid"]) == int(pid) for p in processes):
        raise ValueError(f"pid {pid} already runs on {device_uuid}")
    processes.append({"pid": int(pid), "used_mib": int(used_mib)})
    _write(state_path, state)
    return int(pid)


def end_process(state_path: str | os.PathLike[str], pid: int) -> None:
    """Process ``pid`` exits: it leaves every device it ran on. Already gone is fine, as a
    test cleaning up after a container that took its processes with it needs."""
    state = read_state(state_path)
    changed = False
    for device in _devices(state):
        processes = device.get("processes") or []
        kept = [p for p in processes if int(p["pid"]) != int(pid)]
        if len(kept) != len(processes):
            device["processes"] = kept
            changed = True
    if changed:
        _write(state_path, state)


def set_memory_used(state_path: str | os.PathLike[str], device_uuid: str, mib: int) -> None:
    """Memory in use on a device that no listed process holds (leaked by a crashed process,
    a zombie's): NVML counts it in ``used`` but lists no process for it."""
    if int(mib) < 0:
        raise ValueError(f"memory in use {mib} MiB is negative")
    state = read_state(state_path)
    _gpu_entry, device = _device(state, device_uuid)
    device["memory_used_mib"] = int(mib)
    _write(state_path, state)


def set_utilization(
    state_path: str | os.PathLike[str], gpu_index: int, gpu_percent: int,
    memory_percent: int = 0,
) -> None:
    """GPU ``gpu_index``'s utilization as NVML samples it. Only a whole GPU with MIG off
    reports it: on a MIG-enabled GPU and its MIG devices NVML says Not Supported."""
    for value in (gpu_percent, memory_percent):
        if not 0 <= int(value) <= 100:
            raise ValueError(f"utilization {value}% is outside 0..100")
    state = read_state(state_path)
    _gpu(state, gpu_index)["utilization"] = {"gpu": int(gpu_percent),
                                             "memory": int(memory_percent)}
    _write(state_path, state)


def set_pending_mig(state_path: str | os.PathLike[str], index: int, mode: str) -> None:
    """Ask for a MIG mode change (``nvidia-smi -mig 1``): it stays pending until reboot()."""
    state = read_state(state_path)
    gpu = _gpu(state, index)
    if not gpu.get("mig_capable", True):
        raise TopologyError(f"GPU {index} is not MIG-capable")
    gpu["mig_pending"] = _mode(mode, f"GPU {index}")
    _write(state_path, state)


def read_hook_log(path: str | os.PathLike[str] | None) -> list[dict[str, Any]]:
    """Every call of the fake hook so far: one dict per container start (see bin/)."""
    if not path or not Path(path).exists():
        return []
    lines = Path(path).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


_ERROR_CODES: dict[str, int] = {}


def error_code(error: str | int) -> int:
    """An NVML error code from its number or its class name (``"GpuIsLost"``,
    ``"NVMLError_GpuIsLost"``), as the fake's error classes (and nvidia-ml-py's) name them."""
    if isinstance(error, int):
        return error
    if not _ERROR_CODES:
        spec = importlib.util.spec_from_file_location("gpusim_fake_pynvml_errors",
                                                      FAKE_DIR / "pynvml.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        for code, cls in module.NVMLError._valClassMapping.items():
            _ERROR_CODES[cls.__name__.removeprefix("NVMLError_")] = code
    name = error.removeprefix("NVMLError_")
    if name not in _ERROR_CODES:
        raise ValueError(f"no NVML error named {error!r}; one of {sorted(_ERROR_CODES)}")
    return _ERROR_CODES[name]


def add_fault(
    state_path: str | os.PathLike[str],
    error: str | int,
    *,
    gpu: int | None = None,
    functions: Iterable[str] | None = None,
    times: int | None = None,
) -> str:
    """Make NVML calls fail with ``error`` (see the fake's docstring): those about GPU index
    ``gpu`` (its handle, its MIG devices' handles, looking it up), or every call; only
    ``functions`` if given; ``times`` times, or for good. Returns the rule's id."""
    state = read_state(state_path)
    rule: dict[str, Any] = {"id": uuidlib.uuid4().hex, "error": error_code(error)}
    if gpu is not None:
        rule["gpu"] = _gpu(state, gpu)["uuid"]
    if functions is not None:
        rule["functions"] = sorted(functions)
    if times is not None:
        rule["times"] = int(times)
    state.setdefault("faults", {}).setdefault("rules", []).append(rule)
    _write(state_path, state)
    return str(rule["id"])


def set_nvml_delay(state_path: str | os.PathLike[str], seconds: float) -> None:
    """Every NVML call takes ``seconds`` (a driver stuck behind a hung GPU)."""
    state = read_state(state_path)
    state.setdefault("faults", {})["delay_s"] = float(seconds)
    _write(state_path, state)


def clear_faults(state_path: str | os.PathLike[str]) -> None:
    """No more injected failures or delay (``root`` stays as it is)."""
    state = read_state(state_path)
    state.pop("faults", None)
    _write(state_path, state)


def load_fake_nvml() -> ModuleType:
    """A fresh copy of the fake ``pynvml`` module, under its own name.

    Loaded from its file rather than imported as ``pynvml`` so the test process keeps the real
    nvidia-ml-py importable beside it; pass it to the product (``read_nvml(nvml=...)``).
    """
    spec = importlib.util.spec_from_file_location("gpusim_fake_pynvml", FAKE_DIR / "pynvml.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its error classes look themselves up by module name
    spec.loader.exec_module(module)
    return module


class Simulator:
    """One simulated host, bound to a state file: what the ``gpusim`` fixtures hand to tests."""

    def __init__(
        self,
        state_path: str | os.PathLike[str],
        hook_log: str | os.PathLike[str] | None = None,
    ) -> None:
        self.state_path = Path(state_path)
        self.hook_log = Path(hook_log) if hook_log else None
        self.topology: dict[str, Any] = {}

    def install(
        self, topology: str | os.PathLike[str] | Mapping[str, Any] = "a100x4"
    ) -> dict[str, Any]:
        """Make ``topology`` current; ``.topology`` keeps what was installed."""
        self.topology = install(topology, self.state_path)
        return copy.deepcopy(self.topology)

    def state(self) -> dict[str, Any]:
        return read_state(self.state_path)

    def reboot(self, seed: int | None = None) -> dict[str, Any]:
        return reboot(self.state_path, seed)

    def remove_gpu(self, index: int) -> dict[str, Any]:
        return remove_gpu(self.state_path, index)

    def set_mig(
        self, index: int, devices: Iterable[str | Mapping[str, Any]], seed: int | None = None
    ) -> list[dict[str, Any]]:
        return set_mig(self.state_path, index, devices, seed)

    def set_pending_mig(self, index: int, mode: str) -> None:
        set_pending_mig(self.state_path, index, mode)

    def set_root(self, root: bool) -> None:
        """``root: false``: NVML as a non-root hub meets it: GPU-instance lookups and the
        memory of a MIG-enabled GPU raise ``NVMLError_NoPermission``, nothing else does."""
        state = self.state()
        state["root"] = bool(root)
        _write(self.state_path, state)

    def lose_gpu(self, index: int) -> str:
        """GPU ``index`` falls off the bus but stays counted, as NVML does it (Xid 79): looking
        it up by index or UUID, and every call on its handle or its MIG devices' handles,
        raise ``NVMLError_GpuIsLost``; the other GPUs answer. Returns the fault's id."""
        return add_fault(self.state_path, "GpuIsLost", gpu=index)

    def fail_gpu(
        self,
        index: int,
        error: str | int,
        functions: Iterable[str] | None = None,
        times: int | None = None,
    ) -> str:
        """NVML calls about GPU ``index`` (only ``functions`` if given) raise ``error``
        (``"NoPermission"``, ``"Unknown"``, a code), ``times`` times or for good."""
        return add_fault(self.state_path, error, gpu=index, functions=functions, times=times)

    def fail_calls(
        self, times: int, error: str | int = "Unknown", functions: Iterable[str] | None = None
    ) -> str:
        """The next ``times`` NVML calls (of ``functions`` if given) raise ``error``, then
        calls answer again: a driver that hiccups. Counted per process that loads the fake."""
        return add_fault(self.state_path, error, functions=functions, times=times)

    def set_nvml_delay(self, seconds: float) -> None:
        """Every NVML call takes ``seconds``."""
        set_nvml_delay(self.state_path, seconds)

    def clear_faults(self) -> None:
        clear_faults(self.state_path)

    def start_process(self, device_uuid: str, used_mib: int, pid: int | None = None) -> int:
        return start_process(self.state_path, device_uuid, used_mib, pid)

    def end_process(self, pid: int) -> None:
        end_process(self.state_path, pid)

    def set_memory_used(self, device_uuid: str, mib: int) -> None:
        set_memory_used(self.state_path, device_uuid, mib)

    def set_utilization(self, gpu_index: int, gpu_percent: int, memory_percent: int = 0) -> None:
        set_utilization(self.state_path, gpu_index, gpu_percent, memory_percent)

    def hook_calls(self) -> list[dict[str, Any]]:
        return read_hook_log(self.hook_log)

    def clear_hook_log(self) -> None:
        if self.hook_log and self.hook_log.exists():
            self.hook_log.write_text("")

    def nvml(self) -> ModuleType:
        """A fresh fake ``pynvml``; it reads ``$GPUSIM_STATE``, which the fixtures set."""
        return load_fake_nvml()

    # Convenience views for assertions.
    def mig_uuids(self) -> list[str]:
        return [m["uuid"] for g in self.state()["gpus"] for m in g["mig_devices"]]

    def gpu_uuids(self) -> list[str]:
        return [g["uuid"] for g in self.state()["gpus"]]
