#!/usr/bin/env bash
# The main job: install what is missing, build, and run `bnlab run CONFIG [extra args]`.
# CONFIG defaults to configs/seed_repro.json.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
"$root/scripts/build.sh" bnlab_app >&2  # the app only: the test suite is scripts/test.sh's business
config="${1:-$root/configs/seed_repro.json}"
[ $# -gt 0 ] && shift
exec "${BNLAB_BUILD_DIR:-$root/build}/bin/bnlab" run "$config" "$@"
