"""The differential test's own logic, without Docker: JUnit parsing and the verdicts."""

from __future__ import annotations

from pathlib import Path

from .dockerspawner_suite import SuiteRun, parse_junit
from .test_dockerspawner_differential import EXPECTED_DIFFERENCES, compare

JUNIT = """\
<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
  <testcase classname="test_dockerspawner" name="test_ok[a.b]" time="0.1"/>
  <testcase classname="test_dockerspawner" name="test_bad" time="0.1">
    <failure message="AssertionError: assert [...] == [...]&#10;  At index 0 diff: 1 != 2">
      trace</failure>
  </testcase>
  <testcase classname="test_dockerspawner" name="test_setup" time="0.1">
    <error message="failed on setup with &quot;KeyError&quot;">trace</error>
  </testcase>
  <testcase classname="test_dockerspawner" name="test_both" time="0.1">
    <failure message="call failed">x</failure><error message="teardown failed">y</error>
  </testcase>
  <testcase classname="test_dockerspawner" name="test_xfail" time="0.1">
    <skipped type="pytest.xfail" message="podman"/>
  </testcase>
  <testcase classname="" name="test_broken" time="0.1">
    <error message="collection failure">z</error>
  </testcase>
</testsuite></testsuites>
"""


def test_parse_junit(tmp_path: Path) -> None:
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    results, messages = parse_junit(path)
    assert results == {
        "test_dockerspawner.py::test_ok[a.b]": "passed",
        "test_dockerspawner.py::test_bad": "failed",
        "test_dockerspawner.py::test_setup": "error",
        "test_dockerspawner.py::test_both": "failed",
        "test_dockerspawner.py::test_xfail": "skipped",
        "test_broken": "error",
    }
    assert messages["test_dockerspawner.py::test_bad"] == (
        "AssertionError: assert [...] == [...] | At index 0 diff: 1 != 2"
    )
    assert messages["test_dockerspawner.py::test_both"] == "call failed"


def run(spawner: str, **results: str) -> SuiteRun:
    return SuiteRun(spawner, {f"t.py::{name}": status for name, status in results.items()})


def test_compare_counts_only_dockerspawner_passes() -> None:
    expected = next(iter(EXPECTED_DIFFERENCES))
    ds = run("dockerspawner", same="passed", gpu_only_fail="passed", both="failed",
             gpu_only_pass="failed")
    ds.results[expected] = "passed"
    gpu = run("gpuspawner", same="passed", gpu_only_fail="error", both="failed",
              gpu_only_pass="passed")
    gpu.results[expected] = "failed"
    verdict = compare(ds, gpu)
    assert verdict["unexpected"] == ["t.py::gpu_only_fail"]
    assert verdict["stale"] == []
    notes = {row[0]: row[3] for row in verdict["rows"]}
    assert notes["t.py::both"] == "fails with both: counts for neither"
    assert notes["t.py::gpu_only_pass"] == "passes with GPUSpawner only"
    assert notes[expected].startswith("expected difference")


def test_compare_finds_stale_exceptions_and_missing_tests() -> None:
    expected = next(iter(EXPECTED_DIFFERENCES))
    ds = run("dockerspawner", gone="passed")
    ds.results[expected] = "passed"
    gpu = run("gpuspawner")
    gpu.results[expected] = "passed"
    verdict = compare(ds, gpu)
    assert verdict["stale"] == [expected]
    assert verdict["unexpected"] == ["t.py::gone"]  # missing with GPUSpawner: not a pass
