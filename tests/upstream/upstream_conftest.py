"""conftest.py for DockerSpawner's own tests, run by tests/upstream/dockerspawner_suite.py.

Copied as ``conftest.py`` next to the upstream test modules (the sdist ships none). It plays
the part of DockerSpawner's own conftest on this machine's private Docker engine, and, with
``UPSTREAM_SPAWNER=gpuspawner``, swaps GPUSpawner in for DockerSpawner *before* the test
modules import it, so ``from dockerspawner import DockerSpawner`` in every upstream test gets
GPUSpawner.

Environment (set by the runner):
  UPSTREAM_SPAWNER     dockerspawner (default) | gpuspawner
  DOCKER_HOST          the Docker engine the containers are made on
  UPSTREAM_HUB_IP      where containers reach the hub (the engine's bridge gateway); default:
                       the gateway of that engine's ``bridge`` network
  UPSTREAM_WORKDIR     where GPUSpawner's operation log goes (default: a temporary directory)
  UPSTREAM_IMAGE_TAGS  JSON {upstream image name: local image}: images the tests name and that
                       cannot be pulled here, (re)tagged before each test (test_image_pull_policy
                       removes busybox:1.29.1 and cannot pull it back without a registry)

JupyterHub 6 compatibility (the same for both spawners, so it cannot favour either): the
upstream tests were written for JupyterHub < 6, where ``user.spawners[name]`` made a named
server on first access, with any name (``"also-has@"``). JupyterHub 6 makes servers only through
``get_or_create_spawner`` and refuses new names that are not safe slugs. ``PRE6_SERVERS`` keeps
the old behaviour in the test process: a spawner accessed by name gets its database record as
before, and ``JupyterHub.allow_existing_invalid_named_servers = "allow-start"`` (JupyterHub's
own setting for hubs upgraded with such names) lets such a server start. Without it four
tests (test_name_collision, test_start_stop[True/False], test_legacy_escape) fail with
"orm_spawner not found" for both spawners, and the real spawn-and-stop test is lost.
"""

import json
import os
import tempfile
from unittest import mock

import docker
import dockerspawner
import pytest
from traitlets.config import Config

SPAWNER = os.environ.get("UPSTREAM_SPAWNER", "dockerspawner")
if SPAWNER == "gpuspawner":
    from gpuspawner.spawner import GPUSpawner

    dockerspawner.DockerSpawner = GPUSpawner
elif SPAWNER != "dockerspawner":
    raise RuntimeError(f"UPSTREAM_SPAWNER must be dockerspawner or gpuspawner, not {SPAWNER!r}")

# jupyterhub's own fixtures, as DockerSpawner's conftest takes them (after the swap, though
# they do not import dockerspawner). cleanup_after stops servers and deletes users between
# tests; tmp_cwd runs each module in a temporary directory.
from jupyterhub.tests.conftest import (  # noqa: E402, F401
    cleanup_after,
    tmp_cwd,
    user,
    username,
)
from jupyterhub.tests.mocking import MockHub  # noqa: E402
from jupyterhub.user import User  # noqa: E402

from tests.upstream.dockerspawner_suite import tag_images  # noqa: E402  (PYTHONPATH: the repo)

PREFIX = "dockerspawner-test"
HUB_ID = "dockerspawner-test"
WORKDIR = os.environ.get("UPSTREAM_WORKDIR") or tempfile.mkdtemp(prefix="upstream-")
IMAGE_TAGS = json.loads(os.environ.get("UPSTREAM_IMAGE_TAGS") or "{}")
#: Keep JupyterHub < 6's named servers (see the module's docstring).
PRE6_SERVERS = True


def pytest_report_header(config):
    cls = dockerspawner.DockerSpawner
    return (f"upstream dockerspawner {dockerspawner.__version__} tests with "
            f"{cls.__module__}.{cls.__name__} on {os.environ.get('DOCKER_HOST', '(default)')}")


