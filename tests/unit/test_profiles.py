"""profile_list parsing and who is offered what."""

from __future__ import annotations

import pytest

from gpuspawner.profiles import ProfileError, default_of, parse_profiles, permitted

from .hosts import limits

PROFILES = [
    {"display_name": "CPU only", "slug": "cpu"},
    {
        "display_name": "Small GPU",
        "slug": "mig-1g",
        "gpu": {"mig_profile": "1g.10gb"},
        "default": True,
    },
    {
        "display_name": "Two GPUs",
        "gpu": {"gpus": 2},
        "overrides": {"image": "big:1", "ports": {"ssh": 22}},
    },
]


def test_parse_and_defaults():
    cpu, small, two = parse_profiles(PROFILES)
    assert (cpu.slug, cpu.wants_gpu, cpu.request_label()) == ("cpu", False, "CPU only")
    assert small.mig_profile == "1g.10gb" and small.request_label() == "MIG 1g.10gb"
    assert two.slug == "two-gpus" and two.gpus == 2 and two.overrides["image"] == "big:1"
    assert default_of([cpu, small, two]) is small
    assert default_of([cpu, two]) is cpu


@pytest.mark.parametrize(
    "entry, fragment",
    [
        ({"slug": "x", "kubespawner_override": {}}, "unknown key(s) kubespawner_override"),
        ({"slug": "x", "gpu": {"mig_profile": "1g.10gb", "gpus": 1}}, "not both"),
        ({"slug": "x", "gpu": {"gpus": -1}}, "whole number"),
        ({"slug": "x", "gpu": {"count": 1}}, "gpu must be"),
        ({"slug": "x", "overrides": {"privileged": True}}, "unknown override(s) privileged"),
        ({"description": "no name"}, "needs a display_name"),
        ("cpu", "is not a mapping"),
    ],
)
def test_bad_entries_name_the_entry_and_key(entry, fragment):
    with pytest.raises(ProfileError, match="profile_list entry 2") as info:
        parse_profiles([{"slug": "ok"}, entry])
    assert fragment in str(info.value)


def test_duplicate_slugs():
    with pytest.raises(ProfileError, match="used twice"):
        parse_profiles([{"slug": "a"}, {"slug": "a"}])


def test_policy_hides_what_it_forbids():
    profiles = parse_profiles(PROFILES)
    assert [p.slug for p in permitted(profiles, limits(allow_full_gpu=False))] == ["cpu", "mig-1g"]
    only_cpu = limits(allowed_profiles=("cpu",))
    assert [p.slug for p in permitted(profiles, only_cpu)] == ["cpu"]
    one = limits(max_gpu_slots_per_container=1)
    assert "two-gpus" not in [p.slug for p in permitted(profiles, one)]
    by_mig_name = limits(allowed_profiles=("1g.*",))
    assert [p.slug for p in permitted(profiles, by_mig_name)] == ["mig-1g"]


def test_resolve_takes_a_permitted_slug_and_nothing_else():
    from gpuspawner.profiles import ProfileRefused, resolve

    profiles = parse_profiles(PROFILES)
    allowed = permitted(profiles, limits(allow_full_gpu=False))
    assert resolve({}, allowed, profiles).slug == "mig-1g"  # the default
    assert resolve({"profile": "mig-1g"}, allowed, profiles).slug == "mig-1g"
    refusals = [
        ({"profile": "two-gpus"}, "profile", 400, "Profiles you may choose: cpu, mig-1g"),
        ({"profile": "mig-1g", "device_ids": ["GPU-x"]}, "options", 400, "device_ids"),
        ({"image": "evil"}, "options", 400, "come with the profile"),
    ]
    for options, code, status, words in refusals:
        with pytest.raises(ProfileRefused) as info:
            resolve(options, allowed, profiles)
        assert (info.value.code, info.value.status) == (code, status)
        assert words in info.value.message
    with pytest.raises(ProfileRefused) as info:
        resolve({}, [], profiles)  # the policy allows none of them
    assert info.value.status == 403
    assert resolve({}, [], []).slug == "default"  # no profiles at all: a CPU server
