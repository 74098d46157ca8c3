"""The spawn form: the profiles a user may choose, with live availability, as HTML.

Pure: plain data in (profiles, free slices per profile, whether the host has GPUs), escaped
HTML out, so the one renderer of this page is tested without a hub.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

from .profiles import OPTION_PREFIX, UNLISTED, UNLISTED_SUFFIX, Profile, ProfileOption


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
    counts = free.get(key, (0, 0))
    have, total = counts
    # Devices NVML failed on are in neither number (allocator.Free says how many, and why).
    down, reason = getattr(counts, "unavailable", 0), getattr(counts, "reason", None)
    label = profile.mig_profile or "whole GPUs"
    if total == 0 and down:
        return f"unavailable: {reason or 'NVML cannot read its GPU'}", True
    if total == 0:
        return f"unavailable: no {label} on this host", True
    more = f", {down} unavailable" if down else ""
    if profile.gpus and have < profile.gpus:
        return f"{label}: {have} of {total} free{more} (needs {profile.gpus}) - full", True
    if have == 0:
        return f"{label}: 0 of {total} free{more} - full", True
    return f"{label}: {have} of {total} free{more}", False


def choice_key(profile: str, option: str, choice: str) -> str:
    """The key of one choice of a profile option in ``render``'s ``blocked``."""
    return f"{profile}--{option}--{choice}"


def _option(profile: Profile, option: ProfileOption, picked: str | None,
            disabled: str, blocked: Mapping[str, str]) -> str:
    """A profile option as KubeSpawner's form sends it: a ``<select>`` named
    ``profile-option-<slug>--<name>`` (with "Other…" where free text is allowed) and the
    free text in ``…--unlisted-choice``. A choice in ``blocked`` (its image needs a newer
    driver) is shown disabled, with the sentence as its title."""
    field = f"{OPTION_PREFIX}{profile.slug}--{option.name}"
    e = html.escape
    why = {c.name: blocked.get(choice_key(profile.slug, option.name, c.name))
           for c in option.choices}
    listed = picked if option.choice(picked or "") and not why.get(picked or "") else None
    text = picked if picked and listed is None and option.unlisted else ""
    parts = [f'<div class="gpuspawner-option ms-4 mb-1" data-option="{e(option.name)}">',
             f'<label class="small me-2" for="{e(field)}">{e(option.display_name)}</label>']
    if option.choices:
        now = listed or (UNLISTED if text else option.default)
        if why.get(now):  # never preselect what cannot start: the first that can
            now = next((c.name for c in option.choices if not why[c.name]), "")
        rows = [f'<option value="{e(c.name)}"{" selected" if c.name == now else ""}'
                + (f' disabled title="{e(why[c.name] or "")}">{e(c.display_name)} '
                   "(needs a newer driver)</option>" if why[c.name] else
                   f">{e(c.display_name)}</option>")
                for c in option.choices]
        if option.unlisted is not None:
            rows.append(f'<option value="{UNLISTED}"{" selected" if now == UNLISTED else ""}>'
                        f"{e(option.unlisted.display_name_in_choices)}</option>")
        parts.append(f'<select class="form-select form-select-sm d-inline-block w-auto" '
                     f'id="{e(field)}" name="{e(field)}" {disabled}>{"".join(rows)}</select>')
    if option.unlisted is not None:
        hint = option.unlisted.validation_message or option.unlisted.display_name
        labelled = "" if option.choices else f' id="{e(field)}"'  # the label's target
        parts.append(
            f'<input type="text" class="form-control form-control-sm d-inline-block w-auto"'
            f'{labelled} name="{e(field + UNLISTED_SUFFIX)}" value="{e(text)}" '
            f'placeholder="{e(hint)}" aria-label="{e(option.unlisted.display_name)}" '
            f'{disabled}>')
    parts.append("</div>")
    return "".join(parts)


def render(
    profiles: Sequence[Profile],
    free: Mapping[str, tuple[int, int]],
    has_gpus: bool,
    trouble: str | None,
    chosen: str,
    picked: Mapping[str, str] | None = None,
    blocked: Mapping[str, str] | None = None,
    notice: str | None = None,
) -> str:
    """One radio button per profile, each with its options; full profiles are shown
    disabled, with the reason. ``picked``: the last choices of the chosen profile;
    ``blocked``: profiles (by slug) and choices (``choice_key``) whose image this driver
    cannot start, with the sentence; ``notice``: a sentence for the user above it all (why
    their server was stopped)."""
    rows = []
    for profile in profiles:
        note, full = availability(profile, free, has_gpus, trouble)
        why = (blocked or {}).get(profile.slug)
        if why:
            note, full = "unavailable: the image needs a newer driver", True
        checked = "checked" if profile.slug == chosen and not full else ""
        disabled = "disabled" if full else ""
        mine = (picked or {}) if profile.slug == chosen else {}
        options = "".join(_option(profile, o, mine.get(o.name), disabled, blocked or {})
                          for o in profile.options)
        rows.append(
            f"""
  <div class="list-group-item gpuspawner-profile{' text-muted' if full else ''}">
    <label class="d-block">
      <input type="radio" class="form-check-input me-2" name="profile"
             value="{html.escape(profile.slug)}" {checked} {disabled}>
      <strong>{html.escape(profile.display_name)}</strong>
      <span class="badge {'bg-secondary' if full else 'bg-success'} ms-2"
            data-free="{html.escape(note)}">{html.escape(note)}</span>
      <div class="small">{html.escape(profile.description)}</div>
      {f'<div class="small text-danger">{html.escape(why)}</div>' if why else ""}
    </label>{options}
  </div>"""
        )
    top = (f'<p class="alert alert-info gpuspawner-notice">{html.escape(notice)}</p>\n'
           if notice else "")
    return top + '<div class="list-group gpuspawner-profiles">' + "".join(rows) + "\n</div>"


def error(message: str) -> str:
    return f"<p class='alert alert-danger'>{html.escape(message)}</p>"
