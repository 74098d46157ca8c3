"""A hub of several hosts, as plain data: the host label, policy limits counted across hosts,
how busy a host is and the order hosts are tried in (DESIGN.md "Spawn"; docs/scaling.md)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from traitlets import TraitError

from gpuspawner import allocator, labels, spawnplan
from gpuspawner.admin import views
from gpuspawner.allocator import Refusal
from gpuspawner.spawnplan import Plan
from gpuspawner.traits import GPUSpawnerTraits

from .hosts import host, limits
from .test_spawnplan import INV, SLICE, container, plan, request, snap

#: Another host: one GPU with seven 1g slices, UUIDs of its own.
FAR = host(["1g.10gb"] * 7)
FAR = replace(FAR, gpus=tuple(replace(g, uuid="GPU-ffff0000-0000-0000-0000-000000000000")
                              for g in FAR.gpus),
              migs=tuple(replace(m, uuid=f"MIG-ffff{i:04x}-0000-0000-0000-000000000000",
                                 parent_uuid="GPU-ffff0000-0000-0000-0000-000000000000")
                         for i, m in enumerate(FAR.migs)))


def test_a_container_made_for_a_host_says_which_and_a_one_host_hub_writes_no_host_label():
    on_far = plan(snap(), request(host="gpu2"))
    assert isinstance(on_far, Plan)
    assert dict(on_far.labels)[labels.HOST] == "gpu2"
    assert labels.decode(dict(on_far.labels)).host == "gpu2"
    alone = plan(snap(), request())
    assert labels.HOST not in dict(alone.labels)
    assert labels.decode(dict(alone.labels)).host is None


def test_limits_count_what_the_user_holds_on_other_hosts():
    # ann holds two slices on the far host: 2/7 of a GPU-equivalent, one server.
    far_ann = [container(f"far{i}", server=f"s{i}", devices=[FAR.migs[i]], inventory=FAR)[0]
               for i in range(2)]
    views = {"gpu1": snap(), "gpu2": snap(*far_ann, inventory=FAR)}
    elsewhere = spawnplan.held_elsewhere(views, "gpu1", "lab", "ann")
    assert {a.container_id for a in elsewhere} == {"far0", "far1"}
    here = spawnplan.with_elsewhere(views["gpu1"], elsewhere)
    quota = limits(max_gpu_equivalents=0.3)  # 2/7 + 1/7 > 0.3
    assert isinstance(plan(views["gpu1"], request(), lim=quota), Plan)  # blind to gpu2
    refused = plan(here, request(), lim=quota)
    assert isinstance(refused, Refusal) and refused.code == allocator.QUOTA, refused
    servers = plan(here, request(), lim=limits(max_servers=2))
    assert isinstance(servers, Refusal) and servers.code == allocator.TOO_MANY_SERVERS
    # Another host's devices are never this host's: all seven slices are still free here.
    assert here.free_by_profile()["1g.10gb"] == views["gpu1"].free_by_profile()["1g.10gb"]
    assert isinstance(plan(here, request(), lim=limits(max_gpu_equivalents=1.0)), Plan)


def test_only_the_users_holding_containers_of_this_hub_elsewhere_are_counted():
    mine = container("m", devices=[FAR.migs[0]], inventory=FAR)[0]
    other_user = container("o", user="bob", devices=[FAR.migs[1]], inventory=FAR)[0]
    other_hub = container("h", hub="another", devices=[FAR.migs[2]], inventory=FAR)[0]
    stopped = container("s", server="old", state=spawnplan.CREATED, devices=[FAR.migs[3]],
                        inventory=FAR)[0]
    expired = container("e", server="gone", state="expired", devices=[FAR.migs[4]],
                        inventory=FAR)[0]
    here_too = container("x", server="here", devices=[SLICE[0]])[0]
    views = {"gpu1": snap(here_too),
             "gpu2": snap(mine, other_user, other_hub, stopped, expired, inventory=FAR)}
    counted = {a.container_id for a in spawnplan.held_elsewhere(views, "gpu1", "lab", "ann")}
    # A spawn in flight holds (DESIGN.md "What taken means"); an expired hold does not.
    assert counted == {"m", "s"}


def test_a_server_moving_here_is_not_charged_for_its_own_old_container():
    """The server that moves leaves its old container behind until it runs here: that one
    is not charged (it is about to go); the user's other servers are."""
    old = container("old", server="", devices=[FAR.migs[0]], inventory=FAR)[0]
    other = container("other", server="s1", devices=[FAR.migs[1]], inventory=FAR)[0]
    views = {"gpu1": snap(), "gpu2": snap(old, other, inventory=FAR)}
    counted = spawnplan.held_elsewhere(views, "gpu1", "lab", "ann", server="")
    assert {a.container_id for a in counted} == {"other"}
    assert {a.container_id for a in spawnplan.held_elsewhere(views, "gpu1", "lab", "ann")} == {
        "old", "other"}


def test_what_keeps_a_server_on_its_host():
    """Docker's Mounts: a volume (named or anonymous) and a bind mount stay on their host;
    a tmpfs holds nothing worth keeping and nothing else is a mount."""
    mounts = [
        {"Type": "tmpfs", "Destination": "/tmp"},
        {"Type": "volume", "Name": "home-ann", "Source": "/var/lib/docker/volumes/home-ann/_data",
         "Destination": "/home/jovyan/work"},
        {"Type": "bind", "Source": "/srv/data", "Destination": "/data"},
    ]
    assert spawnplan.kept_on_host(mounts) == ("volume home-ann", "bind mount /srv/data")
    assert spawnplan.kept_on_host([mounts[0]]) == ()
    assert spawnplan.kept_on_host(None) == ()


