"""Fixtures that run a real JupyterHub (tests/hub.py) on the private engine per test.

Function scope on purpose: every test gets a fresh database, fresh ports and a fresh
simulated host (``gpusim``), so tests never see each other's users, servers or devices. The
hub is stopped before ``gpusim`` removes the containers, because fixtures tear down in the
reverse order of their set-up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ..hub import RunningHub

MakeHub = Callable[..., RunningHub]


@pytest.fixture
def make_hub(
    engine: Any, gpusim: Any, singleuser_image: str, tmp_path: Path
) -> Iterator[MakeHub]:
    """Factory for hubs with their own config: ``make_hub(config_extra=..., env_extra=...)``.

    Each hub gets its own work directory under ``tmp_path``; all are stopped after the test.
    """
    hubs: list[RunningHub] = []

    def make(
        config_extra: str = "", env_extra: dict[str, str] | None = None, start: bool = True
    ) -> RunningHub:
        hub = RunningHub(
            engine, singleuser_image, tmp_path / f"hub{len(hubs)}",
            config_extra=config_extra, env_extra=env_extra,
        )
        hubs.append(hub)
        return hub.start() if start else hub

    yield make
    for hub in reversed(hubs):
        hub.stop()


@pytest.fixture
def hub(make_hub: MakeHub) -> RunningHub:
    """A started hub with the default configuration (tests/hub.py DEFAULT_PROFILES)."""
    return make_hub()
