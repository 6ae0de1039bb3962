#!/usr/bin/env bash
# Configures (once) and builds bnlab in Release into build/ with ninja; used by run.sh and test.sh.
# Usage: build.sh [TARGET...]   (default: everything, tests included)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${BNLAB_BUILD_DIR:-$root/build}"
if [ ! -f "$build/build.ninja" ]; then
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
fi
# Two compile jobs fit the machine's 2 cores and the ~1.5 GiB each torch translation unit takes.
targets=()
for t in "$@"; do targets+=(--target "$t"); done
cmake --build "$build" "${targets[@]}" -- -j "${BNLAB_JOBS:-$(nproc)}"
