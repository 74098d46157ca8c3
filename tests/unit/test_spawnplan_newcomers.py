"""``spawnplan.newcomers``: when Docker's event buffer proves what became live since a plan's
read, so that a race check needs no list. Plain data: the buffer's answers written by hand,
the expected verdicts from the rules in its docstring (and docs/spawner.md)."""

from __future__ import annotations

import pytest

from gpuspawner import spawnplan
from gpuspawner.ledger import _epoch_ns, _stamp
from gpuspawner.records import EVENT_BUFFER, Change, Changes

MS = 1_000_000
PLANNED = 1_800_000_000 * 10**9  # the plan's read began (the hub's clock)
CHECKED = PLANNED + 40 * MS  # the check's moment (the hub's clock)
MINE = "mine"


def window(*changes: Change, events: int | None = None, daemon: bool = False,
           skew: int = 0, margin: int = 500 * MS) -> Changes:
    """The buffer's answer to a window asked with the engine's clock ``skew`` ahead."""
    return Changes(changes, len(changes) if events is None else events, daemon,
                   PLANNED + skew - margin, CHECKED + skew + 5 * MS)


def verdict(changes: Changes, expect: str = "create",
            own: frozenset[str] = frozenset({MINE})) -> spawnplan.Newcomers:
    return spawnplan.newcomers(changes, MINE, expect, own, PLANNED, CHECKED)


def test_only_the_spawns_own_event_proves_a_quiet_window():
    found = verdict(window(Change(MINE, "create", CHECKED - 2 * MS)))
    assert (found.proven, found.suspects) == (True, ())
    assert found.skew_ns == -2 * MS  # its event came 2 ms before the check: a lower bound


def test_what_was_made_or_started_since_is_suspect_and_what_stopped_is_not():
    found = verdict(window(
        Change("made", "create", PLANNED + 1 * MS),
        Change("started", "start", PLANNED + 2 * MS),
        Change("restarted", "restart", PLANNED + 3 * MS),
        Change("unpaused", "unpause", PLANNED + 4 * MS),
        Change("stopped", "die", PLANNED + 5 * MS),
        Change("gone", "destroy", PLANNED + 6 * MS),
        Change("paused", "pause", PLANNED + 7 * MS),
        Change("exec", "exec_start: sh -c true", PLANNED + 8 * MS),
        Change(MINE, "create", CHECKED - 1 * MS),
    ))
    assert found.proven
    assert found.suspects == ("made", "restarted", "started", "unpaused")


def test_the_spawns_own_containers_are_never_suspects():
    own = frozenset({MINE, "its-container", "its-place-holder"})
    found = verdict(window(Change("its-place-holder", "create", PLANNED + 1 * MS),
                           Change("its-container", "start", PLANNED + 2 * MS),
                           Change(MINE, "start", CHECKED - 1 * MS)), expect="start", own=own)
    assert (found.proven, found.suspects) == (True, ())


@pytest.mark.parametrize("events", [EVENT_BUFFER, EVENT_BUFFER + 1])
def test_a_full_buffer_may_have_dropped_events(events):
    found = verdict(window(Change(MINE, "create", CHECKED - 1 * MS), events=events))
    assert not found.proven


def test_one_event_short_of_a_full_buffer_proves_the_window():
    found = verdict(window(Change(MINE, "create", CHECKED - 1 * MS), events=EVENT_BUFFER - 1))
    assert found.proven


def test_a_reload_of_the_engine_proves_nothing():
    assert not verdict(window(Change(MINE, "create", CHECKED - 1 * MS), daemon=True)).proven


@pytest.mark.parametrize("expect, present", [("create", "start"), ("start", "create")])
def test_without_the_spawns_own_event_the_window_proves_nothing(expect, present):
    """Before the start its create, after it its start: missing, the window ended too early
    on the engine's clock, or the engine restarted and emptied its buffer since."""
    found = verdict(window(Change(MINE, present, CHECKED - 1 * MS)), expect=expect)
    assert not found.proven
    assert not verdict(window(Change("other", expect, CHECKED - 1 * MS)),
                       expect=expect).proven


def test_a_window_that_began_after_the_plan_on_the_engines_clock_proves_nothing():
    """The engine's clock is 2 s behind the hub's, and the window was asked as if they
    agreed: it began 1.5 s after the plan's read on the engine's clock. The spawn's own
    event shows it (the engine's time of it, 2 s less than the hub's)."""
    late = window(Change(MINE, "create", CHECKED - 2000 * MS - 1 * MS))
    found = verdict(late)
    assert not found.proven
    assert found.skew_ns == -2001 * MS


def test_an_engine_clock_ahead_is_fine_when_the_window_was_asked_on_it():
    skew = 3000 * MS
    found = verdict(window(Change(MINE, "create", CHECKED + skew - 1 * MS), skew=skew))
    assert found.proven
    assert found.skew_ns == skew - 1 * MS


def test_docker_times_as_docker_takes_and_gives_them():
    assert _stamp(1_800_000_000_000_000_007) == "1800000000.000000007"
    assert _epoch_ns("2027-01-15T08:00:00.5Z") == 1_800_000_000 * 10**9 + 500_000_000
    assert _epoch_ns("2027-01-15T09:00:00.000000001+01:00") == 1_800_000_000 * 10**9 + 1
    assert _epoch_ns("not a time") is None
