"""What hardware exists: GPUs and their MIG devices.

The only module that talks to NVML or ``nvidia-smi``. Three backends, tried in this order by
``auto``: NVML (``nvidia-ml-py``, imported as ``pynvml``), ``nvidia-smi`` text, and a static
topology file for hubs that run where they cannot see the GPUs. Whatever looks wrong (MIG on
without instances, a mode change pending a reset, a driver that will not load) goes into
``Inventory.problems`` so the admin page and ``doctor`` can show it, instead of a GPU silently
missing from the choice.

NVML is read as real hosts give it: a non-root caller is refused some questions (answered
another way, said in ``Inventory.unprivileged``); a failure on one GPU makes that GPU and its
MIG devices ``unavailable`` with the reason while the others serve; transient errors are
asked again. Long-running callers read through a ``Reader``: one NVML thread, a short cache.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import csv
import io
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any
from xml.etree import ElementTree

import yaml

from . import procs
from .records import GPU, GpuProcess, Inventory, MigDevice

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

#: NVML errors asked again after a short pause: the driver timed out (``Timeout``), was not
#: ready yet (``NotReady``: still initialising, or a GPU being reset), or could not say
#: (``Unknown``: what NVML answers while the kernel module is busy or an RPC to it failed).
#: Every other error describes a state that a fraction of a second does not change (a GPU
#: lost, access refused, a function or profile not supported, a device not found) and is
#: dealt with where it is met.
TRANSIENT_ERRORS = {"NVML_ERROR_TIMEOUT": 10, "NVML_ERROR_NOT_READY": 27, "NVML_ERROR_UNKNOWN": 999}
#: Pauses (seconds) before the second and the third try of a call that failed transiently,
#: and of a GPU whose MIG devices changed while it was read. Reads run on a worker thread
#: (see ``Reader``), never on the event loop, so they may sleep.
RETRY_PAUSES = (0.05, 0.2)
_MIB = 1024 * 1024
_MODEL_MEMORY = re.compile(r"(\d+)\s*GB\b", re.IGNORECASE)

Sleep = Callable[[float], None]


def _load_nvml() -> ModuleType:
    try:
        import pynvml  # nvidia-ml-py
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise InventoryError(f"nvidia-ml-py is not installed ({exc})") from exc
    return pynvml


class _MigChanged(Exception):
    """A MIG device of the GPU being read went away during the read (re-created)."""


class _Caller:
    """One read's way of calling NVML: a transient error is tried again after a pause."""

    def __init__(self, nvml: ModuleType, sleep: Sleep) -> None:
        self.nvml = nvml
        self.sleep = sleep
        self.transient = {getattr(nvml, name, code) for name, code in TRANSIENT_ERRORS.items()}
        self.tries = len(RETRY_PAUSES) + 1

    def is_transient(self, exc: BaseException) -> bool:
        return getattr(exc, "value", None) in self.transient

    def __call__(self, name: str, *args: Any) -> Any:
        function = getattr(self.nvml, name)
        for pause in (*RETRY_PAUSES, None):
            try:
                return function(*args)
            except self.nvml.NVMLError as exc:
                if pause is None or not self.is_transient(exc):
                    log.debug("inventory: %s failed: %s", name, exc)
                    raise
                log.debug("inventory: %s failed (%s); trying again in %.2fs", name, exc, pause)
            self.sleep(pause)
        raise AssertionError("unreachable")  # pragma: no cover


def _cuda_version(call: _Caller) -> str | None:
    try:
        version = int(call("nvmlSystemGetCudaDriverVersion"))
    except call.nvml.NVMLError:
        return None
    return f"{version // 1000}.{(version % 1000) // 10}"


#: What a non-root reader is refused, and what it does instead (``Inventory.unprivileged``).
_REFUSED = {
    "gi": "GPU-instance lookups (MIG profile names are matched from slice count and memory "
          "instead; where two profiles have the same size, like 1g.10gb and 1g.10gb+me, the "
          "plain one is assumed)",
    "memory": "the total memory of MIG-enabled GPUs (taken from the model name instead)",
    "profiles": "the GPU-instance profile table (MIG profile names are made from slice count "
                "and memory, and a MIG GPU's compute slices assumed from its model)",
}


