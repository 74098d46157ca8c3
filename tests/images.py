"""The test images, built here because no base image can be pulled on these machines.

``gpuspawner-test/base:bookworm`` is a Debian root file system from ``debootstrap``, imported
with ``docker import``. ``gpuspawner-test/singleuser:<key>`` adds a venv with the host's
JupyterHub version and ``jupyter_server``, installed offline from wheels that ``pip download``
fetched on the host (the engine itself has no network).

Both are slow to make the first time (about a minute) and must be instant afterwards, so the
rootfs tarball and the wheels are cached in ``/var/cache/gpuspawner-tests``
(``GPUSPAWNER_TEST_CACHE``) under keys made of exactly what produced them, and the images stay
in the private engine's data root, labelled with the same keys.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from types import ModuleType

import docker

DEFAULT_CACHE = Path("/var/cache/gpuspawner-tests")
BASE_REPOSITORY, BASE_TAG = "gpuspawner-test/base", "bookworm"
BASE_IMAGE = f"{BASE_REPOSITORY}:{BASE_TAG}"
SINGLEUSER_REPOSITORY = "gpuspawner-test/singleuser"
ENV_REPOSITORY = "gpuspawner-test/env"
KEY_LABEL = "gpuspawner-test.key"

DEBOOTSTRAP_ARGS = (
    "--variant=minbase",
    "--include=python3,python3-venv,ca-certificates",
    "bookworm",
    "{dir}",
    "http://deb.debian.org/debian",
)
#: The image's Python (bookworm's python3) and the platforms its wheels may be built for.
IMAGE_PYTHON = "3.11"
WHEEL_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64",
                   "any")
PATH = "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ImageError(RuntimeError):
    """An image could not be made; the message carries the failing tool's output."""


def cache_dir() -> Path:
    path = Path(os.environ.get("GPUSPAWNER_TEST_CACHE") or DEFAULT_CACHE)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise builders of one cache entry across processes (two sessions, one cache)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check(argv: list[str], what: str, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        raise ImageError(f"{what} failed ({done.returncode}): {' '.join(argv)}\n{tail}")


def _image_key(client: docker.DockerClient, name: str) -> str | None:
    try:
        image = client.images.get(name)
    except docker.errors.ImageNotFound:
        return None
    return (image.labels or {}).get(KEY_LABEL)


# ------------------------------------------------------------------------------ base image


def base_key() -> str:
    return _key("debootstrap", *DEBOOTSTRAP_ARGS)


def base_rootfs(cache: Path | None = None) -> Path:
    """The Debian rootfs tarball, made with debootstrap unless the cache has it."""
    cache = cache or cache_dir()
    tarball = cache / f"rootfs-{base_key()}.tar"
    with _locked(cache / f"rootfs-{base_key()}.lock"):
        if tarball.exists():
            return tarball
        if shutil.which("debootstrap") is None:
            raise ImageError("debootstrap is not installed; run scripts/setup.sh")
        work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=cache))
        try:
            target = work / "root"
            argv = ["debootstrap", *(a.format(dir=target) for a in DEBOOTSTRAP_ARGS)]
            print(f"images: {' '.join(argv)} (about 40 s, once)", file=sys.stderr)
            _check(argv, "debootstrap")
            for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for entry in (target / junk).glob("*"):
                    if entry.is_file():
                        entry.unlink()
            partial = work / "rootfs.tar"
            _check(["tar", "--numeric-owner", "-C", str(target), "-cf", str(partial), "."],
                   "tar")
            os.replace(partial, tarball)
        finally:
            # --one-file-system: never follow a /proc or /sys that a failed debootstrap left
            # mounted inside the target.
            subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)
    return tarball


def ensure_base_image(client: docker.DockerClient, cache: Path | None = None) -> str:
    """Import the rootfs as ``gpuspawner-test/base:bookworm`` unless the engine has it."""
    key = base_key()
    if _image_key(client, BASE_IMAGE) == key:
        return BASE_IMAGE
    tarball = base_rootfs(cache)
    changes = [
        f"LABEL {KEY_LABEL}={key}",
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ENV LANG=C.UTF-8",
        'CMD ["/bin/bash"]',
    ]
    client.api.import_image_from_file(
        str(tarball), repository=BASE_REPOSITORY, tag=BASE_TAG, changes=changes
    )
    if _image_key(client, BASE_IMAGE) != key:
        raise ImageError(f"docker import of {tarball} did not produce {BASE_IMAGE}")
    return BASE_IMAGE


# ------------------------------------------------------------------------ singleuser image


def host_jupyterhub_version() -> str:
    return metadata.version("jupyterhub")


