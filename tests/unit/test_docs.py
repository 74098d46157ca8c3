"""The docs that are generated from code are up to date, and name every setting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dockerspawner import DockerSpawner

from gpuspawner.policy import parse_policy
from gpuspawner.spawner import GPUSpawner

ROOT = Path(__file__).resolve().parents[2]


def test_trait_reference_is_generated_from_the_code():
    done = subprocess.run(
        [sys.executable, "scripts/gen_trait_docs.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    text = (ROOT / "docs/reference/traits.md").read_text()
    own = set(GPUSpawner.class_traits(config=True)) - set(DockerSpawner.class_traits(config=True))
    assert own, "GPUSpawner has no traits of its own?"
    for name in own:
        assert f"## `c.GPUSpawner.{name}`" in text
        assert GPUSpawner.class_traits()[name].help, f"{name} has no help"


def test_jupyterhub_help_documents_gpuspawner():
    done = subprocess.run(
        [str(Path(sys.executable).parent / "jupyterhub"), "--help-all"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "--GPUSpawner.policy_file=" in done.stdout
    assert "--GPUSpawner.on_gpu_lost=" in done.stdout


def test_example_policy_in_the_docs_parses():
    parse_policy((ROOT / "docs/examples/policy.yaml").read_text(), "docs/examples/policy.yaml")


def test_every_relative_link_in_the_docs_resolves():
    import re

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
