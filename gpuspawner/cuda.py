"""Will the NVIDIA runtime start this image here? ``NVIDIA_REQUIRE_*`` checked before the create.

Why it exists: CUDA images say which driver they need in ``NVIDIA_REQUIRE_CUDA`` (and any
other ``NVIDIA_REQUIRE_*``). The NVIDIA container runtime evaluates that at every start of a
GPU container and refuses the start when the driver does not meet it
(``nvidia-container-cli: requirement error: unsatisfied condition: cuda>=12.9, ...``). Without
this module that refusal came after a container had been made, and reached the student as a
bare 500. Here the same rules are evaluated on plain data (the image's ``Config.Env`` and the
host's driver and CUDA versions from the inventory), so the spawner can refuse at once with a
sentence that names both sides, the options form can mark the profiles that cannot start, and
``gpuspawner doctor`` can list every profile image with whether this host meets it. Pure: no
Docker, no NVML.

The rules are the runtime's, read from its source, not guessed (a check that is stricter than
the runtime would refuse images that start; one that is looser would let the 500 through):

* Which variables. ``nvidia-container-toolkit`` (``internal/config/image/cuda_image.go``,
  ``GetRequirements``): every ``NVIDIA_REQUIRE_*`` variable except ``NVIDIA_REQUIRE_JETPACK*``
  is one requirement (one ``--require`` of ``nvidia-container-cli``); all of them must hold
  (AND). A *legacy* image (``CUDA_VERSION`` set, ``NVIDIA_REQUIRE_CUDA`` unset or empty) gets
  ``cuda>=<major.minor of CUDA_VERSION>``; a ``CUDA_VERSION`` that is no semantic version
  makes the hook fail, so the start fails. ``NVIDIA_DISABLE_REQUIRE`` parsed as Go's
  ``strconv.ParseBool`` (``1 t T true TRUE True``) switches all of them off; anything else
  (``yes``, ``on``) does not. The environment is the image's with the container's on top
  (later entries win, as the toolkit builds its map).
* When. Only for a container that gets GPUs: ``NVIDIA_VISIBLE_DEVICES`` unset, empty or
  ``void`` is no GPU container and nothing is checked; ``none`` is one (driver, no device) and
  is checked. gpuspawner sets the device list itself for GPU servers and ``void`` for CPU
  ones, so the spawner checks exactly its GPU profiles.
* How one requirement reads. ``libnvidia-container`` (``src/cli/dsl.c``, ``dsl_evaluate``):
  split on single spaces into alternatives (OR), each split on commas into terms (AND). The
  requirement holds as soon as one alternative has all its terms true; evaluation stops at
  the first false term of an alternative and at the first alternative that holds, so a term
  that is never reached is never read. So ``cuda>=12.4 brand=tesla,driver>=535,driver<536``
  means "a driver for CUDA 12.4 or newer, OR a Tesla-brand GPU on a 535.x driver" (the
  forward-compatibility branches NVIDIA lists in its images), not "CUDA 12.4 and one of the
  brands".
* A term. ``name op value``; names ``cuda``, ``driver``, ``arch``, ``brand`` (any case);
  operators ``= != < <= > >=`` (a lone ``!`` reads as ``!=``, a quirk of its prefix match).
  ``cuda`` compares the driver's CUDA version (``major.minor`` of
  ``nvmlSystemGetCudaDriverVersion``: 12040 is ``12.4``), ``driver`` the driver version
  (``550.90.07``), ``arch`` the GPU's compute capability (``8.0``), numerically component by
  component (``12.10 > 12.9``; missing components are 0). ``brand`` compares the GPU's brand
  case-insensitively and only with ``=``/``!=``.
* Unknown facts pass. The runtime treats an unknown CUDA or driver version, and the brand and
  arch when no device is selected, as satisfying the term. Here an unknown fact (``None``:
  no NVML, a topology file without versions, a brand the inventory does not read) passes the
  same way: this check never refuses an image the runtime could start, and the only images
  it lets through that the runtime refuses need a brand or arch on a host whose driver sits in
  one of the image's forward-compatibility branches.
* A malformed term (no operator, an unknown name, ``==``, a version with letters, ``<`` on a
  brand) makes the runtime fail the start with ``requirement error: invalid expression`` when
  it is reached; so does this check, in the same cases, and says so.
* The runtime's own message names the *first* space-separated alternative of the requirement
  that failed (``unsatisfied condition: cuda>=12.9``) and adds ", please update your driver to
  a newer version, or use an earlier cuda container" when that alternative starts with
  ``cuda>=``. ``Verdict.runtime_error`` is that text, for logs.

Sources: github.com/NVIDIA/libnvidia-container ``src/cli/dsl.c`` and ``src/cli/configure.c``
(per selected GPU, a MIG device judged by its parent; globally with no device); ``src/driver.c``
(the CUDA version string); github.com/NVIDIA/nvidia-container-toolkit
``internal/config/image/cuda_image.go``, ``devices.go``, ``builder.go`` and
``cmd/nvidia-container-runtime-hook``; NVIDIA's container-toolkit documentation, "Specialized
Configurations with Docker", section Constraints.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .records import Inventory, JSONRecord

#: The refusal code (``errors.refuse(reason, CODE, 409)``) and the event reason of a spawn
#: refused because the image cannot start on this driver.
CODE = "cuda"

REQUIRE_PREFIX = "NVIDIA_REQUIRE_"
JETPACK_PREFIX = "NVIDIA_REQUIRE_JETPACK"  # the toolkit passes these to nothing
REQUIRE_CUDA = "NVIDIA_REQUIRE_CUDA"
DISABLE_REQUIRE = "NVIDIA_DISABLE_REQUIRE"
CUDA_VERSION = "CUDA_VERSION"
VISIBLE_DEVICES = "NVIDIA_VISIBLE_DEVICES"

#: Go's ``strconv.ParseBool`` true spellings: NVIDIA_DISABLE_REQUIRE takes effect only with these.
_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
#: The runtime's operators, as its prefix match reads them (a lone "!" matches "!=" first).
_OPERATORS = {"=": "=", "!=": "!=", "!": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
_OPERATOR_CHARS = "<>=!"
_VERSION_CHARS = frozenset("0123456789.")
_UINTMAX = 2**64 - 1
_CUDA_PREFIX = "cuda>="
_UPDATE_HINT = ", please update your driver to a newer version, or use an earlier cuda container"
#: ``golang.org/x/mod/semver.IsValid`` of "v" + CUDA_VERSION: vMAJOR[.MINOR[.PATCH[-pre][+build]]].
_NUM = r"(?:0|[1-9][0-9]*)"
_SEMVER = re.compile(
    rf"^v{_NUM}(?:\.{_NUM}(?:\.{_NUM}(?:-[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?"
    r"(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?)?)?$"
)
#: ``brand=<b>,driver>=<N>,driver<<M>``: one forward-compatibility branch of a CUDA image.
_BRANCH = re.compile(r"^brand=[^,]+,driver>=([0-9]+),driver<[0-9]+$", re.IGNORECASE)


# ------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Host(JSONRecord):
    """The facts the runtime compares against; ``None`` is unknown, and unknown passes.

    ``brand`` as libnvidia-container names it (``Tesla``, ``Nvidia``, ``GeForce``...; compared
    case-insensitively), ``arch`` the compute capability (``8.0``). The inventory reads neither
    today, so the spawner passes ``None`` and the brand/arch terms pass (see the module
    docstring for what that can let through).
    """

    driver: str | None = None
    cuda: str | None = None
    brand: str | None = None
    arch: str | None = None

    @classmethod
    def of(cls, inventory: Inventory, brand: str | None = None,
           arch: str | None = None) -> Host:
        """The host as the inventory reads it (driver and CUDA version)."""
        return cls(inventory.driver_version or None, inventory.cuda_version or None, brand, arch)

    def describe(self) -> str:
        """``this host's driver 550.90.07 supports CUDA 12.4``, with what is known."""
        driver = f"driver {self.driver}" if self.driver else "driver"
        if self.cuda:
            return f"this host's {driver} supports CUDA {self.cuda}"
        return f"this host has {driver}" if self.driver else "this host's driver is unknown"