def requirements() -> list[str]:
    return [f"jupyterhub=={host_jupyterhub_version()}", "jupyter_server"]


def wheels(cache: Path | None = None) -> Path:
    """A directory of wheels for the image's Python, downloaded once on the host."""
    cache = cache or cache_dir()
    reqs = requirements()
    key = _key("wheels", IMAGE_PYTHON, *WHEEL_PLATFORMS, *reqs)
    target = cache / f"wheels-{key}"
    with _locked(cache / f"wheels-{key}.lock"):
        if (target / ".complete").exists():
            return target
        shutil.rmtree(target, ignore_errors=True)
        argv = [
            sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
            "--python-version", IMAGE_PYTHON, "--implementation", "cp",
            *(f"--platform={p}" for p in WHEEL_PLATFORMS),
            "--dest", str(target), *reqs,
        ]
        # This machine's pip config pins a constraints file; the image needs none of it.
        env = {**os.environ, "PIP_CONSTRAINT": "", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        print(f"images: pip download {' '.join(reqs)} (once)", file=sys.stderr)
        _check(argv, "pip download", env=env)
        (target / ".complete").write_text(json.dumps(reqs) + "\n")
    return target


def dockerfile(base: str, reqs: list[str]) -> str:
    quoted = " ".join(f"'{r}'" for r in reqs)
    return f"""\
FROM {base}
COPY wheels /tmp/wheels
RUN python3 -m venv /opt/venv \\
 && PIP_DISABLE_PIP_VERSION_CHECK=1 /opt/venv/bin/pip install --quiet --no-index \\
      --no-cache-dir --find-links /tmp/wheels {quoted} \\
 && rm -rf /tmp/wheels \\
 && useradd --create-home --uid 1000 --shell /bin/bash jovyan
ENV PATH={PATH} LANG=C.UTF-8
USER jovyan
WORKDIR /home/jovyan
EXPOSE 8888
CMD ["jupyterhub-singleuser"]
"""


def _context(text: str, wheel_dir: Path | None = None) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = text.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for wheel in sorted(wheel_dir.glob("*.whl")) if wheel_dir else ():
            tar.add(wheel, arcname=f"wheels/{wheel.name}")
    buffer.seek(0)
    return buffer


def _build(client: docker.DockerClient, text: str, name: str, key: str,
           wheel_dir: Path | None = None) -> None:
    """Build ``text`` as ``name``, labelled ``key``, without network (the engine has none)."""
    try:
        client.images.build(
            fileobj=_context(text, wheel_dir), custom_context=True, tag=name, rm=True,
            forcerm=True, pull=False, labels={KEY_LABEL: key}, network_mode="none",
        )
    except docker.errors.BuildError as exc:
        log = "".join(str(chunk.get("stream") or chunk.get("error") or "")
                      for chunk in exc.build_log)
        raise ImageError(f"building {name} failed: {exc}\n{log[-4000:]}") from exc


def ensure_singleuser_image(client: docker.DockerClient, cache: Path | None = None) -> str:
    """Build ``gpuspawner-test/singleuser:<key>`` from the base unless the engine has it."""
    base = ensure_base_image(client, cache)
    reqs = requirements()
    text = dockerfile(base, reqs)
    # Keyed without listing the wheels: a cached wheel directory is keyed by reqs already,
    # and not needing it lets a second run skip even looking at the cache.
    key = _key("singleuser", base_key(), text)
    name = f"{SINGLEUSER_REPOSITORY}:{key}"
    if _image_key(client, name) == key:
        return name
    _build(client, text, name, key, wheels(cache))
    return name


# ----------------------------------------------------------------------- derived images


def ensure_env_image(client: docker.DockerClient, base: str, env: Mapping[str, str]) -> str:
    """``base`` with ``ENV`` lines added, as images from elsewhere (a CUDA base sets
    ``NVIDIA_VISIBLE_DEVICES=all``) come: ``gpuspawner-test/env:<key>``. Keyed by the base
    image's id, so a rebuilt base gets a fresh one; ENV only, so the build takes a second."""
    base_id = client.images.get(base).id
    lines = "".join(f"ENV {name}={json.dumps(value)}\n" for name, value in sorted(env.items()))
    text = f"FROM {base}\n{lines}"
    key = _key("env", base_id, text)
    name = f"{ENV_REPOSITORY}:{key}"
    if _image_key(client, name) != key:
        _build(client, text, name, key)
    return name


def load_builder() -> ModuleType:
    """docker/build_images.py (offline builds of the repository's own Dockerfiles), loaded by
    path: the repository's docker/ folder is not importable, ``import docker`` being the SDK."""
    name = "gpuspawner_build_images"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).resolve().parents[1] / "docker" / "build_images.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module
