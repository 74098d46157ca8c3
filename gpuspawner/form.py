"""The spawn form: the profiles a user may choose, with live availability, as HTML.

Pure: plain data in (profiles, free slices per profile, whether the host has GPUs), escaped
HTML out, so the one renderer of this page is tested without a hub.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

from .profiles import Profile


def availability(
    profile: Profile, free: Mapping[str, tuple[int, int]], has_gpus: bool, trouble: str | None
) -> tuple[str, bool]:
    """What the form says of a profile's devices, and whether it is full (not choosable)."""
    if not profile.wants_gpu:
        return "CPU only", False
    if trouble:
        return "availability unknown", False
    if not has_gpus:
        return "unavailable: no NVIDIA GPUs on this host", True
    key = profile.mig_profile or "gpu"
    have, total = free.get(key, (0, 0))
    label = profile.mig_profile or "whole GPUs"
    if total == 0:
        return f"unavailable: no {label} on this host", True
    if profile.gpus and have < profile.gpus:
        return f"{label}: {have} of {total} free (needs {profile.gpus}) - full", True
    if have == 0:
        return f"{label}: 0 of {total} free - full", True
    return f"{label}: {have} of {total} free", False


def render(
    profiles: Sequence[Profile],
    free: Mapping[str, tuple[int, int]],
    has_gpus: bool,
    trouble: str | None,
    chosen: str,
) -> str:
    """One radio button per profile; full profiles are shown disabled, with the reason."""
    rows = []
    for profile in profiles:
        note, full = availability(profile, free, has_gpus, trouble)
        checked = "checked" if profile.slug == chosen and not full else ""
        disabled = "disabled" if full else ""
        rows.append(
            f"""
  <label class="list-group-item gpuspawner-profile{' text-muted' if full else ''}">
    <input type="radio" class="form-check-input me-2" name="profile"
           value="{html.escape(profile.slug)}" {checked} {disabled}>
    <strong>{html.escape(profile.display_name)}</strong>
    <span class="badge {'bg-secondary' if full else 'bg-success'} ms-2"
          data-free="{html.escape(note)}">{html.escape(note)}</span>
    <div class="small">{html.escape(profile.description)}</div>
  </label>"""
        )
    return '<div class="list-group gpuspawner-profiles">' + "".join(rows) + "\n</div>"


def error(message: str) -> str:
    return f"<p class='alert alert-danger'>{html.escape(message)}</p>"
