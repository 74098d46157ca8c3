#!/usr/bin/env python3
"""Run the fault suite (tests/faults) at full size and write its table to docs/reliability.md.

    sudo .venv/bin/python scripts/reliability.py            # full size, about an hour
    sudo .venv/bin/python scripts/reliability.py --ci       # the CI sizes, minutes
    sudo .venv/bin/python scripts/reliability.py --from-rows DIR   # only write the table

Each test of tests/faults writes its row (JSON) into ``$GPUSPAWNER_RELIABILITY_OUT`` before
it asserts that every column is 0, so a failing scenario still has its row, and a run cut
short by ``--deadline`` still has the rows that finished: the table says which did not.
Runs as root (the tests start a private dockerd); arguments after ``--`` go to pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "reliability.md"
RUN_FILE = "run.json"  # beside the rows: when the run started, how long it took

#: Row names, in the issue's order, with the words the table shows.
SCENARIOS = {
    "two-hubs": "1. Two hubs, everyone presses Start at once",
    "churn": "2. Churn through the API, holders made by hand",
    "engine-restart": "3. Docker engine restarted mid-spawn",
    "hub-kill": "4. Hub killed (SIGKILL) mid-spawn, restarted",
    "nvml-lost-gpu": "5a. NVML: a GPU lost mid-read",
    "nvml-absent": "5b. NVML absent (no driver library)",
    "nvml-slow": "5c. NVML slow (2 s per call)",
    "log-disk-full": "6a. Operation log: disk full",
    "log-read-only": "6b. Operation log: read-only",
    "port-squatter": "7. A host process on the lowest port, unseen by the hub",
    "power-cycle": "8. Power-cycle: MIG devices re-created with new UUIDs",
}
COLUMNS = ("double_holders", "orphans", "servers_lost", "data_lost")

#: What each scenario does (tests/faults/test_*.py say it in code).
WHAT = """\
1. **Two hubs** (`test_two_hubs.py`): hubs `faults-a` and `faults-b` (their own `hub_id` and
   container prefix, the same user names) on one engine and one host: two A100s cut into
   7 + 2 `1g.10gb` slices. Each round every user of both hubs presses Start (`mig-1g`) at the
   same moment; the winners write their marker files, every ready server must answer, then
   all stop (no hold). Later rounds start users' stopped containers again (reused, or
   replaced when their slice went to someone else).
2. **Churn** (`test_churn.py`): one hub on four A100s (7 × 1g; 3g + 2g + 2 × 1g; 2 × 3g; one
   whole GPU). Operations drawn from a fixed seed on the default and a named server of each
   user, two at a time: a stopped server starts with a random profile (CPU, 1g, 3g, whole
   GPU); a running one stops, restarts (same or another profile) or is removed (deleted
   through the API, its container removed by the admin). Every 50 operations, with nothing in
   flight, a container made by hand (`docker run --gpus device=<uuid>`, no labels) takes a
   MIG device that no container names, for the next 20 operations. Every server that starts
   writes markers; every server the hub lists must answer at each holder made by hand.
3. **Engine restart** (`test_restarts.py`): servers running (3g, whole GPU, 1g); each round
   newcomers press Start (1g or CPU) and 0.3 to 3 s later the engine is stopped (it stops
   every container) and started again; once the hub has polled, the users whose server
   stopped press Start again, as do newcomers whose spawn broke (that must work); the round's
   newcomers then stop.
4. **Hub killed** (`test_restarts.py`): the same rounds with the hub killed by SIGKILL and
   restarted (same database; its proxy ended and started again); orphans are counted after
   each restart, before anyone presses Start again.
5. **NVML** (`test_nvml.py`): (a) the GPU under a running server is lost (`GpuIsLost` on it and
   its MIG devices) while reads are in flight (each call 10 ms, a read about 2 s) and users
   press Start (CPU, 1g, 3g, whole GPU): every spawn must work, none on the lost GPU; (b) the
   hub restarted without an NVML library (nvidia-ml-py, no libnvidia-ml), `inventory_source
   = "auto"`: running servers stay, spawns of every size work through `nvidia-smi`; (c) every
   NVML call takes 2 s (about 200 calls, so 400 s, per read of this host), from 3 s before
   the users press Start: spawns of every size must still work.
