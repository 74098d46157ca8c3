"""Utilization per MIG device, from NVIDIA's dcgm-exporter, where one runs.

NVML reports utilization for whole GPUs only (``nvmlDeviceGetUtilizationRates`` fails on a
MIG device handle). DCGM measures it per GPU instance, and dcgm-exporter publishes it in
Prometheus' text format::

    DCGM_FI_PROF_GR_ENGINE_ACTIVE{gpu="0",UUID="GPU-…",GPU_I_PROFILE="1g.10gb",GPU_I_ID="9",…} 0.53

``gpu`` is the GPU's index, ``GPU_I_ID`` the GPU-instance id (``MigDevice.gi``; absent or
empty on a whole-GPU row), the value the fraction of time the compute engine was busy.
``DCGM_FI_DEV_GPU_UTIL`` (percent, whole GPUs) is used where the profiling field is absent.

With ``dcgm_url`` set (``GPUSPAWNER_DCGM_URL``), the admin service and the CLI read it once
per snapshot; a failing read leaves utilization as NVML gave it ("n/a" for MIG devices) and
is logged, never an error: utilization is for people, nothing is decided on it.
"""

from __future__ import annotations

import logging
import urllib.request
from dataclasses import replace

from prometheus_client.parser import text_string_to_metric_families

from .records import Inventory

log = logging.getLogger(__name__)

#: Fraction of time the compute (graphics) engine was active: per GPU and per GPU instance.
ENGINE_ACTIVE = "DCGM_FI_PROF_GR_ENGINE_ACTIVE"
#: Utilization in percent, whole GPUs only (the older, non-profiling field).
GPU_UTIL = "DCGM_FI_DEV_GPU_UTIL"

#: (GPU index, GPU-instance id or None for the whole GPU) -> utilization in percent.
Utilization = dict[tuple[int, int | None], int]


def parse(text: str) -> Utilization:
    """The utilization figures in a dcgm-exporter ``/metrics`` text (ValueError when it is
    not Prometheus' text format)."""
    found: Utilization = {}
    fallback: Utilization = {}
    for family in text_string_to_metric_families(text):
        if family.name not in (ENGINE_ACTIVE, GPU_UTIL):
            continue
        for sample in family.samples:
            try:
                gpu = int(sample.labels["gpu"])
                instance = sample.labels.get("GPU_I_ID") or None
                key = (gpu, int(instance) if instance is not None else None)
            except (KeyError, ValueError):
                continue
            if family.name == ENGINE_ACTIVE:
                found[key] = round(max(0.0, min(1.0, sample.value)) * 100)
            else:
                fallback[key] = round(max(0.0, min(100.0, sample.value)))
    return {**fallback, **found}


#: The last failure logged per URL: a page polled every few seconds logs a failure once,
#: and again only when it changes or after a success.
_failing: dict[str, str] = {}


def read(url: str, timeout: float = 2.0) -> Utilization:
    """``parse`` of what ``url`` serves; {} (logged once per failure) when it cannot be read."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - admin's URL
            found = parse(response.read().decode("utf-8", "replace"))
    except (OSError, ValueError) as exc:
        if _failing.get(url) != str(exc):
            _failing[url] = str(exc)
            log.warning("dcgm-exporter at %s could not be read: %s", url, exc)
        return {}
    _failing.pop(url, None)
    return found


def apply(inventory: Inventory, utilization: Utilization) -> Inventory:
    """``inventory`` with DCGM's figures where NVML gave none: every MIG device, and whole GPUs
    NVML did not report."""
    if not utilization:
        return inventory
    gpus = tuple(
        replace(g, utilization=utilization[(g.index, None)])
        if g.utilization is None and (g.index, None) in utilization else g
        for g in inventory.gpus)
    migs = tuple(
        replace(m, utilization=utilization[(m.gpu_index, m.gi)])
        if m.utilization is None and m.gi is not None and (m.gpu_index, m.gi) in utilization
        else m
        for m in inventory.migs)
    return replace(inventory, gpus=gpus, migs=migs)
