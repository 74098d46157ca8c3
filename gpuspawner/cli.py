"""``gpuspawner``: the world from a shell, while the hub is up or down.

It reads Docker and the GPUs directly, through the same Snapshot the spawner decides on, so
what it prints is what the spawner would see. Settings come from flags or the same
environment variables as ``jupyterhub_config.py``.

Exit codes: 0 fine; 1 ``doctor`` found a failing check, or a user/profile is unknown;
2 a configuration error (bad policy or topology file); 3 the Docker engine does not answer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import allocator, boot, health, hosts, inventory
from .admin import DEFAULT_HUB_ID
from .events import follow, tail
from .inventory import InventoryError
from .ledger import LedgerError
from .policy import PolicyError, PolicyFile, parse_duration
from .records import host_field
from .snapshot import Snapshot
from .world import DEFAULT_START_TIMEOUT, World

EXIT_OK, EXIT_PROBLEM, EXIT_CONFIG, EXIT_DOCKER = 0, 1, 2, 3


def _table(rows: list[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [list(map(str, header))] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _port_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    return int(low), int(high or low)


def _seconds(text: str) -> float:
    """A ``--start-timeout`` value: seconds, or the policy file's spellings (``3m``)."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        json.dump(data, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print(text)


#: One host's reading: its name (None on a one-host hub), its snapshot, why it is down.
Part = tuple[str | None, Snapshot | None, str]


def _parts(args: argparse.Namespace, world: World) -> list[Part]:
    """What the reading commands show: the local engine, or with ``--hosts`` every host of
    the file at once (``hosts.read_all``), each up with its snapshot or down with why."""
    if not args.hosts:
        return [(None, world.snapshot(), "")]
    readers = _host_readers(args)
    with ThreadPoolExecutor(len(readers)) as pool:
        views = hosts.read_all(readers, pool, timeout=HOSTS_TIMEOUT)
    return [(view.name, view.snapshot, view.down) for view in views]


#: Seconds a host of ``--hosts`` has to answer a reading command before it counts as down.
HOSTS_TIMEOUT = 30.0


def _up(parts: list[Part]) -> list[tuple[str | None, Snapshot]]:
    """The hosts that answered; each one that did not is said on stderr."""
    for name, snap, down in parts:
        if snap is None:
            print(f"gpuspawner: {name}: DOWN: {down}", file=sys.stderr)
    return [(name, snap) for name, snap, _down in parts if snap is not None]


def _done(parts: list[Part]) -> int:
    """Exit 1 when a host of ``--hosts`` did not answer (what it showed is the others')."""
    return EXIT_OK if all(snap is not None for _n, snap, _d in parts) else EXIT_PROBLEM


def _with_host(name: str | None, record: dict[str, Any]) -> dict[str, Any]:
    return {**host_field(name), **record}


def cmd_status(args, world: World) -> int:
    parts = _parts(args, world)
    lines: list[str] = []
    data: list[dict[str, Any]] = []
    for name, snap in _up(parts):
        free = snap.free_by_profile()
        held = [a for a in snap.allocations if a.holds and (a.uuids or a.gpu_count or a.slots)]
        lead = "" if name is None else f"{name}: "
        lines += [
            f"{lead}inventory: {snap.inventory.source}, {len(snap.inventory.gpus)} GPU(s), "
            f"{len(snap.inventory.migs)} MIG device(s)",
            f"{lead}allocations: {len(held)} holding devices, {len(snap.unmanaged())} "
            "unmanaged",
            f"{lead}free: " + (", ".join(f"{k} {f}/{t}" for k, (f, t) in free.items())
                               or "nothing"),
        ]
        lines += [f"{lead}problem: {p}" for p in snap.inventory.problems]
        data.append(_with_host(name, {"inventory": snap.inventory.to_json(),
                                      "holding": len(held),
                                      "unmanaged": len(snap.unmanaged()),
                                      "free": snap.free_json()}))
    _emit(args, data if args.hosts else data[0], "\n".join(lines))
    return _done(parts)