def test_how_busy_a_host_is():
    # INV: GPU 0 in seven 1g slices, GPU 1 whole. Two slices held: 2/7 of one GPU of two.
    two = [container(f"c{i}", server=f"s{i}", devices=[SLICE[i]])[0] for i in range(2)]
    assert spawnplan.host_load(snap(*two), wants_gpu=True) == pytest.approx((2 / 7) / 2, abs=1e-3)
    whole = container("w", devices=[INV.gpus[1]])[0]
    assert spawnplan.host_load(snap(whole), wants_gpu=True) == pytest.approx(1 / 2)
    stopped = container("x", state="expired", devices=[INV.gpus[1]])[0]
    assert spawnplan.host_load(snap(stopped), wants_gpu=True) == 0.0
    assert spawnplan.host_load(snap(inventory=replace(INV, gpus=(), migs=())), True) == 0.0
    # A CPU server: this hub's running containers, whatever they hold.
    other_hub = container("o", hub="another", server="o")[0]
    assert spawnplan.host_load(snap(*two, whole, stopped, other_hub), wants_gpu=False) == 3.0


@given(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=1, max_size=6),
       st.sampled_from([allocator.PACK, allocator.SPREAD]))
def test_pack_tries_the_busiest_host_first_spread_the_emptiest_ties_in_config_order(
    loads: list[float], strategy: str
) -> None:
    fits = [(f"h{i}", load) for i, load in enumerate(loads)]
    order = spawnplan.order_hosts(fits, strategy)
    assert sorted(order) == sorted(name for name, _ in fits)
    position = {name: i for i, (name, _) in enumerate(fits)}
    load = dict(fits)
    for first, second in zip(order, order[1:], strict=False):
        if load[first] == load[second]:
            assert position[first] < position[second]
        elif strategy == allocator.PACK:
            assert load[first] > load[second]
        else:
            assert load[first] < load[second]


@pytest.mark.parametrize("value, words", [
    ({"gpu2": "http://gpu2:2375"}, "must start with unix://"),
    ({"gpu2": "tcp://gpu2:2376"}, "needs tls_ca, tls_cert and tls_key"),
    ({"gpu2": {"url": "unix:///x", "adress": "10.0.0.2"}}, "unknown key(s) adress"),
])
def test_a_wrong_hosts_setting_is_refused_when_the_config_is_loaded(value, words):
    with pytest.raises(TraitError, match=r"GPUSpawner\.hosts: host gpu2") as caught:
        GPUSpawnerTraits(hosts=value)
    assert words in str(caught.value)
    assert GPUSpawnerTraits(hosts={"gpu1": "unix:///run/docker.sock"}).hosts


def test_the_form_offers_what_every_host_has_summed():
    one = {"1g.10gb": allocator.Free(2, 9), "gpu": allocator.Free(1, 1)}
    two = {"1g.10gb": allocator.Free(4, 4), "3g.40gb": allocator.Free(0, 0, 1, "GPU 0 lost")}
    both = allocator.summed([one, two])
    assert both == {"1g.10gb": (6, 13), "gpu": (1, 1), "3g.40gb": (0, 0)}
    assert both["3g.40gb"].unavailable == 1 and both["3g.40gb"].reason == "GPU 0 lost"
    assert both["1g.10gb"].unavailable == 0 and both["1g.10gb"].reason is None


def test_the_admin_overview_of_several_hosts_groups_cards_by_host_and_names_it_for_actions():
    ann = container("a", devices=[SLICE[0]], state="held")[0]
    bo = container("b", user="bo", devices=[FAR.migs[0]], inventory=FAR, state="held")[0]
    cy = container("c", user="cy", devices=[FAR.migs[1]], inventory=FAR)[0]  # running
    here, far = snap(ann), snap(bo, cy, inventory=FAR)
    model = views.across_hosts([("gpu1", here, ""), ("gpu2", far, ""),
                                ("gpu3", None, "host gpu3 (tcp://gpu3:2376): no answer")],
                               "lab", acts_on="gpu1")
    # INV has two GPUs, FAR one: three cards, in the order of the hosts, each naming its host.
    assert [(c.host, c.uuid) for c in model.cards] == [
        ("gpu1", INV.gpus[0].uuid), ("gpu1", INV.gpus[1].uuid), ("gpu2", FAR.gpus[0].uuid)]
    holders = {h.container: h for c in model.cards for b in c.blocks for h in b.holders}
    # Stopped and this hub's: released through the engine of the host each names.
    assert holders["jupyter-ann"].can_release and holders["jupyter-ann"].host == ""
    assert holders["jupyter-bo"].can_release and holders["jupyter-bo"].host == "gpu2"
    assert holders["jupyter-cy"].can_stop  # the Hub stops a server on any host
    # Totals add up per profile: 7 + 7 slices of 1g.10gb, one held here and two there.
    totals = {t.profile: (t.free, t.total) for t in model.totals}
    assert totals["1g.10gb"] == (11, 14)
    assert "host gpu3 (tcp://gpu3:2376): no answer" in model.problems
    single = views.overview(here, "lab")
    assert all(c.host == "" for c in single.cards)
