"""``gpuspawner status`` and ``doctor`` on a host whose NVML is not at its best: a non-root
user, a GPU lost. They read NVML (the simulator's fake, as ``import pynvml`` finds it) and
must print the world with the trouble named, never a traceback.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from gpuspawner import cli

from ..gpusim import load_fake_nvml

pytestmark = pytest.mark.docker


@pytest.fixture
def nvml_cli(engine: Any, gpusim: Any, capsys: pytest.CaptureFixture[str],
             monkeypatch: pytest.MonkeyPatch):
    """``run(*args)`` -> (exit code, stdout, stderr) with ``--inventory nvml`` on the fake."""
    monkeypatch.setitem(sys.modules, "pynvml", load_fake_nvml())

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main(["--docker-host", engine.base_url, "--inventory", "nvml",
                         "--hub-id", "test", *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_a_non_root_hub_lists_everything_and_says_what_root_adds(nvml_cli, gpusim):
    gpusim.set_root(False)
    code, out, err = nvml_cli("status")
    assert code == 0 and "Traceback" not in out + err
    lines = out.splitlines()
    assert lines[0] == "inventory: nvml, 4 GPU(s), 13 MIG device(s)"
    assert "free: 1g.10gb 9/9, 2g.20gb 1/1, 3g.40gb 3/3, gpu 1/1" in lines
    assert any(line.startswith("problem: the hub's user is not root") for line in lines)
    code, out, _ = nvml_cli("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(out)}
    assert code == 0
    assert checks["nvml-permissions"]["status"] == "warn"
    assert "as root" in checks["nvml-permissions"]["message"]


def test_a_lost_gpu_is_reported_and_the_rest_listed(nvml_cli, gpusim):
    gpusim.lose_gpu(1)
    code, out, err = nvml_cli("status")
    assert code == 0 and "Traceback" not in out + err
    lines = out.splitlines()
    # GPU 1 is listed (by index: this one read never saw its UUID); its slices are not known.
    assert lines[0] == "inventory: nvml, 4 GPU(s), 9 MIG device(s)"
    assert any(line.startswith("problem: GPU 1 (") and "is unavailable" in line
               for line in lines)
    code, out, _ = nvml_cli("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(out)}
    assert code == 0 and checks["unavailable"]["status"] == "warn"
    assert "GPU is lost" in checks["unavailable"]["message"]
