"""The policy file: parsing, the merge rules, every error an admin can make, durations."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuspawner.policy import (
    BUILTIN_LIMITS,
    LIMIT_KEYS,
    Group,
    Limits,
    Policy,
    PolicyError,
    UserOverride,
    UserPolicy,
    format_duration,
    load_policy,
    parse_duration,
    parse_policy,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "policy.yaml"

BRIEF = """\
defaults:
  max_gpu_equivalents: 1          # alias: max_mig_instances
  max_gpu_slots_per_container: 1
  allow_full_gpu: false
  allowed_profiles: ["cpu", "mig-*"]
  priority: 10
  gpu_hold_after_stop: 30m
  max_servers: 2
groups:
  staff:
    members: [alice, bob]
    max_gpu_equivalents: 4
    allow_full_gpu: true
    priority: 50
user_overrides:
  carol:
    max_gpu_equivalents: 2
"""


def parse(text: str) -> Policy:
    return parse_policy(text, "policy.yaml")


def limits_of(text: str, user: str = "u", hub_groups: tuple[str, ...] = ()) -> Limits:
    return parse(text).for_user(user, hub_groups).limits


# --------------------------------------------------------------------------- parsing


def test_builtin_defaults_are_the_documented_ones():
    assert BUILTIN_LIMITS == Limits(
        max_gpu_equivalents=1.0,
        max_gpu_slots_per_container=1,
        allow_full_gpu=False,
        allowed_profiles=None,
        priority=0,
        gpu_hold_after_stop=0.0,
        max_servers=None,
    )


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "null\n", "~\n"])
def test_empty_file_is_all_builtin_defaults(text):
    policy = parse(text)
    assert policy.defaults == BUILTIN_LIMITS
    assert policy.groups == () and policy.user_overrides == ()
    assert policy.for_user("anyone").limits == BUILTIN_LIMITS
    assert policy.source == "policy.yaml"


@pytest.mark.parametrize("text", ["defaults:\n", "groups:\n", "user_overrides:\n",
                                  "defaults: {}\ngroups: {}\nuser_overrides: {}\n"])
def test_empty_sections_are_allowed(text):
    assert parse(text).for_user("u").limits == BUILTIN_LIMITS


def test_the_brief_example():
    policy = parse(BRIEF)
    assert policy.defaults == Limits(1.0, 1, False, ("cpu", "mig-*"), 10, 1800.0, 2)
    assert policy.groups == (
        Group("staff", ("alice", "bob"),
              (("allow_full_gpu", True), ("max_gpu_equivalents", 4.0), ("priority", 50))),
    )
    assert policy.user_overrides == (UserOverride("carol", (("max_gpu_equivalents", 2.0),)),)

    alice = policy.for_user("alice")
    assert alice == UserPolicy(
        "alice",
        Limits(4.0, 1, True, ("cpu", "mig-*"), 50, 1800.0, 2),
        groups=("staff",),
        sources=("defaults", "group staff"),
    )
    carol = policy.for_user("carol")
    assert carol.limits == replace(policy.defaults, max_gpu_equivalents=2.0)
    assert carol.sources == ("defaults", "user carol") and carol.groups == ()
    assert policy.for_user("zed").limits == policy.defaults
    assert policy.for_user("zed").sources == ("defaults",)


def test_types_are_resolved():
    limits = limits_of("defaults:\n  max_gpu_equivalents: 2\n  gpu_hold_after_stop: 90\n")
    assert isinstance(limits.max_gpu_equivalents, float) and limits.max_gpu_equivalents == 2.0
    assert isinstance(limits.gpu_hold_after_stop, float) and limits.gpu_hold_after_stop == 90.0
    assert limits_of("defaults: {max_gpu_equivalents: 0.25}").max_gpu_equivalents == 0.25


@pytest.mark.parametrize("key", ["max_gpu_equivalents", "max_gpu_slots_per_container",
                                 "max_servers", "allowed_profiles"])
@pytest.mark.parametrize("spelling", ["null", "~", ""])
def test_null_means_unlimited(key, spelling):
    assert getattr(limits_of(f"defaults:\n  {key}: {spelling}\n"), key) is None


def test_zero_is_allowed_and_distinct_from_unlimited():
    limits = limits_of("defaults:\n  max_gpu_equivalents: 0\n  max_servers: 0\n"
                       "  max_gpu_slots_per_container: 0\n  gpu_hold_after_stop: 0\n")
    assert (limits.max_gpu_equivalents, limits.max_servers) == (0.0, 0)
    assert limits.max_gpu_slots_per_container == 0 and limits.gpu_hold_after_stop == 0.0


def test_negative_priority_is_a_valid_rank():
    assert limits_of("defaults: {priority: -5}").priority == -5


def test_yaml_booleans_for_allow_full_gpu():
    assert limits_of("defaults: {allow_full_gpu: yes}").allow_full_gpu is True
    assert limits_of("defaults: {allow_full_gpu: False}").allow_full_gpu is False


def test_alias_max_mig_instances():
    policy = parse("defaults: {max_mig_instances: 3}\n"
                   "groups: {g: {max_mig_instances: 5}}\n"
                   "user_overrides: {u: {max_mig_instances: 0.5}}\n")
    assert policy.defaults.max_gpu_equivalents == 3.0
    assert policy.for_user("x", ["g"]).limits.max_gpu_equivalents == 5.0
    assert policy.for_user("u", ["g"]).limits.max_gpu_equivalents == 0.5
    # The alias in one layer and the canonical name in another is fine.
    mixed = parse("defaults: {max_mig_instances: 3}\ngroups: {g: {max_gpu_equivalents: 1}}")
    assert mixed.for_user("x", ["g"]).limits.max_gpu_equivalents == 1.0


def test_members_and_patterns_are_deduplicated_in_order():
    policy = parse("groups:\n  g:\n    members: [b, a, b]\n    allowed_profiles: [y, x, y]\n")
    assert policy.groups[0].members == ("b", "a")
    assert policy.for_user("a").limits.allowed_profiles == ("y", "x")


def test_group_without_members_or_settings():
    policy = parse("groups:\n  quiet:\n  listed:\n    members:\n")
    assert [g.name for g in policy.groups] == ["listed", "quiet"]
    assert policy.for_user("u", ["quiet"]).groups == ("quiet",)
    assert policy.for_user("u", ["quiet"]).limits == BUILTIN_LIMITS


def test_groups_and_overrides_are_sorted_by_name():
    policy = parse("groups: {b: {}, a: {}, c: {}}\nuser_overrides: {z: {}, y: {}}")
    assert [g.name for g in policy.groups] == ["a", "b", "c"]
    assert [o.user for o in policy.user_overrides] == ["y", "z"]


def test_anchors_and_merge_keys():
    text = """\
