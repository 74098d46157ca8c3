"""Offline build of the single-user image in the tests' private Docker engine.

``scripts/build-images.sh --local`` runs this file, and ``tests/docker/test_images.py`` loads
it (by path: the repository's ``docker/`` folder is not importable as ``docker``, which is the
Docker SDK). Nothing can be pulled on the test machines, so the image is built from
``docker/singleuser/Dockerfile`` on the local Debian base ``gpuspawner-test/base:bookworm``
(tests/images.py), with ``network_mode="none"`` and wheels downloaded on the host.

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


def wheels(reqs: list[str], cache: Path | None = None, log: Log = _stderr) -> Path:
    """Wheels of ``reqs`` for the base image's Python, downloaded once on the host."""
    cache = cache or images.cache_dir()
    key = _key("singleuser-wheels", images.IMAGE_PYTHON, *images.WHEEL_PLATFORMS, *reqs)
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
    old = _labelled(client, tag)
    if old is not None and (old.labels or {}).get(KEY_LABEL) == key:
        return Built(tag, old.id, version, key, False, time.monotonic() - started,
                     old.attrs.get("Size", 0))
    wheel_dir = wheels(reqs, cache, log)
    log(f"build-images: building {tag} from {SINGLEUSER_DOCKERFILE.relative_to(REPO)} "
        f"on {base} (network none)")
    try:
        image, _ = client.images.build(
            fileobj=context(dockerfile, wheel_dir), custom_context=True, tag=tag, rm=True,
            forcerm=True, pull=False, network_mode="none", labels={KEY_LABEL: key},
            buildargs={"BASE": base, "JUPYTERHUB_VERSION": version},
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build the single-user image offline in the tests' private Docker engine.")
    parser.add_argument("--tag", default=LOCAL_TAG)
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
    try:
        built = build_singleuser_local(engine.client, jupyterhub_version=args.jupyterhub_version,
                                       tag=args.tag)
    except images.ImageError as exc:
        _stderr(f"build-images: {exc}")
        return 1
    finally:
        engine.stop()
    what = "built" if built.built else "up to date (cached)"
    print(f"{built.name}: {what} in {built.seconds:.1f}s; {built.image_id[7:19]}, "
          f"{built.size_bytes / 1e6:.0f} MB, jupyterhub {built.jupyterhub_version}; "
          f"in the private test engine ({engine.base_url}, data root "
          f"{engine.paths.data_root})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
