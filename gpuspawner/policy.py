"""Who may take what: the YAML policy file (limits per user and group, priorities, holds).

The file format stays close to DS01's ``resource-limits.yaml`` so lab admins can reuse what
they have. Everything here is pure: ``parse_policy`` turns text into frozen records and
``Policy.for_user`` merges them; only ``load_policy`` touches the file system, so the merge
rules can be tested exhaustively and the spawner, the admin page and the CLI all see the
same answer for the same file.

Errors are meant for the admin who edits the file at 2 a.m.: each names the file, the line
and the key path, and says how to fix it. Line numbers come from PyYAML's node marks, not
from searching the text, so they are right even with anchors, flow style or repeated keys.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Any

import yaml

from .records import JSONRecord

__all__ = [
    "BUILTIN_LIMITS",
    "Group",
    "Limits",
    "LIMIT_KEYS",
    "Policy",
    "PolicyError",
    "UserOverride",
    "UserPolicy",
    "format_duration",
    "load_policy",
    "parse_duration",
    "parse_policy",
]

#: The limit keys, in the order the docs and error messages list them.
LIMIT_KEYS: tuple[str, ...] = (
    "max_gpu_equivalents",
    "max_gpu_slots_per_container",
    "allow_full_gpu",
    "allowed_profiles",
    "priority",
    "gpu_hold_after_stop",
    "max_servers",
    "gpu_idle_timeout",
)
#: DS01 spelling of ``max_gpu_equivalents``; accepted so existing files load unchanged.
ALIASES: dict[str, str] = {"max_mig_instances": "max_gpu_equivalents"}
_TOP_KEYS = ("defaults", "groups", "user_overrides")
_LIMIT_AND_ALIAS_KEYS = tuple(sorted((*LIMIT_KEYS, *ALIASES)))
_GROUP_KEYS = tuple(sorted((*_LIMIT_AND_ALIAS_KEYS, "members")))

_NULL_TAG = "tag:yaml.org,2002:null"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class PolicyError(ValueError):
    """A policy file an admin must fix.

    It carries the location as attributes (not only in the text) so the admin page can point
    at the line and tests can check it without parsing messages.
    """

    def __init__(
        self, message: str, *, source: str, line: int | None = None, key: str | None = None
    ) -> None:
        self.message = message
        self.source = source
        self.line = line
        self.key = key
        where = f"{source} line {line}" if line is not None else source
        super().__init__(f"{where}: {message}")


# --------------------------------------------------------------------------- durations

_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([dhms])")
_DURATION_HELP = (
    'write seconds as a number, or a duration like "90s", "30m", "2h", "1d" or "1h30m"'
)


def parse_duration(value: object) -> float:
    """Seconds from an int/float or a string like ``"1h30m"``.

    Public because the spawner's own time settings take the same spellings as the policy
    file, so admins learn one syntax. Raises ValueError (the caller adds where it was).
    """
    if isinstance(value, bool):  # YAML ``yes``/``no`` would otherwise read as 1/0 seconds
        raise ValueError(f"{value!r} is not a duration; {_DURATION_HELP}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_duration_text(value)
    else:
        raise ValueError(f"{value!r} is not a duration; {_DURATION_HELP}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{value!r} is not a duration; {_DURATION_HELP} (0 or more)")
    return seconds


def _parse_duration_text(text: str) -> float:
    compact = text.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", compact):
        return float(compact)
    total, position, seen = 0.0, 0, ""
    for match in _PART.finditer(compact):
        unit = match.group(2)
        # Units must not repeat and must go from large to small, so "30m1h" or "1m1m" is
        # flagged as the typo it most likely is instead of being silently added up.
        out_of_order = bool(seen) and "dhms".index(unit) <= "dhms".index(seen[-1])
        if compact[position : match.start()].strip() or out_of_order:
            break
        total += float(match.group(1)) * _UNITS[unit]
        seen += unit
        position = match.end()
    if not seen or compact[position:].strip():
        raise ValueError(f"{text!r} is not a duration; {_DURATION_HELP}")
    return total


def format_duration(seconds: float) -> str:
    """The shortest ``1h30m`` spelling of ``seconds``, for messages and the admin page.

    ``parse_duration(format_duration(s)) == s`` for whole seconds, so what the admin page
    shows can be pasted back into the file.
    """
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError(f"{seconds!r} is not a duration")
    if seconds != int(seconds):
        return f"{seconds:g}s"
    rest = int(seconds)
    if rest == 0:
        return "0s"
    parts = []
    for unit, size in _UNITS.items():
        count, rest = divmod(rest, int(size))
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Limits(JSONRecord):
    """One user's resolved limits: every field concrete, ``None`` only where it means unlimited.

    The allocator and the profile filter read only this, never the raw file, so a new key in
    the file cannot reach a decision without passing through the merge rules first.
    """

    max_gpu_equivalents: float | None = 1.0
    max_gpu_slots_per_container: int | None = 1
    allow_full_gpu: bool = False
    allowed_profiles: tuple[str, ...] | None = None
    priority: int = 0
    gpu_hold_after_stop: float = 0.0
    max_servers: int | None = None
    #: Seconds a GPU server may run no compute process on its devices before the admin
    #: service stops it (``admin/activity.py``); None: never.
    gpu_idle_timeout: float | None = None

    def __post_init__(self) -> None:
        # Tests and config code build Limits by hand with lists; keep the record hashable.
        if self.allowed_profiles is not None and not isinstance(self.allowed_profiles, tuple):
            object.__setattr__(self, "allowed_profiles", tuple(self.allowed_profiles))

    def allows_profile(self, slug: str, mig_profile: str | None = None) -> bool:
        """Whether a pattern matches the spawner slug or the MIG profile name.

        Both are tried so admins can write either the names their users see (``mig-small``)
        or the hardware names they already know (``1g.*``). An empty slug means "no slug"
        (the allocator asks about bare MIG profiles), so it never matches ``*`` on its own.
        Matching is case-sensitive, the same on every platform.
        """
        if self.allowed_profiles is None:
            return True
        names = [name for name in (slug, mig_profile) if name]
        return any(fnmatchcase(name, pattern) for pattern in self.allowed_profiles
                   for name in names)


#: What a user gets when the file says nothing (and when there is no file).
BUILTIN_LIMITS = Limits()


@dataclass(frozen=True)
class Group(JSONRecord):
    """A policy group as written: only the keys it sets (``settings``), and its members.

    Keys are kept partial (not resolved against ``defaults``) because the merge needs to know
    which keys a group actually sets: a key no applying group sets keeps the defaults value.
    """

    name: str
    members: tuple[str, ...] = ()
    settings: tuple[tuple[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "members": list(self.members),
                **_settings_json(self.settings)}


@dataclass(frozen=True)
class UserOverride(JSONRecord):
    """``user_overrides.<user>``: the keys set for one user, which win over every group."""

    user: str
    settings: tuple[tuple[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"user": self.user, **_settings_json(self.settings)}


@dataclass(frozen=True)
class UserPolicy(JSONRecord):
    """A user's limits together with why: the groups that applied and every layer used."""

    user: str
    limits: Limits
    groups: tuple[str, ...] = ()
    sources: tuple[str, ...] = ("defaults",)


