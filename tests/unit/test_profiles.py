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
        ({"slug": "x", "kube_override": {}}, "unknown key(s) kube_override"),
        ({"slug": "x", "kubespawner_override": {"privileged": True}},
         "unknown override(s) privileged"),
        ({"slug": "x", "overrides": {"image": "a"}, "kubespawner_override": {"image": "b"}},
         "not both"),
        ({"slug": "x", "profile_options": {"image": {"choices": {}}}}, "has no choices"),
        ({"slug": "x", "profile_options": {"image": {"choices": {"a": {
            "kubespawner_override": {"gpus": 4}}}}}}, "unknown override(s) gpus"),
        ({"slug": "x", "profile_options": {"image": {"choices": {"a": {"default": True},
                                                                 "b": {"default": True}}}}},
         "two choices are the default"),
        ({"slug": "x", "profile_options": {"image": {"unlisted_choice": {
            "enabled": True, "validation_regex": "(", "kubespawner_override": {
                "image": "{value}"}}}}}, "does not compile"),
        ({"slug": "x", "profile_options": {"bad name!": {"choices": {"a": {}}}}},
         "an option name is"),
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
    assert resolve({}, allowed, profiles).profile.slug == "mig-1g"  # the default
    assert resolve({"profile": "mig-1g"}, allowed, profiles).profile.slug == "mig-1g"
    refusals = [
        ({"profile": "two-gpus"}, "profile", 400, "Profiles you may choose: cpu, mig-1g"),
        ({"profile": "mig-1g", "device_ids": ["GPU-x"]}, "options", 400, "device_ids"),
        ({"image": "evil"}, "options", 400, "come with the profile"),
        ({"profile": "cpu", "ports": {"ssh": 22}}, "options", 400, "ports"),
        ({"profile": "cpu", "gpu_count": 2}, "options", 400, "gpu_count"),
        ({"profile": "cpu", "ds01.user": "bob"}, "options", 400, "ds01.user"),
        ({"profile": "cpu", "labels": {}}, "options", 400, "labels"),
        ({"profile": "cpu", "profile-option-size": "big"}, "options", 400,
         "profile-option-size"),
    ]
    for options, code, status, words in refusals:
        with pytest.raises(ProfileRefused) as info:
            resolve(options, allowed, profiles)
        assert (info.value.code, info.value.status) == (code, status)
        assert words in info.value.message
    with pytest.raises(ProfileRefused) as info:
        resolve({}, [], profiles)  # the policy allows none of them
    assert info.value.status == 403
    assert resolve({}, [], []).profile.slug == "default"  # no profiles at all: a CPU server


# KubeSpawner's documented shape, as a KubeSpawner admin writes it.
KUBE = [
    {
        "display_name": "GPU",
        "slug": "gpu",
        "gpu": {"mig_profile": "1g.10gb"},
        "kubespawner_override": {"mem_limit": "8G"},
        "profile_options": {
            "image": {
                "display_name": "Image",
                "choices": {
                    "pytorch": {"display_name": "PyTorch",
                                "kubespawner_override": {"image": "lab/pytorch:2"}},
                    "tf": {"display_name": "TensorFlow", "default": True,
                           "overrides": {"image": "lab/tf:2", "environment": {"FW": "tf"}}},
                },
                "unlisted_choice": {
                    "enabled": True,
                    "display_name": "Image location",
                    "validation_regex": "^pangeo/.*$",
                    "validation_message": "must be a pangeo image",
                    "kubespawner_override": {"image": "{value}",
                                             "environment": {"CUSTOM": "{value}"}},
                },
            },
            "memory": {"display_name": "Memory", "choices": {
                "small": {"kubespawner_override": {"mem_limit": "4G"}},
                "large": {"kubespawner_override": {"mem_limit": "32G"}},
            }},
        },
    },
    {"display_name": "CPU", "slug": "cpu", "overrides": {"image": "lab/cpu:1"}},
]


