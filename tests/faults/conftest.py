"""Fixtures of the fault suite: hubs made for faults, and the scenario that measures a row.

Every test here is one row of docs/reliability.md: it drives real hubs (tests/hub.py) on the
private engine and the simulated host (the ``gpusim`` fixture), measures the four columns
(tests/faults/measure.py), writes its row as JSON into ``$GPUSPAWNER_RELIABILITY_OUT`` (a
temporary directory when unset), and then asserts that every column is 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ..hub import RunningHub
from . import sizes, standin
from .measure import Scenario, out_dir

#: The hubs of this suite poll their servers every 3 s (JupyterHub's default is 30 s), so a
#: server whose container a fault stopped is noticed within a settle of a few seconds.
POLL_INTERVAL = 3

MakeHub = Callable[..., RunningHub]
MakeScenario = Callable[..., Scenario]

#: Profiles of the fault hubs: JupyterHub's CPU default and three GPU sizes.
PROFILES = [
    {"display_name": "CPU only", "slug": "cpu", "default": True},
    {"display_name": "Small GPU (1g.10gb)", "slug": "mig-1g", "gpu": {"mig_profile": "1g.10gb"}},
    {"display_name": "Medium GPU (3g.40gb)", "slug": "mig-3g", "gpu": {"mig_profile": "3g.40gb"}},
    {"display_name": "Whole GPU", "slug": "gpu-1", "gpu": {"gpus": 1}},
]


def engine_up(engine: Any) -> None:
    """Start the private engine again if a test stopped it and failed before starting it."""
    proc = getattr(engine, "_proc", None)
    if proc is None or proc.poll() is not None:
        engine.start()


@pytest.fixture(scope="session")
def rows_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return out_dir(tmp_path_factory.mktemp("reliability"))


@pytest.fixture
def fault_hub(
    engine: Any, gpusim: Any, singleuser_image: str, tmp_path: Path
) -> Iterator[MakeHub]:
    """``fault_hub(hub_id, config_extra=..., env_extra=..., policy=..., start=True)``: a
    hub with its own ``hub_id`` and container prefix (two hubs may serve the same user
    names), the suite's profiles, a 5 s poll and its operation log in its work directory.
    Stopped after the test, before ``gpusim`` removes the containers."""
    hubs: list[RunningHub] = []
    # Copies gpuspawner saved and then untagged (a container was made from each) are left
    # as dangling images once earlier tests' containers are gone: drop them.
    engine.client.api.prune_images(filters={"dangling": True})

    def make(hub_id: str, config_extra: str = "", env_extra: dict[str, str] | None = None,
             policy: str | None = None, start: bool = True) -> RunningHub:
        extra = (
            f"c.GPUSpawner.hub_id = {hub_id!r}\n"
            f"c.DockerSpawner.prefix = {hub_id!r}\n"
            f"c.GPUSpawner.profile_list = {PROFILES!r}\n"
            f"c.Spawner.poll_interval = {POLL_INTERVAL}\n"
        )
        if sizes.SERVER == "stand-in":
            extra += f"c.Spawner.cmd = {standin.command()!r}\n"
        if policy is not None:
            path = tmp_path / f"{hub_id}-policy.yaml"
            path.write_text(policy)
            extra += f"c.GPUSpawner.policy_file = {str(path)!r}\n"
        hub = RunningHub(engine, singleuser_image, tmp_path / hub_id,
                         config_extra=extra + config_extra, env_extra=env_extra)
        hub.hub_id = hub_id  # type: ignore[attr-defined]
        hubs.append(hub)
        return hub.start() if start else hub

    yield make
    engine_up(engine)
    for hub in reversed(hubs):
        hub.stop()


@pytest.fixture
def scenario(
    engine: Any, gpusim: Any, rows_dir: Path, request: pytest.FixtureRequest
) -> Iterator[MakeScenario]:
    """``scenario(name, size)``: the bookkeeping of one row (see measure.Scenario)."""
    made: list[Scenario] = []

    def make(name: str, size: Any) -> Scenario:
        scn = Scenario(name, size, engine, gpusim, rows_dir, test=request.node.nodeid,
                       full=sizes.FULL, server=sizes.SERVER)
        made.append(scn)
        return scn

    yield make
    for scn in made:
        scn.holders.stop()