def cmd_gpus(args, world: World) -> int:
    parts = _parts(args, world)
    records: list[dict[str, Any]] = []
    table: list[Sequence[Any]] = []
    for name, snap in _up(parts):
        by_id = {a.container_id: a for a in snap.allocations}
        for d in snap.devices():
            records.append(_with_host(name, d.to_json()))
            table.append(((name,) if args.hosts else ()) + (
                d.slot, d.kind, d.profile, d.uuid, d.state, d.memory_words() or "n/a",
                len(d.processes) if d.memory_used_mib is not None or d.processes else "n/a",
                ", ".join(f"{by_id[h].user or by_id[h].container_name}" for h in d.holders)))
    header = ("slot", "kind", "profile", "uuid", "state", "memory", "processes", "holder")
    _emit(args, records, _table(table, (("host",) if args.hosts else ()) + header))
    return _done(parts)


def cmd_allocations(args, world: World) -> int:
    parts = _parts(args, world)
    records: list[dict[str, Any]] = []
    table: list[Sequence[Any]] = []
    for name, snap in _up(parts):
        for a in snap.allocations:
            records.append(_with_host(name, a.to_json()))
            table.append(((name,) if args.hosts else ()) + (
                a.user or "-", a.server or "-", a.profile or "-", ",".join(a.slots) or "-",
                a.state, "managed" if a.managed else "unmanaged",
                " ".join(f"{k}={v}" for k, v in a.ports), a.container_name))
    header = ("user", "server", "profile", "slots", "state", "kind", "ports", "container")
    _emit(args, records, _table(table, (("host",) if args.hosts else ()) + header))
    return _done(parts)


def cmd_available(args, world: World) -> int:
    """Free / total per profile: of the local engine, or with ``--hosts`` summed over every
    host that answers (what the spawn form offers), each host's beside it in the JSON."""
    parts = _parts(args, world)
    each = {name: snap.free_by_profile() for name, snap in _up(parts)}
    free = allocator.summed(each.values())
    if args.profile:
        if args.profile not in free:
            where = "any host" if args.hosts else "this host"
            print(f"no {args.profile} devices on {where} (have: {', '.join(free) or 'none'})",
                  file=sys.stderr)
            return EXIT_PROBLEM
        free = {args.profile: free[args.profile]}
        each = {name: {k: v for k, v in got.items() if k == args.profile}
                for name, got in each.items()}
    total = {k: {"free": f[0], "total": f[1]} for k, f in free.items()}
    data: dict[str, Any] = total
    rows = [(k, f[0], f[1]) for k, f in free.items()]
    if args.hosts:
        data = {"total": total, "hosts": {name: {k: {"free": f[0], "total": f[1]}
                                                 for k, f in got.items()}
                                          for name, got in each.items()}}
        rows = [("all", *row) for row in rows] + [
            (name, k, f[0], f[1]) for name, got in each.items() for k, f in got.items()]
    header = (("host",) if args.hosts else ()) + ("profile", "free", "total")
    _emit(args, data, _table(rows, header))
    return _done(parts)


def cmd_user(args, world: World) -> int:
    parts = _parts(args, world)
    up = _up(parts)
    policy = world.policy().for_user(args.name)
    used = sum(snap.usage(args.name) for _name, snap in up)
    mine = [(name, a) for name, snap in up for a in snap.of(args.name)]
    data = {"user": args.name, "equivalents": used,
            "limits": policy.limits.to_json(), "policy_sources": list(policy.sources),
            "allocations": [_with_host(name, a.to_json()) for name, a in mine]}
    limit = policy.limits.max_gpu_equivalents
    text = [f"{args.name}: {used} of "
            f"{'unlimited' if limit is None else limit} GPU-equivalents "
            f"(policy: {', '.join(policy.sources)})"]
    for name, a in mine:
        text.append(f"  {a.server or '(default)'}: {a.profile} {','.join(a.slots) or 'CPU'} "
                    f"{a.state} {a.container_name}" + ("" if name is None else f" on {name}"))
    _emit(args, data, "\n".join(text))
    if not mine:
        return EXIT_PROBLEM
    return _done(parts)


