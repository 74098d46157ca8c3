"""What hardware exists: GPUs and their MIG devices.

The only module that talks to NVML or ``nvidia-smi``. Three backends, tried in this order by
``auto``: NVML (``nvidia-ml-py``, imported as ``pynvml``), ``nvidia-smi`` text, and a static
topology file for hubs that run where they cannot see the GPUs. Whatever looks wrong (MIG on
without instances, a mode change pending a reset, a driver that will not load) goes into
``Inventory.problems`` so the admin page and ``doctor`` can show it, instead of a GPU silently
missing from the choice.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from .records import GPU, Inventory, MigDevice

log = logging.getLogger(__name__)

SOURCES = ("auto", "nvml", "nvidia-smi", "file", "none")

_PROFILE = re.compile(r"^(?:(\d+)c\.)?(\d+)g\.(\d+)gb")
#: Compute slices of MIG-capable GPUs whose total is not 7. Used only where the driver
#: cannot be asked (nvidia-smi text, a topology file that leaves it out).
_TOTAL_SLICES_BY_MODEL = {"A30": 4}


class InventoryError(RuntimeError):
    """The chosen inventory source cannot be read; the message says what to check."""


def profile_slices(profile: str) -> int | None:
    """Compute slices of a GPU instance from its profile name (``3g.40gb`` -> 3)."""
    match = _PROFILE.match(profile)
    return int(match.group(2)) if match else None


def profile_memory_mib(profile: str) -> int | None:
    match = _PROFILE.match(profile)
    return int(match.group(3)) * 1024 if match else None


def default_total_slices(model: str) -> int:
    for key, slices in _TOTAL_SLICES_BY_MODEL.items():
        if key in model:
            return slices
    return 7


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _mig_problems(gpus: Iterable[GPU], migs: Iterable[MigDevice]) -> list[str]:
    migs = list(migs)
    problems = []
    for gpu in gpus:
        if gpu.mig_enabled and not any(m.parent_uuid == gpu.uuid for m in migs):
            problems.append(
                f"GPU {gpu.index} ({gpu.uuid}) has MIG enabled but no MIG devices: it can serve "
                "no one until an admin creates instances (nvidia-smi mig -cgi … -C) or turns "
                "MIG off"
            )
        if gpu.mig_pending is not None and gpu.mig_pending != gpu.mig_enabled:
            want = "on" if gpu.mig_pending else "off"
            problems.append(
                f"GPU {gpu.index} ({gpu.uuid}) has a MIG mode change to {want} pending a GPU "
                "reset; until then it keeps its current mode"
            )
    return problems


# --------------------------------------------------------------------------- NVML


def _load_nvml() -> ModuleType:
    try:
        import pynvml  # nvidia-ml-py
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise InventoryError(f"nvidia-ml-py is not installed ({exc})") from exc
    return pynvml


def _cuda_version(nvml: ModuleType) -> str | None:
    try:
        version = int(nvml.nvmlSystemGetCudaDriverVersion())
    except nvml.NVMLError:
        return None
    return f"{version // 1000}.{(version % 1000) // 10}"


def _profile_table(nvml: ModuleType, handle: Any) -> dict[int, tuple[str, int, int]]:
    """GPU-instance profile id -> (name, slices, memory MiB) for the profiles this GPU has."""
    table: dict[int, tuple[str, int, int]] = {}
    count = getattr(nvml, "NVML_GPU_INSTANCE_PROFILE_COUNT", 10)
    for index in range(count):
        try:
            # nvidia-ml-py takes version 2 (not the struct-version constant) for the variant
            # whose info carries the profile's name; older releases have no version argument.
            try:
                info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, index, 2)
            except TypeError:
                info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, index)
            except nvml.NVMLError as exc:
                missing = getattr(nvml, "NVML_ERROR_FUNCTION_NOT_FOUND", -1)
                if getattr(exc, "value", None) != missing:
                    raise
                info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, index, 1)  # old driver
        except nvml.NVMLError:
            continue
        name = _text(getattr(info, "name", b"")).strip()
        slices = int(info.sliceCount)
        memory = int(info.memorySizeMB)
        name = name.removeprefix("MIG ").strip() or f"{slices}g.{round(memory / 1024)}gb"
        table[int(info.id)] = (name, slices, memory)
    return table


def _mig_profile(
    nvml: ModuleType,
    handle: Any,
    gi: int,
    slices: int,
    memory: int,
    table: dict[int, tuple[str, int, int]],
    problems: list[str],
) -> str:
    """The MIG profile name of a device: from its GPU instance when we may look, else by size."""
    try:
        instance = nvml.nvmlDeviceGetGpuInstanceById(handle, gi)
        profile_id = int(nvml.nvmlGpuInstanceGetInfo(instance).profileId)
        if profile_id in table:
            return table[profile_id][0]
    except nvml.NVMLError_NoPermission:
        note = (
            "NVML refused GPU-instance lookups (not root): MIG profile names are matched "
            "from slice count and memory instead"
        )
        if note not in problems:
            problems.append(note)
    except nvml.NVMLError:
        pass
    matches = [name for name, s, m in table.values() if s == slices and m == memory]
    if len(matches) == 1:
        return matches[0]
    return f"{slices}g.{round(memory / 1024)}gb"


def read_nvml(nvml: ModuleType | None = None) -> Inventory:
    """Read every GPU and MIG device from NVML. Raises InventoryError when NVML cannot load."""
    nvml = nvml or _load_nvml()
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        raise InventoryError(f"NVML could not be initialised: {exc}") from exc
    problems: list[str] = []
    gpus: list[GPU] = []
    migs: list[MigDevice] = []
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        cuda = _cuda_version(nvml)
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            name = _text(nvml.nvmlDeviceGetName(handle))
            memory = int(nvml.nvmlDeviceGetMemoryInfo(handle).total) // (1024 * 1024)
            try:
                current, pending = nvml.nvmlDeviceGetMigMode(handle)
                capable = True
            except nvml.NVMLError:  # NotSupported: a GPU without MIG
                current = pending = 0
                capable = False
            enabled = current == nvml.NVML_DEVICE_MIG_ENABLE
            table = _profile_table(nvml, handle) if capable else {}
            total = max((s for _, s, _ in table.values()), default=0)
            if capable and not total:
                total = default_total_slices(name)
            gpu = GPU(
                index=index,
                uuid=uuid,
                name=name,
                memory_mib=memory,
                mig_enabled=enabled,
                mig_pending=(pending == nvml.NVML_DEVICE_MIG_ENABLE) if capable else None,
                total_slices=total,
            )
            gpus.append(gpu)
            if enabled:
                migs.extend(_read_migs(nvml, handle, gpu, table, problems))
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass
    problems[:0] = _mig_problems(gpus, migs)
    return Inventory(tuple(gpus), tuple(migs), "nvml", driver, cuda, tuple(problems))


def _read_migs(
    nvml: ModuleType,
    handle: Any,
    gpu: GPU,
    table: dict[int, tuple[str, int, int]],
    problems: list[str],
) -> list[MigDevice]:
    found = []
    for position in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, position)
        except nvml.NVMLError_NotFound:
            continue  # an empty index: MIG devices need not be contiguous
        gi = int(nvml.nvmlDeviceGetGpuInstanceId(mig))
        ci = int(nvml.nvmlDeviceGetComputeInstanceId(mig))
        attributes = nvml.nvmlDeviceGetAttributes(mig)
        slices = int(attributes.gpuInstanceSliceCount)
        memory = int(attributes.memorySizeMB)
        found.append(
            MigDevice(
                slot=f"{gpu.index}.{position}",
                uuid=_text(nvml.nvmlDeviceGetUUID(mig)),
                parent_uuid=gpu.uuid,
                gpu_index=gpu.index,
                gi=gi,
                ci=ci,
                profile=_mig_profile(nvml, handle, gi, slices, memory, table, problems),
                memory_mib=memory,
                slices=slices,
                total_slices=gpu.total_slices,
            )
        )
    return found


def uuid_present(uuid: str, nvml: ModuleType | None = None) -> bool:
    """Ask the driver about one device; cheaper than a full read when only one UUID matters."""
    nvml = nvml or _load_nvml()
    nvml.nvmlInit()
    try:
        nvml.nvmlDeviceGetHandleByUUID(uuid)
        return True
    except nvml.NVMLError_NotFound:
        return False
    finally:
        nvml.nvmlShutdown()


# --------------------------------------------------------------------------- nvidia-smi

_SMI_GPU = re.compile(r"^GPU (\d+): (.+?) \(UUID: (GPU-[^)]+)\)")
_SMI_MIG = re.compile(r"^\s+MIG (\S+)\s+Device\s+(\d+): \(UUID: (MIG-[^)]+)\)")
_SMI_FIELDS = "index,uuid,name,memory.total,mig.mode.current,mig.mode.pending,driver_version"

Runner = Callable[[list[str]], str]


def _run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        text = (done.stdout + done.stderr).strip().splitlines()
        raise InventoryError(f"{' '.join(argv)} failed: {text[0] if text else done.returncode}")
    return done.stdout


def parse_nvidia_smi(listing: str, query: str) -> Inventory:
    """Build an inventory from ``nvidia-smi -L`` and ``--query-gpu`` CSV output (pure)."""
    rows = {}
    driver = None
    for row in csv.reader(io.StringIO(query)):
        if len(row) < 7 or not row[0].strip().isdigit():
            continue
        index, uuid, name, memory, current, pending, driver = (c.strip() for c in row[:7])
        rows[int(index)] = (uuid, name, memory, current, pending)
    gpus: list[GPU] = []
    migs: list[MigDevice] = []
    gpu: GPU | None = None
    for line in listing.splitlines():
        if match := _SMI_GPU.match(line):
            index = int(match.group(1))
            uuid, name, memory, current, pending = rows.get(
                index, (match.group(3), match.group(2), "0", "[N/A]", "[N/A]")
            )
            capable = current.lower() in ("enabled", "disabled")
            digits = re.sub(r"\D", "", memory)
            gpu = GPU(
                index=index,
                uuid=match.group(3),
                name=match.group(2).strip(),
                memory_mib=int(digits) if digits else 0,
                mig_enabled=current.lower() == "enabled",
                mig_pending=(pending.lower() == "enabled") if capable else None,
                total_slices=default_total_slices(match.group(2)) if capable else 0,
            )
            gpus.append(gpu)
        elif (match := _SMI_MIG.match(line)) and gpu is not None:
            profile = match.group(1)
            migs.append(
                MigDevice(
                    slot=f"{gpu.index}.{match.group(2)}",
                    uuid=match.group(3),
                    parent_uuid=gpu.uuid,
                    gpu_index=gpu.index,
                    gi=None,
                    ci=None,
                    profile=profile,
                    memory_mib=profile_memory_mib(profile) or 0,
                    slices=profile_slices(profile) or 1,
                    total_slices=gpu.total_slices or 7,
                )
            )
    problems = _mig_problems(gpus, migs)
    if migs:
        problems.append(
            "read through nvidia-smi: GPU-instance ids are unknown, so a restart after MIG "
            "re-creation matches slices by parent GPU and profile only"
        )
    return Inventory(tuple(gpus), tuple(migs), "nvidia-smi", driver, None, tuple(problems))


def read_nvidia_smi(binary: str = "nvidia-smi", run: Runner = _run) -> Inventory:
    path = shutil.which(binary)
    if path is None:
        raise InventoryError(f"{binary} is not on PATH")
    listing = run([path, "-L"])
    query = run([path, f"--query-gpu={_SMI_FIELDS}", "--format=csv,noheader,nounits"])
    return parse_nvidia_smi(listing, query)


# --------------------------------------------------------------------------- topology file


def _mode(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("enabled", "on", "true", "1"):
        return True
    if str(value).lower() in ("disabled", "off", "false", "0"):
        return False
    raise InventoryError(f"{where}: MIG mode {value!r} is not 'enabled' or 'disabled'")


def parse_topology(data: Any, source: str = "topology") -> Inventory:
    """Build an inventory from a topology mapping (the static file's schema; pure)."""
    if not isinstance(data, dict) or not isinstance(data.get("gpus", []), list):
        raise InventoryError(f"{source}: expected a mapping with a 'gpus' list")
    gpus: list[GPU] = []
    migs: list[MigDevice] = []
    try:
        for entry in data.get("gpus") or []:
            where = f"{source}: GPU {entry.get('index')}"
            name = str(entry.get("name", "NVIDIA GPU"))
            capable = bool(entry.get("mig_capable", True))
            enabled = _mode(entry.get("mig_mode", "disabled"), where) if capable else False
            pending = _mode(entry.get("mig_pending", enabled), where) if capable else None
            total = int(entry.get("total_slices") or (default_total_slices(name) if capable else 0))
            gpu = GPU(
                index=int(entry["index"]),
                uuid=str(entry["uuid"]),
                name=name,
                memory_mib=int(entry.get("memory_mib", 0)),
                mig_enabled=enabled,
                mig_pending=pending,
                total_slices=total,
            )
            gpus.append(gpu)
            if not enabled:
                continue
            for position, mig in enumerate(entry.get("mig_devices") or []):
                profile = str(mig["profile"])
                migs.append(
                    MigDevice(
                        slot=f"{gpu.index}.{int(mig.get('index', position))}",
                        uuid=str(mig["uuid"]),
                        parent_uuid=gpu.uuid,
                        gpu_index=gpu.index,
                        gi=int(mig["gi"]) if mig.get("gi") is not None else None,
                        ci=int(mig["ci"]) if mig.get("ci") is not None else None,
                        profile=profile,
                        memory_mib=int(mig.get("memory_mib") or profile_memory_mib(profile) or 0),
                        slices=int(mig.get("slices") or profile_slices(profile) or 1),
                        total_slices=total,
                    )
                )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InventoryError(f"{source}: malformed topology ({exc!r})") from exc
    cuda = data.get("cuda_version")
    return Inventory(
        tuple(gpus),
        tuple(migs),
        "file",
        str(data["driver_version"]) if data.get("driver_version") else None,
        str(cuda) if cuda else None,
        tuple(_mig_problems(gpus, migs)),
    )


def read_topology_file(path: str | os.PathLike[str]) -> Inventory:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise InventoryError(f"topology file {path} cannot be read: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InventoryError(f"topology file {path} is not valid YAML/JSON: {exc}") from exc
    return parse_topology(data, str(path))


# --------------------------------------------------------------------------- choice


def read(
    source: str = "auto",
    *,
    topology_file: str | os.PathLike[str] | None = None,
    nvml: ModuleType | None = None,
    smi_binary: str = "nvidia-smi",
    logger: logging.Logger | None = None,
) -> Inventory:
    """Read the inventory from ``source``; ``auto`` falls back and logs which one answered.

    ``auto`` never raises: a host with no NVIDIA driver is a CPU-only host, and says so in
    ``problems``. An explicit source raises InventoryError so a misconfiguration is loud.
    """
    logger = logger or log
    if source not in SOURCES:
        raise InventoryError(f"unknown inventory source {source!r}; use one of {SOURCES}")
    if source == "nvml":
        return read_nvml(nvml)
    if source == "nvidia-smi":
        return read_nvidia_smi(smi_binary)
    if source == "file":
        if not topology_file:
            raise InventoryError("inventory source 'file' needs a topology file")
        return read_topology_file(topology_file)
    if source == "none":
        return Inventory(source="none")
    reasons = []
    if topology_file:
        return read_topology_file(topology_file)
    try:
        inventory = read_nvml(nvml)
        logger.debug("inventory: read %d GPU(s) through NVML", len(inventory.gpus))
        return inventory
    except InventoryError as exc:
        reasons.append(str(exc))
    try:
        inventory = read_nvidia_smi(smi_binary)
        logger.info("inventory: NVML unavailable (%s); read nvidia-smi instead", reasons[0])
        return inventory
    except InventoryError as exc:
        reasons.append(str(exc))
    logger.info(
        "inventory: no NVIDIA GPUs visible (%s); GPU profiles unavailable", "; ".join(reasons)
    )
    return Inventory(
        source="none",
        problems=(f"no NVIDIA driver answered ({'; '.join(reasons)}): only CPU servers can start",),
    )