def test_profile_options_in_kubespawners_shape():
    from gpuspawner.profiles import ProfileRefused, resolve

    profiles = parse_profiles(KUBE)
    gpu = profiles[0]
    assert [o.name for o in gpu.options] == ["image", "memory"]
    assert gpu.option("memory").default == "small"  # no default given: the first choice
    # Nothing chosen: each option's default; the profile's own overrides underneath.
    chosen = resolve({"profile": "gpu"}, profiles, profiles)
    assert dict(chosen.choices) == {"image": "tf", "memory": "small"}
    assert chosen.overrides == {"mem_limit": "4G", "image": "lab/tf:2",
                                "environment": {"FW": "tf"}}
    # KubeSpawner's REST shape, and the issue's profile-option-<name> spelling.
    for options in ({"profile": "gpu", "image": "pytorch", "memory": "large"},
                    {"profile": "gpu", "profile-option-image": "pytorch",
                     "profile-option-memory": "large"}):
        chosen = resolve(options, profiles, profiles)
        assert chosen.image == "lab/pytorch:2" and chosen.overrides["mem_limit"] == "32G"
    # Free text, where the admin allows it, through {value}.
    for options in ({"profile": "gpu", "image--unlisted-choice": "pangeo/base:1"},
                    {"profile": "gpu", "image": "unlisted_choice",
                     "image--unlisted-choice": "pangeo/base:1"},
                    {"profile": "gpu", "image": "pangeo/base:1"}):
        chosen = resolve(options, profiles, profiles)
        assert chosen.image == "pangeo/base:1"
        assert chosen.overrides["environment"] == {"CUSTOM": "pangeo/base:1"}
    # Anything not offered: a 400 that names what may be chosen.
    for options, words in [
        ({"profile": "gpu", "image": "evil/miner"},
         "You may choose: pytorch, tf or text matching ^pangeo/.*$"),
        ({"profile": "gpu", "image--unlisted-choice": "evil/miner"}, "must be a pangeo image"),
        ({"profile": "gpu", "image--unlisted-choice": "pangeo/x y"}, "You may choose"),
        ({"profile": "gpu", "memory": "huge"}, "You may choose: small, large."),
        ({"profile": "gpu", "memory": ["large"]}, "must be text"),
        ({"profile": "cpu", "image": "pytorch"}, "come with the profile"),
    ]:
        with pytest.raises(ProfileRefused) as info:
            resolve(options, profiles, profiles)
        assert info.value.status == 400 and words in info.value.message, info.value.message


def test_allowed_images_become_an_image_choice():
    from gpuspawner.profiles import ProfileRefused, resolve, with_images

    images = {"4.0": "quay.io/jupyterhub/singleuser:4.0", "4": "quay.io/jupyterhub/singleuser:4"}
    plain = parse_profiles([{"display_name": "CPU", "slug": "cpu"},
                            {"display_name": "Own", "slug": "own",
                             "overrides": {"image": "lab/own:1"}}])
    offered = with_images(plain, images, "lab/configured:1")
    cpu, own = offered
    assert [c.name for c in cpu.option("image").choices] == ["4.0", "4"]
    assert own.options == ()  # a profile with its own image keeps it
    # DockerSpawner's meaning: a name from the list; nothing: the configured image.
    assert resolve({"image": "4.0"}, offered, plain).image == images["4.0"]
    assert resolve({}, offered, plain).image is None
    for options in ({"image": images["4.0"]},  # the image, not its name
                    {"profile": "own", "image": "4.0"}):
        with pytest.raises(ProfileRefused) as info:
            resolve(options, offered, plain)
        assert info.value.status == 400
    # Configured image among the allowed: it is the default choice.
    assert with_images(plain, images, images["4"])[0].option("image").default == "4"
    # "*": any image, as DockerSpawner allows it.
    anything = with_images(plain, "*", "lab/configured:1")
    assert resolve({"image": "x/y:z"}, anything, plain).image == "x/y:z"
    assert with_images(plain, {}, "x") == plain and with_images(plain, None, "x") == plain
    # Without allowed_images, {"image": …} stays refused.
    with pytest.raises(ProfileRefused):
        resolve({"image": "4.0"}, plain, plain)


