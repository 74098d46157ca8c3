"""Spawner profiles, in the shape admins know from KubeSpawner's ``profile_list``.

Pure: plain dicts from the config in, frozen records out, and the one place that decides
which profiles (and which options inside a profile) a user may see and choose, and what
``user_options`` mean.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .records import JSONRecord

_KEYS = {"display_name", "slug", "description", "default", "gpu", "overrides",
         "kubespawner_override", "profile_options"}
_GPU_KEYS = {"mig_profile", "gpus"}
_OVERRIDE_KEYS = {"image", "mem_limit", "cpu_limit", "environment", "ports"}
#: What a choice inside a profile may change: never devices or ports (those are the
#: profile's and the allocator's).
_OPTION_OVERRIDE_KEYS = {"image", "mem_limit", "cpu_limit", "environment"}
_OPTION_KEYS = {"display_name", "choices", "unlisted_choice"}
_CHOICE_KEYS = {"display_name", "description", "default", "kubespawner_override", "overrides",
                "slug"}
_UNLISTED_KEYS = {"enabled", "display_name", "display_name_in_choices", "description_in_choices",
                  "validation_regex", "validation_message", "kubespawner_override", "overrides"}

#: The value KubeSpawner's form sends for "Other…"; the text is in ``<name>--unlisted-choice``.
UNLISTED = "unlisted_choice"
UNLISTED_SUFFIX = "--unlisted-choice"
#: The REST spelling of an option, beside KubeSpawner's bare ``<name>``.
OPTION_PREFIX = "profile-option-"
#: The option ``allowed_images`` becomes (DockerSpawner's own ``{"image": name}``).
IMAGE_OPTION = "image"


class ProfileError(ValueError):
    """A profile_list entry an admin must fix."""


@dataclass(frozen=True)
class OptionChoice(JSONRecord):
    """One listed choice of a profile option."""

    name: str
    display_name: str
    description: str = ""
    overrides: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Unlisted(JSONRecord):
    """Free text a profile option accepts besides its choices (KubeSpawner's
    ``unlisted_choice``); ``{value}`` in its overrides is replaced by the text."""

    display_name: str = "Other"
    display_name_in_choices: str = "Other…"
    validation_regex: str | None = None
    validation_message: str = ""
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def accepts(self, value: str) -> bool:
        # KubeSpawner's rule (re.match: anchored at the start; admins write ``$`` for the
        # end), so its configs mean the same here. Whitespace and control characters are
        # never part of an image, a size or a name.
        if not value or len(value) > 255 or any(ch.isspace() or ord(ch) < 32 for ch in value):
            return False
        return self.validation_regex is None or re.match(self.validation_regex, value) is not None


@dataclass(frozen=True)
class ProfileOption(JSONRecord):
    """A choice inside a profile (an image, a memory size), KubeSpawner's
    ``profile_options.<name>``."""

    name: str
    display_name: str
    choices: tuple[OptionChoice, ...] = ()
    #: The choice taken when the user names none; None: nothing is overridden (DockerSpawner's
    #: ``allowed_images`` without the configured image among them).
    default: str | None = None
    unlisted: Unlisted | None = None

    def choice(self, name: str) -> OptionChoice | None:
        return next((c for c in self.choices if c.name == name), None)

    def offered(self) -> str:
        """What may be chosen, in words, for the refusal that names it."""
        names = ", ".join(c.name for c in self.choices)
        if self.unlisted is None:
            return names or "nothing"
        free = ("any text" if self.unlisted.validation_regex is None
                else f"text matching {self.unlisted.validation_regex}")
        return f"{names} or {free}" if names else free


@dataclass(frozen=True)
class Profile(JSONRecord):
    slug: str
    display_name: str
    description: str = ""
    default: bool = False
    mig_profile: str | None = None
    gpus: int = 0
    overrides: Mapping[str, Any] = field(default_factory=dict)
    options: tuple[ProfileOption, ...] = ()

    @property
    def wants_gpu(self) -> bool:
        return bool(self.mig_profile or self.gpus)

    def request_label(self) -> str:
        if self.mig_profile:
            return f"MIG {self.mig_profile}"
        if self.gpus:
            return f"{self.gpus} whole GPU{'s' if self.gpus > 1 else ''}"
        return "CPU only"

    def option(self, name: str) -> ProfileOption | None:
        return next((o for o in self.options if o.name == name), None)

    @property
    def sets_image(self) -> bool:
        return IMAGE_OPTION in self.overrides or any(
            IMAGE_OPTION in c.overrides for o in self.options for c in o.choices
        ) or any(o.unlisted and IMAGE_OPTION in o.unlisted.overrides for o in self.options)


#: The profile of a hub without ``profile_list``: DockerSpawner's server, CPU only.
DEFAULT = Profile(slug="default", display_name="Default")


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "profile"


def _overrides(raw: Any, known: set[str], where: str) -> dict[str, Any]:
    overrides = dict(raw or {})
    bad = set(overrides) - known
    if bad:
        raise ProfileError(
            f"{where}: unknown override(s) {', '.join(sorted(bad))} "
            f"(known: {', '.join(sorted(known))})"
        )
    return overrides


def _either(entry: Mapping[str, Any], where: str) -> Any:
    """``overrides`` (gpuspawner's word) or ``kubespawner_override`` (KubeSpawner's): one."""
    if entry.get("overrides") and entry.get("kubespawner_override"):
        raise ProfileError(f"{where}: give overrides or kubespawner_override, not both")
    return entry.get("overrides") or entry.get("kubespawner_override")


def _parse_option(name: Any, raw: Any, where: str) -> ProfileOption:
    where = f"{where}, profile_options.{name}"
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name) or (
        name.endswith(UNLISTED_SUFFIX) or name == "profile"
    ):
        raise ProfileError(f"{where}: an option name is letters, digits, '_', '.', '-'")
    if not isinstance(raw, Mapping) or set(raw) - _OPTION_KEYS:
        raise ProfileError(f"{where} takes {', '.join(sorted(_OPTION_KEYS))}")
    choices: list[OptionChoice] = []
    default = None
    chosen = raw.get("choices") or {}
    if not isinstance(chosen, Mapping):
        raise ProfileError(f"{where}: choices is a mapping of choice name to choice")
    for key, body in chosen.items():
        at = f"{where}, choice {key}"
        if not isinstance(body, Mapping) or set(body) - _CHOICE_KEYS:
            raise ProfileError(f"{at} takes {', '.join(sorted(_CHOICE_KEYS))}")
        if str(key) == UNLISTED:
            raise ProfileError(f"{at}: {UNLISTED} is the name of the free-text choice")
        choices.append(OptionChoice(
            name=str(key), display_name=str(body.get("display_name") or key),
            description=str(body.get("description") or ""),
            overrides=_overrides(_either(body, at), _OPTION_OVERRIDE_KEYS, at)))
        if body.get("default"):
            if default is not None:
                raise ProfileError(f"{where}: two choices are the default")
            default = str(key)
    unlisted = None
    free = raw.get("unlisted_choice")
    if free is not None:
        at = f"{where}, unlisted_choice"
        if not isinstance(free, Mapping) or set(free) - _UNLISTED_KEYS:
            raise ProfileError(f"{at} takes {', '.join(sorted(_UNLISTED_KEYS))}")
        if free.get("enabled"):
            regex = free.get("validation_regex")
            try:
                re.compile(regex or "")
            except re.error as exc:
                raise ProfileError(f"{at}: validation_regex does not compile ({exc})") from exc
            overrides = _overrides(_either(free, at), _OPTION_OVERRIDE_KEYS, at)
            if not overrides:
                raise ProfileError(f"{at}: say what the text sets, e.g. image: '{{value}}'")
            unlisted = Unlisted(
                display_name=str(free.get("display_name") or "Other"),
                display_name_in_choices=str(free.get("display_name_in_choices") or "Other…"),
                validation_regex=str(regex) if regex else None,
                validation_message=str(free.get("validation_message") or ""),
                overrides=overrides)
    if not choices and unlisted is None:
        raise ProfileError(f"{where} has no choices")
    if default is None and choices:
        default = choices[0].name  # KubeSpawner's rule: the first is the default
    return ProfileOption(name=name, display_name=str(raw.get("display_name") or name),
                         choices=tuple(choices), default=default, unlisted=unlisted)


def parse_profiles(raw: Iterable[Mapping[str, Any]]) -> list[Profile]:
    """Validate a profile_list; the error names the entry and the key."""
    found: list[Profile] = []
    seen: set[str] = set()
    for number, entry in enumerate(raw, 1):
        where = f"profile_list entry {number}"
        if not isinstance(entry, Mapping):
            raise ProfileError(f"{where} is not a mapping")
        unknown = set(entry) - _KEYS
        if unknown:
            raise ProfileError(
                f"{where} has unknown key(s) {', '.join(sorted(unknown))} "
                f"(known: {', '.join(sorted(_KEYS))})"
            )
        name = str(entry.get("display_name") or entry.get("slug") or "").strip()
        if not name:
            raise ProfileError(f"{where} needs a display_name")
        slug = str(entry.get("slug") or slugify(name))
        if slug in seen:
            raise ProfileError(f"{where}: slug {slug!r} is used twice")
        seen.add(slug)
        where = f"{where} ({slug})"
        gpu = entry.get("gpu") or {}
        if not isinstance(gpu, Mapping) or set(gpu) - _GPU_KEYS:
            raise ProfileError(f"{where}: gpu must be {{mig_profile: …}} or {{gpus: N}}")
        mig = gpu.get("mig_profile")
        gpus = gpu.get("gpus") or 0
        if mig and gpus:
            raise ProfileError(f"{where}: a profile asks for a MIG slice or GPUs, not both")
        if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 0:
            raise ProfileError(f"{where}: gpus must be a whole number")
        overrides = _overrides(_either(entry, where), _OVERRIDE_KEYS, where)
        options = entry.get("profile_options") or {}
        if not isinstance(options, Mapping):
            raise ProfileError(f"{where}: profile_options is a mapping of option name to option")
        found.append(
            Profile(
                slug=slug,
                display_name=name,
                description=str(entry.get("description") or ""),
                default=bool(entry.get("default")),
                mig_profile=str(mig) if mig else None,
                gpus=int(gpus),
                overrides=overrides,
                options=tuple(_parse_option(k, v, where) for k, v in options.items()),
            )
        )
    return found


def with_images(profiles: Iterable[Profile], allowed: Any, configured: str) -> list[Profile]:
    """DockerSpawner's ``allowed_images`` (a dict of name -> image, or ``"*"``) as an image
    option on every profile that does not set its own image: ``{"image": name}`` then means
    what it means to DockerSpawner, and the form offers the same names."""
    if not allowed:
        return list(profiles)
    if allowed == "*":
        option = ProfileOption(IMAGE_OPTION, "Image", unlisted=Unlisted(
            display_name="Image", display_name_in_choices="Other image…",
            overrides={IMAGE_OPTION: "{value}"}))
    else:
        choices = tuple(OptionChoice(str(name), str(name), overrides={IMAGE_OPTION: str(image)})
                        for name, image in dict(allowed).items())
        default = next((c.name for c in choices if c.overrides[IMAGE_OPTION] == configured),
                       None)
        option = ProfileOption(IMAGE_OPTION, "Image", choices=choices, default=default)
    return [p if p.sets_image or p.option(IMAGE_OPTION) else
            replace(p, options=(*p.options, option)) for p in profiles]


def gpu_images(profiles: Iterable[Profile], configured: str | None) -> list[str]:
    """Every image a GPU server may start from: each GPU profile's own (or the configured
    one), and each listed choice of its image option. Free text is known only at the spawn.
    For ``gpuspawner doctor``, which checks each against the driver's CUDA."""
    found: list[str] = []
    for profile in profiles:
        if not profile.wants_gpu:
            continue
        option = profile.option(IMAGE_OPTION)
        if option is None or not option.choices:
            found.append(profile.overrides.get(IMAGE_OPTION) or configured or "")
        found += [c.overrides.get(IMAGE_OPTION, "") for c in (option.choices if option else ())]
    return [image for image in dict.fromkeys(found) if image]