def hub_images(path: str) -> list[str]:
    """The images of the GPU profiles in a hub's ``jupyterhub_config.py`` (its
    ``profile_list``, ``image`` and ``allowed_images``, of GPUSpawner or DockerSpawner)."""
    from traitlets.config.loader import ConfigFileNotFound, PyFileConfigLoader

    from . import profiles

    directory, name = os.path.split(os.path.abspath(path))
    try:
        config = PyFileConfigLoader(name, directory).load_config()
    except ConfigFileNotFound as exc:
        raise ConfigError(f"{path}: no such hub configuration file") from exc
    except Exception as exc:  # the file is Python: whatever it raises, say where
        raise ConfigError(f"{path} cannot be loaded: {exc}") from exc
    section: dict[str, Any] = {}
    for cls in ("Spawner", "DockerSpawner", "GPUSpawner"):
        section.update(config[cls] if cls in config else {})
    raw = section.get("profile_list") or []
    if callable(raw):
        raise ConfigError(f"{path}: profile_list is a callable; give the images with --image")
    configured = section.get("image") or os.environ.get("GPUSPAWNER_IMAGE")
    allowed = section.get("allowed_images")
    try:
        listed = profiles.parse_profiles(raw)
    except profiles.ProfileError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if allowed and not callable(allowed):
        listed = profiles.with_images(listed, allowed, configured or "")
    return profiles.gpu_images(listed, configured)


class ConfigError(ValueError):
    """A hub configuration file ``doctor --config`` cannot use (exit code 2)."""


def _host_readers(args) -> list[hosts.HostReader]:
    """One reader per host of ``--hosts`` (ConfigError for a bad file or no probe image)."""
    try:
        found = hosts.load_setting(args.hosts)
    except hosts.HostsError as exc:
        raise ConfigError(str(exc)) from exc
    image = args.probe_image or os.environ.get("GPUSPAWNER_IMAGE")
    if not image:
        raise ConfigError("the GPU probe needs an image on every host (any with sh): pass "
                          "--probe-image or set GPUSPAWNER_PROBE_IMAGE or GPUSPAWNER_IMAGE")
    policy = PolicyFile(args.policy)
    return hosts.readers(found, image=image, hub_id=args.hub_id, policy=policy.current,
                         start_timeout=args.start_timeout)


def cmd_hosts(args, world: World | None) -> int:
    """Every host of ``--hosts`` read at once: up with its GPUs, holders and free devices, or
    down with the reason. Exit 1 when a host is down."""
    if not args.hosts:
        print("no hosts file: pass --hosts or set GPUSPAWNER_HOSTS", file=sys.stderr)
        return EXIT_CONFIG
    readers = _host_readers(args)
    with ThreadPoolExecutor(len(readers)) as pool:
        views = hosts.read_all(readers, pool, timeout=args.timeout)
    rows = [v.summary(r.host.url) for v, r in zip(views, readers, strict=True)]
    lines = []
    for row in rows:
        if not row["up"]:
            lines.append(f"{row['name']} ({row['url']}): DOWN: {row['down']}")
            continue
        free = ", ".join(f"{k} {v['free']}/{v['total']}" for k, v in row["free"].items())
        lines.append(f"{row['name']} ({row['url']}): {row['gpus']} GPU(s), {row['migs']} MIG "
                     f"device(s), {len(row['holders'])} holder(s); free: {free or 'none'}"
                     + "".join(f"\n  {p}" for p in row["problems"]))
    _emit(args, rows, "\n".join(lines))
    return EXIT_OK if all(row["up"] for row in rows) else EXIT_PROBLEM


def cmd_doctor(args, world: World) -> int:
    images = [i for i in (os.environ.get("GPUSPAWNER_IMAGE"), *(args.image or ())) if i]
    if args.config:
        images += hub_images(args.config)
    checks = health.run_all(world.client, world.snapshot, _port_range(args.ports), images)
    if args.hosts:
        for reader in _host_readers(args):
            checks += health.host_checks(reader)
    marks = {health.OK: "ok  ", health.WARN: "warn", health.FAIL: "FAIL"}
    _emit(args, [c.to_json() for c in checks],
          "\n".join(f"[{marks[c.status]}] {c.name}: {c.message}" for c in checks))
    return EXIT_PROBLEM if health.worst(checks) == health.FAIL else EXIT_OK


