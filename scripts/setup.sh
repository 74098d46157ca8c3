#!/usr/bin/env bash
# Installs what gpuspawner's demo and tests need on a Debian machine, as root, idempotently:
# Debian's Docker engine and debootstrap (the test image is built here, offline from a base
# image registry), Node's configurable-http-proxy for JupyterHub, and a Python venv in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(docker.io docker-compose debootstrap iproute2 iptables nodejs npm python3-venv
              ca-certificates curl openssl)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# A node from elsewhere (nvm, the image) is as good as Debian's.
if command -v node >/dev/null && command -v npm >/dev/null; then
  kept=(); for p in "${missing[@]}"; do [[ $p == nodejs || $p == npm ]] || kept+=("$p"); done
  missing=("${kept[@]}")
fi
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v configurable-http-proxy >/dev/null; then
  # configurable-http-proxy 5 needs Node 20; Debian bookworm's is 18: take 4 there.
  chp=configurable-http-proxy
  if (( $(node -p 'process.versions.node.split(".")[0]') < 20 )); then chp=configurable-http-proxy@4; fi
  echo "setup: installing $chp"
  npm install -g --silent "$chp" >/dev/null
fi

# Debian's chromium for the admin page's browser test (never a downloaded browser).
bash scripts/setup-browser.sh

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [[ ! -e $stamp ]]; then
  log=$(mktemp)
  if ! { .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[test,demo]'; } \
       >"$log" 2>&1; then
    cat "$log" >&2; echo "setup: pip install failed (above)" >&2; exit 1
  fi
  rm -f "$log"
  rm -f .venv/.installed-*; touch "$stamp"
fi
echo "setup: ready (.venv, docker.io $(dpkg-query -W -f='${Version}' docker.io), node $(node --version))"