def permitted(profiles: Iterable[Profile], limits: Any) -> list[Profile]:
    """The profiles a user's policy lets them choose (forbidden ones are not even offered)."""
    out = []
    for profile in profiles:
        if not limits.allows_profile(profile.slug, profile.mig_profile):
            continue
        if profile.gpus and not limits.allow_full_gpu:
            continue
        most = limits.max_gpu_slots_per_container
        if profile.gpus and most is not None and profile.gpus > most:
            continue
        out.append(profile)
    return out


def default_of(profiles: list[Profile]) -> Profile | None:
    return next((p for p in profiles if p.default), profiles[0] if profiles else None)


class ProfileRefused(ValueError):
    """A user's choice that cannot be honoured: a stable ``code``, an HTTP ``status``, and
    the sentence the user sees."""

    def __init__(self, code: str, status: int, message: str) -> None:
        super().__init__(message)
        self.code, self.status, self.message = code, status, message


@dataclass(frozen=True)
class Chosen(JSONRecord):
    """What ``user_options`` ask for, checked: the profile, each option's choice (a choice
    name, or the free text), what they override, and the keys passed through unread."""

    profile: Profile
    #: option name -> the choice name or the accepted free text
    choices: tuple[tuple[str, str], ...] = ()
    overrides: Mapping[str, Any] = field(default_factory=dict)
    #: A site's own options: kept in ``user_options`` as sent, never read by gpuspawner.
    passed: tuple[str, ...] = ()

    @property
    def image(self) -> str | None:
        return self.overrides.get(IMAGE_OPTION)


