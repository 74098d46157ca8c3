"""The host-port chooser."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpuspawner import ports


def test_lowest_free_ports_in_the_range():
    assert ports.choose(["ssh", "tb"], (40000, 40010), {40000, 40002}) == {
        "ssh": 40001,
        "tb": 40003,
    }


def test_a_server_keeps_its_ports_while_free():
    got = ports.choose(["ssh"], (40000, 40010), {40000}, previous={"ssh": 40007})
    assert got == {"ssh": 40007}
    moved = ports.choose(["ssh"], (40000, 40010), {40007}, previous={"ssh": 40007})
    assert moved == {"ssh": 40000}


def test_host_probe_is_respected_and_exhaustion_is_clear():
    got = ports.choose(["a"], (40000, 40003), set(), is_free=lambda p: p == 40003)
    assert got == {"a": 40003}
    with pytest.raises(ports.PortsExhausted, match="widen port_range"):
        ports.choose(["a", "b"], (40000, 40001), {40000})


def test_bind_probe_sees_a_listener():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert not ports.host_port_free(port, "127.0.0.1")
    assert ports.host_port_free(port, "127.0.0.1")


@given(
    names=st.sets(st.from_regex(r"\A[a-z]{1,4}\Z"), max_size=5),
    used=st.sets(st.integers(40000, 40020)),
)
def test_never_a_used_or_duplicate_port(names, used):
    try:
        got = ports.choose(names, (40000, 40020), used)
    except ports.PortsExhausted:
        assert len(names) > 21 - len(used)
        return
    assert set(got) == names
    assert not set(got.values()) & used
    assert len(set(got.values())) == len(got)
    assert all(40000 <= p <= 40020 for p in got.values())