def test_a_sites_own_options_pass_through_unread():
    from gpuspawner.profiles import resolve

    profiles = parse_profiles(KUBE)
    chosen = resolve({"profile": "cpu", "site_option": "x", "course": "ml101"}, profiles,
                     profiles)
    assert chosen.passed == ("course", "site_option")
    assert chosen.overrides == {"image": "lab/cpu:1"}  # they decide nothing


def test_form_fields_become_user_options_as_in_kubespawner():
    from gpuspawner.profiles import from_form

    form = {
        "profile": ["gpu"],
        "profile-option-gpu--image": ["pytorch"],
        "profile-option-gpu--image--unlisted-choice": ["pangeo/typed-then-changed"],
        "profile-option-gpu--memory": ["large"],
        "profile-option-cpu--image": ["other-profile"],  # not the chosen profile
    }
    assert from_form(form) == {"profile": "gpu", "image": "pytorch", "memory": "large"}
    form["profile-option-gpu--image"] = ["unlisted_choice"]
    assert from_form(form) == {"profile": "gpu", "image": "unlisted_choice",
                               "image--unlisted-choice": "pangeo/typed-then-changed",
                               "memory": "large"}
    assert from_form({"image": ["1.0", "1.1"]}) == {"image": "1.0"}  # DockerSpawner's form
    assert from_form({}) == {}


def test_the_form_disables_an_image_choice_this_driver_cannot_start():
    """What the browser gets: a choice whose image needs a newer CUDA is listed, disabled,
    with the sentence; it is never preselected, even as the default or the last choice."""
    from gpuspawner import form

    (gpu,) = parse_profiles([{
        "display_name": "GPU", "slug": "gpu", "gpu": {"mig_profile": "1g.10gb"},
        "profile_options": {"image": {"display_name": "Image", "choices": {
            "new": {"display_name": "CUDA 13 <new>", "default": True,
                    "overrides": {"image": "lab/cuda13"}},
            "old": {"display_name": "CUDA 12", "overrides": {"image": "lab/cuda12"}},
        }}},
    }])
    why = "lab/cuda13 needs CUDA >= 13.0; this host's driver gives CUDA 12.4 & <more>."
    blocked = {form.choice_key("gpu", "image", "new"): why}
    for picked in ({}, {"image": "new"}):
        page = form.render([gpu], {"1g.10gb": (3, 7)}, True, None, "gpu", picked, blocked)
        assert ('<option value="new" disabled title="lab/cuda13 needs CUDA &gt;= 13.0; this '
                "host&#x27;s driver gives CUDA 12.4 &amp; &lt;more&gt;.\">CUDA 13 &lt;new&gt; "
                "(needs a newer driver)</option>") in page
        assert '<option value="old" selected>CUDA 12</option>' in page
    page = form.render([gpu], {"1g.10gb": (3, 7)}, True, None, "gpu", {}, {})
    assert '<option value="new" selected>CUDA 13 &lt;new&gt;</option>' in page


def test_the_form_shows_a_notice_above_the_profiles_escaped():
    from gpuspawner import form

    (cpu,) = parse_profiles([{"display_name": "CPU", "slug": "cpu"}])
    page = form.render([cpu], {}, False, None, "cpu", notice="Stopped <after> 2h & more")
    assert page.startswith('<p class="alert alert-info gpuspawner-notice">Stopped &lt;after'
                           "&gt; 2h &amp; more</p>")
    assert "gpuspawner-notice" not in form.render([cpu], {}, False, None, "cpu")