@dataclass(frozen=True)
class Policy:
    """A parsed policy file; ``for_user`` is the only way to get limits out of it."""

    source: str = "<built-in>"
    #: Built-in defaults with the file's ``defaults`` section applied.
    defaults: Limits = BUILTIN_LIMITS
    groups: tuple[Group, ...] = ()  # sorted by name by the parser, for stable output
    user_overrides: tuple[UserOverride, ...] = ()
    _by_user: dict[str, UserOverride] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )
    #: ``hold_seconds`` by user, for users without hub groups: the ledger asks for every
    #: stopped container it reads (hundreds per read), and the policy never changes.
    _holds: dict[str, float] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_user", {o.user: o for o in self.user_overrides})

    @classmethod
    def default(cls) -> Policy:
        """The policy with no file: every user gets the built-in limits (one instance: what
        it has worked out is kept)."""
        return _default_policy() if cls is Policy else cls()

    def for_user(self, user: str, hub_groups: Iterable[str] = ()) -> UserPolicy:
        """Merge built-in < ``defaults`` < groups < ``user_overrides`` for one user.

        Several groups combine to the most generous value per key, so being put in one more
        group can never take anything away; hub group names count as policy groups of the
        same name so admins can manage membership in JupyterHub instead of in this file.
        """
        if isinstance(hub_groups, str):
            raise TypeError("hub_groups must be an iterable of group names, not one string")
        in_hub = set(hub_groups)
        applied = sorted(
            (g for g in self.groups if user in g.members or g.name in in_hub),
            key=lambda g: g.name,
        )
        values = {key: getattr(self.defaults, key) for key in LIMIT_KEYS}
        set_by_groups = [dict(g.settings) for g in applied]
        for key in LIMIT_KEYS:
            found = [settings[key] for settings in set_by_groups if key in settings]
            if found:
                values[key] = _most_generous(key, found)
        sources = ["defaults", *(f"group {g.name}" for g in applied)]
        override = self._by_user.get(user)
        if override is not None:
            values.update(dict(override.settings))
            sources.append(f"user {user}")
        return UserPolicy(
            user=user,
            limits=Limits(**values),
            groups=tuple(g.name for g in applied),
            sources=tuple(sources),
        )

    def hold_seconds(self, user: str, hub_groups: Iterable[str] = ()) -> float:
        """How long a stopped server of ``user`` keeps its devices (the ledger's callback).

        The ledger knows only the user name from a container's labels, so a hold given
        through a hub group alone is not seen there; put such users in ``members``.
        """
        groups = tuple(hub_groups)
        if groups:
            return self.for_user(user, groups).limits.gpu_hold_after_stop
        hold = self._holds.get(user)
        if hold is None:
            hold = self._holds[user] = self.for_user(user).limits.gpu_hold_after_stop
        return hold

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "defaults": self.defaults.to_json(),
            "groups": [g.to_json() for g in self.groups],
            "user_overrides": [o.to_json() for o in self.user_overrides],
        }