def _unprivileged(notes: set[str]) -> str | None:
    if not notes:
        return None
    refused = [text for key, text in _REFUSED.items() if key in notes]
    return (
        "the hub's user is not root, so NVML refused " + " and ".join(refused)
        + "; running the hub as root reads them exactly"
    )


def _profile_table(
    call: _Caller, handle: Any, notes: set[str]
) -> dict[int, tuple[str, int, int]]:
    """GPU-instance profile id -> (name, slices, memory MiB) for the profiles this GPU has."""
    nvml = call.nvml
    table: dict[int, tuple[str, int, int]] = {}
    count = getattr(nvml, "NVML_GPU_INSTANCE_PROFILE_COUNT", 10)
    for index in range(count):
        try:
            # nvidia-ml-py takes version 2 (not the struct-version constant) for the variant
            # whose info carries the profile's name; older releases have no version argument.
            try:
                info = call("nvmlDeviceGetGpuInstanceProfileInfo", handle, index, 2)
            except TypeError:
                info = call("nvmlDeviceGetGpuInstanceProfileInfo", handle, index)
            except nvml.NVMLError_FunctionNotFound:
                info = call("nvmlDeviceGetGpuInstanceProfileInfo", handle, index, 1)  # old driver
        except (nvml.NVMLError_NotSupported, nvml.NVMLError_InvalidArgument):
            continue  # a profile this GPU does not have, or one this driver does not know
        except nvml.NVMLError_NoPermission:
            notes.add("profiles")
            return {}
        name = _text(getattr(info, "name", b"")).strip()
        slices = int(info.sliceCount)
        memory = int(info.memorySizeMB)
        name = name.removeprefix("MIG ").strip() or f"{slices}g.{round(memory / 1024)}gb"
        table[int(info.id)] = (name, slices, memory)
    return table


def _by_size(slices: int, memory: int, table: dict[int, tuple[str, int, int]]) -> str:
    matches = [name for name, s, m in table.values() if s == slices and m == memory]
    plain = [name for name in matches if "+" not in name]
    if len(matches) == 1:
        return matches[0]
    if len(plain) == 1:
        return plain[0]
    return f"{slices}g.{round(memory / 1024)}gb"


def _mig_profile(
    call: _Caller,
    handle: Any,
    gi: int,
    slices: int,
    memory: int,
    table: dict[int, tuple[str, int, int]],
    notes: set[str],
) -> str:
    """The MIG profile name of a device: from its GPU instance when we may look, else by size."""
    nvml = call.nvml
    try:
        instance = call("nvmlDeviceGetGpuInstanceById", handle, gi)
        profile_id = int(call("nvmlGpuInstanceGetInfo", instance).profileId)
        if profile_id in table:
            return table[profile_id][0]
    except nvml.NVMLError_NoPermission:
        notes.add("gi")
    except nvml.NVMLError_NotFound as exc:
        raise _MigChanged(f"GPU instance {gi} not found") from exc
    except (nvml.NVMLError_NotSupported, nvml.NVMLError_InvalidArgument):
        pass
    return _by_size(slices, memory, table)


def _model_memory(name: str) -> int:
    match = _MODEL_MEMORY.search(name)
    return int(match.group(1)) * 1024 if match else 0


def _gpu_memory(
    call: _Caller, handle: Any, name: str, mig_enabled: bool,
    table: dict[int, tuple[str, int, int]], notes: set[str],
) -> int:
    try:
        return int(call("nvmlDeviceGetMemoryInfo", handle).total) // _MIB
    except call.nvml.NVMLError_NoPermission:
        if not mig_enabled:
            raise  # not what NVML refuses a non-root user: something is wrong with this GPU
        # Aggregate memory of a MIG-enabled GPU needs privileges; per MIG device it does not.
        notes.add("memory")
        return _model_memory(name) or max((m for _, _, m in table.values()), default=0)