defaults: &base
  priority: 5
  gpu_hold_after_stop: 1h
groups:
  a:
    <<: *base
    priority: 9
  b: *base
"""
    policy = parse(text)
    assert policy.for_user("x", ["a"]).limits.priority == 9  # explicit key wins over the merge
    assert policy.for_user("x", ["a"]).limits.gpu_hold_after_stop == 3600.0
    assert policy.for_user("x", ["b"]).limits.priority == 5


def test_quoted_numeric_names():
    policy = parse("groups:\n  '2024':\n    members: ['12345']\n    priority: 3\n"
                   "user_overrides:\n  '67890': {priority: 4}\n")
    assert policy.for_user("12345").limits.priority == 3
    assert policy.for_user("x", ["2024"]).limits.priority == 3
    assert policy.for_user("67890").limits.priority == 4


def test_example_file_parses_and_reads_sensibly():
    policy = load_policy(EXAMPLE)
    assert policy.source == str(EXAMPLE)
    assert {g.name for g in policy.groups} == {"staff", "thesis", "guests"}
    alice = policy.for_user("alice")
    assert alice.limits.allow_full_gpu and alice.limits.allowed_profiles is None
    assert policy.for_user("dave", ["thesis"]).limits.gpu_hold_after_stop == 5400.0
    guest = policy.for_user("12345").limits
    assert guest.max_gpu_equivalents == 0.0 and guest.allowed_profiles == ("cpu",)
    carol = policy.for_user("carol", ["staff"])
    assert carol.limits.priority == 40 and carol.sources[-1] == "user carol"
    json.dumps(policy.to_json())


# --------------------------------------------------------------------------- merging

THREE_GROUPS = """\
defaults:
  max_gpu_equivalents: 1
  max_gpu_slots_per_container: 1
  allowed_profiles: [cpu]
  priority: 10
  gpu_hold_after_stop: 10m
  max_servers: 2
groups:
  a:
    members: [u]
    max_gpu_equivalents: 2
    allowed_profiles: [mig-*, cpu]
    priority: 20
    gpu_hold_after_stop: 1h
  b:
    members: [u]
    max_gpu_equivalents: 3
    max_gpu_slots_per_container: 2
    allowed_profiles: [full-*]
    priority: 5
    max_servers: 1
  c:
    max_gpu_equivalents: null
    allow_full_gpu: true
    allowed_profiles: null
    max_servers: null