@dataclass(frozen=True)
class Requirement(JSONRecord):
    """One ``--require`` the runtime gets: the variable it came from and its expression."""

    variable: str  # "NVIDIA_REQUIRE_CUDA", or "CUDA_VERSION" for the legacy rule
    expression: str


@dataclass(frozen=True)
class Requirements(JSONRecord):
    """What an environment asks of the driver. ``error``: the hook cannot even read it (a
    legacy ``CUDA_VERSION`` that is no version), so every start of a GPU container fails."""

    items: tuple[Requirement, ...] = ()
    disabled: bool = False
    error: str | None = None

    def text(self) -> str:
        """All expressions as one line (``NVIDIA_REQUIRE_X: ...`` for all but the CUDA one)."""
        parts = [r.expression if r.variable in (REQUIRE_CUDA, CUDA_VERSION)
                 else f"{r.variable}: {r.expression}" for r in self.items]
        return " AND ".join(parts)


@dataclass(frozen=True)
class Verdict(JSONRecord):
    """The runtime's answer for one environment on one host.

    ``condition`` is what the runtime names (the first alternative of the failing
    requirement), ``term`` the first term that was false in that alternative, or the term it
    could not read (``invalid``). ``runtime_error``: ``nvidia-container-cli``'s message after
    its ``nvidia-container-cli: `` prefix, ``None`` when the start would go ahead.
    """

    ok: bool
    requirement: Requirement | None = None
    condition: str | None = None
    term: str | None = None
    invalid: bool = False
    runtime_error: str | None = None


