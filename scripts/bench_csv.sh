#!/usr/bin/env bash
# Benchmarks bnlab's CSV reader on ROWS x 50 columns (default 1,000,000 rows: 49 features and a
# target, numbers as numpy's "%.7g" writes them), against what a skilled user would write in
# Python (pandas.read_csv, its C parser, straight to float32) and against the machine's limit
# for the same bytes (reading the file from the page cache: cat > /dev/null). Prints the times,
# the peak memory of each and the ratios; timing is a benchmark, never a pass/fail test.
# bnlab's time is manifest.json's timings_s.data: reading and parsing the file, standardizing
# the features and building the model, before pretraining.
# Usage: scripts/bench_csv.sh [ROWS]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
rows="${1:-1000000}"
"$root/scripts/setup.sh"
"$root/scripts/build.sh" bnlab_app >&2
bin="${BNLAB_BUILD_DIR:-$root/build}/bin/bnlab"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
rss_mib() { echo $(( $(sed -n 's/^rss_kb //p' "$1") / 1024 )); }

echo "bench_csv: writing $rows x 50 ..." >&2
/usr/bin/python3 - "$tmp/big.csv" "$rows" <<'PY'
import sys
import numpy as np
path, rows = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
with open(path, "w") as f:
    f.write(",".join([f"x{i}" for i in range(49)] + ["y"]) + "\n")
    for start in range(0, rows, 100000):
        block = rng.standard_normal((min(100000, rows - start), 50)).astype(np.float32)
        np.savetxt(f, block, fmt="%.7g", delimiter=",")
PY
bytes=$(stat -c %s "$tmp/big.csv")
cat > "$tmp/big.json" <<EOF
{"name": "bench_csv", "data": {"source": "csv", "path": "big.csv", "target_columns": ["y"]},
 "model": {"hidden": [8], "loss": "mse"}, "pretrain": {"epochs": 1, "batch_size": 65536},
 "finetune": {"sample": 0, "epochs": 1}, "strategies": ["frozen"]}
EOF
cat "$tmp/big.csv" > /dev/null  # in the page cache for every reader below

echo "bench_csv: cat ..." >&2
start=$(date +%s.%N); cat "$tmp/big.csv" > /dev/null; end=$(date +%s.%N)
cat_s=$(awk -v a="$start" -v b="$end" 'BEGIN { print b - a }')

echo "bench_csv: bnlab ..." >&2
/usr/bin/time -f "rss_kb %M" -o "$tmp/bnlab.rss" "$bin" run "$tmp/big.json" --out "$tmp/run" --no-plots --verbose 0
bnlab_s=$(/usr/bin/python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['timings_s']['data'])" "$tmp/run/manifest.json")

echo "bench_csv: pandas ..." >&2
/usr/bin/time -f "rss_kb %M" -o "$tmp/pandas.rss" /usr/bin/python3 - "$tmp/big.csv" > "$tmp/pandas.out" <<'PY'
import sys, time
import numpy as np
import pandas as pd
t = time.perf_counter()
x = pd.read_csv(sys.argv[1], dtype=np.float32, engine="c").to_numpy()
print(time.perf_counter() - t, x.shape[0])
PY
read -r pandas_s pandas_rows < "$tmp/pandas.out"
[ "$pandas_rows" = "$rows" ] || { echo "bench_csv: pandas read $pandas_rows rows, want $rows" >&2; exit 1; }

data_mib=$(( rows * 50 * 4 / 1048576 ))
printf '\n## CSV reading: %s rows x 50 columns (%s MiB of text, %s MiB as float32), measured %s\n\n' \
  "$rows" "$(( bytes / 1048576 ))" "$data_mib" "$(date -u +%Y-%m-%d)"
printf '| | time | peak RSS | time / bnlab'"'"'s |\n|---|---|---|---|\n'
printf '| bnlab (read, parse, standardize, build the model) | %.2f s | %s MiB | 1 |\n' "$bnlab_s" "$(rss_mib "$tmp/bnlab.rss")"
printf '| pandas.read_csv(dtype=float32), C parser | %.2f s | %s MiB | %.2f |\n' "$pandas_s" "$(rss_mib "$tmp/pandas.rss")" "$(awk -v a="$pandas_s" -v b="$bnlab_s" 'BEGIN { print a / b }')"
printf '| cat FILE > /dev/null (the bytes from the page cache) | %.2f s | | %.3f |\n' "$cat_s" "$(awk -v a="$cat_s" -v b="$bnlab_s" 'BEGIN { print a / b }')"
printf '\nbnlab peak RSS is the whole run (pretraining one epoch of a 49-8-1 network included).\n'
