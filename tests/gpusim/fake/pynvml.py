"""A fake of nvidia-ml-py's ``pynvml`` that answers from the simulator's state file.

Why a fake and not mocks: the product's inventory must run its real NVML code path on machines
without a GPU, and it must meet the same awkward facts a real driver gives it (empty MIG handle
indexes, GPU-instance lookups refused to non-root users, MIG mode changes pending a reset, a
host without a driver). So this module copies the real library's names, signatures, error
classes and return types (ctypes structures, ``bytes`` in the profile name, a ``c_uint`` from
``nvmlDeviceIsMigDeviceHandle``), and nothing more convenient than the real one.

The state is the JSON that ``tests.gpusim.install()`` writes to ``$GPUSIM_STATE``. It is read
at ``nvmlInit()`` and again by any call after the file changed, so a change of the host (a MIG
re-creation, a reboot, a fault switched on) is seen at once, as a driver sees its hardware: a
handle to a MIG device that is gone answers ``Not Found``, one to a GPU that is gone ``GPU is
lost``. Standard library only: a hub started in a subprocess gets it with
``PYTHONPATH=<this dir>``.

Activity: each GPU and MIG device's ``processes`` and ``memory_used_mib`` make its memory
``used`` and its process list; a MIG-enabled GPU's handle sums its MIG devices (as root). A
GPU's ``utilization`` is reported only with MIG off: NVML does not sample MIG devices.

Faults the simulator can switch on (state keys, see ``tests.gpusim.Simulator``), each failing
the way a real driver fails, with its exception classes and messages:

- ``root: false``: a non-root caller. GPU-instance lookups and the memory and processes of a
  MIG-enabled GPU (``nvmlDeviceGetMemoryInfo`` and ``…RunningProcesses`` on its handle:
  aggregate information needs privileges) raise ``NVMLError_NoPermission``; everything else
  answers (MIG device handles, their UUIDs, GPU-instance and compute-instance ids,
  attributes, memory and processes).
- ``faults.delay_s``: every NVML call takes that long (a driver busy with a hung GPU).
- ``faults.rules``: a list of ``{id, error, gpu, functions, times}``: calls of ``functions``
  (all when absent; ``nvmlShutdown`` never) about GPU ``gpu`` (its UUID: calls on its handle,
  its MIG devices' handles, ``nvmlDeviceGetHandleByIndex`` of its index, ``…ByUUID``; any call
  when absent) raise ``NVMLError(error)``; ``times`` of them (counted per process and rule
  ``id``), or every one when absent. ``error: 15`` on one GPU is a GPU that fell off the bus;
  ``error: 999, times: 2`` a driver that fails twice and then answers.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import string
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn

# ---------------------------------------------------------------------------------- constants

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_ALREADY_INITIALIZED = 5
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_INSUFFICIENT_SIZE = 7
NVML_ERROR_INSUFFICIENT_POWER = 8
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_IRQ_ISSUE = 11
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_CORRUPTED_INFOROM = 14
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_OPERATING_SYSTEM = 17
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_IN_USE = 19
NVML_ERROR_MEMORY = 20
NVML_ERROR_NO_DATA = 21
NVML_ERROR_VGPU_ECC_NOT_SUPPORTED = 22
NVML_ERROR_INSUFFICIENT_RESOURCES = 23
NVML_ERROR_FREQ_NOT_SUPPORTED = 24
NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25
NVML_ERROR_DEPRECATED = 26
NVML_ERROR_NOT_READY = 27
NVML_ERROR_GPU_NOT_FOUND = 28
NVML_ERROR_INVALID_STATE = 29
NVML_ERROR_RESET_TYPE_NOT_SUPPORTED = 30
NVML_ERROR_UNKNOWN = 999

NVML_DEVICE_MIG_DISABLE = 0x0
NVML_DEVICE_MIG_ENABLE = 0x1

NVML_GPU_INSTANCE_PROFILE_1_SLICE = 0x0
NVML_GPU_INSTANCE_PROFILE_2_SLICE = 0x1
NVML_GPU_INSTANCE_PROFILE_3_SLICE = 0x2
NVML_GPU_INSTANCE_PROFILE_4_SLICE = 0x3
NVML_GPU_INSTANCE_PROFILE_7_SLICE = 0x4
NVML_GPU_INSTANCE_PROFILE_8_SLICE = 0x5
NVML_GPU_INSTANCE_PROFILE_6_SLICE = 0x6
NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1 = 0x7
NVML_GPU_INSTANCE_PROFILE_2_SLICE_REV1 = 0x8
NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2 = 0x9
NVML_GPU_INSTANCE_PROFILE_1_SLICE_GFX = 0xA
NVML_GPU_INSTANCE_PROFILE_2_SLICE_GFX = 0xB
NVML_GPU_INSTANCE_PROFILE_4_SLICE_GFX = 0xC
NVML_GPU_INSTANCE_PROFILE_1_SLICE_NO_ME = 0xD
NVML_GPU_INSTANCE_PROFILE_2_SLICE_NO_ME = 0xE
NVML_GPU_INSTANCE_PROFILE_1_SLICE_ALL_ME = 0xF
NVML_GPU_INSTANCE_PROFILE_2_SLICE_ALL_ME = 0x10
NVML_GPU_INSTANCE_PROFILE_3_SLICE_GFX = 0x11
NVML_GPU_INSTANCE_PROFILE_COUNT = 0x12

NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE = 0x0
NVML_COMPUTE_INSTANCE_PROFILE_2_SLICE = 0x1
NVML_COMPUTE_INSTANCE_PROFILE_3_SLICE = 0x2
NVML_COMPUTE_INSTANCE_PROFILE_4_SLICE = 0x3
NVML_COMPUTE_INSTANCE_PROFILE_7_SLICE = 0x4
NVML_COMPUTE_INSTANCE_PROFILE_COUNT = 0x9

NVML_DEVICE_NAME_BUFFER_SIZE = 64
NVML_DEVICE_NAME_V2_BUFFER_SIZE = 96
NVML_DEVICE_UUID_BUFFER_SIZE = 80
NVML_DEVICE_UUID_V2_BUFFER_SIZE = 96
NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE = 80

nvmlGpuInstanceProfileInfo_v2 = 0x02000098
nvmlMemory_v2 = 0x02000028

_MIB = 1024 * 1024
#: What NVML puts in a process's gpuInstanceId/computeInstanceId when MIG is off
#: (NVML_VALUE_NOT_AVAILABLE as a c_uint).
_NOT_AVAILABLE_UINT = 0xFFFFFFFF

# ------------------------------------------------------------------------------------ errors


class NVMLError(Exception):
    """Same scheme as the real one: ``NVMLError(code)`` returns the code's subclass."""

    _valClassMapping: dict[int, type[NVMLError]] = {}
    _errcode_to_string = {
        NVML_ERROR_UNINITIALIZED: "Uninitialized",
        NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
        NVML_ERROR_NOT_SUPPORTED: "Not Supported",
        NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
        NVML_ERROR_ALREADY_INITIALIZED: "Already Initialized",
        NVML_ERROR_NOT_FOUND: "Not Found",
        NVML_ERROR_INSUFFICIENT_SIZE: "Insufficient Size",
        NVML_ERROR_INSUFFICIENT_POWER: "Insufficient External Power",
        NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
        NVML_ERROR_TIMEOUT: "Timeout",
        NVML_ERROR_IRQ_ISSUE: "Interrupt Request Issue",
        NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
        NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
        NVML_ERROR_CORRUPTED_INFOROM: "Corrupted infoROM",
        NVML_ERROR_GPU_IS_LOST: "GPU is lost",
        NVML_ERROR_RESET_REQUIRED: "GPU requires restart",
        NVML_ERROR_OPERATING_SYSTEM: "The operating system has blocked the request.",
        NVML_ERROR_LIB_RM_VERSION_MISMATCH: "RM has detected an NVML/RM version mismatch.",
        NVML_ERROR_MEMORY: "Insufficient Memory",
        NVML_ERROR_UNKNOWN: "Unknown Error",
    }
    value: int

    def __new__(cls, value: int) -> NVMLError:
        if cls is NVMLError:
            cls = NVMLError._valClassMapping.get(value, cls)
        obj = Exception.__new__(cls)
        obj.value = value
        return obj

    def __str__(self) -> str:
        return self._errcode_to_string.get(self.value, f"NVML Error with code {self.value}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NVMLError) and self.value == other.value

    def __hash__(self) -> int:
        return hash(self.value)


def nvmlExceptionClass(nvmlErrorCode: int) -> type[NVMLError]:
    if nvmlErrorCode not in NVMLError._valClassMapping:
        raise ValueError(f"nvmlErrorCode {nvmlErrorCode} is not valid")
    return NVMLError._valClassMapping[nvmlErrorCode]


def _extract_error_classes() -> None:
    """Make ``NVMLError_NotFound`` and friends exactly as the real module names them."""
    namespace = globals()  # this copy's own, never sys.modules[__name__] (_install_faults)
    for name in [x for x in list(namespace) if x.startswith("NVML_ERROR_")]:
        class_name = "NVMLError_" + string.capwords(
            name.replace("NVML_ERROR_", ""), "_"
        ).replace("_", "")
        code = namespace[name]

        def make_new(code: int = code) -> Any:
            def new(cls: type[NVMLError], *args: Any) -> NVMLError:
                return NVMLError.__new__(cls, code)

            return new

        error_class = type(class_name, (NVMLError,), {"__new__": make_new()})
        error_class.__module__ = __name__
        namespace[class_name] = error_class
        NVMLError._valClassMapping[code] = error_class


_extract_error_classes()
# The names tests and type checkers look for, bound for readers of this file (the loop above
# has already made them; these lines only give them a static name).
NVMLError_Uninitialized: type[NVMLError] = NVMLError._valClassMapping[NVML_ERROR_UNINITIALIZED]
NVMLError_InvalidArgument: type[NVMLError] = NVMLError._valClassMapping[
    NVML_ERROR_INVALID_ARGUMENT
]
NVMLError_NotSupported: type[NVMLError] = NVMLError._valClassMapping[NVML_ERROR_NOT_SUPPORTED]
NVMLError_NoPermission: type[NVMLError] = NVMLError._valClassMapping[NVML_ERROR_NO_PERMISSION]
NVMLError_NotFound: type[NVMLError] = NVMLError._valClassMapping[NVML_ERROR_NOT_FOUND]
NVMLError_LibraryNotFound: type[NVMLError] = NVMLError._valClassMapping[
    NVML_ERROR_LIBRARY_NOT_FOUND
]
NVMLError_DriverNotLoaded: type[NVMLError] = NVMLError._valClassMapping[
    NVML_ERROR_DRIVER_NOT_LOADED
]
NVMLError_FunctionNotFound: type[NVMLError] = NVMLError._valClassMapping[
    NVML_ERROR_FUNCTION_NOT_FOUND
]
NVMLError_Unknown: type[NVMLError] = NVMLError._valClassMapping[NVML_ERROR_UNKNOWN]


class NVMLLibraryMismatchError(Exception):
    """What the real unversioned wrappers (``…RunningProcesses``) raise instead of
    FunctionNotFound: not an NVMLError, so a caller catching only NVMLError meets it."""


def nvmlErrorString(result: int) -> str:
    return NVMLError._errcode_to_string.get(result, "Unknown Error")


# ------------------------------------------------------------- result types (as the real ones)


class c_nvmlMemory_t(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong),
                ("used", ctypes.c_ulonglong)]