"""


def test_several_groups_take_the_most_generous_value_per_key():
    up = parse(THREE_GROUPS).for_user("u")
    assert up.groups == ("a", "b")
    assert up.sources == ("defaults", "group a", "group b")
    assert up.limits == Limits(
        max_gpu_equivalents=3.0,  # max
        max_gpu_slots_per_container=2,  # only b sets it
        allow_full_gpu=False,  # no group sets it: defaults
        allowed_profiles=("mig-*", "cpu", "full-*"),  # union, in group-name order
        priority=20,  # max, although b is lower than defaults
        gpu_hold_after_stop=3600.0,
        max_servers=1,  # only b sets it, and it LOWERS the default: groups beat defaults
    )


def test_none_means_unlimited_and_wins_among_groups():
    limits = parse(THREE_GROUPS).for_user("u", ["c"]).limits
    assert limits.max_gpu_equivalents is None
    assert limits.allowed_profiles is None
    assert limits.max_servers is None
    assert limits.allow_full_gpu is True  # any-true
    assert limits.max_gpu_slots_per_container == 2


def test_a_single_group_may_lower_the_defaults():
    limits = limits_of("defaults: {max_gpu_equivalents: 2, priority: 10}\n"
                       "groups: {guests: {members: [g], max_gpu_equivalents: 0, priority: 1}}",
                       "g")
    assert (limits.max_gpu_equivalents, limits.priority) == (0.0, 1)


def test_hub_groups_map_to_policy_groups_of_the_same_name():
    policy = parse(THREE_GROUPS)
    via_hub = policy.for_user("v", ["a", "b"])
    assert via_hub.limits == policy.for_user("u").limits
    assert via_hub.groups == ("a", "b")
    # A hub group with no policy group of that name changes nothing.
    assert policy.for_user("v", ["unknown"]).limits == policy.defaults
    assert policy.for_user("v", ["unknown"]).groups == ()
    # Members and hub groups combine; a group counted both ways counts once.
    both = policy.for_user("u", ["a", "c"])
    assert both.groups == ("a", "b", "c")
    # Names are case-sensitive, like JupyterHub's.
    assert policy.for_user("v", ["A"]).groups == ()


def test_user_overrides_win_over_every_group_even_when_less_generous():
    text = THREE_GROUPS + "user_overrides:\n  u:\n    priority: 1\n    max_servers: null\n"
    up = parse(text).for_user("u", ["c"])
    assert up.limits.priority == 1
    assert up.limits.max_servers is None
    assert up.limits.max_gpu_equivalents is None  # not overridden: from group c
    assert up.sources == ("defaults", "group a", "group b", "group c", "user u")


def test_override_for_a_user_in_no_group_starts_from_defaults():
    policy = parse("defaults: {priority: 10, max_servers: 3}\nuser_overrides: {x: {priority: 0}}")
    assert policy.for_user("x").limits == replace(policy.defaults, priority=0)


def test_hub_groups_must_not_be_a_single_string():
    with pytest.raises(TypeError, match="not one string"):
        parse(THREE_GROUPS).for_user("u", "abc")


def test_hold_seconds():
    policy = parse(THREE_GROUPS)
    assert policy.hold_seconds("nobody") == 600.0
    assert policy.hold_seconds("u") == 3600.0
    assert policy.hold_seconds("v", ["a"]) == 3600.0
    assert Policy.default().hold_seconds("x") == 0.0


def test_policy_default():
    assert Policy.default() == Policy()
    assert Policy.default().for_user("x") == UserPolicy("x", BUILTIN_LIMITS, (), ("defaults",))


def test_manually_built_policy_merges_groups_in_name_order():
    b = Group("b", ("u",), (("allowed_profiles", ("y",)),))
    a = Group("a", ("u",), (("allowed_profiles", ("x",)),))
    assert Policy(groups=(b, a)).for_user("u") == Policy(groups=(a, b)).for_user("u")
    assert Policy(groups=(b, a)).for_user("u").limits.allowed_profiles == ("x", "y")


# --------------------------------------------------------------------------- Limits


@pytest.mark.parametrize(
    "patterns, slug, mig, allowed",
    [
        (None, "anything", None, True),
        (None, "", None, True),
        (("cpu",), "cpu", None, True),
        (("cpu",), "cpu-big", None, False),
        (("mig-*",), "mig-1g", "1g.10gb", True),
        (("1g.*",), "small", "1g.10gb", True),  # by MIG profile name
        (("1g.*",), "small", "2g.20gb", False),
        (("1g.*",), "", "1g.10gb", True),  # the allocator's bare MIG question
        (("*",), "", None, False),  # no slug and no MIG profile: nothing to match
        (("cpu",), "", "1g.10gb", False),
        (("CPU",), "cpu", None, False),  # case-sensitive
        (("mig-?g",), "mig-2g", None, True),
        (("mig-[12]g",), "mig-3g", None, False),
        ((), "cpu", None, False),  # an empty list allows nothing
    ],
)
def test_allows_profile(patterns, slug, mig, allowed):
    assert Limits(allowed_profiles=patterns).allows_profile(slug, mig) is allowed


def test_limits_accepts_a_list_and_stays_hashable():
    limits = Limits(allowed_profiles=["cpu"])  # type: ignore[arg-type]
    assert limits.allowed_profiles == ("cpu",)
    hash(limits)


def test_to_json_round_trips_through_json():
    policy = parse(BRIEF)
    out = json.loads(json.dumps(policy.to_json()))
    assert out["source"] == "policy.yaml"
    assert out["defaults"]["allowed_profiles"] == ["cpu", "mig-*"]
    assert out["defaults"]["gpu_hold_after_stop"] == 1800.0
    assert out["groups"] == [{"name": "staff", "members": ["alice", "bob"],
                              "allow_full_gpu": True, "max_gpu_equivalents": 4.0,
                              "priority": 50}]
    assert out["user_overrides"] == [{"user": "carol", "max_gpu_equivalents": 2.0}]
    alice = json.loads(json.dumps(policy.for_user("alice").to_json()))
    assert alice == {
        "user": "alice",
        "limits": {"max_gpu_equivalents": 4.0, "max_gpu_slots_per_container": 1,
                   "allow_full_gpu": True, "allowed_profiles": ["cpu", "mig-*"],
                   "priority": 50, "gpu_hold_after_stop": 1800.0, "max_servers": 2,
                   "gpu_idle_timeout": None},
        "groups": ["staff"],
        "sources": ["defaults", "group staff"],
    }
    assert Limits().to_json()["allowed_profiles"] is None


def test_records_are_frozen():
    with pytest.raises(AttributeError):
        Limits().priority = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        Policy().source = "x"  # type: ignore[misc]


# --------------------------------------------------------------------------- errors

KNOWN = ("allow_full_gpu, allowed_profiles, gpu_hold_after_stop, gpu_idle_timeout, "
         "max_gpu_equivalents, max_gpu_slots_per_container, max_mig_instances, max_servers, "
         "priority")

ERRORS = [
    # (text, line, key, fragment of the message)
    ("defaults:\n  max_gpus: 1\n", 2, "defaults.max_gpus",
     f"unknown key 'max_gpus' in defaults (known keys: {KNOWN}); fix the spelling or remove "
     "it"),
    ("defaults:\n  max_gpu_equivalent: 1\n", 2, "defaults.max_gpu_equivalent",
     "; did you mean 'max_gpu_equivalents'?"),
    ("groups:\n  staff:\n    members: [a]\n    colour: 2\n", 4, "groups.staff.colour",
     "unknown key 'colour' in groups.staff (known keys: allow_full_gpu, "),
    ("groups:\n  staff:\n    colour: 2\n", 3, "groups.staff.colour",
     "; fix the spelling or remove it"),
    ("groups:\n  staff:\n    memebrs: [a]\n", 3, "groups.staff.memebrs",
     "did you mean 'members'?"),
    ("user_overrides:\n  carol:\n    members: [a]\n", 3, "user_overrides.carol.members",
     "unknown key 'members' in user_overrides.carol"),
    ("default:\n  priority: 1\n", 1, "default",
     "unknown key 'default' in the top level (known keys: defaults, groups, "
     "user_overrides); did you mean 'defaults'?"),
    ("- defaults\n", 1, None, "the policy must be a mapping, not a list"),
    ("just text\n", 1, None, "the policy must be a mapping"),
    ("defaults: 3\n", 1, "defaults", "defaults must be a mapping of key: value settings"),
    ("groups: [staff]\n", 1, "groups", "groups must be a mapping of group names to settings"),
    ("groups:\n  staff: [alice]\n", 2, "groups.staff", "groups.staff must be a mapping"),
    ("user_overrides: carol\n", 1, "user_overrides", "mapping of user names to settings"),
    # numbers
    ("defaults:\n  max_gpu_equivalents: -1\n", 2, "defaults.max_gpu_equivalents",
     "must be 0 or more, not -1"),
    ("defaults:\n  max_gpu_equivalents: .nan\n", 2, "defaults.max_gpu_equivalents",
     "must be 0 or more"),
    ("defaults:\n  max_gpu_equivalents: .inf\n", 2, "defaults.max_gpu_equivalents",
     "or null for unlimited"),
    ("defaults:\n  max_gpu_equivalents: true\n", 2, "defaults.max_gpu_equivalents",
     "must be a number, not the yes/no value true"),
    ("defaults:\n  max_gpu_equivalents: '2'\n", 2, "defaults.max_gpu_equivalents",
     "must be a number, not the text '2'"),
    ("defaults:\n  max_gpu_equivalents: unlimited\n", 2, "defaults.max_gpu_equivalents",
     "null for unlimited"),
    ("defaults:\n  max_gpu_slots_per_container: 1.5\n", 2,
     "defaults.max_gpu_slots_per_container", "must be a whole number, not the number 1.5"),
    ("defaults:\n  max_gpu_slots_per_container: -2\n", 2,
     "defaults.max_gpu_slots_per_container", "must be 0 or more"),
    ("defaults:\n  max_servers: no\n", 2, "defaults.max_servers",
     "must be a whole number, not the yes/no value false"),
    ("defaults:\n  max_servers: [1]\n", 2, "defaults.max_servers", "not a list"),
    ("defaults:\n  max_mig_instances: -1\n", 2, "defaults.max_mig_instances",
     "must be 0 or more"),
    # priority
    ("defaults:\n  priority: 1.5\n", 2, "defaults.priority", "must be a whole number"),
    ("defaults:\n  priority: true\n", 2, "defaults.priority", "not the yes/no value true"),
    ("defaults:\n  priority: high\n", 2, "defaults.priority", "not the text 'high'"),
    ("defaults:\n  priority: null\n", 2, "defaults.priority", "not null"),
    # booleans
    ("defaults:\n  allow_full_gpu: 1\n", 2, "defaults.allow_full_gpu",
     "must be true or false, not the number 1"),
    ("defaults:\n  allow_full_gpu: 'true'\n", 2, "defaults.allow_full_gpu",
     "not the text 'true'"),
    ("defaults:\n  allow_full_gpu: null\n", 2, "defaults.allow_full_gpu", "not null"),
    # profiles
    ("defaults:\n  allowed_profiles: cpu\n", 2, "defaults.allowed_profiles",
     "must be a list, not the text 'cpu'"),
    ("defaults:\n  allowed_profiles: {cpu: 1}\n", 2, "defaults.allowed_profiles",
     "must be a list, not a mapping"),
    ("defaults:\n  allowed_profiles:\n    - cpu\n    - 7\n", 4, "defaults.allowed_profiles",
     "entries must be text, not '7'"),
    ("defaults:\n  allowed_profiles: ['']\n", 2, "defaults.allowed_profiles",
     "entries must be text"),
    ("defaults:\n  allowed_profiles: [[a]]\n", 2, "defaults.allowed_profiles",
     "entries must be text, not a list"),
    # durations
    ("defaults:\n  gpu_hold_after_stop: 30x\n", 2, "defaults.gpu_hold_after_stop",
     "is not a duration: the text '30x'; write seconds as a number"),
    ("defaults:\n  gpu_hold_after_stop: -5\n", 2, "defaults.gpu_hold_after_stop",
     "is not a duration"),
    ("defaults:\n  gpu_hold_after_stop: true\n", 2, "defaults.gpu_hold_after_stop",
     "the yes/no value true"),
    ("defaults:\n  gpu_hold_after_stop: null\n", 2, "defaults.gpu_hold_after_stop",
     "is not a duration: null"),
    ("defaults:\n  gpu_hold_after_stop: [1h]\n", 2, "defaults.gpu_hold_after_stop",
     "is not a duration: a list"),
    ("groups:\n  g:\n    gpu_hold_after_stop: 30m1h\n", 3, "groups.g.gpu_hold_after_stop",
     '"1h30m"'),
    # members
    ("groups:\n  staff:\n    members: alice\n", 3, "groups.staff.members",
     "must be a list of user names, not 'alice'"),
    ("groups:\n  staff:\n    members:\n      - alice\n      - 12345\n", 5,
     "groups.staff.members", "must be user names, not the number 12345; put names that look "
     "like numbers or yes/no in quotes"),
    ("groups:\n  staff:\n    members: [alice, yes]\n", 3, "groups.staff.members",
     "not the yes/no value true"),
    ("groups:\n  staff:\n    members: [alice, null]\n", 3, "groups.staff.members", "not null"),
    ("groups:\n  staff:\n    members: [{a: 1}]\n", 3, "groups.staff.members",
     "not a mapping"),
    # names
    ("user_overrides:\n  12345:\n    priority: 1\n", 2, "user_overrides",
     "user name '12345' in user_overrides is read as the number 12345, not a name; put it in "
     "quotes: '12345'"),
    ("groups:\n  2024: {}\n", 2, "groups", "group name '2024'"),
    ("groups:\n  null: {}\n", 2, "groups", "is read as null"),
    ("defaults:\n  yes: 1\n", 2, "defaults",
     "key 'yes' in defaults is read as the yes/no value true, not a name"),
    ("defaults:\n  ? [a, b]\n  : 1\n", 2, "defaults", "key a list in defaults is not a name"),
    # structure and repetition
    ("defaults:\n  priority: 1\n  priority: 2\n", 3, "defaults.priority",
     "'priority' appears twice in defaults (first on line 2); keep only one"),
    ("groups:\n  a: {}\n  b: {}\n  a: {}\n", 4, "groups.a", "'a' appears twice in groups"),
    ("defaults: {}\ngroups: {}\ndefaults: {}\n", 3, "defaults",
     "appears twice in the top level"),
    ("defaults:\n  max_gpu_equivalents: 1\n  max_mig_instances: 2\n", 3,
     "defaults.max_mig_instances",
     "defaults sets both max_gpu_equivalents and max_mig_instances, which mean the same; "
     "keep only max_gpu_equivalents"),
    ("groups:\n  g:\n    max_mig_instances: 2\n    max_gpu_equivalents: 1\n", 4,
     "groups.g.max_mig_instances", "sets both"),
    ("groups:\n  staff: {}\nuser_overrides:\n  staff:\n    priority: 3\n", 4,
     "user_overrides.staff",
     "'staff' in user_overrides is the name of a group, and user_overrides takes user names "
     "only; move these settings under groups.staff"),
    ("defaults:\n  <<: [1]\n", 2, "defaults", "bad '<<' merge"),
    ("defaults:\n  priority: !!python/name:os.system\n", 2, "defaults.priority",
     "cannot read the value of defaults.priority"),
]


@pytest.mark.parametrize("text, line, key, fragment", ERRORS)
def test_errors_name_file_line_and_key(text, line, key, fragment):
    with pytest.raises(PolicyError) as info:
        parse(text)
    error = info.value
    message = str(error)
    assert fragment in message
    assert message.startswith(f"policy.yaml line {line}: ")
    assert (error.source, error.line, error.key) == ("policy.yaml", line, key)
    if key is not None:
        assert key.rsplit(".", 1)[0] in message
    assert isinstance(error, ValueError)
    assert message.count("; ") >= 1  # problem; how to fix


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("defaults:\n  priority: [1\n", 3, "YAML syntax error: expected ',' or ']'"),
        ("defaults:\n\tpriority: 1\n", 2, "YAML syntax error"),
        ("defaults:\n  priority: 1\n bad: 2\n", 3, "YAML syntax error"),
        ("a: 1\n---\nb: 2\n", 2, "expected a single document"),
        ("defaults:\n  allowed_profiles: [cpu, *nope]\n", 2, "found undefined alias"),
        ("defaults: {priority: 1\n", 2, "YAML syntax error"),
        ('defaults:\n  gpu_hold_after_stop: "1h\n', 3, "YAML syntax error"),
    ],
)
def test_yaml_syntax_errors(text, line, fragment):
    with pytest.raises(PolicyError) as info:
        parse(text)
    assert fragment in str(info.value)
    assert str(info.value).startswith(f"policy.yaml line {info.value.line}: ")
    assert info.value.line == line and info.value.key is None
    assert "check the indentation and quoting" in str(info.value)


def test_unreadable_characters():
    with pytest.raises(PolicyError, match="policy.yaml") as info:
        parse("defaults:\n  priority: 1\x07\n")
    assert info.value.source == "policy.yaml"


def test_line_numbers_count_comments_and_blank_lines():
    text = "# header\n\n# more\ngroups:\n\n  staff:\n    # note\n    priorty: 5\n"
    with pytest.raises(PolicyError) as info:
        parse(text)
    assert info.value.line == 8 and info.value.key == "groups.staff.priorty"
    assert "did you mean 'priority'?" in str(info.value)


def test_error_inside_an_anchor_points_at_the_anchor():
    text = "defaults: &d\n  priority: x\ngroups:\n  g: *d\n"
    with pytest.raises(PolicyError) as info:
        parse(text)
    assert info.value.line == 2 and info.value.key == "defaults.priority"


def test_policy_error_attributes_and_text():
    error = PolicyError("bad; fix it", source="f.yaml", line=3, key="defaults.x")
    assert str(error) == "f.yaml line 3: bad; fix it"
    assert (error.source, error.line, error.key, error.message) == (
        "f.yaml", 3, "defaults.x", "bad; fix it")
    assert str(PolicyError("gone", source="f.yaml")) == "f.yaml: gone"


def test_default_source_name():
    with pytest.raises(PolicyError, match=r"^<policy> line 1: "):
        parse_policy("[]")


# --------------------------------------------------------------------------- loading


def test_load_policy_none_is_default():
    assert load_policy(None) == Policy.default()


def test_load_policy_reads_a_file(tmp_path):
    path = tmp_path / "gpu-policy.yaml"
    path.write_text(BRIEF, encoding="utf-8")
    assert load_policy(path) == parse_policy(BRIEF, str(path))
    assert load_policy(str(path)).source == str(path)


def test_load_policy_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value).startswith(f"{path}: the policy file does not exist")
    assert info.value.source == str(path) and info.value.line is None


def test_load_policy_unreadable(tmp_path):
    with pytest.raises(PolicyError, match="cannot be read"):
        load_policy(tmp_path)  # a directory
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00defaults")
    with pytest.raises(PolicyError, match="UTF-8"):
        load_policy(binary)


def test_load_policy_errors_name_the_path(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("defaults:\n  max_gpus: 1\n", encoding="utf-8")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value).startswith(f"{path} line 2: unknown key 'max_gpus'")


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    "value, seconds",
    [
        (0, 0.0), (90, 90.0), (1.5, 1.5), ("0", 0.0), ("90", 90.0), ("2.5", 2.5),
        ("90s", 90.0), ("30m", 1800.0), ("2h", 7200.0), ("1d", 86400.0),
        ("1h30m", 5400.0), ("1d2h3m4s", 93784.0), ("1h 30m", 5400.0), (" 45 s ", 45.0),
        ("1.5h", 5400.0), ("0s", 0.0), ("0m", 0.0),
    ],
)
def test_parse_duration(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value",
    ["", " ", "m", "-5", "-5m", "5x", "1H", "30m1h", "1h1h", "1h 30", "h1", "1h-30m",
     "abc", "1,5h", "inf", "nan", True, False, None, [1], -1, float("inf"), float("nan")],
)
def test_parse_duration_rejects(value):
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0s"), (45, "45s"), (60, "1m"), (5400, "1h30m"), (86400, "1d"), (93784, "1d2h3m4s"),
     (1.5, "1.5s")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


def test_format_duration_rejects_negative():
    with pytest.raises(ValueError):
        format_duration(-1)


@given(st.integers(min_value=0, max_value=10**8))
def test_format_duration_round_trips(seconds):
    assert parse_duration(format_duration(seconds)) == seconds


# --------------------------------------------------------------------------- properties

NAMES = st.sampled_from(["ann", "ben", "cy", "dee", "eli"])
GROUP_NAMES = st.sampled_from(["g1", "g2", "g3", "g4"])
PATTERNS = st.lists(st.sampled_from(["cpu", "mig-*", "1g.*", "full-*", "big"]), max_size=3,
                    unique=True)
AMOUNT = st.one_of(st.none(), st.integers(0, 8), st.floats(0, 8, allow_nan=False))
COUNT = st.one_of(st.none(), st.integers(0, 8))
HOLD = st.one_of(st.integers(0, 10**5), st.sampled_from(["0", "30m", "2h", "1h30m", "1d"]))

VALUES = {
    "max_gpu_equivalents": AMOUNT,
    "max_gpu_slots_per_container": COUNT,
    "allow_full_gpu": st.booleans(),
    "allowed_profiles": st.one_of(st.none(), PATTERNS),
    "priority": st.integers(-100, 100),
    "gpu_hold_after_stop": HOLD,
    "max_servers": COUNT,
    "gpu_idle_timeout": st.one_of(st.none(), HOLD),  # null: never stopped for idling
}


@st.composite
def partial_limits(draw, min_keys: int = 0) -> dict:
    keys = draw(st.lists(st.sampled_from(LIMIT_KEYS), unique=True, min_size=min_keys))
    return {key: draw(VALUES[key]) for key in keys}


@st.composite
def raising(draw, base: Limits) -> dict:
    """Settings that are each at least as generous as ``base``."""
    out = {}
    for key in draw(st.lists(st.sampled_from(LIMIT_KEYS), unique=True, min_size=3)):
        current = getattr(base, key)
        if key in ("max_gpu_equivalents", "max_gpu_slots_per_container", "max_servers"):
            whole = key != "max_gpu_equivalents"
            more = st.integers(0, 3) if whole else st.floats(0, 3, allow_nan=False)
            out[key] = None if current is None else draw(
                st.one_of(st.none(), more.map(lambda d, c=current: c + d)))
        elif key == "gpu_idle_timeout":  # longer is more generous; null (never) the most
            out[key] = None if current is None else draw(
                st.one_of(st.none(), st.integers(0, 10**4).map(lambda d, c=current: c + d)))
        elif key == "allow_full_gpu":
            out[key] = True if current else draw(st.booleans())
        elif key == "allowed_profiles":
            out[key] = None if current is None else draw(st.one_of(
                st.none(), PATTERNS.map(lambda extra, c=current: [*c, *extra])))
        elif key == "priority":
            out[key] = current + draw(st.integers(0, 50))
        else:
            out[key] = current + draw(st.integers(0, 10**4))
    return out


def more_or_equally_generous(key: str, got, base) -> bool:
    if key in ("max_gpu_equivalents", "max_gpu_slots_per_container", "max_servers",
               "gpu_idle_timeout"):
        return got is None or (base is not None and got >= base)
    if key == "allow_full_gpu":
        return got or not base
    if key == "allowed_profiles":
        return got is None or (base is not None and set(base) <= set(got))
    return got >= base


@st.composite
def policies(draw) -> tuple[dict, Policy]:
    document: dict = {}
    if draw(st.booleans()):
        document["defaults"] = draw(partial_limits())
    groups = {}
    for name in draw(st.lists(GROUP_NAMES, unique=True, max_size=4)):
        body = draw(partial_limits())
        members = draw(st.lists(NAMES, unique=True, max_size=3))
        if members:
            body["members"] = members
        groups[name] = body
    if groups:
        document["groups"] = groups
    overrides = {name: draw(partial_limits())
                 for name in draw(st.lists(NAMES, unique=True, max_size=2))}
    if overrides:
        document["user_overrides"] = overrides
    return document, parse_policy(yaml.safe_dump(document), "random.yaml")


@settings(max_examples=150, deadline=None)
@given(policies(), NAMES, st.lists(GROUP_NAMES, max_size=4), st.randoms(use_true_random=False))
def test_for_user_is_deterministic_and_order_independent(drawn, user, hub_groups, rnd):
    _document, policy = drawn
    first = policy.for_user(user, hub_groups)
    shuffled = list(hub_groups)
    rnd.shuffle(shuffled)
    assert policy.for_user(user, shuffled) == first
    assert policy.for_user(user, tuple(shuffled) + tuple(hub_groups)) == first  # duplicates
    assert policy.for_user(user, iter(hub_groups)) == first  # any iterable
    assert policy.for_user(user, set(hub_groups)) == first
    assert first.groups == tuple(sorted(first.groups))
    assert first.sources[0] == "defaults"
    json.dumps(first.to_json())


@settings(max_examples=150, deadline=None)
@given(policies(), NAMES, st.lists(GROUP_NAMES, max_size=4))
def test_parsed_policy_round_trips_and_keeps_limits_in_range(drawn, user, hub_groups):
    document, policy = drawn
    # Re-parsing the same document gives an equal policy (nothing depends on parse order).
    assert parse_policy(yaml.safe_dump(document, sort_keys=False), "random.yaml") == policy
    limits = policy.for_user(user, hub_groups).limits
    for key in ("max_gpu_equivalents", "max_gpu_slots_per_container", "max_servers"):
        value = getattr(limits, key)
        assert value is None or (value >= 0 and math.isfinite(value))
    assert isinstance(limits.priority, int) and not isinstance(limits.priority, bool)
    assert limits.gpu_hold_after_stop >= 0


@st.composite
def raising_policy(draw):
    """Defaults, one group that only raises them, other random groups, no overrides."""
    # Many keys per layer, so that groups often disagree on the same key.
    defaults = draw(partial_limits(min_keys=4))
    base = parse_policy(yaml.safe_dump({"defaults": defaults})).defaults
    up = draw(raising(base))
    # The raising group's name is drawn too, so it is merged first, last or in between.
    name, *rest = draw(st.permutations(["a", "m", "z"]))
    others = {other: draw(partial_limits(min_keys=4)) for other in rest}
    document = {"defaults": defaults, "groups": {name: {**up, "members": ["ann"]}, **others}}
    return name, rest, up, parse_policy(yaml.safe_dump(document), "random.yaml")


@settings(max_examples=200, deadline=None)
@given(raising_policy(), st.booleans())
def test_a_group_that_only_raises_never_lowers_anything(drawn, via_hub):
    name, others, up, policy = drawn
    user, hub = ("zed", [name]) if via_hub else ("ann", [])
    # In the raising group only: never less generous than defaults on any key.
    limits = policy.for_user(user, hub).limits
    for key in LIMIT_KEYS:
        assert more_or_equally_generous(key, getattr(limits, key),
                                        getattr(policy.defaults, key)), key
    # Joining any other groups as well can never lower a key the raising group sets.
    both = policy.for_user(user, [*hub, *others]).limits
    for key in up:
        assert more_or_equally_generous(key, getattr(both, key), getattr(limits, key)), key
        assert more_or_equally_generous(key, getattr(both, key),
                                        getattr(policy.defaults, key)), key


def test_gpu_idle_timeout_is_off_by_default_and_the_most_generous_group_wins():
    policy = parse("""
defaults: {gpu_idle_timeout: 2h}
groups:
  short: {members: [ann, bo], gpu_idle_timeout: 30m}
  long: {members: [bo, cy], gpu_idle_timeout: null}
""")
    assert Limits().gpu_idle_timeout is None
    assert policy.for_user("ann").limits.gpu_idle_timeout == 1800.0
    assert policy.for_user("bo").limits.gpu_idle_timeout is None  # null: never
    assert policy.for_user("di").limits.gpu_idle_timeout == 7200.0
    with pytest.raises(PolicyError, match="gpu_idle_timeout is not a duration"):
        parse("defaults: {gpu_idle_timeout: soon}")
