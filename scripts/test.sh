#!/usr/bin/env bash
# The whole test suite: install what is missing, build, run every test with ctest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
"$root/scripts/build.sh"
cd "${BNLAB_BUILD_DIR:-$root/build}"
ctest --output-on-failure -j "${BNLAB_TEST_JOBS:-2}" "$@"