class c_nvmlMemory_v2_t(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint), ("total", ctypes.c_ulonglong),
                ("reserved", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong),
                ("used", ctypes.c_ulonglong)]


class c_nvmlProcessInfo_v2_t(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong),
                ("gpuInstanceId", ctypes.c_uint), ("computeInstanceId", ctypes.c_uint)]


c_nvmlProcessInfo_v3_t = c_nvmlProcessInfo_v2_t
c_nvmlProcessInfo_t = c_nvmlProcessInfo_v3_t


class c_nvmlUtilization_t(ctypes.Structure):
    _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]


class nvmlFriendlyObject:
    """The real process lists hold these (a struct's fields as attributes), not structs."""

    def __init__(self, dictionary: dict[str, Any]) -> None:
        for key in dictionary:
            setattr(self, key, dictionary[key])

    def __str__(self) -> str:
        return self.__dict__.__str__()


def nvmlStructToFriendlyObject(struct: ctypes.Structure) -> nvmlFriendlyObject:
    values = {}
    for field in struct._fields_:
        value = getattr(struct, field[0])
        values[field[0]] = value.decode() if isinstance(value, bytes) else value
    return nvmlFriendlyObject(values)


class c_nvmlDeviceAttributes(ctypes.Structure):
    _fields_ = [
        ("multiprocessorCount", ctypes.c_uint),
        ("sharedCopyEngineCount", ctypes.c_uint),
        ("sharedDecoderCount", ctypes.c_uint),
        ("sharedEncoderCount", ctypes.c_uint),
        ("sharedJpegCount", ctypes.c_uint),
        ("sharedOfaCount", ctypes.c_uint),
        ("gpuInstanceSliceCount", ctypes.c_uint),
        ("computeInstanceSliceCount", ctypes.c_uint),
        ("memorySizeMB", ctypes.c_ulonglong),
    ]


