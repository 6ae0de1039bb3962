#!/usr/bin/env bash
# Regenerates tests/golden/smoke_<name>.json from a fresh run of every configs/smoke/*.json,
# after cross-checking each run against the independent Python re-implementation
# (scripts/reference.py). Run it only when a change of results is intended, and say why in
# the commit.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${BNLAB_BUILD_DIR:-$root/build}/bin/bnlab"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
for cfg in "$root"/configs/smoke/*.json; do
  name="$(basename "$cfg" .json)"
  "$bin" run "$cfg" --out "$tmp/$name" --verbose 0 --no-plots
  /usr/bin/python3 "$root/scripts/reference.py" "$tmp/$name" | tail -n 1
  "$bin" golden "$tmp/$name" -o "$root/tests/golden/smoke_$name.json"
done
