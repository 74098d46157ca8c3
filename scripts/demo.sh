#!/usr/bin/env bash
# The demo: JupyterHub with gpuspawner on a simulated A100 x4 host. Installs what it needs
# (scripts/setup.sh), then runs scripts/demo.py; open http://127.0.0.1:8000 and log in.
# Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) != 0 ]]; then
  echo "scripts/demo.sh: run as root: the demo starts its own dockerd and bridge" >&2
  exit 2
fi
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
