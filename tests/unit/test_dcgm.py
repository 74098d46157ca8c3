# ruff: noqa: E501 - dcgm-exporter's lines are as long as they are
"""Utilization per MIG device from a dcgm-exporter: its text format, written out by hand
from dcgm-exporter's documented output, served by a real HTTP server."""

from __future__ import annotations

import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gpuspawner import dcgm
from gpuspawner.admin.views import activity
from gpuspawner.policy import Policy
from gpuspawner.snapshot import Snapshot

from .hosts import host

EXPORTED = """\
# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).
# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-0",device="nvidia0",modelName="NVIDIA A100-SXM4-80GB",Hostname="gpu1"} 71
DCGM_FI_DEV_GPU_UTIL{gpu="1",UUID="GPU-1",device="nvidia1",modelName="NVIDIA A100-SXM4-80GB",Hostname="gpu1"} 12
# HELP DCGM_FI_PROF_GR_ENGINE_ACTIVE Ratio of time the graphics engine is active.
# TYPE DCGM_FI_PROF_GR_ENGINE_ACTIVE gauge
DCGM_FI_PROF_GR_ENGINE_ACTIVE{gpu="0",UUID="GPU-0",device="nvidia0",modelName="NVIDIA A100-SXM4-80GB",GPU_I_PROFILE="1g.10gb",GPU_I_ID="7",Hostname="gpu1"} 0.534
DCGM_FI_PROF_GR_ENGINE_ACTIVE{gpu="0",UUID="GPU-0",device="nvidia0",modelName="NVIDIA A100-SXM4-80GB",GPU_I_PROFILE="3g.40gb",GPU_I_ID="2",Hostname="gpu1"} 0
DCGM_FI_PROF_GR_ENGINE_ACTIVE{gpu="1",UUID="GPU-1",device="nvidia1",modelName="NVIDIA A100-SXM4-80GB",Hostname="gpu1"} 0.25
# HELP DCGM_FI_DEV_FB_USED Framebuffer memory used (in MiB).
# TYPE DCGM_FI_DEV_FB_USED gauge
DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-0",device="nvidia0",Hostname="gpu1"} 12000
"""


def test_the_engine_activity_of_each_gpu_instance_is_its_utilization():
    assert dcgm.parse(EXPORTED) == {
        (0, None): 71,  # DCGM_FI_DEV_GPU_UTIL, no profiling row for the whole GPU 0
        (1, None): 25,  # the profiling field wins over the older one
        (0, 7): 53,
        (0, 2): 0,
    }
    assert dcgm.parse("") == {}
    with pytest.raises(ValueError):
        dcgm.parse("this is { not prometheus\n")


def test_mig_devices_get_dcgms_figure_by_gpu_index_and_instance_id():
    inventory = host(["1g.10gb", "3g.40gb"], None)
    migs = (replace(inventory.migs[0], gi=7, memory_used_mib=0),
            replace(inventory.migs[1], gi=2, memory_used_mib=0))
    inventory = replace(inventory, migs=migs,
                        gpus=(inventory.gpus[0], replace(inventory.gpus[1], utilization=40)))
    applied = dcgm.apply(inventory, dcgm.parse(EXPORTED))
    assert [m.utilization for m in applied.migs] == [53, 0]
    assert applied.gpus[1].utilization == 40  # NVML's own figure is kept
    assert applied.gpus[0].utilization == 71  # none from NVML (MIG on): DCGM's
    snap = Snapshot(applied, (), Policy(), frozenset(), _now())
    words = {v.uuid: activity(v) for v in snap.devices()}
    assert words[migs[0].uuid] == "0.0/9.5 GiB · 53% utilization"
    without = Snapshot(inventory, (), Policy(), frozenset(), _now())
    assert {v.uuid: activity(v) for v in without.devices()}[migs[0].uuid] == (
        "0.0/9.5 GiB · utilization n/a")


def _now():
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)


class _Exporter(BaseHTTPRequestHandler):
    body = EXPORTED.encode()
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(self.status)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


def test_read_from_a_real_exporter_and_an_unreachable_one_is_no_error(caplog):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Exporter)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        assert dcgm.read(url)[(0, 7)] == 53
        _Exporter.status = 500
        assert dcgm.read(url) == {}
    finally:
        _Exporter.status = 200
        server.shutdown()
    assert dcgm.read(url, timeout=1) == {}  # nothing listens any more
    assert "dcgm-exporter at" in caplog.text
