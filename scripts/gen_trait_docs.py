"""Write docs/reference/traits.md from GPUSpawner's traits, so the reference cannot drift.

    .venv/bin/python scripts/gen_trait_docs.py          # rewrite the file
    .venv/bin/python scripts/gen_trait_docs.py --check  # exit 1 when it is out of date
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dockerspawner import DockerSpawner  # noqa: E402

from gpuspawner.spawner import GPUSpawner  # noqa: E402

TARGET = ROOT / "docs" / "reference" / "traits.md"


def render() -> str:
    own = {
        name: trait
        for name, trait in GPUSpawner.class_traits(config=True).items()
        if name not in DockerSpawner.class_traits(config=True)
    }
    lines = [
        "# GPUSpawner configuration reference",
        "",
        "Generated from the traits' help by `scripts/gen_trait_docs.py`; do not edit by hand.",
        "Every DockerSpawner and Spawner setting also applies (`jupyterhub --help-all`).",
        "",
    ]
    for name in sorted(own):
        trait = own[name]
        default = trait.default_value_repr()
        lines += [
            f"## `c.GPUSpawner.{name}`",
            "",
            f"*{type(trait).__name__}*, default `{default}`",
            "",
            inspect.cleandoc(trait.help or "(no help)"),
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = render()
    if args.check:
        if TARGET.read_text() != text:
            print(f"{TARGET} is out of date: run scripts/gen_trait_docs.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
