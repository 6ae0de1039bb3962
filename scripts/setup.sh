#!/usr/bin/env bash
# Installs, only when missing, the Debian packages bnlab needs to build, test and plot.
# Usage: setup.sh [--build]   (--build: only what building and running bnlab needs)
# Idempotent: a second run with everything present does nothing and touches no network.
set -euo pipefail

# What building and running bnlab needs (the CI recipes' smoke job: setup.sh --build).
build_packages=(
  build-essential cmake ninja-build ccache pkg-config
  libtorch-dev nlohmann-json3-dev libcxxopts-dev libgtest-dev
  libhdf5-dev libzip-dev libsqlite3-dev
  protobuf-compiler libprotobuf-dev  # tensorboard/ event files (lib/proto)
  gnuplot-nox
)
# What the test suite needs besides: references, fuzzing, services, a browser.
test_packages=(
  python3-torch python3-numpy python3-h5py python3-pandas
  clang libclang-rt-14-dev
  slurm-wlm munge util-linux
  python3-yaml yamllint  # tests/ci/test_ci_recipes.py
  python3-crc32c  # tests/report/test_tensorboard.py
  chromium python3-pil fonts-dejavu-core  # tests/report/test_report_html.py
)
packages=("${build_packages[@]}")
case "${1:-}" in
  "") packages+=("${test_packages[@]}") ;;
  --build) ;;
  *) echo "setup.sh: unknown option \"$1\" (none: everything; --build: only what building and running bnlab needs)" >&2; exit 2 ;;
esac

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "setup.sh: installing ${missing[*]}" >&2
sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "setup.sh: done" >&2