class c_nvmlGpuInstanceProfileInfo_t(ctypes.Structure):
    _fields_ = [
        ("id", ctypes.c_uint),
        ("isP2pSupported", ctypes.c_uint),
        ("sliceCount", ctypes.c_uint),
        ("instanceCount", ctypes.c_uint),
        ("multiprocessorCount", ctypes.c_uint),
        ("copyEngineCount", ctypes.c_uint),
        ("decoderCount", ctypes.c_uint),
        ("encoderCount", ctypes.c_uint),
        ("jpegCount", ctypes.c_uint),
        ("ofaCount", ctypes.c_uint),
        ("memorySizeMB", ctypes.c_ulonglong),
    ]


class c_nvmlGpuInstanceProfileInfo_v2_t(ctypes.Structure):
    # ``name`` is a char array, so reading it gives bytes (b"MIG 1g.10gb"), as the real one.
    _fields_ = [
        ("version", ctypes.c_uint),
        ("id", ctypes.c_uint),
        ("isP2pSupported", ctypes.c_uint),
        ("sliceCount", ctypes.c_uint),
        ("instanceCount", ctypes.c_uint),
        ("multiprocessorCount", ctypes.c_uint),
        ("copyEngineCount", ctypes.c_uint),
        ("decoderCount", ctypes.c_uint),
        ("encoderCount", ctypes.c_uint),
        ("jpegCount", ctypes.c_uint),
        ("ofaCount", ctypes.c_uint),
        ("memorySizeMB", ctypes.c_ulonglong),
        ("name", ctypes.c_char * NVML_DEVICE_NAME_V2_BUFFER_SIZE),
    ]


class c_nvmlGpuInstancePlacement_t(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint), ("size", ctypes.c_uint)]