def _print_event(args, entry: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(entry))
        return
    rest = {k: v for k, v in entry.items() if k not in ("time", "event")}
    print(f"{entry.get('time')} {entry.get('event', '?'):<18} "
          + " ".join(f"{k}={v}" for k, v in rest.items()))


def cmd_events(args, world: World | None) -> int:
    if not args.events:
        print("no operation log: pass --events or set GPUSPAWNER_EVENTS", file=sys.stderr)
        return EXIT_CONFIG
    for entry in tail(args.events, args.limit):
        _print_event(args, entry)
    if not args.follow:
        return EXIT_OK
    for entry in follow(args.events):  # across rotations, from now on
        _print_event(args, entry)
        sys.stdout.flush()
    return EXIT_OK


def cmd_wait(args, world: World) -> int:
    """Wait for the GPU host after a boot (``boot.missing``): for scripts and compose that
    start the hub only when Docker, the driver and the MIG devices are there."""
    deadline = time.monotonic() + args.timeout
    said: list[str] | None = None
    while True:
        try:
            snap = world.snapshot(fresh=True)
            what = boot.missing(True, snap.inventory, args.mig or [],
                                had_gpus=args.gpus or any(a.uuids for a in snap.allocations))
        except LedgerError:
            what = [boot.DOCKER]
        if not what:
            print("the GPU host is ready")
            return EXIT_OK
        if what != said:
            print(boot.sentence(what), flush=True)
            said = what
        if time.monotonic() >= deadline:
            print(f"gpuspawner: still waiting after {args.timeout:.0f} s: {', '.join(what)}",
                  file=sys.stderr)
            return EXIT_PROBLEM
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


COMMANDS = {
    "status": (cmd_status, "one-paragraph summary: inventory, holders, free slots"),
    "gpus": (cmd_gpus, "every GPU and MIG device with its state and holder"),
    "allocations": (cmd_allocations, "every container that holds or held a device"),
    "available": (cmd_available, "free / total per MIG profile and whole GPUs"),
    "user": (cmd_user, "one user's allocations and limits"),
    "doctor": (cmd_doctor, "health checks; exits 1 when one fails"),
    "events": (cmd_events, "the operation log"),
    "wait": (cmd_wait, "wait for Docker, the NVIDIA driver and MIG devices after a boot; "
                       "exits 1 at the time-out"),
    "hosts": (cmd_hosts, "every GPU host of --hosts at once: up with its GPUs and holders, or "
                         "down with the reason; exits 1 when one is down"),
}


