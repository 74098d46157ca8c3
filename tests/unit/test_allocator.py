"""The allocation rules, one behaviour per test."""

from __future__ import annotations

from gpuspawner import allocator
from gpuspawner.allocator import Choice, Refusal, choose, free_by_profile
from gpuspawner.records import EXPIRED, FAILED, HELD

from .hosts import Request, holding, host, limits, stopped, unmanaged

A100 = host(["1g.10gb"] * 7, ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"], None, None)


def test_mig_request_gets_one_slice_of_that_profile():
    choice = choose(A100, [], limits(), Request("ann", mig_profile="1g.10gb"))
    assert isinstance(choice, Choice)
    assert len(choice.devices) == 1
    assert choice.devices[0].profile == "1g.10gb"
    assert choice.equivalents == round(1 / 7, 4)
    assert choice.uuids[0].startswith("MIG-")


def test_never_hands_out_a_taken_slice():
    taken = []
    for n in range(9):
        choice = choose(A100, taken, limits(), Request(f"u{n}", mig_profile="1g.10gb"))
        assert isinstance(choice, Choice), choice
        assert choice.uuids[0] not in {u for a in taken for u in a.uuids}
        taken.append(holding(choice, f"u{n}"))
    refusal = choose(A100, taken, limits(), Request("late", mig_profile="1g.10gb"))
    assert isinstance(refusal, Refusal)
    assert refusal.code == allocator.FULL
    assert "all 9 1g.10gb slices are in use (9/9)" in refusal.message
    assert "3g.40gb has 1 free" in refusal.message and "2g.20gb has 1 free" in refusal.message
    assert len(refusal.holders) == 9 and {h.user for h in refusal.holders} == {
        f"u{n}" for n in range(9)
    }


def test_packs_onto_partly_used_gpus_first():
    first = choose(A100, [], limits(), Request("a", mig_profile="1g.10gb"))
    # GPU 1 already has a slice in use after this one: packing keeps filling it.
    on_gpu1 = choose(
        A100, [], limits(), Request("a", mig_profile="1g.10gb", prefer_parents=(A100.gpus[1].uuid,))
    )
    assert on_gpu1.devices[0].gpu_index == 1
    second = choose(A100, [holding(on_gpu1, "a")], limits(), Request("b", mig_profile="1g.10gb"))
    assert second.devices[0].gpu_index == 1
    assert first.devices[0].gpu_index == 0  # empty host: lowest index


def test_spread_strategy_prefers_the_emptiest_gpu():
    on_gpu1 = choose(
        A100, [], limits(), Request("a", mig_profile="1g.10gb", prefer_parents=(A100.gpus[1].uuid,))
    )
    nxt = choose(
        A100,
        [holding(on_gpu1, "a")],
        limits(),
        Request("b", mig_profile="1g.10gb", strategy="spread"),
    )
    assert nxt.devices[0].gpu_index == 0


def test_restart_keeps_the_same_slice_when_free():
    other = A100.migs[3]
    choice = choose(
        A100, [], limits(), Request("a", mig_profile="1g.10gb", prefer_uuids=(other.uuid,))
    )
    assert choice.uuids == (other.uuid,) and choice.kept


def test_own_stopped_container_of_the_same_server_does_not_block_its_restart():
    first = choose(A100, [], limits(max_gpu_equivalents=0.15), Request("a", mig_profile="1g.10gb"))
    mine = stopped(holding(first, "a"))
    again = choose(
        A100,
        [mine],
        limits(max_gpu_equivalents=0.15),
        Request("a", mig_profile="1g.10gb", prefer_uuids=first.uuids,
                own_container=mine.container_id),
    )
    assert isinstance(again, Choice) and again.uuids == first.uuids


def test_another_container_of_the_same_server_is_someone_elses():
    """Only the server's own container (by id) gives up its devices to a restart: a stray of
    the same user and server name (another name, another hub) keeps what it holds."""
    first = choose(A100, [], limits(), Request("a", mig_profile="3g.40gb"))
    stray = holding(first, "a")  # running, same user and server
    again = choose(A100, [stray], limits(), Request("a", mig_profile="3g.40gb",
                                                    prefer_uuids=first.uuids))
    assert isinstance(again, Refusal) and again.code == allocator.FULL


def test_quota_in_gpu_equivalents():
    lim = limits(max_gpu_equivalents=0.3)
    a = choose(A100, [], lim, Request("a", server="x", mig_profile="1g.10gb"))
    b = choose(A100, [holding(a, "a", "x")], lim, Request("a", server="y", mig_profile="1g.10gb"))
    assert isinstance(b, Choice)
    held = [holding(a, "a", "x"), holding(b, "a", "y")]
    c = choose(A100, held, lim, Request("a", server="z", mig_profile="1g.10gb"))
    assert isinstance(c, Refusal) and c.code == allocator.QUOTA
    assert "you already hold 0.29 of your 0.3" in c.message


def test_expired_and_failed_allocations_hold_nothing():
    a = choose(A100, [], limits(), Request("a", mig_profile="3g.40gb"))
    for state in (EXPIRED, FAILED):
        b = choose(
            A100, [stopped(holding(a, "a"), state)], limits(), Request("b", mig_profile="3g.40gb")
        )
        assert isinstance(b, Choice) and b.uuids == a.uuids


def test_whole_gpus_only_where_mig_is_off_and_only_if_allowed():
    two = choose(A100, [], limits(), Request("a", gpus=2))
    assert isinstance(two, Choice) and two.slots == ("2", "3")
    assert two.equivalents == 2.0
    assert choose(A100, [], limits(), Request("a", gpus=3)).code == allocator.NO_SUCH_PROFILE
    no = choose(A100, [], limits(allow_full_gpu=False), Request("a", gpus=1))
    assert isinstance(no, Refusal) and no.code == allocator.FORBIDDEN
    many = choose(A100, [], limits(max_gpu_slots_per_container=1), Request("a", gpus=2))
    assert many.code == allocator.TOO_MANY_DEVICES


def test_a_mig_slice_in_use_keeps_its_gpu_from_being_given_whole_and_vice_versa():
    inv = host(["1g.10gb"], None)
    outside = unmanaged(count=-1)  # docker run --gpus all
    refused = choose(inv, [outside], limits(), Request("a", mig_profile="1g.10gb"))
    assert isinstance(refused, Refusal) and refused.code == allocator.FULL
    assert refused.holders[0].managed is False
    whole = unmanaged(uuids=[inv.gpus[0].uuid])
    assert isinstance(choose(inv, [whole], limits(), Request("a", mig_profile="1g.10gb")), Refusal)


def test_unmanaged_count_takes_the_first_gpus():
    inv = host(None, None, None)
    choice = choose(inv, [unmanaged(count=2)], limits(), Request("a", gpus=1))
    assert choice.slots == ("2",)


def test_unknown_profile_names_what_exists():
    refusal = choose(A100, [], limits(), Request("a", mig_profile="1g.5gb"))
    assert refusal.code == allocator.NO_SUCH_PROFILE
    assert "1g.10gb, 2g.20gb, 3g.40gb" in refusal.message


def test_host_without_gpus():
    empty = host()
    refusal = choose(empty, [], limits(), Request("a", mig_profile="1g.10gb"))
    assert refusal.code == allocator.NO_GPUS
    assert isinstance(choose(empty, [], limits(), Request("a")), Choice)  # CPU still spawns


def test_policy_forbidden_profile():
    refusal = choose(
        A100,
        [],
        limits(allowed_profiles=("cpu",)),
        Request("a", profile="big", mig_profile="3g.40gb"),
    )
    assert refusal.code == allocator.FORBIDDEN and "'big'" in refusal.message


def test_max_servers_counts_other_servers_only():
    a = choose(A100, [], limits(), Request("a", server="one"))
    held = [holding(a, "a", "one")]
    assert choose(A100, held, limits(max_servers=1), Request("a", server="one")) == Choice()
    refusal = choose(A100, held, limits(max_servers=1), Request("a", server="two"))
    assert refusal.code == allocator.TOO_MANY_SERVERS


def test_higher_priority_takes_a_held_slot_never_a_running_one():
    inv = host(["3g.40gb"], None)
    low = choose(inv, [], limits(), Request("low", mig_profile="3g.40gb"))
    running = holding(low, "low", priority=1)
    assert choose(
        inv, [running], limits(priority=9), Request("hi", mig_profile="3g.40gb")
    ).code == (allocator.FULL)
    held = stopped(running, HELD)
    choice = choose(inv, [held], limits(priority=9), Request("hi", mig_profile="3g.40gb"))
    assert isinstance(choice, Choice) and choice.preempts == (held.container_id,)
    # Equal priority does not pre-empt.
    same = choose(inv, [held], limits(priority=1), Request("peer", mig_profile="3g.40gb"))
    assert isinstance(same, Refusal)


def test_free_by_profile_counts():
    a = choose(A100, [], limits(), Request("a", mig_profile="1g.10gb"))
    counts = free_by_profile(A100, [holding(a, "a")])
    assert counts["1g.10gb"] == (8, 9)
    assert counts["gpu"] == (2, 2)
    assert counts["3g.40gb"] == (1, 1)


def test_both_mig_and_gpus_is_refused():
    assert choose(A100, [], limits(), Request("a", mig_profile="1g.10gb", gpus=1)).code == (
        allocator.FORBIDDEN
    )


# ----------------------------------------------------------------- unavailable devices

LOST = "NVML says the GPU is lost"


def _down(inventory, *gpu_indexes: int, migs_too: bool = True):
    """``inventory`` with these GPUs (and, as inventory.read_nvml does, their MIG devices)
    marked unavailable."""
    from dataclasses import replace

    gpus = tuple(replace(g, unavailable=LOST) if g.index in gpu_indexes else g
                 for g in inventory.gpus)
    migs = tuple(replace(m, unavailable=LOST) if migs_too and m.gpu_index in gpu_indexes
                 else m for m in inventory.migs)
    return replace(inventory, gpus=gpus, migs=migs)


def test_an_unavailable_slice_is_never_chosen():
    inv = _down(A100, 0)  # GPU 0's seven 1g.10gb; GPU 1 has two more
    taken = []
    for n in range(2):
        choice = choose(inv, taken, limits(), Request(f"u{n}", mig_profile="1g.10gb"))
        assert isinstance(choice, Choice) and choice.devices[0].gpu_index == 1
        taken.append(holding(choice, f"u{n}"))
    refusal = choose(inv, taken, limits(), Request("late", mig_profile="1g.10gb"))
    assert isinstance(refusal, Refusal) and refusal.code == allocator.FULL
    assert "all 2 1g.10gb slices are in use (2/2)" in refusal.message


def test_a_slice_of_an_unavailable_gpu_is_not_chosen_even_if_itself_unmarked():
    inv = _down(A100, 0, migs_too=False)
    choice = choose(inv, [], limits(), Request("ann", mig_profile="1g.10gb"))
    assert isinstance(choice, Choice) and choice.devices[0].gpu_index == 1
    assert free_by_profile(inv, [])["1g.10gb"] == (2, 2)


def test_a_profile_that_only_an_unavailable_gpu_has_is_refused_as_unavailable():
    inv = _down(A100, 1)  # the only 3g.40gb and 2g.20gb are on GPU 1
    refusal = choose(inv, [], limits(), Request("ann", mig_profile="3g.40gb"))
    assert isinstance(refusal, Refusal) and refusal.code == allocator.UNAVAILABLE
    assert LOST in refusal.message and "1 3g.40gb slices" in refusal.message
    missing = choose(inv, [], limits(), Request("ann", mig_profile="4g.40gb"))
    assert missing.code == allocator.NO_SUCH_PROFILE


def test_unavailable_whole_gpus_are_not_chosen():
    inv = _down(A100, 2)  # GPUs 2 and 3 are whole; 2 is down
    one = choose(inv, [], limits(), Request("ann", gpus=1))
    assert isinstance(one, Choice) and one.slots == ("3",)
    two = choose(inv, [], limits(), Request("ann", gpus=2))
    assert isinstance(two, Refusal) and two.code == allocator.UNAVAILABLE
    assert "1 of this host's 2 whole GPUs are unavailable" in two.message
    three = choose(inv, [], limits(), Request("ann", gpus=3))
    assert three.code == allocator.NO_SUCH_PROFILE


def test_free_by_profile_counts_unavailable_devices_apart():
    a = choose(A100, [], limits(), Request("a", mig_profile="1g.10gb"))
    counts = free_by_profile(_down(A100, 0, 2), [holding(a, "a")])
    assert counts["1g.10gb"] == (2, 2)  # a took GPU 0's: it is down, so 2 free on GPU 1
    assert counts["1g.10gb"].unavailable == 7 and counts["1g.10gb"].reason == LOST
    assert counts["gpu"] == (1, 1) and counts["gpu"].unavailable == 1
    assert counts["3g.40gb"] == (1, 1) and counts["3g.40gb"].unavailable == 0
    assert counts["3g.40gb"].reason is None
    assert free_by_profile(A100, [])["1g.10gb"].unavailable == 0