class _Handle:
    """An opaque device handle, like the real ``c_nvmlDevice_t`` pointer.

    It names its device by UUID and is resolved against the state loaded by the latest
    ``nvmlInit``; a handle whose device went away answers ``GPU is lost``.
    """

    __slots__ = ("_uuid", "_mig")

    def __init__(self, uuid: str, mig: bool) -> None:
        self._uuid = uuid
        self._mig = mig

    def __repr__(self) -> str:
        return f"<c_nvmlDevice_t object at {id(self):#x}>"


class _GpuInstance:
    """An opaque GPU-instance handle (``c_nvmlGpuInstance_t``)."""

    __slots__ = ("_parent", "_gi")

    def __init__(self, parent: _Handle, gi: int) -> None:
        self._parent = parent
        self._gi = gi

    def __repr__(self) -> str:
        return f"<c_nvmlGpuInstance_t object at {id(self):#x}>"


class c_nvmlGpuInstanceInfo_t:
    """The real one is a ctypes structure whose ``device`` is a handle; ours holds a _Handle."""

    def __init__(self, device: _Handle, gi: int, profile_id: int, start: int, size: int) -> None:
        self.device = device
        self.id = gi
        self.profileId = profile_id
        self.placement = c_nvmlGpuInstancePlacement_t(start, size)


# -------------------------------------------------------------------------- profile tables

#: GPU-instance profiles per GPU model: (profile index, profile id, name, slices,
#: instance count, memory MiB, multiprocessors). From ``nvidia-smi mig -lgip`` of these models.
PROFILE_TABLES: dict[str, list[tuple[int, int, str, int, int, int, int]]] = {
    "A100-80GB": [
        (NVML_GPU_INSTANCE_PROFILE_1_SLICE, 19, "1g.10gb", 1, 7, 9728, 14),
        (NVML_GPU_INSTANCE_PROFILE_2_SLICE, 14, "2g.20gb", 2, 3, 19968, 28),
        (NVML_GPU_INSTANCE_PROFILE_3_SLICE, 9, "3g.40gb", 3, 2, 40192, 42),
        (NVML_GPU_INSTANCE_PROFILE_4_SLICE, 5, "4g.40gb", 4, 1, 40192, 56),
        (NVML_GPU_INSTANCE_PROFILE_7_SLICE, 0, "7g.80gb", 7, 1, 80384, 98),
        (NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1, 20, "1g.10gb+me", 1, 1, 9728, 14),
        (NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2, 15, "1g.20gb", 1, 4, 19968, 14),
    ],
    "H100-80GB": [
        (NVML_GPU_INSTANCE_PROFILE_1_SLICE, 19, "1g.10gb", 1, 7, 9984, 16),
        (NVML_GPU_INSTANCE_PROFILE_2_SLICE, 14, "2g.20gb", 2, 3, 20096, 32),
        (NVML_GPU_INSTANCE_PROFILE_3_SLICE, 9, "3g.40gb", 3, 2, 40448, 60),
        (NVML_GPU_INSTANCE_PROFILE_4_SLICE, 5, "4g.40gb", 4, 1, 40448, 64),
        (NVML_GPU_INSTANCE_PROFILE_7_SLICE, 0, "7g.80gb", 7, 1, 80896, 132),
        (NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1, 20, "1g.10gb+me", 1, 1, 9984, 16),
        (NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2, 15, "1g.20gb", 1, 4, 20096, 26),
    ],
}
# For models without a table: profile index and id by slice count (the A100/H100 numbering).
_GENERIC_INDEX = {1: 0, 2: 1, 3: 2, 4: 3, 7: 4, 8: 5, 6: 6}
_GENERIC_ID = {1: 19, 2: 14, 3: 9, 4: 5, 7: 0}
_PROFILE_RE = re.compile(r"(\d+)g\.(\d+)gb")


def model_key(name: str) -> str | None:
    """The PROFILE_TABLES key of a GPU model name, or None for models without a table."""
    if "80GB" in name and "A100" in name:
        return "A100-80GB"
    if "80GB" in name and "H100" in name:
        return "H100-80GB"
    return None