#: nvidia-ml-py's names for the compute-process list, newest first (a driver may lack some).
_PROCESS_CALLS = ("nvmlDeviceGetComputeRunningProcesses_v3",
                  "nvmlDeviceGetComputeRunningProcesses_v2",
                  "nvmlDeviceGetComputeRunningProcesses")


def _activity(call: _Caller, handle: Any) -> tuple[int | None, tuple[GpuProcess, ...]]:
    """Memory in use and compute processes of one device (a MIG device handle, or a GPU
    with MIG off); (None, ()) where NVML will not say. Never makes a device unavailable:
    activity is for people and for ``busy``, not for what exists."""
    nvml = call.nvml
    try:
        used: int | None = int(call("nvmlDeviceGetMemoryInfo", handle).used) // _MIB
    except nvml.NVMLError:
        used = None
    processes: tuple[GpuProcess, ...] = ()
    for name in _PROCESS_CALLS:
        if not hasattr(nvml, name):
            continue
        try:
            found = call(name, handle) or []
        except nvml.NVMLError_FunctionNotFound:
            continue
        except Exception as exc:  # NVML's errors, and nvidia-ml-py's library mismatch
            log.debug("inventory: %s failed: %s", name, exc)
            break
        processes = tuple(GpuProcess(int(p.pid), _process_mib(p), procs.container_of(p.pid))
                          for p in found)
        break
    return used, processes


def _process_mib(process: Any) -> int:
    """A process's memory in MiB; 0 where NVML does not know it (nvidia-ml-py gives None, an
    older one the all-ones "not available" value)."""
    used = getattr(process, "usedGpuMemory", None) or 0
    return 0 if used >= 2**63 else int(used) // _MIB


def _utilization(call: _Caller, handle: Any) -> int | None:
    """A whole GPU's utilization in percent; None where NVML does not report it (MIG)."""
    try:
        return int(call("nvmlDeviceGetUtilizationRates", handle).gpu)
    except call.nvml.NVMLError:
        return None


@dataclass
class _Partial:
    """What was read of one GPU before NVML failed on it."""

    index: int
    uuid: str | None = None
    name: str | None = None
    mig_enabled: bool | None = None
    migs: list[MigDevice] = field(default_factory=list)


def _read_gpu(
    call: _Caller, index: int, partial: _Partial, notes: set[str]
) -> tuple[GPU, list[MigDevice]]:
    nvml = call.nvml
    handle = call("nvmlDeviceGetHandleByIndex", index)
    partial.uuid = uuid = _text(call("nvmlDeviceGetUUID", handle))
    partial.name = name = _text(call("nvmlDeviceGetName", handle))
    try:
        current, pending = call("nvmlDeviceGetMigMode", handle)
        capable = True
    except (nvml.NVMLError_NotSupported, nvml.NVMLError_FunctionNotFound):  # no MIG here
        current = pending = 0
        capable = False
    enabled = current == nvml.NVML_DEVICE_MIG_ENABLE
    partial.mig_enabled = enabled
    table = _profile_table(call, handle, notes) if capable else {}
    total = max((s for _, s, _ in table.values()), default=0)
    if capable and not total:
        total = default_total_slices(name)
    gpu = GPU(
        index=index,
        uuid=uuid,
        name=name,
        memory_mib=_gpu_memory(call, handle, name, enabled, table, notes),
        mig_enabled=enabled,
        mig_pending=(pending == nvml.NVML_DEVICE_MIG_ENABLE) if capable else None,
        total_slices=total,
    )
    if enabled:
        _read_migs(call, handle, gpu, table, notes, partial.migs)
    else:
        used, processes = _activity(call, handle)
        gpu = replace(gpu, memory_used_mib=used, processes=processes,
                      utilization=_utilization(call, handle))
    return gpu, partial.migs


