#!/usr/bin/env bash
# One model.layers config on both engines: every curve point, evaluate before and evaluate after
# of every (strategy, sample) against scripts/reference.py, Python PyTorch written from the
# layer list bnlab records (architecture.json), within 1e-5 relative.
# Usage: check_layout.sh BNLAB_BINARY SOURCE_DIR NAME
set -euo pipefail
bin="$1"; src="$2"; name="$3"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
for engine in batched torch; do
  "$bin" run "$src/configs/layouts/$name.json" --out "$tmp/$engine" --engine "$engine" --verbose 0 --no-plots
  test -s "$tmp/$engine/architecture.json"
  echo "$name, $engine engine:"
  /usr/bin/python3 "$src/scripts/reference.py" "$tmp/$engine" --relative --tol 1e-5 | tail -n 1
done
