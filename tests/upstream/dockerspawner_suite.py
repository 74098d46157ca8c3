"""Run DockerSpawner's own tests (from its PyPI sdist) with a chosen spawner class.

GPUSpawner claims to be a drop-in DockerSpawner, so the upstream suite is a free, independent
specification of what that means. Nothing of it is kept in this repository: the sdist of the
*installed* dockerspawner version is downloaded at test time (cached in the test cache, under a
lock), and only its two test modules about ``DockerSpawner`` are unpacked into a temporary
directory, next to our own ``conftest.py`` (``upstream_conftest.py``: the sdist ships none) and
a ``pytest.ini``. Each run is a separate ``python -m pytest`` process (so the class swap in the
conftest cannot leak), writing JUnit XML that ``parse_junit`` reads back.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import docker

from ..images import _locked, cache_dir

HERE = Path(__file__).resolve().parent
CONFTEST = HERE / "upstream_conftest.py"

#: The upstream modules that test ``DockerSpawner`` itself (test_swarmspawner.py and
#: test_systemuserspawner.py are about other classes).
TEST_MODULES = ("test_dockerspawner.py", "test_deprecations.py")

#: What the spawner-under-test is called in ``UPSTREAM_SPAWNER``.
SPAWNERS = ("dockerspawner", "gpuspawner")

#: Container names (and so the clean-up) of the upstream tests: their conftest's prefix.
PREFIX = "dockerspawner-test"

# The upstream pyproject's settings, minus ``--maxfail=1`` (we want every result) and with
# tests on the module's loop: jupyterhub's ``app`` fixture is module-scoped, and the hub it
# starts must run on the loop the tests await on.
PYTEST_INI = """\
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = module
asyncio_default_test_loop_scope = module
markers =
    role
    user
    slow
    group
    services
"""

_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
               "ALL_PROXY")


class SuiteError(RuntimeError):
    """The upstream suite could not be fetched or run (not: a test failed)."""


def dockerspawner_version() -> str:
    return metadata.version("dockerspawner")


def default_image() -> str:
    """DockerSpawner's default ``image`` (``quay.io/jupyterhub/singleuser:<hub x.y>``)."""
    import dockerspawner

    return str(dockerspawner.DockerSpawner.class_traits()["image"].default_value)


def image_tags(singleuser_image: str, base_image: str) -> dict[str, str]:
    """Image names the upstream tests use (none can be pulled here) -> the local image to tag
    under that name: a Jupyter single-user image, and busybox (sh, ls, sleep: the base)."""
    return {
        default_image(): singleuser_image,
        "quay.io/jupyterhub/singleuser:4.0": singleuser_image,
        "quay.io/jupyterhub/singleuser:4": singleuser_image,
        "busybox:1.29.1": base_image,
    }


def tag_images(client: docker.DockerClient, tags: Mapping[str, str]) -> None:
    """Tag each source image under its upstream name, unless it already is that image."""
    for name, source in tags.items():
        wanted = client.images.get(source)
        try:
            if client.images.get(name).id == wanted.id:
                continue
        except docker.errors.ImageNotFound:
            pass
        repository, _, tag = name.rpartition(":")
        wanted.tag(repository, tag)


# --------------------------------------------------------------------------- the sdist


def sdist(version: str | None = None, cache: Path | None = None) -> Path:
    """The dockerspawner sdist of ``version`` (default: the installed one), downloaded once
    with pip into the test cache and reused from there."""
    version = version or dockerspawner_version()
    cache = cache or cache_dir()
    target = cache / f"dockerspawner-sdist-{version}"
    with _locked(cache / f"dockerspawner-sdist-{version}.lock"):
        found = sorted(target.glob("dockerspawner-*.tar.gz"))
        if found:
            return found[0]
        work = Path(tempfile.mkdtemp(prefix="dockerspawner-sdist-", dir=cache))
        try:
            argv = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--no-binary", ":all:", "--dest", str(work), f"dockerspawner=={version}"]
            # This machine's pip config pins a constraints file; a download needs none of it.
            env = {**os.environ, "PIP_CONSTRAINT": "", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
            print(f"upstream: pip download dockerspawner=={version} sdist (once)",
                  file=sys.stderr)
            done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False,
                                  timeout=300)
            found = sorted(work.glob("dockerspawner-*.tar.gz"))
            if done.returncode != 0 or not found:
                raise SuiteError(f"pip download of the dockerspawner {version} sdist failed "
                                 f"({done.returncode}):\n{done.stdout}{done.stderr}")
            target.mkdir(exist_ok=True)
            os.replace(found[0], target / found[0].name)
            return target / found[0].name
        finally:
            shutil.rmtree(work, ignore_errors=True)


