"""Choices inside a profile, as a user and the engine see them: DockerSpawner's
``allowed_images`` as an image choice, KubeSpawner-shaped ``profile_options``, a site's own
options passed through, and a new image choice that replaces the container without loss."""

from __future__ import annotations

import pytest

from .conftest import MakeHub
from .test_promises import run_in
from .test_spawn import STREAM

pytestmark = pytest.mark.docker

IMAGES = {"A": "lab/notebook:a", "B": "lab/notebook:b"}


def tag_lab_images(engine, singleuser_image: str) -> None:
    """Two names for the test's notebook image, as a lab's registry would offer two."""
    image = engine.client.images.get(singleuser_image)
    for name in IMAGES.values():
        repository, tag = name.split(":")
        image.tag(repository, tag)


OPTIONS_CONFIG = f"""
c.DockerSpawner.allowed_images = {IMAGES!r}
c.GPUSpawner.profile_list = [
    {{"display_name": "CPU only", "slug": "cpu", "default": True}},
    {{"display_name": "Small GPU", "slug": "mig-1g", "gpu": {{"mig_profile": "1g.10gb"}}}},
    {{"display_name": "Memory", "slug": "mem",
      "profile_options": {{"memory": {{"display_name": "Memory", "choices": {{
          "small": {{"display_name": "512 MB", "kubespawner_override": {{"mem_limit": "512M"}}}},
          "large": {{"display_name": "1 GB", "kubespawner_override": {{"mem_limit": "1G"}}}},
      }}}}}}}},
]
"""


def config(container) -> dict:
    container.reload()
    return container.attrs["Config"]


def test_image_choices_options_and_a_new_image_without_loss(
    make_hub: MakeHub, engine, singleuser_image
):
    tag_lab_images(engine, singleuser_image)
    hub = make_hub(config_extra=OPTIONS_CONFIG + STREAM)

    # DockerSpawner's {"image": name}, and a site's own option beside it.
    hub.spawn("ann", "cpu", options={"image": "B", "course": "ml101"})
    first = hub.container("ann")
    assert config(first)["Image"] == "lab/notebook:b"
    assert "GPUSPAWNER_IMAGE=lab/notebook:b" in config(first)["Env"]
    assert hub.server_model("ann")["user_options"] == {
        "profile": "cpu", "image": "B", "course": "ml101"}
    assert run_in(engine, first.id, "echo made-on-b > /home/jovyan/notes.txt && echo ok") == "ok"
    hub.stop_server("ann")

    # Another image: a new container from it; the old one is kept, files and all.
    hub.spawn("ann", "cpu", options={"image": "A"})
    second = hub.container("ann")
    assert second.id != first.id and config(second)["Image"] == "lab/notebook:a"
    assert any("Image changed from lab/notebook:b to lab/notebook:a" in m
               for m in hub.last_progress), hub.last_progress
    saves = [e for e in hub.events() if e["event"] == "container.save"]
    assert [e["reason"] for e in saves] == ["image-changed"]
    kept = [t for i in engine.client.images.list(name="gpuspawner-kept/*") for t in i.tags]
    assert len(kept) == 1 and kept[0].startswith("gpuspawner-kept/jupyter-ann:")
    out = engine.client.containers.run(kept[0], ["/home/jovyan/notes.txt"], remove=True,
                                       entrypoint=["cat"])
    assert out.decode().strip() == "made-on-b"
    hub.stop_server("ann")
    # The same choice again: the same container, as it was.
    hub.spawn("ann", "cpu", options={"image": "A"})
    assert hub.container("ann").id == second.id

    # A choice inside a profile (KubeSpawner's shape): Docker gets the memory limit.
    hub.spawn("bob", "mem", options={"memory": "large"})
    bob = hub.container("bob")
    bob.reload()
    assert bob.attrs["HostConfig"]["Memory"] == 1024**3

    # What is not offered: refused at once (a hub that answers a quick refusal in the
    # request itself), naming what may be chosen; nothing created.
    hub.stop()
    hub = make_hub(config_extra=OPTIONS_CONFIG)
    for options, words in [
        ({"image": "lab/notebook:a"}, "You may choose: A, B."),
        ({"image": "A", "device_ids": ["MIG-x"]}, "device_ids cannot be chosen"),
        ({"memory": "huge"}, "You may choose: small, large."),
    ]:
        response = hub.spawn("cy", "mem" if "memory" in options else "cpu", options=options)
        assert response.status_code == 400, response.text
        assert words in response.json()["message"], response.text
    assert hub.container("cy") is None
