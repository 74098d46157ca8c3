"""``gpuspawner.cuda``: the NVIDIA runtime's requirement rules, judged before a container exists.

The expected answers are written by hand from the documented rules (libnvidia-container's
``dsl.c``: space-separated alternatives are ORed, comma-separated terms ANDed; every
``NVIDIA_REQUIRE_*`` is ANDed; ``NVIDIA_DISABLE_REQUIRE`` in Go's ParseBool spellings; a legacy
``CUDA_VERSION``), never by asking the code. The requirement strings are those NVIDIA's own
images carry (``nvidia/cuda`` Dockerfiles, gitlab.com/nvidia/container-images/cuda ``dist/``).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpuspawner import cuda
from gpuspawner.cuda import Host
from gpuspawner.records import Inventory

_BRANDS = ("tesla", "unknown", "nvidia", "nvidiartx", "geforce", "geforcertx", "quadro",
           "quadrortx", "titan", "titanrtx")


def _branch(driver: int, brands: tuple[str, ...] = _BRANDS) -> str:
    return " ".join(f"brand={b},driver>={driver},driver<{driver + 1}" for b in brands)


#: nvidia/cuda:12.4.1-base-ubuntu22.04 (dist/12.4.1/ubuntu2204/base/Dockerfile).
CUDA_12_4_1 = f"cuda>=12.4 {_branch(470)} {_branch(525)} {_branch(535)}"
#: nvidia/cuda:11.8.0-base-ubuntu22.04.
CUDA_11_8_0 = f"cuda>=11.8 {_branch(470)}"
#: nvidia/cuda:11.8.0-base-ubuntu18.04: also the 450 (Tesla only), 510 and 515 branches.
CUDA_11_8_0_1804 = (f"cuda>=11.8 brand=tesla,driver>=450,driver<451 {_branch(470)} "
                    f"{_branch(510)} {_branch(515)}")
#: nvidia/cuda:10.0-base (2018): Tesla on the 384 and 410 branches.
CUDA_10_0 = "cuda>=10.0 brand=tesla,driver>=384,driver<385 brand=tesla,driver>=410,driver<411"

A100_550 = Host("550.90.07", "12.4", "Nvidia", "8.0")  # the simulator's default host
A100_535 = Host("535.183.01", "12.2", "Nvidia", "8.0")
V100_535 = Host("535.183.01", "12.2", "Tesla", "7.0")
GRID_535 = Host("535.183.01", "12.2", "GRID", "8.6")
UNKNOWN_BRAND_535 = Host("535.183.01", "12.2")
A100_530 = Host("530.30.02", "12.1", "Nvidia", "8.0")
A100_525 = Host("525.147.05", "12.0", "Nvidia", "8.0")
A100_470 = Host("470.256.02", "11.4", "Nvidia", "8.0")
A100_510 = Host("510.108.03", "11.6", "Nvidia", "8.0")
H100_560 = Host("560.35.03", "12.6", "Nvidia", "9.0")
V100_384 = Host("384.183", "9.0", "Tesla", "7.0")
GTX_384 = Host("384.183", "9.0", "GeForce", "6.1")


# ------------------------------------------------------------------ real images vs hosts

#: (requirement, host, the CUDA version the refusal names or None when the image starts).
REAL = [
    (CUDA_12_4_1, A100_550, None),            # cuda 12.4 >= 12.4
    (CUDA_12_4_1, H100_560, None),
    (CUDA_12_4_1, A100_535, None),            # CUDA 12.2, but brand=nvidia on the 535 branch
    (CUDA_12_4_1, V100_535, None),            # brand=tesla on the 535 branch
    (CUDA_12_4_1, UNKNOWN_BRAND_535, None),   # brand unknown passes, as in the runtime
    (CUDA_12_4_1, Host("535.54.03", "12.2", "NVIDIA"), None),  # brands compare in any case
    (CUDA_12_4_1, GRID_535, "12.4"),          # GRID is on none of its lists
    (CUDA_12_4_1, A100_530, "12.4"),          # 530 is no listed branch, CUDA 12.1 < 12.4
    (CUDA_12_4_1, A100_525, None),
    (CUDA_12_4_1, A100_470, None),
    (CUDA_12_4_1, A100_510, "12.4"),
    (CUDA_11_8_0, A100_550, None),
    (CUDA_11_8_0, A100_470, None),
    (CUDA_11_8_0, A100_510, "11.8"),          # the 22.04 image lists only the 470 branch
    (CUDA_11_8_0_1804, A100_510, None),       # the 18.04 one lists 510 too
    (CUDA_11_8_0_1804, Host("450.248.02", "11.0", "Tesla"), None),
    (CUDA_11_8_0_1804, Host("450.248.02", "11.0", "Nvidia"), "11.8"),  # 450: Tesla only
    (CUDA_10_0, V100_384, None),
    (CUDA_10_0, GTX_384, "10.0"),
    (CUDA_10_0, A100_470, None),
]


@pytest.mark.parametrize(("requirement", "host", "needs"), REAL)
def test_real_cuda_images_against_hosts(requirement: str, host: Host, needs: str | None):
    env = [f"NVIDIA_REQUIRE_CUDA={requirement}", "NVIDIA_VISIBLE_DEVICES=all"]
    sentence = cuda.check(env, host, image="lab/img")
    if needs is None:
        assert sentence is None
        return
    assert sentence == (
        f"The image lab/img needs CUDA {needs} (cuda>={needs}); this host's driver "
        f"{host.driver} supports CUDA {host.cuda}. Choose another image or ask an admin to "
        "update the driver."
    )


def test_the_sentence_of_the_brief():
    env = ["PATH=/usr/bin", "NVIDIA_REQUIRE_CUDA=cuda>=12.9"]
    assert cuda.check(env, A100_550, image="lab/cuda:12.9") == (
        "The image lab/cuda:12.9 needs CUDA 12.9 (cuda>=12.9); this host's driver 550.90.07 "
        "supports CUDA 12.4. Choose another image or ask an admin to update the driver."
    )


def test_the_runtime_names_the_first_alternative_with_its_hint():
    outcome = cuda.evaluate(CUDA_12_4_1, A100_530)
    assert not outcome.ok and outcome.condition == "cuda>=12.4" and not outcome.invalid
    assert outcome.runtime_error == (
        "requirement error: unsatisfied condition: cuda>=12.4, please update your driver to a "
        "newer version, or use an earlier cuda container")
    other = cuda.evaluate("driver>=560 cuda>=13.0", A100_550, "NVIDIA_REQUIRE_DRIVER")
    assert other.runtime_error == "requirement error: unsatisfied condition: driver>=560"
    assert cuda.check(["NVIDIA_REQUIRE_DRIVER=driver>=560 cuda>=13.0"], A100_550, image="x") == (
        "The image x needs driver>=560 (NVIDIA_REQUIRE_DRIVER); this host's driver 550.90.07 "
        "supports CUDA 12.4. Choose another image or ask an admin to update the driver.")


# ----------------------------------------------------------------------------- the rules


@pytest.mark.parametrize(("expression", "ok"), [
    ("", True),                                    # nothing asked
    ("   ", True),
    ("cuda>=12.4,", True),                         # empty terms are skipped
    ("  cuda>=12.4", True),
    ("cuda>=13.0 driver>=550", True),              # OR: the second alternative holds
    ("cuda>=12.0,driver>=560", False),             # AND: the second term fails
    ("cuda>=13.0 ,", False),                       # an empty alternative proves nothing
    ("CUDA>=12.4", True),                          # names in any case
    ("cuda=12.4.0", True),                         # missing components are 0
    ("cuda>12.4", False),
    ("cuda<=12.4", True),
    ("cuda<12.4.1", True),
    ("cuda>=12.10", False),                        # numeric: 12.4 < 12.10
    ("cuda!=12.4", False),
    ("cuda!12.4", False),                          # a lone "!" reads as "!="
    ("cuda!12.5", True),
    ("driver>=550.90", True),
    ("driver<550.90.07", False),
    ("driver=550.90.7", True),                     # 07 is 7
    ("driver>=550.90.07.1", False),
    ("brand=nvidia", True),
    ("brand=Tesla", False),
    ("brand!=tesla", True),
    ("arch>=8.0", True),
    ("arch>=9.0", False),
    ("arch=8", True),
])
def test_terms_and_alternatives(expression: str, ok: bool):
    assert cuda.evaluate(expression, A100_550).ok is ok


@pytest.mark.parametrize("expression", [
    "cuda>=12.9 nonsense",       # no operator
    "cuda==12.4",                # not an operator
    "cuda=>12.4",
    "foo>=1",                    # no such name
    ">=12.4",                    # no name
    "cuda>=",                    # no value
    "cuda>=12.x",                # not a version
    "cuda>=.5",                  # a leading dot
    "brand>=tesla",              # brands compare only with = and !=
    "cuda>=13 arch>=sm_90",
])
def test_terms_the_runtime_cannot_read_fail_the_start(expression: str):
    outcome = cuda.evaluate(expression, A100_550)
    assert not outcome.ok and outcome.invalid
    assert outcome.runtime_error == "requirement error: invalid expression"
    sentence = cuda.check([f"NVIDIA_REQUIRE_CUDA={expression}"], A100_550, image="x")
    assert sentence is not None
    assert sentence.startswith("The image x declares a requirement the NVIDIA runtime cannot "
                               "read (NVIDIA_REQUIRE_CUDA: ")
    assert "this host's driver 550.90.07 supports CUDA 12.4" in sentence


@pytest.mark.parametrize("expression", [
    "cuda>=12.4 nonsense",       # never reached: the first alternative holds
    "cuda>=12.0,driver>=560 driver>=550",
    "cuda>=13,nonsense driver>=550",  # the first alternative stops at its false term
])
def test_terms_never_reached_are_never_read(expression: str):
    assert cuda.evaluate(expression, A100_550).ok


def test_unknown_facts_pass_like_the_runtime():
    nothing = Host()
    assert cuda.evaluate("cuda>=99 driver>=999 brand=tesla arch>=99", nothing).ok
    assert cuda.evaluate("cuda>=abc", nothing).ok  # never compared, so never read
    assert cuda.evaluate("brand>=tesla", Host("550.90.07", "12.4")).ok
    assert not cuda.evaluate("brand>=tesla", A100_550).ok


@given(st.lists(st.integers(0, 999), min_size=1, max_size=4),
       st.lists(st.integers(0, 999), min_size=1, max_size=4),
       st.sampled_from(["=", "!=", "<", "<=", ">", ">="]))
def test_versions_compare_number_by_number(a: list[int], b: list[int], op: str):
    width = max(len(a), len(b))
    left, right = tuple(a + [0] * (width - len(a))), tuple(b + [0] * (width - len(b)))
    expected = {"=": left == right, "!=": left != right, "<": left < right,
                "<=": left <= right, ">": left > right, ">=": left >= right}[op]
    text = ".".join
    assert cuda.compare_version(text(map(str, a)), op, text(map(str, b))) is expected


# ------------------------------------------------------------------- which variables count


@pytest.mark.parametrize(("value", "off"), [
    ("1", True), ("t", True), ("T", True), ("true", True), ("TRUE", True), ("True", True),
    ("yes", False), ("on", False), ("2", False), ("", False), ("false", False),
    ("tRuE", False),
])
def test_disable_require_takes_go_booleans(value: str, off: bool):
    env = ["NVIDIA_REQUIRE_CUDA=cuda>=12.9", f"NVIDIA_DISABLE_REQUIRE={value}"]
    assert (cuda.check(env, A100_550, image="x") is None) is off


def test_every_nvidia_require_variable_must_hold():
    env = [f"NVIDIA_REQUIRE_CUDA={CUDA_12_4_1}", "NVIDIA_REQUIRE_ARCH=arch>=9.0"]
    assert cuda.check(env, H100_560, image="x") is None
    assert cuda.check(env, A100_550, image="x") == (
        "The image x needs arch>=9.0 (NVIDIA_REQUIRE_ARCH); this host's driver 550.90.07 "
        "supports CUDA 12.4 and its GPU's compute capability is 8.0. Choose another image or "
        "ask an admin to check the image.")
    assert cuda.check(env, Host("550.90.07", "12.4"), image="x") is None  # arch unknown
    jetpack = ["NVIDIA_REQUIRE_JETPACK=csv-mounts=all", "NVIDIA_REQUIRE_JETPACK_HOST_MOUNTS="]
    assert cuda.check(jetpack, A100_550, image="x") is None  # the toolkit ignores these


def test_legacy_images_require_their_cuda_version():
    assert cuda.check(["CUDA_VERSION=12.9.1"], A100_550, image="x") == (
        "The image x needs CUDA 12.9 (cuda>=12.9); this host's driver 550.90.07 supports "
        "CUDA 12.4. Choose another image or ask an admin to update the driver.")
    assert cuda.check(["CUDA_VERSION=12.4.1"], A100_550, image="x") is None
    assert cuda.check(["CUDA_VERSION=v12"], A100_550, image="x") is None  # v12 is 12.0
    # An empty NVIDIA_REQUIRE_CUDA is no requirement, so the legacy rule applies.
    assert cuda.check(["NVIDIA_REQUIRE_CUDA=", "CUDA_VERSION=12.9.0"], A100_550,
                      image="x") is not None
    # A non-empty one wins over CUDA_VERSION.
    assert cuda.check(["CUDA_VERSION=12.9.1", "NVIDIA_REQUIRE_CUDA=cuda>=12.0"], A100_550,
                      image="x") is None
    for bad in ("twelve", "12.4.1.2", "012.4", "12.4+b"):
        assert cuda.check([f"CUDA_VERSION={bad}"], A100_550, image="x") == (
            f"The image x sets CUDA_VERSION={bad} without NVIDIA_REQUIRE_CUDA, and the NVIDIA "
            "runtime cannot read that version, so it refuses to start it. Choose another image "
            "or ask an admin to fix it.")
    assert cuda.check(["CUDA_VERSION=12.9.1", "NVIDIA_DISABLE_REQUIRE=1"], A100_550,
                      image="x") is None


def test_the_container_environment_goes_on_top_of_the_image():
    image = ["NVIDIA_REQUIRE_CUDA=cuda>=12.9", "NVIDIA_REQUIRE_CUDA=cuda>=12.0"]  # later wins
    assert cuda.check(image, A100_550, image="x") is None
    image = ["NVIDIA_REQUIRE_CUDA=cuda>=12.9"]
    assert cuda.check(image, A100_550, image="x",
                      container_env={"NVIDIA_DISABLE_REQUIRE": "true"}) is None
    assert cuda.check(image, A100_550, image="x",
                      container_env={"NVIDIA_REQUIRE_CUDA": "cuda>=12.0"}) is None
    assert cuda.check(["PATH=/bin"], A100_550, image="x",
                      container_env={"NVIDIA_REQUIRE_CUDA": "cuda>=13.0"}) is not None
    # The devices are the caller's business: NVIDIA_VISIBLE_DEVICES=void is not read here.
    assert cuda.check(image, A100_550, image="x",
                      container_env={"NVIDIA_VISIBLE_DEVICES": "void"}) is not None


@pytest.mark.parametrize(("env", "gpu"), [
    ({}, False),
    ({"NVIDIA_VISIBLE_DEVICES": ""}, False),
    ({"NVIDIA_VISIBLE_DEVICES": "void"}, False),
    ({"NVIDIA_VISIBLE_DEVICES": "MIG-1, void"}, False),   # void anywhere wins
    ({"NVIDIA_VISIBLE_DEVICES": "none"}, True),            # the driver, no device: checked
    ({"NVIDIA_VISIBLE_DEVICES": "all"}, True),
    ({"NVIDIA_VISIBLE_DEVICES": "MIG-1"}, True),
    ({"CUDA_VERSION": "12.4.1"}, True),                    # legacy and unset: all
    ({"CUDA_VERSION": "12.4.1", "NVIDIA_REQUIRE_CUDA": "cuda>=12.4"}, False),
])
def test_which_containers_the_runtime_checks(env: dict[str, str], gpu: bool):
    assert cuda.gets_devices(env) is gpu


def test_versions_as_the_runtime_spells_them():
    assert cuda.cuda_version_string(12040) == "12.4"
    assert cuda.cuda_version_string(11080) == "11.8"
    assert cuda.cuda_version_string(12020) == "12.2"
    inv = Inventory(source="nvml", driver_version="550.90.07", cuda_version="12.4")
    assert cuda.Host.of(inv) == Host("550.90.07", "12.4")
    assert cuda.Host.of(Inventory()) == Host()
    assert cuda.image_env({"Config": {"Env": ["A=1"]}}) == ["A=1"]
    assert cuda.image_env({"Config": {"Env": None}}) == [] and cuda.image_env(None) == []
    assert cuda.parse_env(["A=1", "B", "A=2=3"]) == {"A": "2=3"}


# --------------------------------------------------------------------------------- doctor


def test_doctor_rows_list_every_image_with_its_fit():
    images = {
        "nvidia/cuda:12.4.1": [f"NVIDIA_REQUIRE_CUDA={CUDA_12_4_1}"],
        "lab/cuda:12.9": ["NVIDIA_REQUIRE_CUDA=cuda>=12.9"],
        "lab/notyet": None,
        "lab/plain": ["PATH=/bin"],
        "lab/anything": ["NVIDIA_REQUIRE_CUDA=cuda>=13", "NVIDIA_DISABLE_REQUIRE=true"],
    }
    rows = {r.image: r for r in cuda.doctor_rows(images, "550.90.07", "12.4")}
    assert list(rows) == list(images)
    fits = rows["nvidia/cuda:12.4.1"]
    assert fits.fits is True
    assert fits.requirement == "cuda>=12.4 (or driver 470/525/535 on the brands it lists)"
    assert fits.message == "this host's driver 550.90.07 supports CUDA 12.4: the image starts"
    assert rows["lab/cuda:12.9"].fits is False
    assert rows["lab/cuda:12.9"].requirement == "cuda>=12.9"
    assert rows["lab/cuda:12.9"].message.startswith("The image lab/cuda:12.9 needs CUDA 12.9")
    assert rows["lab/notyet"].fits is None
    assert rows["lab/plain"].fits is True and rows["lab/plain"].requirement == ""
    assert rows["lab/anything"].fits is True and "NVIDIA_DISABLE_REQUIRE" in \
        rows["lab/anything"].message
    assert rows["lab/cuda:12.9"].to_json()["fits"] is False
    status, message = cuda.doctor_summary(list(rows.values()))
    assert status == "warn" and message.startswith("1 of 5 profile image(s) cannot start")
    unknown = cuda.doctor_rows({"lab/cuda:12.9": ["NVIDIA_REQUIRE_CUDA=cuda>=12.9"]}, None, None)
    assert unknown[0].fits is None
    assert cuda.doctor_summary(unknown)[0] == "ok"
    assert cuda.doctor_summary([rows["lab/plain"]]) == ("ok", "all 1 profile image(s) fit "
                                                        "this driver")
