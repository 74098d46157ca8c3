"""Spawner profiles, in the shape admins know from KubeSpawner's ``profile_list``.

Pure: plain dicts from the config in, frozen records out, and the one place that decides
which profiles a user may see and choose.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .records import JSONRecord

_KEYS = {"display_name", "slug", "description", "default", "gpu", "overrides"}
_GPU_KEYS = {"mig_profile", "gpus"}
_OVERRIDE_KEYS = {"image", "mem_limit", "cpu_limit", "environment", "ports"}


class ProfileError(ValueError):
    """A profile_list entry an admin must fix."""


@dataclass(frozen=True)
class Profile(JSONRecord):
    slug: str
    display_name: str
    description: str = ""
    default: bool = False
    mig_profile: str | None = None
    gpus: int = 0
    overrides: Mapping[str, Any] = field(default_factory=dict)

    @property
    def wants_gpu(self) -> bool:
        return bool(self.mig_profile or self.gpus)

    def request_label(self) -> str:
        if self.mig_profile:
            return f"MIG {self.mig_profile}"
        if self.gpus:
            return f"{self.gpus} whole GPU{'s' if self.gpus > 1 else ''}"
        return "CPU only"


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "profile"


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
        gpu = entry.get("gpu") or {}
        if not isinstance(gpu, Mapping) or set(gpu) - _GPU_KEYS:
            raise ProfileError(f"{where} ({slug}): gpu must be {{mig_profile: …}} or {{gpus: N}}")
        mig = gpu.get("mig_profile")
        gpus = gpu.get("gpus") or 0
        if mig and gpus:
            raise ProfileError(
                f"{where} ({slug}): a profile asks for a MIG slice or GPUs, not both"
            )
        if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 0:
            raise ProfileError(f"{where} ({slug}): gpus must be a whole number")
        overrides = dict(entry.get("overrides") or {})
        bad = set(overrides) - _OVERRIDE_KEYS
        if bad:
            raise ProfileError(
                f"{where} ({slug}): unknown override(s) {', '.join(sorted(bad))} "
                f"(known: {', '.join(sorted(_OVERRIDE_KEYS))})"
            )
        found.append(
            Profile(
                slug=slug,
                display_name=name,
                description=str(entry.get("description") or ""),
                default=bool(entry.get("default")),
                mig_profile=str(mig) if mig else None,
                gpus=int(gpus),
                overrides=overrides,
            )
        )
    return found


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


def resolve(
    options: Mapping[str, Any], allowed: list[Profile], everything: list[Profile]
) -> Profile:
    """The profile ``user_options`` ask for. Only a permitted slug, nothing else, is
    accepted: devices, ports and images come with the profile, never from the user."""
    extra = sorted(set(options) - {"profile"})
    names = ", ".join(p.slug for p in allowed) or "none"
    if extra:
        raise ProfileRefused(
            "options", 400,
            f"Only a profile can be chosen (got {', '.join(extra)}); devices, ports and "
            f"images come with the profile. Profiles you may choose: {names}.",
        )
    if not allowed:
        if everything:
            raise ProfileRefused(
                "profile", 403, "Your policy allows none of this hub's profiles; ask an admin.")
        return Profile(slug="default", display_name="Default")
    slug = options.get("profile")
    if not slug:
        return default_of(allowed) or allowed[0]
    for profile in allowed:
        if profile.slug == slug:
            return profile
    raise ProfileRefused(
        "profile", 400,
        f"Unknown or forbidden profile {str(slug)[:80]!r}. Profiles you may choose: {names}.",
    )