@dataclass(frozen=True)
class ImageFit(JSONRecord):
    """One row of ``gpuspawner doctor``: a profile image, its requirement, whether it fits.

    ``fits`` is ``None`` when it cannot be told (the image is not on the engine, or the
    driver's versions are unknown)."""

    image: str
    requirement: str
    fits: bool | None
    message: str


# ------------------------------------------------------------------------------ reading


def parse_env(entries: Iterable[str] | Mapping[str, str] | None) -> dict[str, str]:
    """``KEY=VALUE`` entries (Docker's ``Config.Env``) as a dict; a later entry wins, as in the
    toolkit's map. An entry without ``=`` is skipped (Docker resolves those at create)."""
    if entries is None:
        return {}
    if isinstance(entries, Mapping):
        return {str(k): str(v) for k, v in entries.items()}
    env: dict[str, str] = {}
    for entry in entries:
        key, eq, value = str(entry).partition("=")
        if eq:
            env[key] = value
    return env


def image_env(inspect: Mapping[str, Any] | None) -> list[str]:
    """The ``Config.Env`` of ``docker inspect`` of an image (or a container)."""
    config = (inspect or {}).get("Config") or {}
    return list(config.get("Env") or [])


def cuda_version_string(nvml_version: int) -> str:
    """libnvidia-container's CUDA version of ``nvmlSystemGetCudaDriverVersion`` (12040 ->
    ``12.4``): ``major = v / 1000``, ``minor = v % 100 / 10``."""
    return f"{nvml_version // 1000}.{nvml_version % 100 // 10}"


def disabled(env: Mapping[str, str]) -> bool:
    """``NVIDIA_DISABLE_REQUIRE`` as the toolkit reads it (Go's ``ParseBool``)."""
    return env.get(DISABLE_REQUIRE) in _GO_TRUE


def legacy(env: Mapping[str, str]) -> bool:
    """A *legacy* CUDA image: ``CUDA_VERSION`` set and ``NVIDIA_REQUIRE_CUDA`` unset or empty."""
    return bool(env.get(CUDA_VERSION)) and not env.get(REQUIRE_CUDA)


def gets_devices(env: Mapping[str, str]) -> bool:
    """Whether the toolkit treats the container as a GPU container (and so checks it):
    ``NVIDIA_VISIBLE_DEVICES`` naming devices, ``all`` or ``none``; unset on a legacy image
    means ``all``; unset, empty or ``void`` (anywhere in the list) otherwise means no."""
    if VISIBLE_DEVICES not in env:
        return legacy(env)
    tokens = [t.strip() for t in env[VISIBLE_DEVICES].split(",") if t.strip()]
    return bool(tokens) and "void" not in tokens


