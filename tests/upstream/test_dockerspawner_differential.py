"""GPUSpawner against DockerSpawner's own test suite: a differential test.

The upstream tests of the installed dockerspawner (downloaded as its sdist, never kept here)
run twice on the private engine: with DockerSpawner, then with GPUSpawner swapped in for it.
Every test that passes with DockerSpawner must pass with GPUSpawner, except those listed in
``EXPECTED_DIFFERENCES`` with the reason. A test that fails with both (no registry here, a
JupyterHub rule the upstream test predates) says nothing about GPUSpawner and counts for
neither. The table of every upstream test with both results is printed, pass or fail.
"""

from __future__ import annotations

import fnmatch
import time
from pathlib import Path
from typing import Any

import pytest

from .dockerspawner_suite import (
    SuiteRun,
    image_tags,
    remove_containers,
    run_suite,
    sdist,
    tag_images,
    unpack,
)

pytestmark = pytest.mark.docker

#: test id (fnmatch pattern) -> why GPUSpawner may fail it where DockerSpawner passes.
EXPECTED_DIFFERENCES: dict[str, str] = {
    "test_deprecations.py::test_deprecated_config": (
        "the expected warning hard-codes the class name ('DockerSpawner.image_whitelist is "
        "deprecated ...'); GPUSpawner's says 'GPUSpawner.image_whitelist': an artefact of "
        "the test, the deprecated setting itself works"
    ),
}

#: Below this share of upstream tests passing with DockerSpawner the harness is broken.
MIN_DOCKERSPAWNER_PASS_RATIO = 0.5

#: Seconds each run of the upstream suite may take.
RUN_TIMEOUT = 420


def expected_reason(test_id: str) -> str | None:
    for pattern, reason in EXPECTED_DIFFERENCES.items():
        if fnmatch.fnmatchcase(test_id, pattern):
            return reason
    return None


def compare(ds: SuiteRun, gpu: SuiteRun) -> dict[str, Any]:
    """The rows of the table and the verdicts: unexpected differences and stale entries."""
    rows, unexpected, differing = [], [], []
    for test_id in sorted(set(ds.results) | set(gpu.results)):
        a = ds.results.get(test_id, "missing")
        b = gpu.results.get(test_id, "missing")
        reason = expected_reason(test_id)
        if a == "passed" and b != "passed":
            differing.append(test_id)
            if reason:
                note = f"expected difference: {reason}"
            else:
                note = "UNEXPECTED: passes with DockerSpawner only"
                unexpected.append(test_id)
        elif a == b == "passed":
            note = ""
        elif b == "passed":
            note = "passes with GPUSpawner only"
        elif a == "skipped" and b == "skipped":
            note = "skipped with both"
        else:
            note = "fails with both: counts for neither"
        rows.append((test_id, a, b, note))
    stale = [pattern for pattern in EXPECTED_DIFFERENCES
             if not any(fnmatch.fnmatchcase(t, pattern) for t in differing)]
    return {"rows": rows, "unexpected": unexpected, "stale": stale}


def render(ds: SuiteRun, gpu: SuiteRun, verdict: dict[str, Any], version: str) -> str:
    rows = verdict["rows"]
    width = max([len("upstream test")] + [len(r[0]) for r in rows])
    lines = [
        f"DockerSpawner {version}'s own tests: DockerSpawner vs GPUSpawner "
        f"({ds.wall_s:.0f} s + {gpu.wall_s:.0f} s)",
        f"{'upstream test':<{width}}  {'DockerSpawner':<13}  {'GPUSpawner':<10}  note",
        f"{'-' * width}  {'-' * 13}  {'-' * 10}  ----",
    ]
    lines += [f"{t:<{width}}  {a:<13}  {b:<10}  {n}".rstrip() for t, a, b, n in rows]
    lines.append(
        f"totals: DockerSpawner {ds.count('passed')}/{len(ds.results)} passed, "
        f"GPUSpawner {gpu.count('passed')}/{len(gpu.results)} passed; "
        f"{len(verdict['unexpected'])} unexpected difference(s)"
    )
    failing = [(t, a, b) for t, a, b, _ in rows if a != "passed" or b != "passed"]
    if failing:
        lines.append("")
        lines.append("failure messages (first line; full logs: "
                     f"{ds.log} and {gpu.log}):")
        for test_id, a, b in failing:
            for name, run, status in (("DockerSpawner", ds, a), ("GPUSpawner", gpu, b)):
                if status not in ("passed", "missing") and run.messages.get(test_id):
                    lines.append(f"  {test_id} [{name}, {status}]: {run.messages[test_id]}")
    return "\n".join(lines)


def test_gpuspawner_passes_dockerspawners_own_tests(
    engine: Any, singleuser_image: str, base_image: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    started = time.monotonic()
    archive = sdist()
    suite = tmp_path / "suite"
    unpack(archive, suite)
    tags = image_tags(singleuser_image, base_image)
    tag_images(engine.client, tags)

    runs = {}
    for spawner in ("dockerspawner", "gpuspawner"):
        remove_containers(engine.client)
        runs[spawner] = run_suite(
            spawner, suite, tmp_path / spawner, docker_host=engine.base_url,
            hub_ip=engine.gateway, image_tags=tags, timeout=RUN_TIMEOUT,
        )
    remove_containers(engine.client)
    ds, gpu = runs["dockerspawner"], runs["gpuspawner"]

    version = archive.name.removeprefix("dockerspawner-").removesuffix(".tar.gz")
    verdict = compare(ds, gpu)
    table = render(ds, gpu, verdict, version)
    table += f"\nwall time of the differential test: {time.monotonic() - started:.0f} s"
    (tmp_path / "differential.txt").write_text(table + "\n")
    with capsys.disabled():  # shown on success too; on failure the assertion carries it
        print("\n" + table)

    problems = []
    if ds.count("passed") < MIN_DOCKERSPAWNER_PASS_RATIO * len(ds.results):
        problems.append(
            f"DockerSpawner passed only {ds.count('passed')} of {len(ds.results)} upstream "
            f"tests: the harness is broken, not GPUSpawner (log: {ds.log})"
        )
    if verdict["unexpected"]:
        problems.append("GPUSpawner fails upstream tests that DockerSpawner passes: "
                        + ", ".join(verdict["unexpected"]))
    if verdict["stale"]:
        problems.append("EXPECTED_DIFFERENCES entries that no longer differ (remove them): "
                        + ", ".join(verdict["stale"]))
    assert not problems, "\n".join(problems) + "\n\n" + table
