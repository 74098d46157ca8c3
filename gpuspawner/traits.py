"""GPUSpawner's own settings: the traits ``jupyterhub --help-all`` documents.

Kept apart from the spawner's behaviour so each reads on its own; ``GPUSpawner`` inherits
them, and they are configured as ``c.GPUSpawner.<name>`` like any spawner trait.
"""

from __future__ import annotations

from jupyterhub.traitlets import ByteSpecification
from traitlets import (
    Callable as CallableTrait,
)
from traitlets import (
    CaselessStrEnum,
    Dict,
    Float,
    Int,
    List,
    TraitError,
    Tuple,
    Unicode,
    Union,
    validate,
)
from traitlets.config import Configurable

from . import allocator, hosts, inventory


class GPUSpawnerTraits(Configurable):
    """The settings of GPUSpawner beyond DockerSpawner's (see docs/reference/traits.md)."""

    hub_id = Unicode(
        "jupyterhub",
        config=True,
        help="""Id of this hub, written into each container's ``ds01.hub`` label so that two
        hubs on one Docker engine can tell their containers apart. Devices are shared: every
        hub counts every container's devices as taken, whoever made it.""",
    )

    profile_list = Union(
        [List(Dict()), CallableTrait()],
        default_value=[],
        config=True,
        help="""The profiles a user chooses from, as in KubeSpawner's ``profile_list``.

        Each entry: ``display_name``, ``slug`` (default: from the display name),
        ``description``, ``default`` (bool), ``gpu`` (``{"mig_profile": "1g.10gb"}``,
        ``{"gpus": 2}`` for whole GPUs, or absent for CPU only), and ``overrides`` with any of
        ``image``, ``mem_limit``, ``cpu_limit``, ``environment`` (dict) and ``ports``
        (dict name -> container port, added to ``ports``); KubeSpawner's
        ``kubespawner_override`` is accepted for ``overrides``. ``profile_options``, in
        KubeSpawner's shape (``{name: {display_name, choices: {choice: {display_name,
        default, kubespawner_override}}, unlisted_choice: {enabled, validation_regex, …}}}``),
        offers choices inside a profile (an image, a memory size); DockerSpawner's
        ``allowed_images`` becomes an image choice in every profile without its own image.

        May be a callable ``f(spawner) -> list`` (may be async) for per-user lists. Profiles
        the user's policy forbids are not offered. With no profiles, the server is CPU only.""",
    )

    policy_file = Unicode(
        None,
        allow_none=True,
        config=True,
        help="""Path of the YAML policy file (limits per user and group, priorities, holds);
        see docs/policy.md. Re-read when it changes; a file with errors refuses new spawns with
        the error (running servers are untouched). Unset: built-in defaults (one GPU-equivalent
        per user, no whole GPUs, no hold after stop).""",
    )

    inventory_source = CaselessStrEnum(
        list(inventory.SOURCES),
        default_value="auto",
        config=True,
        help="""Where the GPU inventory comes from: ``nvml`` (nvidia-ml-py), ``nvidia-smi``,
        ``file`` (``topology_file``), ``none`` (CPU only), or ``auto``: the topology file if
        set, else NVML, else nvidia-smi, else none.""",
    )

    topology_file = Unicode(
        None,
        allow_none=True,
        config=True,
        help="""A static topology file (YAML/JSON; see docs/inventory.md) for hubs that
        cannot see the GPUs themselves. Must be kept in step with the host by hand.""",
    )

    port_range = Tuple(
        Int(),
        Int(),
        default_value=(40000, 40999),
        config=True,
        help="""Host ports (inclusive) from which each server's ``ports`` are published.
        Ports are checked against every container in Docker and against the host itself.""",
    )

    ports = Union(
        [Dict(), CallableTrait()],
        default_value={},
        config=True,
        help="""Extra container ports to publish on a host port each, as ``{name: container
        port}``, e.g. ``{"ssh": 22, "tensorboard": 6006}``. Host ports come from
        ``port_range``; a server keeps its ports across restarts while they are free. The
        choice is shown in the spawn progress, written to the ``ds01.port.<name>`` labels and
        given to the server as ``GPUSPAWNER_PORT_<NAME>`` environment variables. May be a
        callable of the spawner.""",
    )

    ports_host_ip = Unicode(
        "",
        config=True,
        help="""Host address the extra ``ports`` are published on (and probed on). Empty:
        DockerSpawner's ``host_ip`` (127.0.0.1 unless the admin says otherwise), so nothing
        is published to the network unless the admin asks for it. Web tools such as
        TensorBoard are better reached through jupyter-server-proxy, behind the Hub's login.""",
    )

    on_gpu_lost = CaselessStrEnum(
        ["reallocate", "fail"],
        default_value="reallocate",
        config=True,
        help="""What a restart does when the stopped server's device is gone (MIG re-created,
        GPU removed) or was given to someone else after the hold: ``reallocate`` replaces the
        old container without loss (see ``replace_with``) by a new one, preferring the same
        GPU and profile; ``fail`` refuses, saying what happened and what to do.""",
    )

    replace_with = CaselessStrEnum(
        ["commit", "remove"],
        default_value="commit",
        config=True,
        help="""How a server's own stopped container is replaced when it must be (its device
        is gone after a reboot, its profile or ports changed, it was made before gpuspawner):
        ``commit`` (default) saves it to an image first and creates the new container from
        that image, so files outside volumes and installed packages survive (if the commit
        fails, nothing is removed and the spawn is refused); ``remove`` drops it (volumes are
        kept). Held containers taken over by a higher priority are always saved.""",
    )

    gpu_wait_timeout = Float(
        0,
        config=True,
        help="""Seconds a spawn waits for a device when its profile is full, showing its
        place in the queue (first come, first served within a priority). 0: refuse at once
        with the reason.""",
    )

    boot_timeout = Float(
        300,
        config=True,
        help="""Seconds after the hub starts during which a GPU spawn waits for the GPU host
        to come up (the NVIDIA driver, the MIG devices a boot script re-creates), showing what
        it waits for, instead of failing or moving a restarting server off its slice. Each
        spawn waits at most until shortly before its ``start_timeout``. 0: never wait.""",
    )

    inventory_timeout = Float(
        10,
        config=True,
        help="""Seconds a spawn (or the spawn form) waits for the GPU inventory when NVML is
        slow (a driver stuck behind a hung GPU can take seconds per call). After that it uses
        the last inventory read, saying how old it is; with none yet, GPU spawns are refused
        with that sentence and CPU servers start. The slow read goes on and is used when it
        ends.""",
    )

    busy_memory_mib = Int(
        1024,
        config=True,
        help="""MiB of GPU memory in use above which a device that no running container holds
        is *busy*: a process that outlived its container, or memory it leaked. A busy device
        (or one with any compute process on it) is never given out; the admin page, ``doctor``
        and the operation log (``gpu.busy``) show it. A slice nobody uses shows a few MiB.""",
    )

    allocation_strategy = CaselessStrEnum(
        [allocator.PACK, allocator.SPREAD],
        default_value=allocator.PACK,
        config=True,
        help="""``pack``: fill partly used GPUs first so whole GPUs stay free for multi-GPU
        profiles; ``spread``: prefer the emptiest GPU. On a hub of several ``hosts``, the
        same for hosts: ``pack`` fills the busiest host a server fits on, ``spread`` the
        emptiest.""",
    )

    hosts = Dict(
        config=True,
        help="""GPU hosts this hub starts servers on, each through its own Docker engine:
        ``{name: url}`` or ``{name: {url:, address:, tls_ca:, tls_cert:, tls_key:}}``, with
        ``unix://``, ``ssh://`` or ``tcp://`` (with TLS client certificates) endpoints
        (docs/scaling.md). Empty, the default: the hub's own engine (DockerSpawner's
        ``client_kwargs`` or ``DOCKER_HOST``) only, as always. The host whose endpoint is the
        hub's own engine reads its GPUs through NVML; every other through a short-lived
        probe container on its engine. A server on another host is published on that
        host's ``address`` (required for it) and reached there. Each container is labelled
        ``ds01.host=<name>``, and a server stays on its host while its host has a device
        for it (``move_max_mib``).""",
    )

    move_max_mib = Int(
        4096,
        config=True,
        help="""On a hub of several hosts: a stopped server whose host has no device for its
        profile now, while another host has, is moved there: its container is saved to an
        image, the image is copied to the other host's engine and checked there, the server
        starts from it, and only then are the container and the image on the old host
        removed. Only a server whose files are all in its container moves (a volume or a
        bind mount stays on its host: the user is told, and the operation log says why) and
        only when the saved image is at most this many MiB (the copy is part of the start:
        raise ``start_timeout`` with it). 0: servers never move; they wait for their host,
        as on one host.""",
    )

    @validate("move_max_mib")
    def _valid_move_max_mib(self, proposal: dict) -> int:
        if proposal["value"] < 0:
            raise TraitError("GPUSpawner.move_max_mib: must be 0 (never move) or more")
        return proposal["value"]

    @validate("hosts")
    def _valid_hosts(self, proposal: dict) -> dict:
        value = proposal["value"]
        if value:
            try:
                hosts.parse_hosts(value)
            except hosts.HostsError as exc:
                raise TraitError(f"GPUSpawner.hosts: {exc}") from exc
        return value

    events_file = Unicode(
        None,
        allow_none=True,
        config=True,
        help="""Operation log (JSON lines: allocations, refusals, re-allocations, ports,
        containers). Unset: kept in memory only, and in the hub's log.""",
    )

    events_max_bytes = ByteSpecification(
        10 * 1024 * 1024,
        allow_none=False,
        config=True,
        help="""Size at which the operation log (``events_file``) is rotated: the file is
        renamed to ``<events_file>.1`` (the older ones to ``.2``, ``.3``, …) and a new one is
        started. A number of bytes or a string with a suffix K, M, G, T (powers of 1024), e.g.
        ``"10M"``. 0: never rotated. The admin service rotates the same file at the same size
        (``admin.service(c)`` passes it on as ``GPUSPAWNER_EVENTS_MAX_BYTES``).""",
    )

    events_keep = Int(
        5,
        min=0,
        config=True,
        help="""Rotated operation logs kept (``<events_file>.1`` … ``.<events_keep>``); the
        oldest is deleted at the next rotation. The log takes at most about
        ``(events_keep + 1) * events_max_bytes`` on disk. Passed to the admin service as
        ``GPUSPAWNER_EVENTS_KEEP``.""",
    )

    docker_retries = Int(
        3,
        config=True,
        help="""Times a Docker call that failed for a transient reason (engine restarting,
        connection refused, 5xx) is retried, with backoff, before the spawn fails.""",
    )

    docker_threads = Int(
        8,
        min=1,
        max=64,
        config=True,
        help="""Threads that make Docker calls for all servers at once (DockerSpawner uses
        one, so a slow call of one spawn holds up every other spawn and poll).""",
    )