def _read_migs(
    call: _Caller,
    handle: Any,
    gpu: GPU,
    table: dict[int, tuple[str, int, int]],
    notes: set[str],
    found: list[MigDevice],
) -> None:
    nvml = call.nvml
    for position in range(call("nvmlDeviceGetMaxMigDeviceCount", handle)):
        try:
            mig = call("nvmlDeviceGetMigDeviceHandleByIndex", handle, position)
        except nvml.NVMLError_NotFound:
            continue  # an empty index: MIG devices need not be contiguous
        try:
            uuid = _text(call("nvmlDeviceGetUUID", mig))
            gi = int(call("nvmlDeviceGetGpuInstanceId", mig))
            ci = int(call("nvmlDeviceGetComputeInstanceId", mig))
            attributes = call("nvmlDeviceGetAttributes", mig)
        except nvml.NVMLError_NotFound as exc:
            # The handle was just given out: its device was destroyed since (re-created).
            raise _MigChanged(f"MIG device {gpu.index}:{position} went away") from exc
        if any(m.uuid == uuid for m in found):
            raise _MigChanged(f"MIG device {uuid} was listed twice")
        slices = int(attributes.gpuInstanceSliceCount)
        memory = int(attributes.memorySizeMB)
        used, processes = _activity(call, mig)
        found.append(
            MigDevice(
                slot=f"{gpu.index}.{position}",
                uuid=uuid,
                parent_uuid=gpu.uuid,
                gpu_index=gpu.index,
                gi=gi,
                ci=ci,
                profile=_mig_profile(call, handle, gi, slices, memory, table, notes),
                memory_mib=memory,
                slices=slices,
                total_slices=gpu.total_slices,
                memory_used_mib=used,
                processes=processes,
            )
        )


def _reason(call: _Caller, exc: BaseException) -> str:
    """Why a GPU is unavailable, in words for the form and the admin."""
    nvml = call.nvml
    if isinstance(exc, _MigChanged):
        return ("its MIG devices changed while they were read (re-created?); the next read "
                "sees the new layout")
    if isinstance(exc, nvml.NVMLError_GpuIsLost):
        return ("NVML says the GPU is lost (it fell off the bus or stopped answering); an "
                "admin must reset it or reboot the host")
    if isinstance(exc, nvml.NVMLError_NoPermission):
        return ("NVML refused access to it (Insufficient Permissions): the hub cannot open "
                "this GPU's device")
    if call.is_transient(exc):
        return f"NVML answered '{exc}' {call.tries} times in a row"
    return f"NVML failed on it ({exc})"


def _unavailable(
    partial: _Partial, reason: str, previous: Inventory | None, count: int
) -> tuple[GPU, list[MigDevice]]:
    """A GPU NVML failed on, listed with what is known of it and marked unavailable.

    What the failed read did not get comes from the previous read: the same UUID, or the same
    index while the GPU count is unchanged (NVML numbers GPUs by bus order, so the same index
    is the same GPU). A GPU never read before and whose UUID NVML will not give is listed as
    ``GPU-unknown-<index>``: no container holds that, and nothing is given out on it.
    """
    before = None
    if previous is not None:
        if partial.uuid:
            before = next((g for g in previous.gpus if g.uuid == partial.uuid), None)
        elif len(previous.gpus) == count:
            before = next((g for g in previous.gpus if g.index == partial.index), None)
    uuid = partial.uuid or (before.uuid if before else f"GPU-unknown-{partial.index}")
    migs: dict[str, MigDevice] = {}
    if before is not None and previous is not None:
        migs.update((m.uuid, m) for m in previous.migs_of(before))
    migs.update((m.uuid, m) for m in partial.migs)
    enabled = partial.mig_enabled
    if enabled is None:
        enabled = before.mig_enabled if before else bool(migs)
    gpu = GPU(
        index=partial.index,
        uuid=uuid,
        name=partial.name or (before.name if before else "unknown GPU"),
        memory_mib=before.memory_mib if before else 0,
        mig_enabled=enabled,
        mig_pending=before.mig_pending if before else None,
        total_slices=before.total_slices if before else max(
            (m.total_slices for m in migs.values()), default=0),
        unavailable=reason,
    )
    return gpu, [
        replace(m, slot=f"{partial.index}.{m.slot.partition('.')[2]}", parent_uuid=uuid,
                gpu_index=partial.index, unavailable=reason)
        for m in migs.values()
    ]