def requirements(env: Mapping[str, str]) -> Requirements:
    """The ``--require`` expressions the toolkit's hook passes for this environment, in a
    fixed order (``NVIDIA_REQUIRE_CUDA`` first, then by name, then the legacy rule): the
    toolkit's order is its map's (random), which changes only which failing one is named."""
    if disabled(env):
        return Requirements(disabled=True)
    names = sorted((n for n in env if n.startswith(REQUIRE_PREFIX)
                    and not n.startswith(JETPACK_PREFIX)),
                   key=lambda n: (n != REQUIRE_CUDA, n))
    items = [Requirement(n, env[n]) for n in names]
    if legacy(env):
        version = env[CUDA_VERSION]
        vversion = "v" + version.removeprefix("v")
        if not _SEMVER.match(vversion):
            return Requirements(tuple(items), error=(
                f"CUDA_VERSION={version} is set without NVIDIA_REQUIRE_CUDA and is not a "
                "version the NVIDIA runtime can read"))
        major, _, rest = vversion[1:].partition(".")
        minor = rest.split(".", 1)[0].split("-", 1)[0].split("+", 1)[0] or "0"
        items.append(Requirement(CUDA_VERSION, f"cuda>={major}.{minor}"))
    return Requirements(tuple(items))


# ------------------------------------------------------------------------ the runtime's DSL


def _number_end(text: str, start: int) -> int:
    end = start
    while end < len(text) and text[end].isdigit():
        end += 1
    return end


def compare_version(left: str, op: str, right: str) -> bool | None:
    """``dsl_compare_version``: numeric, component by component; ``None`` where the runtime
    returns -1 (a character other than digits and dots, a leading dot, a huge number)."""
    if not set(left) <= _VERSION_CHARS or not set(right) <= _VERSION_CHARS:
        return None
    i = j = 0
    while i < len(left) and j < len(right):
        i_end, j_end = _number_end(left, i), _number_end(right, j)
        if i_end == i or j_end == j:
            return None
        a, b = int(left[i:i_end]), int(right[j:j_end])
        if a >= _UINTMAX or b >= _UINTMAX:
            return None
        if a != b:
            if op == "=":
                return False
            if op == "!=":
                return True
            return a < b if op in ("<", "<=") else a > b
        while i_end < len(left) and left[i_end] == ".":
            i_end += 1
        while j_end < len(right) and right[j_end] == ".":
            j_end += 1
        i, j = i_end, j_end
    while i < len(left) and left[i] in ".0":
        i += 1
    while j < len(right) and right[j] in ".0":
        j += 1
    more_left, more_right = i < len(left), j < len(right)
    if op == "!=":
        return more_left or more_right
    if op in ("=", "<=", ">=") and not more_left and not more_right:
        return True
    if op == "=":
        return False
    if op in ("<", "<="):
        return not more_left and more_right
    return more_left and not more_right


def _term(term: str, host: Host) -> bool | None:
    """``evaluate_rule``: one ``name op value``; ``None`` is the runtime's "invalid"."""
    cut = next((k for k, c in enumerate(term) if c in _OPERATOR_CHARS), len(term))
    if cut == 0 or cut == len(term):
        return None
    end = cut
    while end < len(term) and term[end] in _OPERATOR_CHARS:
        end += 1
    op = _OPERATORS.get(term[cut:end])
    name, value = term[:cut].lower(), term[end:]
    if op is None or not value:
        return None
    if name == "cuda":
        return True if host.cuda is None else compare_version(host.cuda, op, value)
    if name == "driver":
        return True if host.driver is None else compare_version(host.driver, op, value)
    if name == "arch":
        return True if host.arch is None else compare_version(host.arch, op, value)
    if name == "brand":
        if host.brand is None:
            return True
        if op not in ("=", "!="):
            return None
        return (host.brand.lower() == value.lower()) == (op == "=")
    return None


