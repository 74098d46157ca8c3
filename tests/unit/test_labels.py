"""The label schema: what is written is read back exactly; nonsense is reported, not fatal."""

from __future__ import annotations

from datetime import datetime, timezone

from hypothesis import given
from hypothesis import strategies as st

from gpuspawner import labels as L

WHEN = datetime(2026, 11, 24, 9, 30, 5, tzinfo=timezone.utc)


def test_encode_uses_exactly_the_design_keys():
    out = L.encode(
        hub="lab",
        user="ann",
        server="",
        profile="mig-1g",
        created_at=WHEN,
        slots=["1.2"],
        uuids=["MIG-aaaa"],
        parent_uuids=["GPU-bbbb"],
        gis=[7],
        gpu_profile="1g.10gb",
        equivalents=1 / 7,
        priority=10,
        ports={"ssh": 40001},
    )
    assert out == {
        "ds01.managed": "true",
        "ds01.schema": "1",
        "ds01.interface": "jupyterhub",
        "ds01.hub": "lab",
        "ds01.user": "ann",
        "ds01.server": "",
        "ds01.profile": "mig-1g",
        "ds01.created_at": "2026-11-24T09:30:05Z",
        "ds01.gpu.allocated": "1.2",
        "ds01.gpu.uuid": "MIG-aaaa",
        "ds01.gpu.uuids": "MIG-aaaa",
        "ds01.gpu.parent_uuids": "GPU-bbbb",
        "ds01.gpu.gi": "7",
        "ds01.gpu.profile": "1g.10gb",
        "ds01.gpu.equivalents": "0.1429",
        "ds01.gpu.allocated_at": "2026-11-24T09:30:05Z",
        "ds01.gpu.priority": "10",
        "ds01.port.ssh": "40001",
    }


def test_multi_gpu_has_no_single_uuid_and_cpu_has_empty_allocation():
    multi = L.encode(
        hub="h",
        user="u",
        server="s",
        profile="p",
        created_at=WHEN,
        slots=["0", "1"],
        uuids=["GPU-a", "GPU-b"],
        parent_uuids=["GPU-a", "GPU-b"],
    )
    assert "ds01.gpu.uuid" not in multi and multi["ds01.gpu.uuids"] == "GPU-a,GPU-b"
    cpu = L.encode(hub="h", user="u", server="", profile="cpu", created_at=WHEN)
    assert cpu["ds01.gpu.allocated"] == "" and "ds01.gpu.allocated_at" not in cpu
    assert L.decode(cpu).uuids == () and L.decode(cpu).problems == ()


names = st.text(st.characters(blacklist_categories=["Cs", "Cc"]), min_size=1, max_size=20)
slot_ids = st.lists(st.from_regex(r"\A[0-9]{1,2}(\.[0-6])?\Z"), max_size=3)


@given(
    user=names,
    server=st.text(max_size=10),
    profile=names,
    slots=slot_ids,
    eq=st.floats(0, 8),
    prio=st.integers(-5, 100),
    ports=st.dictionaries(st.from_regex(r"\A[a-z][a-z0-9_-]{0,8}\Z"), st.integers(1, 65535)),
)
def test_round_trip(user, server, profile, slots, eq, prio, ports):
    uuids = [f"MIG-{i:08x}" for i in range(len(slots))]
    out = L.encode(
        hub="h",
        user=user,
        server=server,
        profile=profile,
        created_at=WHEN,
        slots=slots,
        uuids=uuids,
        parent_uuids=["GPU-1"] * len(slots),
        gis=list(range(len(slots))),
        equivalents=eq,
        priority=prio,
        ports=ports,
    )
    back = L.decode(out)
    assert back.problems == ()
    assert (back.user, back.server, back.profile, back.hub) == (user, server, profile, "h")
    assert back.slots == tuple(slots) and back.uuids == tuple(uuids)
    assert abs(back.equivalents - eq) < 1e-4 and back.priority == prio
    assert dict(back.ports) == ports and back.created_at == WHEN


