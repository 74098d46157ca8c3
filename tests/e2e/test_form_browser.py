"""A student's Start, in a real browser: the form with live availability, then JupyterLab.

Debian's chromium, driven from Python; the screenshot of the form is kept under
``artifacts/`` (and is the one the README shows).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ..hub import hub_password
from .conftest import MakeHub
from .test_admin_browser import ARTIFACTS, browser  # noqa: F401 - the fixture
from .test_options import IMAGES, tag_lab_images

pytestmark = pytest.mark.docker


def test_student_picks_a_profile_and_an_image_in_the_form(
    make_hub: MakeHub, browser, engine, singleuser_image, tmp_path: Path  # noqa: F811
):
    tag_lab_images(engine, singleuser_image)
    hub = make_hub(config_extra=f"c.DockerSpawner.allowed_images = {IMAGES!r}\n")
    hub.spawn("bo", "mig-3g")  # someone already holds a 3g slice
    page = browser.new_context(viewport={"width": 1100, "height": 760}).new_page()
    page.goto(f"{hub.url}/hub/login")
    page.fill("#username_input", "ann")
    page.fill("#password_input", hub_password(hub))
    page.click("#login_submit")
    page.wait_for_url("**/hub/**")
    page.goto(f"{hub.url}/hub/spawn")
    form = page.locator(".gpuspawner-profiles")
    form.wait_for()
    text = form.inner_text()
    assert "1g.10gb: 9 of 9 free" in text
    assert "3g.40gb: 2 of 3 free" in text
    assert "Whole GPU" not in text  # the default policy allows no whole GPUs: not offered
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "spawn-form.png"), full_page=True)
    page.check('input[name="profile"][value="mig-1g"]')
    # Each profile offers the lab's images (DockerSpawner's allowed_images).
    page.select_option('select[name="profile-option-mig-1g--image"]', "B")
    page.click('form input[type="submit"], form button[type="submit"]')
    page.wait_for_url("**/user/ann/**", timeout=120_000)
    container = hub.container("ann")
    assert container.labels["ds01.profile"] == "mig-1g"
    assert container.labels["ds01.gpu.uuid"].startswith("MIG-")
    assert container.attrs["Config"]["Image"] == "lab/notebook:b"
