#!/usr/bin/env bash
# Builds gpuspawner's images. Two ways:
#
#   --base IMAGE   online, with the `docker` command (a real GPU host): the single-user image
#                  docker/singleuser/Dockerfile on IMAGE, e.g.
#                  nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 or quay.io/jupyter/base-notebook
#   --local        offline, for these test machines (nothing can be pulled): the same
#                  Dockerfile on the Debian base gpuspawner-test/base:bookworm, built in the
#                  tests' private Docker engine with no network, from wheels downloaded on
#                  the host (docker/build_images.py). Makes gpuspawner/singleuser:local.
#   --hub          also (or, without --base/--local, only) the hub image docker/hub/Dockerfile.
#                  With --local: on the same Debian base, offline, from Debian's nodejs .debs
#                  (apt-get --download-only), configurable-http-proxy (npm install --prefix)
#                  and wheels, all fetched on the host. Makes gpuspawner/hub:local.
#
# Both images get the same JupyterHub (the hub's and jupyterhub-singleuser must match):
# --jupyterhub-version, else the one installed in .venv (or in python3).
# Re-running is cheap: Docker's layer cache online, a keyed image and wheel cache offline.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'EOF'

Options: --tag NAME (single-user image), --hub-tag NAME, --hub-base IMAGE,
         --jupyterhub-version X.Y.Z, --extra-packages "PKG ..." (into the single-user venv),
         --pull (online: fetch newer base images first; use it for upgrades)
EOF
}

mode="" base="" hub=0 pull=() tag="" hub_tag="gpuspawner/hub:latest" hub_base="" version="" extra=""
while (($#)); do
  case $1 in
    --local) mode=local ;;
    --base) mode=online; base=${2:?--base needs an image}; shift ;;
    --hub) hub=1 ;;
    --pull) pull=(--pull) ;;
    --tag) tag=${2:?--tag needs a name}; shift ;;
    --hub-tag) hub_tag=${2:?--hub-tag needs a name}; shift ;;
    --hub-base) hub_base=${2:?--hub-base needs an image}; shift ;;
    --jupyterhub-version) version=${2:?--jupyterhub-version needs a version}; shift ;;
    --extra-packages) extra=${2?--extra-packages needs a value}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "build-images: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z $mode && $hub == 0 ]]; then
  usage >&2
  exit 2
fi

if [[ -z $version ]]; then
  for py in .venv/bin/python python3; do
    if command -v "$py" >/dev/null &&
       version=$("$py" -c 'from importlib.metadata import version; print(version("jupyterhub"))' \
                 2>/dev/null); then
      break
    fi
    version=""
  done
fi
if [[ -z $version ]]; then
  echo "build-images: no JupyterHub found in .venv or python3: give --jupyterhub-version" >&2
  exit 2
fi

built=()
seconds() { echo $((SECONDS - $1))s; }

if [[ $mode == local ]]; then
  if [[ ! -x .venv/bin/python ]]; then
    echo "build-images: --local needs the repository's .venv: run bash scripts/setup.sh" >&2
    exit 2
  fi
  if [[ -n $extra ]]; then
    echo "build-images: --extra-packages is for online builds (the wheels are fixed here)" >&2
    exit 2
  fi
  # The Python part starts the private engine, ensures the base image, downloads the wheels
  # (and for --hub the .debs and npm packages) and builds with network_mode=none; it prints
  # the images it made.
  local_args=(--tag "${tag:-gpuspawner/singleuser:local}" --jupyterhub-version "$version")
  if [[ $hub == 1 ]]; then
    [[ -n $hub_base ]] && { echo "build-images: --hub-base is for online builds" >&2; exit 2; }
    [[ $hub_tag == gpuspawner/hub:latest ]] && hub_tag=gpuspawner/hub:local
    local_args+=(--hub --hub-tag "$hub_tag")
  fi
  .venv/bin/python docker/build_images.py "${local_args[@]}"
  exit 0
fi

if ! command -v docker >/dev/null; then
  echo "build-images: the docker command is not installed" >&2
  exit 2
fi

if [[ $mode == online ]]; then
  tag=${tag:-gpuspawner/singleuser:latest}
  start=$SECONDS
  echo "build-images: $tag on $base, jupyterhub $version"
  docker build "${pull[@]}" \
    --build-arg "BASE=$base" \
    --build-arg "JUPYTERHUB_VERSION=$version" \
    --build-arg "EXTRA_PACKAGES=$extra" \
    -t "$tag" docker/singleuser
  built+=("$tag (single-user, on $base, $(seconds "$start"))")
fi

if [[ $hub == 1 ]]; then
  start=$SECONDS
  hub_args=(--build-arg "JUPYTERHUB_VERSION=$version")
  [[ -n $hub_base ]] && hub_args+=(--build-arg "BASE=$hub_base")
  echo "build-images: $hub_tag, jupyterhub $version"
  # The context is the repository root (the source, pyproject.toml, jupyterhub_config.py);
  # docker/hub/Dockerfile.dockerignore keeps the rest out of it.
  docker build "${pull[@]}" "${hub_args[@]}" -f docker/hub/Dockerfile -t "$hub_tag" .
  built+=("$hub_tag (hub, $(seconds "$start"))")
fi

echo "build-images: built, jupyterhub $version:"
printf '  %s\n' "${built[@]}"