def _read_one(
    call: _Caller, index: int, count: int, notes: set[str], previous: Inventory | None
) -> tuple[GPU, list[MigDevice]]:
    """One GPU and its MIG devices; a failure on it makes it (and them) unavailable."""
    for pause in (*RETRY_PAUSES, None):
        partial = _Partial(index)
        try:
            return _read_gpu(call, index, partial, notes)
        except _MigChanged as exc:
            if pause is not None:
                log.debug("inventory: GPU %d changed while read (%s); reading it again",
                          index, exc)
                call.sleep(pause)
                continue
            failure: BaseException = exc
        except call.nvml.NVMLError as exc:
            failure = exc
        reason = _reason(call, failure)
        log.warning("inventory: GPU %d (%s) is unavailable: %s (%s)", index,
                    partial.uuid or "UUID unknown", reason, failure)
        return _unavailable(partial, reason, previous, count)
    raise AssertionError("unreachable")  # pragma: no cover


def _unavailable_problems(gpus: Iterable[GPU], migs: Iterable[MigDevice]) -> list[str]:
    migs = list(migs)
    problems = []
    for gpu in gpus:
        if gpu.unavailable:
            mine = sum(1 for m in migs if m.parent_uuid == gpu.uuid)
            held = f" and its {mine} MIG device(s)" if mine else ""
            problems.append(
                f"GPU {gpu.index} ({gpu.uuid}) is unavailable: {gpu.unavailable}; it{held} "
                "will not be given out until NVML reads it again"
            )
    return problems


def read_nvml(
    nvml: ModuleType | None = None,
    *,
    previous: Inventory | None = None,
    sleep: Sleep = time.sleep,
) -> Inventory:
    """Read every GPU and MIG device from NVML.

    Raises InventoryError, never a raw NVMLError, when NVML cannot be used at all (it does not
    load or initialise, it cannot count the GPUs). A failure on one GPU marks that GPU and its
    MIG devices ``unavailable`` with the reason and the others are read as usual;
    ``previous`` (the last read) fills in what NVML no longer says of such a GPU, so that a
    container holding it is not judged to hold a device that is gone. What a non-root caller
    is refused is read another way and said in ``unprivileged``. Transient errors are tried
    again after a short pause (``sleep``): call this on a worker thread, as ``Reader`` does.
    """
    nvml = nvml or _load_nvml()
    call = _Caller(nvml, sleep)
    try:
        call("nvmlInit")
    except nvml.NVMLError as exc:
        raise InventoryError(f"NVML could not be initialised: {exc}") from exc
    notes: set[str] = set()
    gpus: list[GPU] = []
    migs: list[MigDevice] = []
    try:
        try:
            count = int(call("nvmlDeviceGetCount"))
        except nvml.NVMLError as exc:
            raise InventoryError(f"NVML cannot count the GPUs: {exc}") from exc
        try:
            driver: str | None = _text(call("nvmlSystemGetDriverVersion"))
        except nvml.NVMLError:
            driver = None
        cuda = _cuda_version(call)
        for index in range(count):
            gpu, found = _read_one(call, index, count, notes, previous)
            gpus.append(gpu)
            migs.extend(found)
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass
    unprivileged = _unprivileged(notes)
    problems = _mig_problems([g for g in gpus if not g.unavailable], migs)
    problems += _unavailable_problems(gpus, migs)
    if unprivileged:
        problems.append(unprivileged)
    return Inventory(tuple(gpus), tuple(migs), "nvml", driver, cuda, tuple(problems),
                     unprivileged)


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


def _mib_or_none(text: str | None) -> int | None:
    """ "9728 MiB" -> 9728; "N/A", "[Insufficient Permissions]", absent -> None."""
    digits = (text or "").replace("MiB", "").strip()
    return int(digits) if digits.isdigit() else None