def evaluate(expression: str, host: Host, variable: str = REQUIRE_CUDA) -> Verdict:
    """One requirement exactly as ``dsl_evaluate`` reads it (see the module docstring)."""
    requirement = Requirement(variable, expression)
    result = True
    first_false: str | None = None
    for group in expression.split(" "):
        if not group:
            continue
        complete = True
        for term in group.split(","):
            if not term:
                continue
            value = _term(term, host)
            if value is None:
                return Verdict(False, requirement, expression.split(" ")[0], term, True,
                               "requirement error: invalid expression")
            result = value
            if not value:
                first_false = first_false or term
                complete = False
                break
        if complete:
            break
    if result:
        return Verdict(True, requirement)
    condition = expression.split(" ")[0]
    hint = _UPDATE_HINT if condition.startswith(_CUDA_PREFIX) else ""
    return Verdict(False, requirement, condition, first_false, False,
                   f"requirement error: unsatisfied condition: {condition}{hint}")


def verdict(env: Mapping[str, str], host: Host) -> Verdict:
    """All of an environment's requirements (AND), the first failing one decides. The caller
    knows the container gets GPUs (``gets_devices``); this does not look at the devices."""
    found = requirements(env)
    if found.error:
        return Verdict(False, Requirement(CUDA_VERSION, env.get(CUDA_VERSION, "")),
                       runtime_error=f"failed to get requirements: {found.error}")
    for requirement in found.items:
        outcome = evaluate(requirement.expression, host, requirement.variable)
        if not outcome.ok:
            return outcome
    return Verdict(True)


# --------------------------------------------------------------------------- the sentence


def _needs(outcome: Verdict) -> str:
    """``needs CUDA 12.9 (cuda>=12.9)`` or ``needs driver>=560 (NVIDIA_REQUIRE_DRIVER)``."""
    condition = outcome.condition or ""
    variable = outcome.requirement.variable if outcome.requirement else REQUIRE_CUDA
    if condition.startswith(_CUDA_PREFIX) and "," not in condition:
        return f"needs CUDA {condition[len(_CUDA_PREFIX):]} ({condition})"
    if variable in (REQUIRE_CUDA, CUDA_VERSION):
        return f"needs {condition}"
    return f"needs {condition} ({variable})"


def _host_words(outcome: Verdict, host: Host) -> str:
    words = host.describe()
    term = (outcome.term or "").lower()
    extra = []
    if term.startswith("brand") and host.brand:
        extra.append(f"its GPU's brand is {host.brand}")
    if term.startswith("arch") and host.arch:
        extra.append(f"its GPU's compute capability is {host.arch}")
    return words + "".join(f" and {e}" for e in extra)


def reason(outcome: Verdict, host: Host, image: str) -> str | None:
    """The student's sentence for a verdict, naming the image's need and the host's side;
    ``None`` when the start would go ahead."""
    if outcome.ok:
        return None
    legacy_unreadable = (outcome.requirement is not None and outcome.condition is None
                         and outcome.requirement.variable == CUDA_VERSION)
    if legacy_unreadable:
        return (f"The image {image} sets {CUDA_VERSION}={outcome.requirement.expression} "
                "without NVIDIA_REQUIRE_CUDA, and the NVIDIA runtime cannot read that version, "
                "so it refuses to start it. Choose another image or ask an admin to fix it.")
    if outcome.invalid:
        variable = outcome.requirement.variable if outcome.requirement else REQUIRE_CUDA
        return (f"The image {image} declares a requirement the NVIDIA runtime cannot read "
                f"({variable}: {outcome.term!r} is not a valid condition), so the runtime "
                f"refuses to start it; {host.describe()}. Choose another image or ask an "
                "admin to fix the image.")
    update = ("update the driver" if (outcome.condition or "").startswith(("cuda", "driver"))
              else "check the image")
    return (f"The image {image} {_needs(outcome)}; {_host_words(outcome, host)}. "
            f"Choose another image or ask an admin to {update}.")