def test_hand_edited_nonsense_is_reported_not_raised():
    back = L.decode(
        {
            "ds01.managed": "true",
            "ds01.user": "ann",
            "ds01.gpu.allocated": "banana",
            "ds01.gpu.uuids": "not-a-uuid,MIG-ok",
            "ds01.gpu.equivalents": "lots",
            "ds01.gpu.priority": "high",
            "ds01.port.ssh": "99999",
            "ds01.gpu.gi": "x",
            "ds01.created_at": "yesterday",
            "ds01.schema": "7",
        }
    )
    assert back.managed and back.user == "ann"
    assert back.slots == () and back.uuids == ("MIG-ok",)
    assert back.equivalents == 0.0 and back.priority == 0 and back.ports == ()
    assert back.created_at is None
    text = " ".join(back.problems)
    for key in (
        "ds01.gpu.allocated",
        "ds01.gpu.uuids",
        "ds01.gpu.equivalents",
        "ds01.gpu.priority",
        "ds01.port.ssh",
        "ds01.gpu.gi",
        "ds01.created_at",
        "ds01.schema",
    ):
        assert key in text


def test_older_ds01_spellings_are_read():
    old = L.decode({"ds01.gpu.uuid": "MIG-1234", "aime.mlc.USER": "bob"})
    assert old.managed and old.user == "bob" and old.uuids == ("MIG-1234",)
    assert not L.decode({"com.example": "x"}).managed
    assert not L.decode(None).managed


def test_port_names_are_checked():
    import pytest

    with pytest.raises(ValueError, match="not usable in a label"):
        L.port_label("SSH port")


def test_docker_nanosecond_times_parse():
    assert L.parse_time("2026-11-24T09:30:05.123456789Z") == WHEN.replace(microsecond=123456)
    assert L.parse_time("0001-01-01T00:00:00Z") is None


def test_docker_status_text_bounds():
    from gpuspawner.ledger import ago_bounds

    assert ago_bounds("Exited (0) Less than a second ago") == (0, 1)
    assert ago_bounds("Exited (137) 5 seconds ago") == (5, 6)
    assert ago_bounds("Exited (0) About a minute ago") == (60, 120)
    assert ago_bounds("Exited (1) 7 minutes ago") == (420, 480)
    assert ago_bounds("Exited (0) 3 hours ago") == (9000, 12600)
    # Days, weeks and months are counted from hours rounded to the nearest (go-units).
    assert ago_bounds("Exited (0) 2 days ago") == (47.5 * 3600, 71.5 * 3600)
    assert ago_bounds("Exited (0) 3 weeks ago") == (3 * 168 * 3600 - 1800, 4 * 168 * 3600 - 1800)
    assert ago_bounds("Up 2 hours") is None


def test_since_anchors_are_the_newest_containers_made_before_the_cut():
    """Docker's ``since`` filter on an anchor lists every container made after it, so an
    anchor must be older than every container that may still be starting: made before the
    cut (a start time-out and more ago). Newest first; a tie in Docker's whole seconds keeps
    Docker's own order (newest first); a few are kept, as the newest may be removed."""
    from gpuspawner.ledger import anchors

    listed = [  # as Docker lists them: newest first
        {"Id": "young", "Created": 1000},
        {"Id": "tie-newer", "Created": 900},
        {"Id": "tie-older", "Created": 900},
        {"Id": "old", "Created": 500},
        {"Id": "older", "Created": 100},
        {"Id": "no-time"},
    ]
    assert anchors(listed, before=950) == ("tie-newer", "tie-older", "old")
    assert anchors(listed, before=950, keep=5) == (
        "tie-newer", "tie-older", "old", "older", "no-time")
    assert anchors(listed, before=900) == ("old", "older", "no-time")
    assert anchors(listed, before=0) == ()
    assert anchors([], before=10**10) == ()