def _percent_or_none(text: str | None) -> int | None:
    digits = (text or "").replace("%", "").strip()
    return int(digits) if digits.isdigit() else None


def _id_or_none(text: str | None) -> int | None:
    text = (text or "").strip()
    return int(text) if text.isdigit() else None


def parse_nvidia_smi_xml(listing: str, report: str) -> Inventory:
    """Build an inventory from ``nvidia-smi -L`` and ``nvidia-smi -q -x`` (pure).

    What a host's own ``nvidia-smi`` says, where NVML cannot be called: the report of a probe
    container on another host's engine (its output is all that crosses the network). ``-L``
    gives the UUIDs and MIG profiles (the XML report has neither for MIG devices); the report
    gives the rest, by GPU in index order and by MIG device index: MIG modes, memory,
    GPU- and compute-instance ids, memory in use, compute processes (by the GPU- and
    compute-instance ids of their MIG device) and a whole GPU's utilization. "N/A" is None,
    as NVML's refusals are. Processes carry no container: their pids are the reporting
    host's. InventoryError when the report is not XML or names other GPUs than the listing.
    """
    base = parse_nvidia_smi(listing, "")
    try:
        root = ElementTree.fromstring(report)
    except ElementTree.ParseError as exc:
        raise InventoryError(f"nvidia-smi -q -x printed no XML report ({exc})") from exc
    nodes = root.findall("gpu")
    if [n.findtext("uuid", "").strip() for n in nodes] != [g.uuid for g in base.gpus]:
        raise InventoryError("nvidia-smi -q -x and nvidia-smi -L name different GPUs "
                             "(read while the GPUs changed?)")
    gpus: list[GPU] = []
    migs: list[MigDevice] = []
    for gpu, node in zip(base.gpus, nodes, strict=True):
        current = node.findtext("mig_mode/current_mig", "").strip().lower()
        pending = node.findtext("mig_mode/pending_mig", "").strip().lower()
        capable = current in ("enabled", "disabled")
        mig_on = current == "enabled"
        processes: dict[tuple[int | None, int | None], list[GpuProcess]] = {}
        for info in node.findall("processes/process_info"):
            pid = _id_or_none(info.findtext("pid"))
            if pid is None:
                continue
            key = (_id_or_none(info.findtext("gpu_instance_id")),
                   _id_or_none(info.findtext("compute_instance_id")))
            # No container: the pid is the reporting host's, which may not be this one.
            processes.setdefault(key, []).append(GpuProcess(
                pid, _mib_or_none(info.findtext("used_memory")) or 0))
        instances = {_id_or_none(m.findtext("index")): m
                     for m in node.findall("mig_devices/mig_device")}
        name = node.findtext("product_name", gpu.name).strip()
        gpus.append(replace(
            gpu, name=name,
            memory_mib=_mib_or_none(node.findtext("fb_memory_usage/total")) or gpu.memory_mib,
            mig_enabled=mig_on, mig_pending=(pending == "enabled") if capable else None,
            total_slices=default_total_slices(name) if capable else 0,
            memory_used_mib=(None if mig_on
                             else _mib_or_none(node.findtext("fb_memory_usage/used"))),
            processes=() if mig_on else tuple(processes.get((None, None), ())),
            utilization=None if mig_on else _percent_or_none(
                node.findtext("utilization/gpu_util")),
        ))
        for mig in (m for m in base.migs if m.parent_uuid == gpu.uuid):
            instance = instances.get(int(mig.slot.split(".")[1]))
            if instance is None:
                migs.append(mig)
                continue
            gi = _id_or_none(instance.findtext("gpu_instance_id"))
            ci = _id_or_none(instance.findtext("compute_instance_id"))
            migs.append(replace(
                mig, gi=gi, ci=ci,
                memory_mib=_mib_or_none(instance.findtext("fb_memory_usage/total"))
                or mig.memory_mib,
                memory_used_mib=_mib_or_none(instance.findtext("fb_memory_usage/used")),
                processes=tuple(processes.get((gi, ci), ())),
            ))
    problems = _mig_problems(gpus, migs)
    if any(m.gi is None for m in migs):
        problems.append("nvidia-smi -q -x did not list every MIG device of nvidia-smi -L: "
                        "those are matched by parent GPU and profile only after a MIG change")
    return Inventory(tuple(gpus), tuple(migs), "nvidia-smi", root.findtext("driver_version"),
                     root.findtext("cuda_version"), tuple(problems))


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
    previous: Inventory | None = None,
) -> Inventory:
    """Read the inventory from ``source``; ``auto`` falls back and logs which one answered.

    ``auto`` never raises: a host with no NVIDIA driver is a CPU-only host, and says so in
    ``problems``. An explicit source raises InventoryError so a misconfiguration is loud.
    ``previous``: the last inventory read, for what NVML no longer says of a failing GPU.
    Blocking, and NVML is not to be called twice at once: use a ``Reader``.
    """
    logger = logger or log
    if source not in SOURCES:
        raise InventoryError(f"unknown inventory source {source!r}; use one of {SOURCES}")
    if source == "nvml":
        return read_nvml(nvml, previous=previous)
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
        inventory = read_nvml(nvml, previous=previous)
        logger.debug("inventory: read %d GPU(s) through NVML", len(inventory.gpus))
        return inventory
    except InventoryError as exc:
        reasons.append(str(exc))
    except Exception as exc:  # auto never fails: a binding that misbehaves is a driver that
        logger.exception("inventory: reading NVML failed")  # does not answer, loudly logged
        reasons.append(f"reading NVML failed: {exc!r}")
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


