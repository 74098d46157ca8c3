"""What a rebooting GPU host still lacks (``boot.missing``), from its documented rules:
Docker always; the driver only where Docker shows that the host had GPUs; MIG devices of a
wanted profile only while a MIG-enabled GPU has none at all."""

from __future__ import annotations

from gpuspawner import boot
from gpuspawner.records import Inventory

from .hosts import host


def test_docker_first():
    assert boot.missing(False, None, [], had_gpus=True) == ["the Docker engine"]
    assert boot.missing(False, Inventory(), ["1g.10gb"], had_gpus=True) == ["the Docker engine"]


def test_a_cpu_spawn_waits_for_nothing_but_docker():
    assert boot.missing(True, None, [], had_gpus=True) == []


def test_the_driver_only_on_a_host_that_had_gpus():
    assert boot.missing(True, Inventory(), [], had_gpus=True) == ["the NVIDIA driver"]
    assert boot.missing(True, Inventory(), ["1g.10gb"], had_gpus=False) == []


def test_mig_devices_while_a_mig_gpu_has_none():
    made = host(["1g.10gb", "1g.10gb"], None)
    assert boot.missing(True, made, ["1g.10gb"], had_gpus=True) == []
    bare = host([], None)  # MIG on, no device yet
    assert boot.missing(True, bare, ["1g.10gb", "3g.40gb"], had_gpus=True) == [
        "MIG devices (1g.10gb)", "MIG devices (3g.40gb)"]
    # Partitioned, just not into this profile: nothing to wait for (the usual refusal).
    assert boot.missing(True, made, ["3g.40gb"], had_gpus=True) == []
    # One GPU still being partitioned while another has the profile: no wait for it.
    assert boot.missing(True, host(["1g.10gb"], []), ["1g.10gb", "2g.20gb"],
                        had_gpus=True) == ["MIG devices (2g.20gb)"]
    assert boot.sentence(["the NVIDIA driver"]) == (
        "The GPU host is still starting (waiting for the NVIDIA driver)")