def _client():
    return docker.from_env(timeout=120)


def _hub_ip(client):
    if os.environ.get("UPSTREAM_HUB_IP"):
        return os.environ["UPSTREAM_HUB_IP"]
    ipam = client.networks.get("bridge").attrs["IPAM"]["Config"]
    return next(c["Gateway"] for c in ipam if "Gateway" in c)


def _remove_ours(client):
    for container in client.api.containers(all=True, filters={"name": PREFIX}):
        if any(n.lstrip("/").startswith(PREFIX) for n in container.get("Names") or []):
            try:
                client.api.remove_container(container["Id"], force=True, v=True)
            except docker.errors.NotFound:
                pass
    # Images GPUSpawner saved (or kept) this suite's containers to before replacing them.
    for image in client.api.images(filters={"label": f"ds01.hub={HUB_ID}"}):
        for tag in image.get("RepoTags") or []:
            if tag.startswith(("gpuspawner-saved/", "gpuspawner-kept/")):
                try:
                    client.api.remove_image(tag, force=True)
                except docker.errors.NotFound:
                    pass


def _tag_images(client):
    tag_images(client, IMAGE_TAGS)


@pytest.fixture(scope="session")
def docker_client():
    """The engine's client; the containers of this suite are removed before and after."""
    client = _client()
    _remove_ours(client)
    try:
        yield client
    finally:
        _remove_ours(client)
        client.close()


_new_spawner = User._new_spawner


def _new_spawner_pre6(self, server_name, spawner_class=None, **kwargs):
    """JupyterHub < 6: a spawner accessed by name is created with its database record."""
    if server_name not in self.orm_spawners:
        self._new_orm_spawner(server_name, server_name)
    return _new_spawner(self, server_name, spawner_class, **kwargs)


@pytest.fixture(autouse=True, scope="session")
def pre6_servers():
    if not PRE6_SERVERS:
        yield
        return
    with mock.patch.object(User, "_new_spawner", _new_spawner_pre6):
        yield


@pytest.fixture(autouse=True)
def upstream_images(docker_client):
    """The images the tests name, present under those names before every test."""
    _tag_images(docker_client)


@pytest.fixture(scope="module")
async def app(request, docker_client):
    """jupyterhub's MockHub (as jupyterhub.tests.conftest.app makes it), listening where the
    containers reach it, with DockerSpawner's settings from DockerSpawner's conftest."""
    hub_ip = _hub_ip(docker_client)
    config = Config()
    config.JupyterHub.hub_ip = hub_ip
    config.JupyterHub.hub_connect_ip = hub_ip
    config.DockerSpawner.prefix = PREFIX
    if PRE6_SERVERS:
        config.JupyterHub.allow_existing_invalid_named_servers = "allow-start"
    if SPAWNER == "gpuspawner":
        config.GPUSpawner.hub_id = HUB_ID
        config.GPUSpawner.events_file = os.path.join(WORKDIR, "gpuspawner-events.jsonl")
        config.GPUSpawner.policy_file = None  # built-in defaults, no system path
    hub = MockHub.instance(config=config)
    await hub.initialize([])
    await hub.start()
    yield hub
    # as jupyterhub's fixture: pytest closes captured fds before the hub's last log lines
    hub.log.handlers = []
    MockHub.clear_instance()
    try:
        await hub.stop()
    except Exception as exc:
        print(f"Error stopping Hub: {exc}")


@pytest.fixture
def named_servers(app):
    with mock.patch.dict(
        app.tornado_settings,
        {"allow_named_servers": True, "named_server_limit_per_user": 2},
    ):
        yield


@pytest.fixture
def dockerspawner_configured_app(app, named_servers):
    """The hub, spawning with DockerSpawner (GPUSpawner when swapped in)."""
    with mock.patch.dict(app.tornado_settings, {"spawner_class": dockerspawner.DockerSpawner}):
        yield app