def profile_table(gpu: dict[str, Any]) -> list[tuple[int, int, str, int, int, int, int]]:
    """This GPU's profile table; for unknown models, made from the profiles it holds."""
    key = model_key(str(gpu.get("name", "")))
    if key:
        return PROFILE_TABLES[key]
    total = int(gpu.get("total_slices") or 7)
    rows: dict[int, tuple[int, int, str, int, int, int, int]] = {}
    for mig in gpu.get("mig_devices") or []:
        slices = int(mig.get("slices") or _slices(mig["profile"]))
        index = _GENERIC_INDEX.get(slices)
        if index is None or index in rows:
            continue
        memory = int(mig.get("memory_mib") or _memory(mig["profile"]))
        rows[index] = (index, _GENERIC_ID.get(slices, 100 + index), mig["profile"].split("+")[0],
                       slices, max(1, total // slices), memory, 14 * slices)
    return sorted(rows.values())


def _slices(profile: str) -> int:
    match = _PROFILE_RE.match(profile)
    return int(match.group(1)) if match else 1


def _memory(profile: str) -> int:
    match = _PROFILE_RE.match(profile)
    return int(match.group(2)) * 1024 if match else 0


# ------------------------------------------------------------------------------------ state

_lock = threading.RLock()
_refcount = 0
_state: dict[str, Any] | None = None
#: (path, mtime_ns, size, inode) of the state file as last read, so a call re-reads it only
#: when the simulator changed it.
_seen: tuple[str, int, int, int] | None = None
#: Faults with ``times``: how many calls each rule id has failed so far in this process.
_fault_counts: dict[str, int] = {}
_depth = threading.local()


def _raise(code: int) -> NoReturn:
    raise NVMLError(code)


def _load_state() -> dict[str, Any]:
    global _seen
    path = os.environ.get("GPUSIM_STATE")
    if not path:
        _raise(NVML_ERROR_LIBRARY_NOT_FOUND)
    try:
        info = os.stat(path)
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
    except FileNotFoundError:
        _raise(NVML_ERROR_LIBRARY_NOT_FOUND)
    except (OSError, ValueError):
        _raise(NVML_ERROR_UNKNOWN)
    if not isinstance(state, dict):
        _raise(NVML_ERROR_UNKNOWN)
    _seen = (path, info.st_mtime_ns, info.st_size, info.st_ino)
    return state


def _refresh() -> None:
    """Re-read the state file if the simulator changed it since it was last read."""
    global _state
    path = os.environ.get("GPUSIM_STATE")
    if _state is None or not path:
        return
    try:
        info = os.stat(path)
    except OSError:
        return  # the file went away mid-session: the driver keeps what it knows
    if _seen == (path, info.st_mtime_ns, info.st_size, info.st_ino):
        return
    try:
        _state = _load_state()
    except NVMLError:
        pass  # caught half-written or unreadable: the next call tries again


def _current() -> dict[str, Any]:
    with _lock:
        if _state is None or _refcount <= 0:
            _raise(NVML_ERROR_UNINITIALIZED)
        _refresh()
        return _state


def _gpus() -> list[dict[str, Any]]:
    return sorted(_current().get("gpus") or [], key=lambda g: int(g["index"]))


def _enabled(gpu: dict[str, Any], key: str = "mig_mode") -> bool:
    if not gpu.get("mig_capable", True):
        return False
    value = gpu.get(key, gpu.get("mig_mode", "disabled"))
    return value is True or str(value).lower() in ("enabled", "on", "true", "1")


def _migs(gpu: dict[str, Any]) -> list[dict[str, Any]]:
    if not _enabled(gpu):
        return []
    return list(gpu.get("mig_devices") or [])


def _resolve(handle: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(gpu, mig or None) for a handle; errors as NVML gives them for bad or stale handles."""
    if not isinstance(handle, _Handle):
        _raise(NVML_ERROR_INVALID_ARGUMENT)
    for gpu in _gpus():
        if not handle._mig and gpu["uuid"] == handle._uuid:
            return gpu, None
        if handle._mig:
            for mig in _migs(gpu):
                if mig["uuid"] == handle._uuid:
                    return gpu, mig
    # A MIG device destroyed (re-created, rebooted) after its handle was taken is no longer
    # found; a GPU that is gone has fallen off the bus.
    return _raise(NVML_ERROR_NOT_FOUND if handle._mig else NVML_ERROR_GPU_IS_LOST)


def _gpu_handle(handle: Any) -> dict[str, Any]:
    gpu, mig = _resolve(handle)
    if mig is not None:
        _raise(NVML_ERROR_INVALID_ARGUMENT)
    return gpu


def _mig_handle(handle: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    gpu, mig = _resolve(handle)
    if mig is None:
        _raise(NVML_ERROR_INVALID_ARGUMENT)
    return gpu, mig


# ------------------------------------------------------------------------------- functions


def nvmlInitWithFlags(flags: int) -> None:
    global _refcount, _state
    state = _load_state()
    with _lock:
        _state = state
        _refcount += 1


def nvmlInit() -> None:
    nvmlInitWithFlags(0)


def nvmlShutdown() -> None:
    global _refcount, _state
    with _lock:
        if _refcount <= 0:
            _raise(NVML_ERROR_UNINITIALIZED)
        _refcount -= 1
        if _refcount == 0:
            _state = None


def nvmlSystemGetDriverVersion() -> str:
    return str(_current().get("driver_version", "550.90.07"))


def nvmlSystemGetCudaDriverVersion() -> int:
    major, _, minor = str(_current().get("cuda_version", "12.4")).partition(".")
    return int(major) * 1000 + int(minor or 0) * 10


def nvmlSystemGetCudaDriverVersion_v2() -> int:
    return nvmlSystemGetCudaDriverVersion()


def nvmlDeviceGetCount() -> int:
    return len(_gpus())


def nvmlDeviceGetHandleByIndex(index: int) -> _Handle:
    gpus = _gpus()
    if not isinstance(index, int) or not 0 <= index < len(gpus):
        _raise(NVML_ERROR_INVALID_ARGUMENT)
    return _Handle(gpus[index]["uuid"], False)


def nvmlDeviceGetHandleByUUID(uuid: str | bytes) -> _Handle:
    text = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
    for gpu in _gpus():
        if gpu["uuid"] == text:
            return _Handle(text, False)
        for mig in _migs(gpu):
            if mig["uuid"] == text:
                return _Handle(text, True)
    return _raise(NVML_ERROR_NOT_FOUND)


def nvmlDeviceGetUUID(handle: _Handle) -> str:
    gpu, mig = _resolve(handle)
    return str((mig or gpu)["uuid"])


def nvmlDeviceGetName(handle: _Handle) -> str:
    gpu, mig = _resolve(handle)
    if mig is not None:
        return f"{gpu['name']} MIG {mig['profile']}"
    return str(gpu["name"])


def nvmlDeviceGetIndex(handle: _Handle) -> int:
    gpu, mig = _resolve(handle)
    if mig is not None:
        _raise(NVML_ERROR_NOT_SUPPORTED)
    return int(gpu["index"])


def nvmlDeviceGetMemoryInfo(
    handle: _Handle, version: int | None = None
) -> c_nvmlMemory_t | c_nvmlMemory_v2_t:
    gpu, mig = _resolve(handle)
    if mig is None and _enabled(gpu) and not _current().get("root", True):
        # "In MIG mode, if device handle is provided, the API returns aggregate information,
        # only if the caller has appropriate privileges." MIG device handles always answer.
        _raise(NVML_ERROR_NO_PERMISSION)
    total = int((mig or gpu).get("memory_mib") or 0) * _MIB
    used = sum(_used_mib(device) for device, _gi, _ci in _owners(gpu, mig)) * _MIB
    free = max(total - used, 0)
    if not version:
        return c_nvmlMemory_t(total, free, used)
    if version != nvmlMemory_v2:
        _raise(NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
    return c_nvmlMemory_v2_t(version, total, 0, free, used)


def _used_mib(device: dict[str, Any]) -> int:
    """One device's memory in use: its processes' and what no process holds."""
    held = sum(int(p.get("used_mib") or 0) for p in device.get("processes") or [])
    return held + int(device.get("memory_used_mib") or 0)


def _owners(
    gpu: dict[str, Any], mig: dict[str, Any] | None
) -> list[tuple[dict[str, Any], int, int]]:
    """The devices whose activity a handle reports, each with the (GPU-instance,
    compute-instance) ids its processes carry: a MIG handle its own, a GPU handle its own
    and (MIG on: the aggregate) every MIG device's."""
    if mig is not None:
        return [(mig, int(mig["gi"]), int(mig.get("ci", 0)))]
    return [(gpu, _NOT_AVAILABLE_UINT, _NOT_AVAILABLE_UINT)] + [
        (m, int(m["gi"]), int(m.get("ci", 0))) for m in _migs(gpu)]


def _running(handle: _Handle, graphics: bool) -> list[nvmlFriendlyObject]:
    """A process list as the real wrappers build it: friendly objects made from
    c_nvmlProcessInfo_t, memory in bytes, refused where aggregate memory is refused."""
    gpu, mig = _resolve(handle)
    if mig is None and _enabled(gpu) and not _current().get("root", True):
        _raise(NVML_ERROR_NO_PERMISSION)  # aggregate information, as for memory
    if graphics:
        return []  # no display work on these hosts
    return [
        nvmlStructToFriendlyObject(c_nvmlProcessInfo_v2_t(
            int(p["pid"]), int(p.get("used_mib") or 0) * _MIB, gi, ci))
        for device, gi, ci in _owners(gpu, mig) for p in device.get("processes") or []
    ]


def nvmlDeviceGetComputeRunningProcesses_v3(handle: _Handle) -> list[nvmlFriendlyObject]:
    return _running(handle, graphics=False)


def nvmlDeviceGetComputeRunningProcesses_v2(handle: _Handle) -> list[nvmlFriendlyObject]:
    return _running(handle, graphics=False)


def nvmlDeviceGetComputeRunningProcesses(handle: _Handle) -> list[nvmlFriendlyObject]:
    return nvmlDeviceGetComputeRunningProcesses_v3(handle)


def nvmlDeviceGetGraphicsRunningProcesses_v3(handle: _Handle) -> list[nvmlFriendlyObject]:
    return _running(handle, graphics=True)


def nvmlDeviceGetGraphicsRunningProcesses_v2(handle: _Handle) -> list[nvmlFriendlyObject]:
    return _running(handle, graphics=True)


def nvmlDeviceGetGraphicsRunningProcesses(handle: _Handle) -> list[nvmlFriendlyObject]:
    return nvmlDeviceGetGraphicsRunningProcesses_v3(handle)


def nvmlDeviceGetUtilizationRates(handle: _Handle) -> c_nvmlUtilization_t:
    gpu, mig = _resolve(handle)
    if mig is not None or _enabled(gpu):
        _raise(NVML_ERROR_NOT_SUPPORTED)  # NVML samples no MIG device, nor a MIG-enabled GPU
    rates = gpu.get("utilization") or {}
    return c_nvmlUtilization_t(int(rates.get("gpu") or 0), int(rates.get("memory") or 0))


def nvmlDeviceGetMigMode(device: _Handle) -> list[int]:
    gpu = _gpu_handle(device)
    if not gpu.get("mig_capable", True):
        _raise(NVML_ERROR_NOT_SUPPORTED)
    current = NVML_DEVICE_MIG_ENABLE if _enabled(gpu) else NVML_DEVICE_MIG_DISABLE
    pending = NVML_DEVICE_MIG_ENABLE if _enabled(gpu, "mig_pending") else NVML_DEVICE_MIG_DISABLE
    return [current, pending]


def nvmlDeviceGetMaxMigDeviceCount(device: _Handle) -> int:
    gpu = _gpu_handle(device)
    if not _enabled(gpu):
        return 0  # "Returns zero if MIG is not supported or enabled."
    return int(gpu.get("max_mig_devices") or gpu.get("total_slices") or 7)


def nvmlDeviceGetMigDeviceHandleByIndex(device: _Handle, index: int) -> _Handle:
    gpu = _gpu_handle(device)
    if not isinstance(index, int) or not 0 <= index < nvmlDeviceGetMaxMigDeviceCount(device):
        _raise(NVML_ERROR_INVALID_ARGUMENT)
    for position, mig in enumerate(_migs(gpu)):
        if int(mig.get("index", position)) == index:
            return _Handle(mig["uuid"], True)
    return _raise(NVML_ERROR_NOT_FOUND)


def nvmlDeviceIsMigDeviceHandle(device: _Handle) -> ctypes.c_uint:
    # The real wrapper returns the c_uint itself, not its value: truthy, but != 1.
    _gpu, mig = _resolve(device)
    return ctypes.c_uint(1 if mig is not None else 0)


def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(migDevice: _Handle) -> _Handle:
    gpu, _mig = _mig_handle(migDevice)
    return _Handle(gpu["uuid"], False)


def nvmlDeviceGetGpuInstanceId(device: _Handle) -> int:
    _gpu, mig = _resolve(device)
    if mig is None:
        _raise(NVML_ERROR_NOT_SUPPORTED)
    return int(mig["gi"])


def nvmlDeviceGetComputeInstanceId(device: _Handle) -> int:
    _gpu, mig = _resolve(device)
    if mig is None:
        _raise(NVML_ERROR_NOT_SUPPORTED)
    return int(mig.get("ci", 0))


def _row_for(gpu: dict[str, Any], profile: str) -> tuple[int, int, str, int, int, int, int] | None:
    for row in profile_table(gpu):
        if row[2] == profile:
            return row
    return None


def nvmlDeviceGetAttributes_v2(device: _Handle) -> c_nvmlDeviceAttributes:
    gpu, mig = _resolve(device)
    if not gpu.get("mig_capable", True):
        _raise(NVML_ERROR_NOT_SUPPORTED)
    if mig is None:
        total = int(gpu.get("total_slices") or 7)
        full = _row_for(gpu, f"{total}g.{round(int(gpu.get('memory_mib', 0)) / 1024)}gb")
        sms = full[6] if full else 14 * total
        return c_nvmlDeviceAttributes(sms, 0, 0, 0, 0, 0, total, total,
                                      int(gpu.get("memory_mib") or 0))
    slices = int(mig.get("slices") or _slices(mig["profile"]))
    row = _row_for(gpu, mig["profile"])
    sms = row[6] if row else 14 * slices
    memory = int(mig.get("memory_mib") or _memory(mig["profile"]))
    return c_nvmlDeviceAttributes(sms, slices, 0, 0, 0, 0, slices, slices, memory)


def nvmlDeviceGetAttributes(device: _Handle) -> c_nvmlDeviceAttributes:
    return nvmlDeviceGetAttributes_v2(device)


def nvmlDeviceGetGpuInstanceProfileInfo(
    device: _Handle, profile: int, version: int = 2
) -> c_nvmlGpuInstanceProfileInfo_t | c_nvmlGpuInstanceProfileInfo_v2_t:
    # Like the real wrapper, ``version`` is 1 or 2 (not the nvmlGpuInstanceProfileInfo_v2
    # struct-version constant): anything else raises FunctionNotFound before asking the GPU.
    if version not in (1, 2):
        _raise(NVML_ERROR_FUNCTION_NOT_FOUND)
    gpu = _gpu_handle(device)
    if not gpu.get("mig_capable", True):
        _raise(NVML_ERROR_NOT_SUPPORTED)
    if not isinstance(profile, int) or not 0 <= profile < NVML_GPU_INSTANCE_PROFILE_COUNT:
        _raise(NVML_ERROR_INVALID_ARGUMENT)
    for index, pid, name, slices, count, memory, sms in profile_table(gpu):
        if index != profile:
            continue
        fields = (pid, 0, slices, count, sms, slices, 0, 0, 0, 0, memory)
        if version == 1:
            return c_nvmlGpuInstanceProfileInfo_t(*fields)
        return c_nvmlGpuInstanceProfileInfo_v2_t(
            nvmlGpuInstanceProfileInfo_v2, *fields, f"MIG {name}".encode()
        )
    return _raise(NVML_ERROR_NOT_SUPPORTED)


# The real module defines V as an alias of the same function.
nvmlDeviceGetGpuInstanceProfileInfoV = nvmlDeviceGetGpuInstanceProfileInfo


def nvmlDeviceGetGpuInstanceById(device: _Handle, gpuInstanceId: int) -> _GpuInstance:
    gpu = _gpu_handle(device)
    if not _enabled(gpu):
        _raise(NVML_ERROR_NOT_SUPPORTED)
    if not _current().get("root", True):
        _raise(NVML_ERROR_NO_PERMISSION)
    for mig in _migs(gpu):
        if int(mig["gi"]) == gpuInstanceId:
            return _GpuInstance(device, gpuInstanceId)
    return _raise(NVML_ERROR_NOT_FOUND)


def nvmlGpuInstanceGetInfo(gpuInstance: _GpuInstance) -> c_nvmlGpuInstanceInfo_t:
    if not isinstance(gpuInstance, _GpuInstance):
        _raise(NVML_ERROR_INVALID_ARGUMENT)
    gpu = _gpu_handle(gpuInstance._parent)
    for mig in _migs(gpu):
        if int(mig["gi"]) == gpuInstance._gi:
            row = _row_for(gpu, mig["profile"])
            slices = int(mig.get("slices") or _slices(mig["profile"]))
            profile_id = row[1] if row else _GENERIC_ID.get(slices, 0)
            return c_nvmlGpuInstanceInfo_t(gpuInstance._parent, gpuInstance._gi, profile_id,
                                           0, slices)
    return _raise(NVML_ERROR_INVALID_ARGUMENT)


# ---------------------------------------------------------------------------------- faults


def _gpu_of(name: str, args: tuple[Any, ...]) -> str | None:
    """The UUID of the GPU a call is about (a MIG device's parent), or None."""
    state = _state
    if state is None or not args:
        return None
    target = args[0]
    if isinstance(target, _GpuInstance):
        target = target._parent
    gpus = sorted(state.get("gpus") or [], key=lambda g: int(g["index"]))
    if name == "nvmlDeviceGetHandleByIndex" and isinstance(target, int):
        return str(gpus[target]["uuid"]) if 0 <= target < len(gpus) else None
    if name == "nvmlDeviceGetHandleByUUID":
        target = _Handle(target.decode() if isinstance(target, bytes) else str(target), True)
    if not isinstance(target, _Handle):
        return None
    for gpu in gpus:
        if gpu["uuid"] == target._uuid or any(
                m["uuid"] == target._uuid for m in gpu.get("mig_devices") or []):
            return str(gpu["uuid"])
    return None


def _faults(name: str, args: tuple[Any, ...]) -> None:
    """Apply the state's faults to one call: its delay, then the first rule that matches."""
    with _lock:
        if _state is not None and _refcount > 0:
            _refresh()
            state = _state
        else:  # nvmlInit, or a call before it: the file as it is now
            try:
                state = _load_state()
            except NVMLError:
                return  # nvmlInit itself reports a missing driver
        faults = state.get("faults") or {}
        delay = float(faults.get("delay_s") or 0)
        failure = None
        for rule in faults.get("rules") or []:
            functions = rule.get("functions")
            if functions is not None and name not in functions:
                continue
            if rule.get("gpu") is not None and _gpu_of(name, args) != rule["gpu"]:
                continue
            times = rule.get("times")
            key = str(rule.get("id", ""))
            if times is not None:
                if _fault_counts.get(key, 0) >= int(times):
                    continue
                _fault_counts[key] = _fault_counts.get(key, 0) + 1
            failure = int(rule["error"])
            break
    if delay > 0:
        time.sleep(delay)
    if failure is not None:
        _raise(failure)


def _with_faults(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        depth = getattr(_depth, "value", 0)
        if depth == 0:  # the caller's call, not one this module makes of itself
            _faults(name, args)
        _depth.value = depth + 1
        try:
            return function(*args, **kwargs)
        finally:
            _depth.value = depth

    return call


def _install_faults() -> None:
    # This module's own namespace, never ``sys.modules[__name__]``: a test that loads a fresh
    # copy (``load_fake_nvml``) while another thread loads one has that entry replaced
    # under it.
    namespace = globals()
    for name, value in list(namespace.items()):
        if (name.startswith("nvml") and name[4:5].isupper() and callable(value)
                and not isinstance(value, type) and name not in ("nvmlShutdown",
                                                                 "nvmlErrorString",
                                                                 "nvmlExceptionClass",
                                                                 "nvmlStructToFriendlyObject")):
            namespace[name] = _with_faults(name, value)


def _throw_on_version_mismatch(function: Callable[..., Any]) -> Callable[..., Any]:
    """The real decorator of the unversioned ``…RunningProcesses``: FunctionNotFound (an old
    driver) becomes NVMLLibraryMismatchError. Applied over the fault hook, so an injected
    FunctionNotFound comes out as the real one would."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except NVMLError_FunctionNotFound as error:
            raise NVMLLibraryMismatchError(
                "Unversioned function called and the pyNVML version does not match the NVML "
                "lib version. Either use matching pyNVML and NVML lib versions or use a "
                f"versioned function such as {function.__name__}_v2") from error

    return wrapper


def _install_version_checks() -> None:
    namespace = globals()  # as in _install_faults
    for name in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        namespace[name] = _throw_on_version_mismatch(namespace[name])


_install_faults()
_install_version_checks()
