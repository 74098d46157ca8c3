"""Offline builds of the single-user and hub images in the tests' private Docker engine.

``scripts/build-images.sh --local`` runs this file, and ``tests/docker/test_images.py`` loads
it (by path: the repository's ``docker/`` folder is not importable as ``docker``, which is the
Docker SDK). Nothing can be pulled on the test machines, so the image is built from
``docker/singleuser/Dockerfile`` on the local Debian base ``gpuspawner-test/base:bookworm``
(tests/images.py), with ``network_mode="none"`` and wheels downloaded on the host. The hub image
(``docker/hub/Dockerfile``, ``--hub``) is built the same way, its context being what the
repository root gives it plus ``docker/hub/offline/``: gpuspawner's dependencies as wheels,
Debian's nodejs as .deb files (``apt-get --download-only`` against the base's dpkg status, so
exactly what the base lacks) and configurable-http-proxy from ``npm install --prefix``.

Both slow steps are cached: the wheels in ``/var/cache/gpuspawner-tests`` (keyed by the
requirements, Python version and platforms), the image in the engine's data root, labelled
with a key of everything that produced it; a second build with the same inputs does nothing.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make ``tests`` importable
    sys.path.insert(1, str(REPO))

import docker  # noqa: E402 - the Docker SDK; this folder has no __init__.py to shadow it

from tests import images  # noqa: E402

SINGLEUSER_DIR = REPO / "docker" / "singleuser"
SINGLEUSER_DOCKERFILE = SINGLEUSER_DIR / "Dockerfile"
LOCAL_TAG = "gpuspawner/singleuser:local"
HUB_DOCKERFILE = REPO / "docker" / "hub" / "Dockerfile"
HUB_LOCAL_TAG = "gpuspawner/hub:local"
#: What docker/hub/Dockerfile COPYs from the repository root (its .dockerignore's list).
HUB_SOURCES = ("pyproject.toml", "README.md", "gpuspawner", "jupyterhub_config.py")
#: configurable-http-proxy's release line for bookworm's Node 18 (the Dockerfile's CHP_VERSION).
CHP_VERSION = "4"
KEY_LABEL = images.KEY_LABEL

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Built:
    """What ``build_singleuser_local`` made or found."""

    name: str
    image_id: str
    jupyterhub_version: str
    key: str
    built: bool  # False: the engine had it already
    seconds: float
    size_bytes: int


def requirements(jupyterhub_version: str) -> list[str]:
    return [f"jupyterhub=={jupyterhub_version}", "jupyterlab"]


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def wheels(reqs: list[str], cache: Path | None = None, log: Log = _stderr,
           kind: str = "singleuser") -> Path:
    """Wheels of ``reqs`` for the base image's Python, downloaded once on the host."""
    cache = cache or images.cache_dir()
    key = _key(f"{kind}-wheels", images.IMAGE_PYTHON, *images.WHEEL_PLATFORMS, *reqs)
    target = cache / f"wheels-{key}"
    with open(cache / f"wheels-{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two builders, one cache entry
        if (target / ".complete").exists():
            return target
        shutil.rmtree(target, ignore_errors=True)
        argv = [
            sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
            "--python-version", images.IMAGE_PYTHON, "--implementation", "cp",
            *(f"--platform={p}" for p in images.WHEEL_PLATFORMS),
            "--dest", str(target), *reqs,
        ]
        # This machine's pip configuration pins a constraints file; the image needs none.
        env = {**os.environ, "PIP_CONSTRAINT": "", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        log(f"build-images: pip download {' '.join(reqs)} for Python {images.IMAGE_PYTHON}")
        done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
            raise images.ImageError(f"pip download failed ({done.returncode}):\n{tail}")
        (target / ".complete").write_text(json.dumps(reqs) + "\n")
    return target


def context(dockerfile: str, wheel_dir: Path) -> io.BytesIO:
    """The build context: the Dockerfile and ``wheels/``, as docker/singleuser/ would hold."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = dockerfile.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("wheels")
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        for wheel in sorted(wheel_dir.glob("*.whl")):
            tar.add(wheel, arcname=f"wheels/{wheel.name}")
    buffer.seek(0)
    return buffer


def _labelled(client: docker.DockerClient, name: str) -> docker.models.images.Image | None:
    try:
        return client.images.get(name)
    except docker.errors.ImageNotFound:
        return None


def _cached(
    client: docker.DockerClient, tag: str, key: str, version: str, started: float
) -> tuple[docker.models.images.Image | None, Built | None]:
    """The image ``tag`` points at now, and a Built for it when it was made from ``key``."""
    old = _labelled(client, tag)
    if old is not None and (old.labels or {}).get(KEY_LABEL) == key:
        return old, Built(tag, old.id, version, key, False, time.monotonic() - started,
                          old.attrs.get("Size", 0))
    return old, None


def build_singleuser_local(
    client: docker.DockerClient,
    *,
    jupyterhub_version: str | None = None,
    tag: str = LOCAL_TAG,
    cache: Path | None = None,
    log: Log = _stderr,
) -> Built:
    """Build ``tag`` from docker/singleuser/Dockerfile on the local base, offline."""
    started = time.monotonic()
    version = jupyterhub_version or images.host_jupyterhub_version()
    base = images.ensure_base_image(client, cache)
    dockerfile = SINGLEUSER_DOCKERFILE.read_text()
    reqs = requirements(version)
    key = _key("singleuser-local", images.base_key(), dockerfile, images.IMAGE_PYTHON,
               *images.WHEEL_PLATFORMS, *reqs)
    old, cached = _cached(client, tag, key, version, started)
    if cached is not None:
        return cached
    wheel_dir = wheels(reqs, cache, log)
    log(f"build-images: building {tag} from {SINGLEUSER_DOCKERFILE.relative_to(REPO)} "
        f"on {base} (network none)")
    return _build(client, tag, key, old, version, started,
                  context(dockerfile, wheel_dir), {"BASE": base, "JUPYTERHUB_VERSION": version})


def _build(
    client: docker.DockerClient,
    tag: str,
    key: str,
    old: docker.models.images.Image | None,
    version: str,
    started: float,
    fileobj: io.BytesIO,
    buildargs: dict[str, str],
) -> Built:
    """Build offline (network none), label with ``key``, drop the image the tag left behind."""
    try:
        image, _ = client.images.build(
            fileobj=fileobj, custom_context=True, tag=tag, rm=True, forcerm=True, pull=False,
            network_mode="none", labels={KEY_LABEL: key}, buildargs=buildargs,
        )
    except docker.errors.BuildError as exc:
        text = "".join(str(chunk.get("stream") or chunk.get("error") or "")
                       for chunk in exc.build_log)
        raise images.ImageError(f"building {tag} failed: {exc}\n{text[-4000:]}") from exc
    if old is not None and old.id != image.id:
        try:  # the tag moved on: drop the old image unless something still uses it
            client.images.remove(old.id)
        except docker.errors.APIError:
            pass
    return Built(tag, image.id, version, key, True, time.monotonic() - started,
                 image.attrs.get("Size", 0))

# ------------------------------------------------------------------------------- hub image


def hub_requirements(jupyterhub_version: str) -> list[str]:
    """What the hub image pip-installs, for ``pip download``: gpuspawner's dependencies (the
    package itself is built in the image from its source, hence setuptools)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    build = project["build-system"]["requires"]
    return [*project["project"]["dependencies"], f"jupyterhub=={jupyterhub_version}",
            "jupyterhub-idle-culler", *build]


def _run_tool(argv: list[str], what: str, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        raise images.ImageError(f"{what} failed ({done.returncode}): {' '.join(argv)}\n{tail}")


def hub_debs(cache: Path | None = None, log: Log = _stderr) -> Path:
    """Debian's nodejs and every package it needs that the base lacks, as .deb files.

    apt resolves against the base's own dpkg status (from its rootfs tarball), so the list is
    exactly what ``dpkg -i`` in the image needs; the host's apt lists give the versions."""
    cache = cache or images.cache_dir()
    key = _key("hub-debs", images.base_key(), "nodejs")
    target = cache / f"debs-{key}"
    with open(cache / f"debs-{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".complete").exists():
            return target
        shutil.rmtree(target, ignore_errors=True)
        work = cache / f"debs-{key}.work"
        shutil.rmtree(work, ignore_errors=True)
        (work / "archives" / "partial").mkdir(parents=True)
        status = work / "status"
        with tarfile.open(images.base_rootfs(cache)) as rootfs:
            member = rootfs.extractfile("./var/lib/dpkg/status")
            assert member is not None
            status.write_bytes(member.read())
        log("build-images: apt-get --download-only nodejs (what the base lacks)")
        try:
            _run_tool(["apt-get", "install", "-y", "-q", "--download-only",
                       "--no-install-recommends", "-o", f"Dir::State::status={status}",
                       "-o", f"Dir::Cache::archives={work / 'archives'}", "nodejs"],
                      "apt-get download")
            target.mkdir()
            for deb in sorted((work / "archives").glob("*.deb")):
                shutil.move(deb, target / deb.name)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        names = sorted(d.name for d in target.glob("*.deb"))
        if not any(n.startswith("nodejs_") for n in names):
            raise images.ImageError(f"apt-get downloaded no nodejs: {names}")
        (target / ".complete").write_text(json.dumps(names) + "\n")
    return target


def hub_npm(cache: Path | None = None, log: Log = _stderr) -> Path:
    """``npm install --prefix`` of configurable-http-proxy (pure JavaScript), once."""
    cache = cache or images.cache_dir()
    spec = f"configurable-http-proxy@{CHP_VERSION}"
    key = _key("hub-npm", spec)
    target = cache / f"npm-{key}"
    with open(cache / f"npm-{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".complete").exists():
            return target
        shutil.rmtree(target, ignore_errors=True)
        if shutil.which("npm") is None:
            raise images.ImageError("npm is not installed on this machine")
        log(f"build-images: npm install {spec}")
        _run_tool(["npm", "install", "--prefix", str(target), "--omit=dev", "--no-audit",
                   "--no-fund", "--no-save", spec], "npm install")
        if not (target / "node_modules" / ".bin" / "configurable-http-proxy").exists():
            raise images.ImageError(f"npm install {spec} made no configurable-http-proxy")
        (target / ".complete").write_text(spec + "\n")
    return target


def _skip_pycache(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    if "__pycache__" in Path(info.name).parts or info.name.endswith((".pyc", ".pyo")):
        return None
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _sources_digest() -> str:
    digest = hashlib.sha256()
    for name in HUB_SOURCES:
        root = REPO / name
        for path in sorted([root] if root.is_file() else root.rglob("*")):
            if path.is_file() and _skip_pycache(tarfile.TarInfo(str(path))) is not None:
                digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def hub_context(dockerfile: str, wheel_dir: Path, deb_dir: Path, npm_dir: Path) -> io.BytesIO:
    """The repository root as docker/hub/Dockerfile sees it, with docker/hub/offline/ filled."""
    buffer = io.BytesIO()
    offline = "docker/hub/offline"
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = dockerfile.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for name in HUB_SOURCES:
            tar.add(REPO / name, arcname=name, filter=_skip_pycache)
        for folder in ("docker", "docker/hub", offline, f"{offline}/wheels", f"{offline}/debs"):
            entry = tarfile.TarInfo(folder)
            entry.type, entry.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(entry)
        for wheel in sorted(wheel_dir.glob("*.whl")):
            tar.add(wheel, arcname=f"{offline}/wheels/{wheel.name}")
        for deb in sorted(deb_dir.glob("*.deb")):
            tar.add(deb, arcname=f"{offline}/debs/{deb.name}")
        tar.add(npm_dir / "node_modules", arcname=f"{offline}/npm/node_modules",
                filter=_skip_pycache)
    buffer.seek(0)
    return buffer


def build_hub_local(
    client: docker.DockerClient,
    *,
    jupyterhub_version: str | None = None,
    tag: str = HUB_LOCAL_TAG,
    cache: Path | None = None,
    log: Log = _stderr,
) -> Built:
    """Build ``tag`` from docker/hub/Dockerfile on the local base, offline."""
    started = time.monotonic()
    version = jupyterhub_version or images.host_jupyterhub_version()
    base = images.ensure_base_image(client, cache)
    dockerfile = HUB_DOCKERFILE.read_text()
    reqs = hub_requirements(version)
    key = _key("hub-local", images.base_key(), dockerfile, images.IMAGE_PYTHON,
               *images.WHEEL_PLATFORMS, *reqs, CHP_VERSION, _sources_digest())
    old, cached = _cached(client, tag, key, version, started)
    if cached is not None:
        return cached
    wheel_dir = wheels(reqs, cache, log, kind="hub")
    deb_dir = hub_debs(cache, log)
    npm_dir = hub_npm(cache, log)
    log(f"build-images: building {tag} from {HUB_DOCKERFILE.relative_to(REPO)} "
        f"on {base} (network none)")
    return _build(
        client, tag, key, old, version, started,
        hub_context(dockerfile, wheel_dir, deb_dir, npm_dir),
        {"BASE": base, "JUPYTERHUB_VERSION": version, "CHP_VERSION": CHP_VERSION},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build the single-user (and hub) image offline in the tests' private "
                    "Docker engine.")
    parser.add_argument("--tag", default=LOCAL_TAG)
    parser.add_argument("--hub", action="store_true", help="also build the hub image")
    parser.add_argument("--hub-tag", default=HUB_LOCAL_TAG)
    parser.add_argument("--jupyterhub-version",
                        help="default: the JupyterHub of this Python (the repository's .venv)")
    args = parser.parse_args(argv)

    from tests.engine import EngineError, PrivateEngine

    engine = PrivateEngine()
    try:
        engine.start()
    except EngineError as exc:
        _stderr(f"build-images: private Docker engine: {exc}")
        return 1
    done: list[Built] = []
    try:
        done.append(build_singleuser_local(
            engine.client, jupyterhub_version=args.jupyterhub_version, tag=args.tag))
        if args.hub:
            done.append(build_hub_local(
                engine.client, jupyterhub_version=args.jupyterhub_version, tag=args.hub_tag))
    except images.ImageError as exc:
        _stderr(f"build-images: {exc}")
        return 1
    finally:
        engine.stop()
    for built in done:
        what = "built" if built.built else "up to date (cached)"
        print(f"{built.name}: {what} in {built.seconds:.1f}s; {built.image_id[7:19]}, "
              f"{built.size_bytes / 1e6:.0f} MB, jupyterhub {built.jupyterhub_version}")
    print(f"in the private test engine ({engine.base_url}, data root "
          f"{engine.paths.data_root})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
