#!/usr/bin/env bash
# The test command: installs what the tests need (scripts/setup.sh), then runs the whole
# suite: unit and property tests, and the Docker/JupyterHub tests against a private Docker
# engine that the tests start themselves (tests/engine.py). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) != 0 ]]; then
  echo "scripts/test.sh: run as root: the tests start their own dockerd and bridge" >&2
  exit 2
fi
bash scripts/setup.sh
.venv/bin/ruff check gpuspawner tests benchmarks scripts docker jupyterhub_config.py
exec .venv/bin/pytest -ra "$@"
