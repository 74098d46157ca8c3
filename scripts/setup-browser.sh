#!/usr/bin/env bash
# Installs Debian's browser package (and fonts, so screenshots show real glyphs) for the
# admin page's browser tests, as root, idempotently. The tests drive /usr/bin/chromium from
# Python: no browser is ever downloaded from anywhere but Debian's archive.
set -euo pipefail

APT_PACKAGES=(chromium fonts-dejavu-core fonts-liberation)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup-browser: ${missing[*]} missing; run this script as root" >&2
    exit 1
  fi
  echo "setup-browser: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "setup-browser: ready ($(/usr/bin/chromium --version 2>/dev/null || echo 'chromium ?'))"