def unpack(archive: Path, dest: Path, modules: tuple[str, ...] = TEST_MODULES) -> list[Path]:
    """Write the upstream test ``modules`` from ``archive``, our conftest and a pytest.ini
    into ``dest``; returns the test files."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    with tarfile.open(archive) as tar:
        members = {Path(m.name).relative_to(Path(m.name).parts[0]).as_posix(): m
                   for m in tar.getmembers() if m.isfile() and len(Path(m.name).parts) > 1}
        for module in modules:
            member = members.get(f"tests/{module}")
            if member is None:
                raise SuiteError(f"{archive.name} has no tests/{module}")
            handle = tar.extractfile(member)
            assert handle is not None
            (dest / module).write_bytes(handle.read())
            written.append(dest / module)
    shutil.copyfile(CONFTEST, dest / "conftest.py")
    (dest / "pytest.ini").write_text(PYTEST_INI)
    return written


# --------------------------------------------------------------------------- running


@dataclass
class SuiteRun:
    """One run of the upstream suite: results by test id, and what to read when it failed."""

    spawner: str
    results: dict[str, str]
    messages: dict[str, str] = field(default_factory=dict)
    returncode: int = 0
    wall_s: float = 0.0
    log: Path | None = None

    def count(self, status: str) -> int:
        return sum(1 for value in self.results.values() if value == status)


def _test_id(classname: str, name: str) -> str:
    if not classname:  # a collection error: the name is the module's
        return name
    return f"{classname.replace('.', '/')}.py::{name}"


def parse_junit(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """JUnit XML -> ({test id: passed|failed|error|skipped}, {test id: first message line}).

    A test whose call failed and whose teardown errored counts as failed."""
    results: dict[str, str] = {}
    messages: dict[str, str] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = _test_id(case.get("classname", ""), case.get("name", ""))
        status, message = "passed", ""
        for kind in ("skipped", "error", "failure"):  # later ones win
            element = case.find(kind)
            if element is not None:
                status = {"failure": "failed"}.get(kind, kind)
                message = element.get("message") or (element.text or "").strip()
        if results.get(test_id) == "failed":  # the same id twice: keep the failure
            continue
        results[test_id] = status
        if message.strip():
            messages[test_id] = _summary(message)
    return results, messages


def _summary(message: str) -> str:
    """The first line of a failure message, and pytest's "At index ... diff" line when the
    first one is an assertion that pytest shortened with "..."."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    summary = lines[0][:300]
    detail = next((line for line in lines[1:] if "diff" in line.lower()), None)
    if detail and "..." in summary:
        summary += " | " + detail[:400]
    return summary


def run_suite(
    spawner: str,
    suite_dir: Path,
    out_dir: Path,
    *,
    docker_host: str,
    hub_ip: str,
    image_tags: Mapping[str, str],
    timeout: float = 420,
) -> SuiteRun:
    """Run the upstream tests in ``suite_dir`` with ``spawner`` (dockerspawner|gpuspawner) in
    a subprocess on the Docker engine ``docker_host``; the hub listens on ``hub_ip`` (where
    containers reach it). Writes junit.xml and pytest.log under ``out_dir``."""
    if spawner not in SPAWNERS:
        raise ValueError(f"spawner must be one of {SPAWNERS}, not {spawner!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    junit, log = out_dir / "junit.xml", out_dir / "pytest.log"
    env = {k: v for k, v in os.environ.items()
           if k not in _PROXY_VARS and not k.startswith(("PYTEST_", "UPSTREAM_"))}
    env.update({
        "UPSTREAM_SPAWNER": spawner,
        "UPSTREAM_HUB_IP": hub_ip,
        "UPSTREAM_WORKDIR": str(out_dir),
        "UPSTREAM_IMAGE_TAGS": json.dumps(dict(image_tags)),
        "DOCKER_HOST": docker_host,
        "PYTHONDONTWRITEBYTECODE": "1",
        # The conftest uses this package's helpers (tag_images): the repository on the path.
        "PYTHONPATH": os.pathsep.join(p for p in (str(HERE.parents[1]),
                                                  env.get("PYTHONPATH")) if p),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                 env.get("PATH", "/usr/bin:/bin")]),
    })
    argv = [
        sys.executable, "-m", "pytest", str(suite_dir),
        "-c", str(suite_dir / "pytest.ini"), "--rootdir", str(suite_dir),
        "--basetemp", str(out_dir / "basetemp"), "-p", "no:cacheprovider",
        "--junitxml", str(junit), "-v", "-rfE", "--tb=short", "--color=no", "--durations=10",
    ]
    started = time.monotonic()
    with open(log, "wb") as handle:
        proc = subprocess.Popen(argv, cwd=suite_dir, env=env, stdout=handle,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise SuiteError(f"the upstream suite with {spawner} ran past {timeout:.0f} s; "
                             f"log: {log}\n{_tail(log)}") from None
    wall = time.monotonic() - started
    if not junit.exists():
        raise SuiteError(f"the upstream suite with {spawner} wrote no JUnit XML "
                         f"(exit {returncode}); log: {log}\n{_tail(log)}")
    results, messages = parse_junit(junit)
    if not results:
        raise SuiteError(f"the upstream suite with {spawner} ran no test (exit {returncode}); "
                         f"log: {log}\n{_tail(log)}")
    return SuiteRun(spawner, results, messages, returncode, wall, log)


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def remove_containers(client: docker.DockerClient, prefix: str = PREFIX) -> int:
    """Force-remove the containers the upstream tests made (their names start with prefix)."""
    removed = 0
    for container in client.api.containers(all=True, filters={"name": prefix}):
        if any(n.lstrip("/").startswith(prefix) for n in container.get("Names") or []):
            try:
                client.api.remove_container(container["Id"], force=True, v=True)
                removed += 1
            except docker.errors.NotFound:
                pass
    return removed