6. **Operation log** (`test_event_log.py`): `events_file` on a 64 KiB tmpfs, (a) filled (the
   disk, then the log's last page with blank lines) or (b) remounted read-only, after servers
   started; spawns of every size must work, the log must not grow and the hub must say so.
7. **Port squatter** (`test_port_squatter.py`): a host process listens on the first port of
   `port_range`; the hub's bind probe is blinded, as in a container's network namespace;
   users press Start at once, each server with an extra published port: every spawn must
   work, on a port of its own, never the squatted one.
8. **Power-cycle** (`test_power_cycle.py`): servers of every size with markers; the hub is
   killed and the engine stopped; the MIG devices are gone (MIG mode stays on); the engine
   and the hub start and everyone presses Start at once; 8 s later the boot script re-creates
   the layout with new UUIDs in another order: every restart must land on a device that
   exists, with the user's files.
"""
#: What the suite found in gpuspawner, and what changed because of it.
FOUND = """\
- **Two hubs (row 1) found devices run by two containers at once.** The race rule compared
  Docker's `Created` times, also between two running containers: a stopped container started
  again is old, so it "won" against a new container on its slice that had finished its checks
  long before, and both kept running (up to 11 ready servers on 9 slices in a round). And a
  stopped container is in nobody's check (it neither runs nor starts), so another hub could
  pass its check while it was being started. Now, between two running containers the earlier
  `StartedAt` wins (the later starter checks after its own start, so it always sees the pair);
  a stopped container started again first gets a place-holder (`<name>-starting`, created and
  never started, with its labels and device requests) that races for it as a new container
  does; within one hub the planner counts such a start as a spawn in flight. The next full
  run still saw one device held twice for a moment: a check had listed the place-holder,
  which went away (its container now ran) before the check inspected it, and a rival that
  went away was taken for one that gave way. A check now reads again when a rival vanished,
  and a created container's age is Docker's `Created`, not its labels' (a place-holder
  carries its container's labels, creation time included).
- **NVML slow (row 5c) failed every spawn**: a read of this host at 2 s per call takes
  minutes, and every spawn, CPU ones included, waited for it. No caller now waits longer than
  `inventory_timeout` (10 s): it gets the last inventory read, with a problem saying how old
  it is (a device gone since fails its start with "unknown device", which reads again).
"""

#: The test files, run in this order (pytest keeps the order given): the long churn last, so
#: a run cut short by --deadline loses the fewest rows. The table keeps the issue's order.
FILES = [f"tests/faults/{name}.py" for name in (
    "test_two_hubs", "test_restarts", "test_nvml", "test_event_log", "test_port_squatter",
    "test_power_cycle", "test_churn")]

#: Detail counters worth a word under the table, with their words.
COUNTERS = [
    ("ready", "ready"), ("refused", "refused"), ("failed", "failed"),
    ("spawns_broken", "spawns the fault broke"), ("started_again", "started again"),
    ("second_try_ready", "second tries ready"), ("second_try_failed", "second tries failed"),
    ("second_try_not_needed", "finished unseen"), ("made_by_hand", "holders made by hand"),
    ("marker_files", "marker files"), ("servers_checked", "servers checked at the end"),
    ("settle_seconds", "settle s"),
]


def machine() -> str:
    """The machine in words: CPU, cores, memory, kernel, Docker, JupyterHub."""
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "?"
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass

    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    venv = REPO / ".venv" / "bin"
    return (f"{os.cpu_count()} cores ({model}), {memory} memory, Linux {platform.release()}, "
            f"{version(['dockerd', '--version'])}, JupyterHub "
            f"{version([str(venv / 'jupyterhub'), '--version'])}")


def read_rows(directory: Path) -> dict[str, dict[str, Any]]:
    rows = {}
    for path in sorted(directory.glob("*.json")):
        try:
            row = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(row, dict) and "scenario" in row:
            rows[row["scenario"]] = row
    return rows


def minutes(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def notes_of(row: dict[str, Any]) -> str:
    details = row.get("details") or {}
    words = [f"{details[key]} {text}" for key, text in COUNTERS if details.get(key)]
    if row.get("failed_checks"):
        words.append("**failed checks**: " + "; ".join(row["failed_checks"]))
    for key in ("double_holders_seen", "orphans_seen", "servers_lost_seen", "data_lost_seen",
                "invalid_devices"):
        seen = details.get(key)
        if seen:
            shown = seen if isinstance(seen, list) else [f"{k}: {v}" for k, v in seen.items()]
            words.append(f"**{key.replace('_', ' ')}**: " + "; ".join(map(str, shown[:5])))
    return ", ".join(words)


def table(rows: dict[str, dict[str, Any]], expected: list[str]) -> str:
    lines = [
        "| scenario | size | double holders | orphans | servers lost | data lost | time |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in expected:
        row = rows.get(name)
        title = SCENARIOS.get(name, name)
        if row is None:
            lines.append(f"| {title} | no row: not run or not finished | – | – | – | – | – |")
            continue
        cells = [str(row[c]) if row[c] == 0 else f"**{row[c]}**" for c in COLUMNS]
        if row.get("failed_checks"):
            title += " (**other checks failed**, see the notes)"
        lines.append(f"| {title} | {row['size']} | " + " | ".join(cells)
                     + f" | {minutes(row['seconds'])} |")
    return "\n".join(lines)


def document(rows: dict[str, dict[str, Any]], command: str, started: str, wall: float,
             full: bool, unfinished_reason: str = "", note: str = "") -> str:
    expected = list(SCENARIOS)
    missing = [name for name in expected if name not in rows]
    failing = [name for name in expected if name in rows and any(rows[name][c] for c in COLUMNS)]
    checks = [name for name in expected if name in rows and rows[name].get("failed_checks")]
    verdict = ("Every column is 0 in every row" + (" that ran." if missing else ".")
               if not failing else "Not every column is 0: see the numbers in bold and the notes.")
    if checks:
        verdict += (f" {len(checks)} row(s) failed a check of their own beyond the four "
                    "columns (see the notes).")
    if missing:
        verdict += (f" {len(missing)} scenario(s) have no row"
                    + (f" ({unfinished_reason})" if unfinished_reason else " (not run)") + ".")
    polls = {(r.get("details") or {}).get("poll_interval") for r in rows.values()} - {None}
    poll = "/".join(str(p) for p in sorted(polls)) or "3"
    notes = "\n".join(f"- **{SCENARIOS.get(name, name)}**: {notes_of(rows[name])}"
                      for name in expected if name in rows)
    return f"""# Reliability: faults, load and power-cycles

The promises (no device is ever used by two containers; nothing a user made is ever lost;
nothing is left holding a device; a server the hub says runs, runs) measured under the faults
a shared GPU host meets. Each row is one test of `tests/faults/` run against a real JupyterHub
with GPUSpawner, a real private Docker engine and the simulated NVIDIA host
([testing.md](testing.md)). The same tests run in CI (`bash scripts/test.sh`) at smaller
sizes and with a stand-in for the single-user server (tests/faults/sizes.py says why); the
full-size run here uses the real `jupyterhub-singleuser` unless a size says "stand-in".

{verdict}

{table(rows, expected)}

Run {started} UTC, {"full size" if full else "CI size"}, {minutes(wall)} in all, on
{machine()}.{" " + note if note else ""} Reproduce (as root, after `bash scripts/setup.sh`):

```sh
{command}
```

## What the suite found

{FOUND}
## The scenarios

{WHAT}
## What each column counts

- **double holders**: devices that two running containers hold at the same moment, read from
  Docker alone: the `HostConfig.DeviceRequests` of every running container, whoever made it,
  where a whole GPU overlaps every MIG device on it (both ways). Read every half second during
  the scenario by a thread with its own Docker client, and once more after it settled; the
  number is the distinct devices ever seen held twice.
- **orphans**: after the scenario settled, running containers that hold a device and that no
  server owns: made by one of the scenario's hubs (`ds01.hub`) for a user/server that hub's
  REST API lists neither as running nor as pending, or holding a device without any hub's
  labels and not made by the test itself (the churn's `docker run --gpus` holders are the
  test's). Where the scenario restarts the hub, orphans are also counted after each restart,
  before anyone presses Start again.
- **servers lost**: servers a hub said were ready, and that the test did not stop, that the
  hub no longer lists as ready, or that do not answer `/user/<name>/[<server>/]api/status`
  through the proxy with 200 (retried for 20 s), at checks during the scenario and at its end.
  Where the fault itself stops every container (an engine restart without live-restore, a
  power-cycle), their users press Start again once; a server counts as lost if that does not
  bring it back.
- **data lost**: each user writes marker files into their container before the fault, outside
  any volume: `/home/jovyan/marker-<n>.txt` as the notebook user and `/opt/markers/marker-<n>.txt`
  as root. After the scenario each is read back (Docker's archive API) from the user's
  container, running or stopped, possibly a replacement, or from the image gpuspawner saved it
  to when there is no container; a file missing or different counts once. Files of a server
  the user removed on purpose (the churn's "remove") are not expected.

**Settled** means: no server of any of the scenario's hubs is pending; two of the hubs' poll
intervals ({poll} s each in these hubs, JupyterHub's default being 30 s) plus 2 s have passed since
the last fault, so every hub polled every server after it (a hub that was just restarted
polled every server before it answered, so 2 s suffice there); and two readings 2 s apart
(every hub's servers with their ready/pending flags, and the running containers that hold a
device) agree. A hold after stop (`gpu_hold_after_stop`) is 0 in these hubs, so a stopped
container holds nothing and is never an orphan.

## Notes per row

{notes}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ci", action="store_true", help="the CI sizes, not the full ones")
    parser.add_argument("--rows", type=Path, help="where the rows go (default: a temp dir)")
    parser.add_argument("--from-rows", type=Path, help="write the table from these rows only")
    parser.add_argument("--out", type=Path, default=DOC, help=f"default: {DOC}")
    parser.add_argument("--deadline", type=float, default=0,
                        help="seconds after which the run is cut short (0: none)")
    parser.add_argument("--note", default="", help="a sentence about the run, printed with it")
    parser.add_argument("pytest_args", nargs="*", help="after --: more pytest arguments")
    args = parser.parse_args(argv)
    full = not args.ci
    command = "sudo .venv/bin/python scripts/reliability.py" + ("" if full else " --ci")
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    began = time.monotonic()
    reason = ""
    if args.from_rows:
        rows_dir = args.from_rows
        rows = read_rows(rows_dir)
        try:  # what the run that made the rows wrote about itself
            run = json.loads((rows_dir / RUN_FILE).read_text())
        except (OSError, ValueError):
            stamps = sorted(r.get("finished_at", "") for r in rows.values())
            run = {"started": stamps[0].replace("T", " ")[:16] if stamps else started,
                   "wall": sum(r.get("seconds", 0) for r in rows.values()),
                   "full": all(r.get("full") for r in rows.values()) if rows else full}
        started, wall, full = run["started"], run["wall"], run["full"]
        reason = run.get("reason", "")
        command = run.get("command", command)
        code = 0
    else:
        rows_dir = args.rows or Path(tempfile.mkdtemp(prefix="gpuspawner-reliability-"))
        rows_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, GPUSPAWNER_RELIABILITY_OUT=str(rows_dir))
        env["GPUSPAWNER_FAULTS_FULL"] = "1" if full else "0"
        env.setdefault("GPUSPAWNER_TEST_ROOT", "/var/lib/gpuspawner-faults")
        pytest = [sys.executable, "-m", "pytest", *FILES, "-p", "no:cacheprovider",
                  "-q", "-rA", *args.pytest_args]
        print("running:", shlex.join(pytest), f"(rows in {rows_dir})", flush=True)
        # SIGINT as pytest knows it (a background shell may have left it ignored): at the
        # deadline pytest is interrupted the way Ctrl-C does it, so its fixtures still stop
        # the hubs and the private engine they started.
        proc = subprocess.Popen(pytest, cwd=REPO, env=env, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            code = proc.wait(args.deadline or None)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(300)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait(60)
            code = 124
            reason = f"the run was cut short after {minutes(args.deadline)}"
        wall = time.monotonic() - began
        rows = read_rows(rows_dir)
        (rows_dir / RUN_FILE).write_text(json.dumps({
            "started": started, "wall": round(wall), "full": full, "reason": reason,
            "command": command, "exit": code}) + "\n")
    args.out.write_text(document(rows, command, started, wall, full, reason, args.note))
    print(f"wrote {args.out} ({len(rows)} rows from {rows_dir})")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
