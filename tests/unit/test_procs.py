"""Host pid -> container: the cgroup texts Docker's containers have, written out by hand
from the kernel's and Docker's documented layouts, and the files a process outside any
container has."""

from __future__ import annotations

from pathlib import Path

from gpuspawner.procs import container_id_from_cgroup, container_of

ID = "3f2c" + "0123456789abcdef" * 3 + "deadbeefcafe"
assert len(ID) == 64


def test_every_layout_docker_uses_names_the_container():
    layouts = {
        "cgroup v2, systemd driver": f"0::/system.slice/docker-{ID}.scope\n",
        "cgroup v2, cgroupfs driver": f"0::/docker/{ID}\n",
        "cgroup v1": f"12:pids:/docker/{ID}\n11:memory:/docker/{ID}\n1:name=systemd:/\n",
        "a --cgroup-parent in front": f"0::/lab/gpu/docker/{ID}\n",
        "systemd inside the container": f"0::/system.slice/docker-{ID}.scope/init.scope\n",
        "the hub in a container with pid: host": f"0::/docker/{ID}/child\n",
    }
    assert {name: container_id_from_cgroup(text) for name, text in layouts.items()} == {
        name: ID for name in layouts}


def test_a_process_in_no_docker_container_has_none():
    for text in ("0::/\n", "0::/user.slice/user-1000.slice/session-3.scope\n",
                 "12:memory:/\n1:name=systemd:/init.scope\n",
                 f"0::/kubepods/burstable/pod1/cri-containerd-{ID}.scope\n",  # not Docker's
                 f"0::/docker/{ID[:12]}\n",  # a short id is no container's cgroup
                 f"0::/docker/{ID}x\n", ""):
        assert container_id_from_cgroup(text) is None, text


def test_reading_a_pid_that_is_gone_or_unseen_gives_none(tmp_path: Path):
    (tmp_path / "77").mkdir()
    (tmp_path / "77" / "cgroup").write_text(f"0::/docker/{ID}\n")
    assert container_of(77, tmp_path) == ID
    assert container_of(78, tmp_path) is None  # ended, or in another pid namespace
    assert container_of(1, Path("/nonexistent")) is None


def test_this_test_process_is_in_no_container_of_ours():
    import os

    assert container_of(os.getpid()) is None  # the test runs on the host (or the CI sandbox)