def _settings_json(settings: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings}


def _most_generous(key: str, values: list[Any]) -> Any:
    """The most generous of several groups' values for ``key`` (None = unlimited wins)."""
    if key in ("max_gpu_equivalents", "max_gpu_slots_per_container", "max_servers",
               "gpu_idle_timeout"):
        return None if any(v is None for v in values) else max(values)
    if key == "allow_full_gpu":
        return any(values)
    if key == "allowed_profiles":
        if any(v is None for v in values):
            return None
        return tuple(dict.fromkeys(p for v in values for p in v))
    return max(values)  # priority, gpu_hold_after_stop


# --------------------------------------------------------------------------- loading


def load_policy(path: str | os.PathLike[str] | None) -> Policy:
    """Read and parse the policy file; the module's only I/O, kept tiny on purpose."""
    if path is None:
        return Policy.default()
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise PolicyError(
            "the policy file does not exist; create it (see docs/policy.md) "
            "or correct the policy_file setting",
            source=source,
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(
            f"the policy file cannot be read ({exc}); make it a readable UTF-8 text file",
            source=source,
        ) from None
    return parse_policy(text, source)


@functools.cache
def _default_policy() -> Policy:
    return Policy()


class PolicyFile:
    """A policy file that is re-read when it changes, so a running hub or admin page picks up
    an admin's edit without a restart. A file with errors raises PolicyError on every read
    until it is fixed; nothing falls back silently to an older policy."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = path
        self._cached: tuple[float, Policy] | None = None

    def current(self) -> Policy:
        if not self.path:
            return Policy.default()
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError:
            mtime = -1.0
        if self._cached is not None and self._cached[0] == mtime:
            return self._cached[1]
        policy = load_policy(self.path)
        self._cached = (mtime, policy)
        return policy


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Parse policy YAML (``source`` names it in errors); an empty document is all defaults."""
    return _Parser(source).parse(text)


_Entries = dict[str, tuple[yaml.Node, yaml.Node]]


class _Parser:
    """Walks the composed YAML node tree so every value keeps its line number."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.constructor = yaml.SafeLoader("")

    def error(self, node: yaml.Node | None, path: str | None, message: str) -> PolicyError:
        line = node.start_mark.line + 1 if node is not None else None
        return PolicyError(message, source=self.source, line=line, key=path or None)

    # -- the document

    def parse(self, text: str) -> Policy:
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            raise PolicyError(
                f"YAML syntax error: {_syntax_problem(exc)} (text containing ': ' or ' #' "
                "needs quotes)",
                source=self.source,
                line=mark.line + 1 if mark is not None else None,
            ) from None
        except yaml.YAMLError as exc:  # unmarked, e.g. a control character in the text
            raise PolicyError(
                f"not valid YAML ({exc}); save the file as plain UTF-8 text",
                source=self.source,
            ) from None
        if root is None or _is_null(root):
            return Policy(source=self.source)
        if not isinstance(root, yaml.MappingNode):
            raise self.error(
                root, None,
                f"the policy must be a mapping, not {_describe_node(root)}; start the file "
                "with one of the keys defaults:, groups: or user_overrides:",
            )
        top = self.mapping(root, "", _TOP_KEYS, "settings")
        defaults = BUILTIN_LIMITS
        if "defaults" in top:
            entries = self.mapping(top["defaults"][1], "defaults", _LIMIT_AND_ALIAS_KEYS,
                                   "settings")
            defaults = replace(BUILTIN_LIMITS, **dict(self.settings(entries, "defaults")))
        groups = self.groups(top["groups"][1]) if "groups" in top else ()
        overrides: tuple[UserOverride, ...] = ()
        if "user_overrides" in top:
            overrides = self.user_overrides(top["user_overrides"][1], {g.name for g in groups})
        return Policy(source=self.source, defaults=defaults, groups=groups,
                      user_overrides=overrides)

    def groups(self, node: yaml.Node) -> tuple[Group, ...]:
        found = []
        for name, (_key_node, value) in self.raw_mapping(node, "groups", "group").items():
            path = f"groups.{name}"
            entries = self.mapping(value, path, _GROUP_KEYS, "settings")
            members: tuple[str, ...] = ()
            if "members" in entries:
                members = self.names(entries.pop("members")[1], f"{path}.members")
            found.append(Group(name=name, members=members,
                               settings=self.settings(entries, path)))
        return tuple(sorted(found, key=lambda g: g.name))

    def user_overrides(self, node: yaml.Node, group_names: set[str]) -> tuple[UserOverride, ...]:
        found = []
        for user, (key_node, value) in self.raw_mapping(node, "user_overrides", "user").items():
            path = f"user_overrides.{user}"
            if user in group_names:
                raise self.error(
                    key_node, path,
                    f"{user!r} in user_overrides is the name of a group, and user_overrides "
                    f"takes user names only; move these settings under groups.{user}",
                )
            entries = self.mapping(value, path, _LIMIT_AND_ALIAS_KEYS, "settings")
            found.append(UserOverride(user=user, settings=self.settings(entries, path)))
        return tuple(sorted(found, key=lambda o: o.user))

    # -- structure

    def mapping(self, node: yaml.Node, path: str, known: Sequence[str], what: str) -> _Entries:
        """A mapping of fixed keys: each checked against ``known``."""
        entries = self.raw_mapping(node, path, what)
        for name, (key_node, _value) in entries.items():
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                fix = f"did you mean {close[0]!r}?" if close else "fix the spelling or remove it"
                raise self.error(
                    key_node, _join(path, name),
                    f"unknown key {name!r} in {path or 'the top level'} "
                    f"(known keys: {', '.join(known)}); {fix}",
                )
        return entries

    def raw_mapping(self, node: yaml.Node, path: str, what: str) -> _Entries:
        """Key -> (key node, value node); ``what`` is "settings", "group" or "user"."""
        if _is_null(node):  # "defaults:" with everything commented out is not a mistake
            return {}
        if not isinstance(node, yaml.MappingNode):
            shape = "key: value settings" if what == "settings" else f"{what} names to settings"
            raise self.error(
                node, path,
                f"{path} must be a mapping of {shape}, not {_describe_node(node)}; "
                f"indent its entries on their own lines under '{path.rsplit('.', 1)[-1]}:'",
            )
        seen: dict[str, yaml.Node] = {}
        for key_node, _value in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            name = self.key_name(key_node, path, what)
            if name in seen:
                raise self.error(
                    key_node, _join(path, name),
                    f"{name!r} appears twice in {path or 'the top level'} (first on line "
                    f"{seen[name].start_mark.line + 1}); keep only one of them",
                )
            seen[name] = key_node
        try:  # "<<: *anchor" merges as in any YAML reader; explicit keys win over merged ones
            self.constructor.flatten_mapping(node)
        except yaml.MarkedYAMLError as exc:
            raise self.error(
                node, path, f"bad '<<' merge in {path or 'the top level'} ({exc.problem}); "
                "merge only mappings, e.g. '<<: *defaults'"
            ) from None
        return {self.key_name(k, path, what): (k, v) for k, v in node.value}

    def key_name(self, key_node: yaml.Node, path: str, what: str) -> str:
        value = self.construct(key_node, path) if isinstance(key_node, yaml.ScalarNode) else None
        if isinstance(value, str) and value:
            return value
        where = path or "the top level"
        if what in ("group", "user") and isinstance(key_node, yaml.ScalarNode):
            message = (f"{what} name {key_node.value!r} in {where} is read as "
                       f"{_describe(value)}, not a name; put it in quotes: '{key_node.value}'")
        elif isinstance(key_node, yaml.ScalarNode):
            message = (f"key {key_node.value!r} in {where} is read as {_describe(value)}, "
                       "not a name; write keys as words, e.g. 'priority: 10'")
        else:
            message = (f"key {_describe_node(key_node)} in {where} is not a name; "
                       "write keys as words, e.g. 'priority: 10'")
        raise self.error(key_node, path, message)

    def names(self, node: yaml.Node, path: str) -> tuple[str, ...]:
        if _is_null(node):
            return ()
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(
                node, path,
                f"{path} must be a list of user names, not {_describe_node(node)}; "
                "write e.g. 'members: [alice, bob]'",
            )
        names: list[str] = []
        for item in node.value:
            value = self.construct(item, path) if isinstance(item, yaml.ScalarNode) else None
            if not isinstance(value, str) or not value:
                shown = _describe(value) if isinstance(item, yaml.ScalarNode) else (
                    _describe_node(item))
                raise self.error(
                    item, path,
                    f"{path} entries must be user names, not {shown}; "
                    "put names that look like numbers or yes/no in quotes, e.g. '12345'",
                )
            names.append(value)
        return tuple(dict.fromkeys(names))

    # -- values

    def settings(self, entries: _Entries, path: str) -> tuple[tuple[str, Any], ...]:
        """Validated values of the limit keys, the alias folded into its canonical name."""
        for alias, canonical in ALIASES.items():
            if alias in entries and canonical in entries:
                later = max(entries[alias][0], entries[canonical][0],
                            key=lambda n: (n.start_mark.line, n.start_mark.column))
                raise self.error(
                    later, _join(path, alias),
                    f"{path} sets both {canonical} and {alias}, which mean the same; "
                    f"keep only {canonical}",
                )
        out: dict[str, Any] = {}
        for name, (_key_node, value_node) in entries.items():
            canonical = ALIASES.get(name, name)
            out[canonical] = self.value(canonical, value_node, _join(path, name))
        return tuple(sorted(out.items()))

    def value(self, key: str, node: yaml.Node, path: str) -> Any:
        raw: Any = (self.construct(node, path) if isinstance(node, yaml.ScalarNode)
                    else _NotScalar(node))
        if key == "max_gpu_equivalents":
            return self.amount(raw, node, path, whole=False)
        if key in ("max_gpu_slots_per_container", "max_servers"):
            return self.amount(raw, node, path, whole=True)
        if key == "allow_full_gpu":
            if not isinstance(raw, bool):
                raise self.error(node, path, f"{path} must be true or false, not "
                                 f"{_describe(raw)}; write e.g. 'allow_full_gpu: true'")
            return raw
        if key == "priority":
            if isinstance(raw, bool) or not isinstance(raw, int):
                raise self.error(node, path, f"{path} must be a whole number, not "
                                 f"{_describe(raw)}; write e.g. 'priority: 10'")
            return raw
        if key == "gpu_idle_timeout" and raw is None:
            return None  # never stopped for want of GPU work
        if key in ("gpu_hold_after_stop", "gpu_idle_timeout"):
            try:
                return parse_duration(raw)
            except ValueError:
                raise self.error(
                    node, path, f"{path} is not a duration: {_describe(raw)}; {_DURATION_HELP}"
                ) from None
        return self.patterns(raw, node, path)  # allowed_profiles

    def amount(self, raw: Any, node: yaml.Node, path: str, *, whole: bool) -> float | int | None:
        kind = "whole number" if whole else "number"
        fix = f"write a {kind} of 0 or more, or null for unlimited"
        if raw is None:
            return None
        if isinstance(raw, bool) or not isinstance(raw, int if whole else int | float):
            raise self.error(node, path, f"{path} must be a {kind}, not {_describe(raw)}; {fix}")
        if not math.isfinite(raw) or raw < 0:
            raise self.error(node, path, f"{path} must be 0 or more, not {raw!r}; {fix}")
        return raw if whole else float(raw)

    def patterns(self, raw: Any, node: yaml.Node, path: str) -> tuple[str, ...] | None:
        if raw is None:
            return None
        fix = 'write a list of profile slugs or patterns, e.g. ["cpu", "mig-*"], or null for all'
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(node, path, f"{path} must be a list, not {_describe(raw)}; {fix}")
        patterns: list[str] = []
        for item in node.value:
            value = self.construct(item, path) if isinstance(item, yaml.ScalarNode) else None
            if not isinstance(value, str) or not value:
                raise self.error(item, path, f"{path} entries must be text, not "
                                 f"{_describe_node(item)}; {fix}")
            patterns.append(value)
        return tuple(dict.fromkeys(patterns))

    def construct(self, node: yaml.Node, path: str) -> Any:
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as exc:
            raise self.error(node, path, f"cannot read the value of {path or 'this key'} "
                             f"({exc.problem}); put it in quotes if it is meant as text"
                             ) from None


@dataclass(frozen=True)
class _NotScalar:
    """Stands for a list or mapping where a single value was expected (for messages)."""

    node: yaml.Node


#: What PyYAML was inside when it broke, by its words, and what opened it.
_OPENED_BY = {
    "while parsing a flow sequence": "the [",
    "while parsing a flow mapping": "the {",
    "while scanning a quoted scalar": "the quote",
}


def _syntax_problem(exc: yaml.MarkedYAMLError) -> str:
    """PyYAML's problem, and where to look. An unclosed ``[``, ``{`` or quote breaks on a later
    line than the one to fix, so the line that opened it (PyYAML's ``context_mark``) is named
    beside the one where it broke (``problem_mark``, the error's line)."""
    problem = exc.problem or exc.context or "invalid YAML"
    start, end = exc.context_mark, exc.problem_mark
    here = "; check the indentation and quoting here"
    if not exc.problem or not exc.context:
        return problem + here
    if start is None or end is None or start.line == end.line:
        return f"{problem} ({exc.context}){here}"
    opened = _OPENED_BY.get(exc.context)
    if opened:
        return (f"{problem} ({opened} opened on line {start.line + 1} is not closed); close "
                "it, or check the indentation and quoting")
    return (f"{problem} ({exc.context} that starts on line {start.line + 1}); check the "
            f"indentation and quoting here and on line {start.line + 1}")


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG


def _describe_node(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if _is_null(node):
        return "null"
    return repr(node.value)


def _describe(value: Any) -> str:
    if isinstance(value, _NotScalar):
        return _describe_node(value.node)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the yes/no value {str(value).lower()}"
    if isinstance(value, str):
        return f"the text {value!r}"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    return f"{type(value).__name__} {value!r}"  # e.g. a YAML date


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