def refused_key(key: str) -> bool:
    """Keys no user may send, whatever the site's form: devices, ports, GPUs and labels
    (images are judged by the caller, against what the profile offers)."""
    low = key.lower()
    return (low in {"device_ids", "devices", "ports", "labels", "label"}
            or low.startswith(("gpu", "ds01.", "aime.")))


def _fill(value: Any, text: str) -> Any:
    if isinstance(value, str):
        return value.replace("{value}", text)
    if isinstance(value, Mapping):
        return {k: _fill(v, text) for k, v in value.items()}
    return value


def _merge(into: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    for key, value in overrides.items():
        if key == "environment" and isinstance(into.get(key), Mapping):
            into[key] = {**into[key], **value}
        else:
            into[key] = value


def _option_inputs(profile: Profile, options: Mapping[str, Any]
                   ) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """The keys of ``options`` that speak to one of ``profile``'s options, by option, and
    those keys: ``<name>``, ``profile-option-<name>`` or the form's
    ``profile-option-<slug>--<name>`` (the choice), each also with ``--unlisted-choice``."""
    found: dict[str, dict[str, Any]] = {}
    keys: set[str] = set()
    for key, value in options.items():
        bare = key
        for prefix in (f"{OPTION_PREFIX}{profile.slug}--", OPTION_PREFIX):
            if bare.startswith(prefix):
                bare = bare[len(prefix):]
                break
        free = bare.endswith(UNLISTED_SUFFIX)
        name = bare[: -len(UNLISTED_SUFFIX)] if free else bare
        if profile.option(name) is not None:
            found.setdefault(name, {})["text" if free else "choice"] = value
            keys.add(key)
    return found, keys


def _choose(option: ProfileOption, given: Mapping[str, Any], where: str
            ) -> tuple[str, Mapping[str, Any]] | None:
    choice, text = given.get("choice"), given.get("text")
    for value in (choice, text):
        if value is not None and not isinstance(value, str):
            raise ProfileRefused("options", 400, f"{option.display_name} must be text.")
    if choice in (None, "") and text in (None, ""):
        if option.default is None:
            return None
        picked = option.choice(option.default)
        assert picked is not None
        return picked.name, picked.overrides
    if choice not in (None, "", UNLISTED):
        picked = option.choice(choice)
        if picked is not None:
            return picked.name, picked.overrides
        text = choice  # DockerSpawner's {"image": name}: free text where that is allowed
    if option.unlisted is not None and text and option.unlisted.accepts(text):
        return text, _fill(dict(option.unlisted.overrides), text)
    why = option.unlisted.validation_message if option.unlisted and text else ""
    raise ProfileRefused(
        "options", 400,
        f"{str(text or choice)[:80]!r} is not offered for {option.display_name} in {where}"
        f"{f' ({why})' if why else ''}. You may choose: {option.offered()}.",
    )


def resolve(
    options: Mapping[str, Any], allowed: list[Profile], everything: list[Profile]
) -> Chosen:
    """What ``user_options`` ask for. A permitted profile slug and the choices that profile
    offers are read; devices, ports and labels are refused (they come with the profile and
    the hub, never from the user); anything else a site's own form sends is passed through
    unread."""
    names = ", ".join(p.slug for p in allowed) or "none"
    if not allowed:
        if everything:
            raise ProfileRefused(
                "profile", 403, "Your policy allows none of this hub's profiles; ask an admin.")
        allowed = [DEFAULT]
    slug = options.get("profile")
    if not slug:
        profile = default_of(allowed) or allowed[0]
    else:
        profile = next((p for p in allowed if p.slug == slug), None)
        if profile is None:
            raise ProfileRefused(
                "profile", 400,
                f"Unknown or forbidden profile {str(slug)[:80]!r}. Profiles you may choose: "
                f"{names}.",
            )
    inputs, spoken = _option_inputs(profile, options)
    rest = sorted(k for k in options if k != "profile" and k not in spoken)
    bad = [k for k in rest if refused_key(k) or k.startswith(OPTION_PREFIX)
           or k == IMAGE_OPTION]
    if bad:
        offered = ", ".join(o.name for o in profile.options)
        raise ProfileRefused(
            "options", 400,
            f"{', '.join(bad)} cannot be chosen for {profile.display_name}: devices, ports and "
            "images come with the profile"
            + (f" (its options: {offered})" if offered else "")
            + f". Profiles you may choose: {names}.",
        )
    overrides: dict[str, Any] = {}
    _merge(overrides, profile.overrides)
    choices: list[tuple[str, str]] = []
    for option in profile.options:
        picked = _choose(option, inputs.get(option.name, {}), profile.display_name)
        if picked is not None:
            choices.append((option.name, picked[0]))
            _merge(overrides, picked[1])
    return Chosen(profile, tuple(choices), overrides, tuple(rest))


def from_form(formdata: Mapping[str, list[str]]) -> dict[str, Any]:
    """The spawn form's fields as ``user_options``: the profile, and the chosen profile's
    own ``profile-option-<slug>--<name>`` fields as ``<name>`` (KubeSpawner's shape); the
    free text only where "Other…" (or nothing) was picked. DockerSpawner's own ``image``
    field is kept as it is."""
    out: dict[str, Any] = {}
    slug = (formdata.get("profile") or [""])[0]
    if slug:
        out["profile"] = slug
        prefix = f"{OPTION_PREFIX}{slug}--"
        fields = {k[len(prefix):]: (v or [""])[0] for k, v in formdata.items()
                  if k.startswith(prefix)}
        for name, value in fields.items():
            if name.endswith(UNLISTED_SUFFIX):
                continue
            if value:
                out[name] = value
        for name, value in fields.items():
            if name.endswith(UNLISTED_SUFFIX) and value:
                option = name[: -len(UNLISTED_SUFFIX)]
                if fields.get(option) in (None, "", UNLISTED):
                    out[name] = value
                    out[option] = UNLISTED
    if formdata.get(IMAGE_OPTION):
        out[IMAGE_OPTION] = formdata[IMAGE_OPTION][0]
    return out