# --------------------------------------------------------------------------- the reader


def _mark_nvml_thread() -> None:
    _NVML_THREAD.active = True


_NVML_THREAD = threading.local()
#: The one thread every Reader reads on: NVML is never called on the event loop, nor in
#: Docker's executor (a hung GPU must not stall Docker calls), nor twice at once.
_EXECUTOR = concurrent.futures.ThreadPoolExecutor(
    max_workers=1, thread_name_prefix="gpuspawner-nvml", initializer=_mark_nvml_thread
)


class Reader:
    """Inventory reads for a long-running process (the spawner, the admin service).

    Reads run on one worker thread shared by every Reader (``_EXECUTOR``), and a result is
    kept for ``ttl`` seconds, so many spawns and page loads in a moment cost one NVML read.
    Callers that arrive while a read runs share it. A read that raises is not kept (the next
    call reads again); in ``auto`` mode ``read`` does not raise. Each read is handed the last
    good one, so a GPU NVML fails on keeps what was known of it (see ``read_nvml``).

    A driver stuck behind a hung GPU can take seconds per NVML call, minutes per read. No
    caller waits longer than ``patience`` seconds from the start of the read: it gets the
    last good inventory, with a problem that says how old it is (a device gone since then
    fails its start with "unknown device", which invalidates the reader and plans again),
    or ``InventoryError`` when there is none yet. The slow read goes on and is kept when it
    ends.
    """

    def __init__(
        self,
        source: str = "auto",
        *,
        topology_file: str | os.PathLike[str] | None = None,
        logger: logging.Logger | None = None,
        ttl: float = 2.0,
        nvml: ModuleType | None = None,
        smi_binary: str = "nvidia-smi",
        clock: Callable[[], float] = time.monotonic,
        patience: float = 10.0,
    ) -> None:
        self.source = source
        self.patience = patience
        self.topology_file = topology_file
        self.logger = logger
        self.ttl = ttl
        self.nvml = nvml
        self.smi_binary = smi_binary
        self.clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, Inventory] | None = None
        self._last: Inventory | None = None
        self._pending: concurrent.futures.Future[Inventory] | None = None
        self._pending_since = 0.0  # clock() when the running read began
        self._last_at = 0.0  # clock() when the last good read ended
        self._generation = 0  # one more at every invalidate()

    def invalidate(self) -> None:
        """Forget the kept result: the next call reads again (after a start failed with
        "unknown device", say). A read running now is not kept when it ends; its callers
        still get it."""
        with self._lock:
            self._cached = None
            self._pending = None
            self._generation += 1

    def begin(self) -> None:
        """Start a read now, unless a kept result is fresh or a read runs: a caller that has
        other waiting to do (Docker's lists) then finds it done, or nearly."""
        self._start()

    def latest(self) -> Inventory | None:
        """The last good inventory, whatever its age; None before the first. For what only a
        driver reload changes (its version, the CUDA version it supports)."""
        with self._lock:
            return self._last

    def _fresh(self) -> Inventory | None:
        if self._cached is not None and self.clock() - self._cached[0] < self.ttl:
            return self._cached[1]
        return None

    def _read_now(
        self, generation: int, future: concurrent.futures.Future[Inventory] | None
    ) -> Inventory:
        try:
            inventory = read(
                self.source, topology_file=self.topology_file, nvml=self.nvml,
                smi_binary=self.smi_binary, logger=self.logger, previous=self._last,
            )
        finally:
            with self._lock:
                if future is not None and self._pending is future:
                    self._pending = None
        with self._lock:
            if generation == self._generation:  # not invalidated while it ran
                self._cached = (self.clock(), inventory)
                if inventory.source != "none":
                    self._last, self._last_at = inventory, self.clock()
        return inventory

    def _start(self) -> tuple[Inventory | None, concurrent.futures.Future[Inventory] | None]:
        """The kept inventory, or the read to wait for (the running one, or a new one)."""
        with self._lock:
            fresh = self._fresh()
            if fresh is not None:
                return fresh, None
            if self._pending is None:
                future: concurrent.futures.Future[Inventory] = concurrent.futures.Future()
                self._pending, self._pending_since = future, self.clock()
                _EXECUTOR.submit(self._run, future, self._generation)
            return None, self._pending

    def _run(self, future: concurrent.futures.Future[Inventory], generation: int) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            inventory = self._read_now(generation, future)
        except BaseException as exc:
            future.set_exception(exc)
        else:
            future.set_result(inventory)

    def _left(self) -> float:
        """Seconds a caller may still wait for the running read."""
        with self._lock:
            return max(0.0, self.patience - (self.clock() - self._pending_since))

    def _stale(self) -> Inventory:
        """The answer when NVML has not answered within ``patience``."""
        with self._lock:
            last, age = self._last, self.clock() - self._last_at
            waited = self.clock() - self._pending_since
        if last is None:
            raise InventoryError(
                f"the GPU inventory ({self.source}) has not answered in {waited:.0f} s (a "
                "hung GPU or driver?); GPU servers wait until it does, CPU servers start")
        note = (f"the GPU inventory has not answered in {waited:.0f} s (a hung GPU or "
                f"driver?): these are the GPUs it reported {age:.0f} s ago")
        if self.logger is not None:
            self.logger.warning("%s", note)
        return replace(last, problems=(*last.problems, note))

    async def read(self) -> Inventory:
        """The inventory, read on the NVML thread unless one younger than ``ttl`` is kept."""
        fresh, future = self._start()
        if fresh is not None:
            return fresh
        assert future is not None
        # Shielded: one caller giving up (a cancelled spawn) must not cancel the shared read.
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)),
                                          self._left())
        except asyncio.TimeoutError:
            return self._stale()

    def read_blocking(self) -> Inventory:
        """``read`` for a caller already on a worker thread (never the event loop): the same
        kept result, the same shared read, on the NVML thread."""
        if getattr(_NVML_THREAD, "active", False):
            # Called from the NVML thread itself: waiting for it would wait forever.
            with self._lock:
                fresh, generation = self._fresh(), self._generation
            return fresh if fresh is not None else self._read_now(generation, None)
        fresh, future = self._start()
        if fresh is not None:
            return fresh
        assert future is not None
        try:
            return future.result(timeout=self._left())
        except concurrent.futures.TimeoutError:
            return self._stale()
