"""The log's rotation is configured once, on the spawner, and the admin service gets the same
settings (``admin.service(c)`` -> environment -> ``Settings``)."""

from __future__ import annotations

import pytest
from traitlets import TraitError
from traitlets.config import Config

from gpuspawner import admin, events
from gpuspawner.admin.app import Admin
from gpuspawner.admin.settings import Settings, SettingsError, parse_bytes
from gpuspawner.traits import GPUSpawnerTraits


def test_spawner_traits_have_the_defaults_and_take_sizes_with_suffixes():
    traits = GPUSpawnerTraits()
    assert traits.events_max_bytes == events.DEFAULT_MAX_BYTES == 10 * 1024 * 1024
    assert traits.events_keep == events.DEFAULT_KEEP_FILES == 5
    config = Config()
    config.GPUSpawnerTraits.events_max_bytes = "20M"
    config.GPUSpawnerTraits.events_keep = 12
    configured = GPUSpawnerTraits(config=config)
    assert configured.events_max_bytes == 20 * 1024 * 1024 and configured.events_keep == 12
    with pytest.raises(TraitError):
        GPUSpawnerTraits(events_keep=-1)
    with pytest.raises(TraitError):
        GPUSpawnerTraits(events_max_bytes="lots")


@pytest.mark.parametrize(("text", "size"), [
    ("10485760", 10485760), ("10M", 10 * 2**20), ("10MiB", 10 * 2**20), ("10mb", 10 * 2**20),
    ("512K", 512 * 1024), ("1.5G", int(1.5 * 2**30)), ("0", 0), (" 2 M ", 2 * 2**20),
])
def test_sizes_read_like_the_spawner_trait(text: str, size: int):
    assert parse_bytes(text) == size


def test_service_settings_from_the_environment():
    plain = Settings.from_env({})
    assert plain.events_max_bytes == 10 * 2**20 and plain.events_keep == 5
    assert plain.docker_events is True
    custom = Settings.from_env({"GPUSPAWNER_EVENTS_MAX_BYTES": "1M",
                                "GPUSPAWNER_EVENTS_KEEP": "9",
                                "GPUSPAWNER_ADMIN_DOCKER_EVENTS": "0"})
    assert custom.events_max_bytes == 2**20 and custom.events_keep == 9
    assert custom.docker_events is False
    for variable, value in (("GPUSPAWNER_EVENTS_MAX_BYTES", "big"),
                            ("GPUSPAWNER_EVENTS_KEEP", "-2"),
                            ("GPUSPAWNER_EVENTS_KEEP", "five"),
                            ("GPUSPAWNER_ADMIN_DOCKER_EVENTS", "maybe")):
        with pytest.raises(SettingsError, match=variable):
            Settings.from_env({variable: value})


def test_admin_service_gets_the_spawner_rotation_settings():
    c = Config()
    c.GPUSpawner.events_file = "/var/log/gpuspawner/events.jsonl"
    c.GPUSpawner.events_max_bytes = "50M"
    c.GPUSpawner.events_keep = 20
    env = admin.service(c)["environment"]
    assert env["GPUSPAWNER_EVENTS_MAX_BYTES"] == "50M"
    assert env["GPUSPAWNER_EVENTS_KEEP"] == "20"
    settings = Settings.from_env(env)
    assert settings.events_max_bytes == 50 * 2**20 and settings.events_keep == 20
    unset = admin.service(Config())["environment"]
    assert "GPUSPAWNER_EVENTS_MAX_BYTES" not in unset  # the service's default is the same


def test_the_service_log_rotates_as_configured(tmp_path):
    settings = Settings(events=str(tmp_path / "e.jsonl"), events_max_bytes=300, events_keep=2)
    service = Admin(settings, world=None, hub=None)  # type: ignore[arg-type]
    log = service.event_log
    assert (log.max_bytes, log.keep_files) == (300, 2)
    for n in range(20):
        log.write(events.SERVER_STOP, user="ann", n=n)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.jsonl", "e.jsonl.1", "e.jsonl.2"]