def check(image_env_entries: Iterable[str] | Mapping[str, str] | None, host: Host, *,
          image: str, container_env: Mapping[str, str] | None = None) -> str | None:
    """The spawner's question, for a server that gets GPUs: ``None`` when the NVIDIA runtime
    will start ``image`` here, else one sentence naming what the image needs and what this
    host has. ``container_env`` (what the spawner sets: ``Spawner.environment``, a profile's
    ``environment``) goes on top of the image's, as Docker and the toolkit merge them; its
    ``NVIDIA_VISIBLE_DEVICES`` is not read (the caller knows it gives devices)."""
    env = parse_env(image_env_entries)
    env.update(parse_env(container_env))
    return reason(verdict(env, host), host, image)


# ------------------------------------------------------------------------------- doctor


def summarize(expression: str) -> str:
    """A requirement short enough for a table: its first alternative, the driver branches
    NVIDIA lists for forward compatibility, and how many other alternatives there are.
    ``cuda>=12.4 (or driver 470/525/535 on the brands it lists)``."""
    groups = [g for g in expression.split(" ") if g]
    if not groups:
        return "(empty)"
    branches = sorted({int(m.group(1)) for g in groups[1:] if (m := _BRANCH.match(g))})
    others = sum(1 for g in groups[1:] if not _BRANCH.match(g))
    text = groups[0]
    if branches:
        text += f" (or driver {'/'.join(map(str, branches))} on the brands it lists)"
    if others:
        text += f" (+{others} other alternative{'s' if others > 1 else ''})"
    return text


def doctor_rows(images: Mapping[str, Sequence[str] | None], driver: str | None,
                cuda: str | None) -> list[ImageFit]:
    """For ``gpuspawner doctor``: every profile image (name -> its ``Config.Env``, ``None``
    when it is not on the engine) with its requirement and whether this host meets it."""
    host = Host(driver, cuda)
    rows: list[ImageFit] = []
    for image, entries in images.items():
        if entries is None:
            rows.append(ImageFit(image, "", None, "not on the engine: it is pulled at the "
                                 "first spawn, and checked then"))
            continue
        env = parse_env(entries)
        found = requirements(env)
        shown = " AND ".join(
            summarize(r.expression) if r.variable in (REQUIRE_CUDA, CUDA_VERSION)
            else f"{r.variable}: {summarize(r.expression)}" for r in found.items)
        if found.disabled:
            rows.append(ImageFit(image, "", True, "NVIDIA_DISABLE_REQUIRE is set: the NVIDIA "
                                 "runtime checks nothing"))
            continue
        if found.error:
            rows.append(ImageFit(image, shown, False, reason(verdict(env, host), host, image)
                                 or found.error))
            continue
        if not found.items:
            rows.append(ImageFit(image, "", True, "declares no NVIDIA_REQUIRE_* condition"))
            continue
        if driver is None and cuda is None:
            rows.append(ImageFit(image, shown, None, "the driver's versions are unknown (no "
                                 "NVML), so this cannot be told; the runtime decides at start"))
            continue
        outcome = verdict(env, host)
        if outcome.ok:
            rows.append(ImageFit(image, shown, True, f"{host.describe()}: the image starts"))
        else:
            rows.append(ImageFit(image, shown, False, reason(outcome, host, image) or ""))
    return rows


def doctor_summary(rows: Sequence[ImageFit]) -> tuple[str, str]:
    """One ``doctor`` check of the rows: ``("ok" | "warn", message)``. A profile image the
    driver cannot start is a warning: other servers are unaffected, that profile's users are
    refused with the sentence until the image or the driver changes."""
    bad = [r for r in rows if r.fits is False]
    if bad:
        return "warn", (f"{len(bad)} of {len(rows)} profile image(s) cannot start on this "
                        f"driver: " + "; ".join(r.message for r in bad[:5]))
    unknown = [r for r in rows if r.fits is None]
    if unknown:
        return "ok", (f"{len(rows) - len(unknown)} profile image(s) fit this driver; "
                      f"{len(unknown)} not checked ({unknown[0].image}: {unknown[0].message})")
    return "ok", f"all {len(rows)} profile image(s) fit this driver"
