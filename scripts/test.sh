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
# Two workers, each with its own private engine and port range (tests/conftest.py): the
# Docker and hub tests spend most of their time waiting, so two halve the wall time on two
# cores. GPUSPAWNER_TEST_WORKERS=0 runs everything in this one process.
workers=${GPUSPAWNER_TEST_WORKERS:-2}
if [[ $workers == 0 ]]; then
  exec .venv/bin/pytest -ra "$@"
fi
exec .venv/bin/pytest -ra -n "$workers" --dist loadfile "$@"
