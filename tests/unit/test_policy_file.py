"""A running hub picks up an edited policy file, and a broken edit is loud."""

from __future__ import annotations

import os

import pytest

from gpuspawner.policy import PolicyError, PolicyFile


def test_edits_are_picked_up_and_errors_raise(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("defaults: {max_gpu_equivalents: 1}\n")
    source = PolicyFile(path)
    assert source.current().for_user("ann").limits.max_gpu_equivalents == 1
    assert source.current() is source.current()  # unchanged: not re-parsed
    path.write_text("defaults: {max_gpu_equivalents: 2}\n")
    os.utime(path, (1, 1))
    assert source.current().for_user("ann").limits.max_gpu_equivalents == 2
    path.write_text("defaults: {max_gpus: 2}\n")
    os.utime(path, (2, 2))
    with pytest.raises(PolicyError, match="line 1"):
        source.current()
    assert PolicyFile(None).current().for_user("x").limits.max_gpu_equivalents == 1.0