def parser() -> argparse.ArgumentParser:
    env = os.environ.get
    top = argparse.ArgumentParser(prog="gpuspawner", description=__doc__.splitlines()[0])
    top.add_argument("--docker-host", default=env("DOCKER_HOST"),
                     help="Docker engine URL (default: DOCKER_HOST or the local socket)")
    top.add_argument("--policy", default=env("GPUSPAWNER_POLICY"), help="policy file")
    top.add_argument("--inventory", default=env("GPUSPAWNER_INVENTORY", "auto"),
                     choices=inventory.SOURCES, help="inventory source")
    top.add_argument("--topology", default=env("GPUSPAWNER_TOPOLOGY"),
                     help="static topology file")
    top.add_argument("--events", default=env("GPUSPAWNER_EVENTS"), help="operation log file")
    top.add_argument("--ports", default=env("GPUSPAWNER_PORTS", "40000-40999"),
                     help="host port range, e.g. 40000-40999")
    top.add_argument("--hub-id", default=env("GPUSPAWNER_HUB_ID") or DEFAULT_HUB_ID,
                     help="the hub's GPUSpawner.hub_id: whose containers count against its "
                     f"users' limits (default: GPUSPAWNER_HUB_ID or {DEFAULT_HUB_ID})")
    top.add_argument("--start-timeout", type=_seconds,
                     default=env("GPUSPAWNER_START_TIMEOUT") or str(DEFAULT_START_TIMEOUT),
                     help="the hub's Spawner.start_timeout: a container created this recently "
                     "and not started is a spawn in flight (default: GPUSPAWNER_START_TIMEOUT "
                     f"or JupyterHub's {DEFAULT_START_TIMEOUT:.0f} s)")
    top.add_argument("--busy-memory-mib", type=int,
                     default=int(env("GPUSPAWNER_BUSY_MEMORY_MIB") or 0),
                     help="the hub's GPUSpawner.busy_memory_mib: memory in use above which a "
                     "device no running container holds is busy (default: "
                     "GPUSPAWNER_BUSY_MEMORY_MIB or 1024)")
    top.add_argument("--dcgm-url", default=env("GPUSPAWNER_DCGM_URL") or None,
                     help="a dcgm-exporter's /metrics URL: utilization per MIG device, which "
                     "NVML does not give (default: GPUSPAWNER_DCGM_URL; none: n/a)")
    top.add_argument("--hosts", default=env("GPUSPAWNER_HOSTS") or None, metavar="FILE",
                     help="a YAML file of GPU hosts (name: Docker endpoint, or name: {url:, "
                     "tls_ca:, tls_cert:, tls_key:}): the hosts command, doctor, and status, "
                     "gpus, allocations, available and user over every host (default: "
                     "GPUSPAWNER_HOSTS)")
    top.add_argument("--probe-image", default=env("GPUSPAWNER_PROBE_IMAGE") or None,
                     metavar="IMAGE",
                     help="an image on every host (any with sh) that runs the GPU probe "
                     "(default: GPUSPAWNER_PROBE_IMAGE, else GPUSPAWNER_IMAGE)")
    sub = top.add_subparsers(dest="command", required=True)
    for name, (_, what) in COMMANDS.items():
        command = sub.add_parser(name, help=what, description=what)
        command.add_argument("--json", action="store_true", help="print JSON")
        if name == "available":
            command.add_argument("--profile", help="one MIG profile, or 'gpu'")
        if name == "user":
            command.add_argument("name")
        if name == "events":
            command.add_argument("--follow", "-f", action="store_true")
            command.add_argument("--limit", type=int, default=50)
        if name == "doctor":
            command.add_argument("--image", action="append", metavar="IMAGE",
                                 help="a profile image to check against this driver's CUDA "
                                 "(repeatable; GPUSPAWNER_IMAGE is always checked)")
            command.add_argument("--config", metavar="FILE",
                                 default=env("GPUSPAWNER_HUB_CONFIG"),
                                 help="the hub's jupyterhub_config.py: check the image of "
                                 "every GPU profile and image choice in it (default: "
                                 "GPUSPAWNER_HUB_CONFIG)")
        if name == "hosts":
            command.add_argument("--timeout", type=_seconds, default=30.0,
                                 help="a host that has not answered after this long is down "
                                 "(seconds, or 1m)")
        if name == "wait":
            command.add_argument("--timeout", type=_seconds, default=600.0,
                                 help="give up after this long (seconds, or 10m)")
            command.add_argument("--gpus", action="store_true",
                                 help="this host has NVIDIA GPUs: wait for the driver too")
            command.add_argument("--mig", action="append", metavar="PROFILE",
                                 help="wait for MIG devices of this profile (repeatable) "
                                 "while a MIG-enabled GPU has none")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    handler = COMMANDS[args.command][0]
    if args.command == "events":
        return handler(args, None)
    try:
        if args.command == "hosts":  # every host its own engine: the local one may be none
            return handler(args, None)
        world = World(docker_host=args.docker_host, policy=args.policy,
                      inventory_source=args.inventory, topology=args.topology,
                      start_timeout=args.start_timeout, hub_id=args.hub_id,
                      busy_memory_mib=args.busy_memory_mib, dcgm_url=args.dcgm_url)
        world.policy()  # a broken policy file is a configuration error (2), for doctor too
        if args.command == "wait":
            return handler(args, world)  # an engine that is not up yet is what it waits for
        world.client  # noqa: B018 - connect now: an engine that is down is exit code 3
        return handler(args, world)
    except (PolicyError, ConfigError) as exc:
        print(f"gpuspawner: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except InventoryError as exc:
        print(f"gpuspawner: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except LedgerError as exc:
        if args.command == "doctor":
            check = health.Check("docker", health.FAIL, str(exc))
            _emit(args, [check.to_json()], f"[FAIL] docker: {exc}")
        else:
            print(f"gpuspawner: {exc}", file=sys.stderr)
        return EXIT_DOCKER if args.command != "doctor" else EXIT_PROBLEM
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
