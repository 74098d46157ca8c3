"""The admin service's window on the world: the shared ``gpuspawner.world.World``, set up
from the service's settings (the hub's id and start time-out included), with a one-second
snapshot cache for pages and scrapes."""

from __future__ import annotations

from typing import Any

from .. import world
from .settings import Settings


class World(world.World):
    def __init__(self, settings: Settings, client: Any = None, max_age: float = 1.0) -> None:
        super().__init__(
            docker_host=settings.docker_host,
            policy=settings.policy,
            inventory_source=settings.inventory,
            topology=settings.topology,
            client=client,
            max_age=max_age,
            start_timeout=settings.start_timeout,
            hub_id=settings.hub_id,
            busy_memory_mib=settings.busy_memory_mib,
            dcgm_url=settings.dcgm_url,
        )
        self.settings = settings
