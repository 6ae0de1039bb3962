#!/usr/bin/env bash
# One smoke config end to end: run it, check it against its committed golden, and check every
# curve point against the independent Python re-implementation (scripts/reference.py).
# Usage: check_smoke.sh BNLAB_BINARY SOURCE_DIR NAME
set -euo pipefail
bin="$1"; src="$2"; name="$3"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
"$bin" run "$src/configs/smoke/$name.json" --out "$tmp/run" --verbose 0 --no-plots
"$bin" check "$tmp/run" --golden "$src/tests/golden/smoke_$name.json" --junit "$tmp/junit.xml"
/usr/bin/python3 "$src/scripts/reference.py" "$tmp/run" --tol 1e-5 | tail -n 1
