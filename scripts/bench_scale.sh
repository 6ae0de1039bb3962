#!/usr/bin/env bash
# The scale section of the benchmarks (scripts/bench.sh runs it; alone: scripts/bench.sh --scale).
# configs/seed_repro.json fine-tuned on N samples x 9 presets x 10 epochs, --jobs = all cores,
# from cached weights, plots on, for N = 1,000 / 10,000 / 100,000; then a study of 1.8 million
# runs (every one of the 100,000 samples x 9 presets x a grid of two learning rates), whose
# summaries are checked against queries on its store. Prints measurements and their ratios to
# the targets of issue 14; a benchmark, never a pass/fail test. Writes BENCHMARKS-scale.md.
# Usage: scripts/bench_scale.sh   (BNLAB_SCALE_MILLION=0 skips the 1.8M-run study)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
"$root/scripts/build.sh" bnlab_app >&2
build="${BNLAB_BUILD_DIR:-$root/build}"
bin="$build/bin/bnlab"
jobs="$(nproc)"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
py=/usr/bin/python3

"$py" - "$root/configs/seed_repro.json" "$tmp" <<'PY'
import json, sys
base = json.load(open(sys.argv[1]))
finetune = {k: v for k, v in base["finetune"].items() if k != "sample"}
for n in (1000, 10000, 100000):
    json.dump(dict(base, finetune=dict(finetune, samples={"count": n, "seed": 1})), open(f"{sys.argv[2]}/s{n}.json", "w"))
json.dump(dict(base, finetune=dict(finetune, samples={"count": 100000, "seed": 1}), grid={"optimizer.lr": [1e-8, 1e-7]}),
          open(f"{sys.argv[2]}/million.json", "w"))
PY
echo "bench_scale: pretraining once (cached for every measured study)..." >&2
"$bin" run "$tmp/s1000.json" --out "$tmp/cache" --verbose 0 --no-plots --set 'strategies=["frozen"]' >/dev/null 2>&1 || true
test -f "$tmp/cache/pretrained.pt"

measure() {  # NAME CONFIG: a copy of the cache run (bnlab reuses its weights), the whole command timed
  # (a folder holding only pretrained.pt is not a bnlab run directory, and bnlab refuses it)
  rm -rf "$tmp/$1"; cp -r "$tmp/cache" "$tmp/$1"; rm -f "$tmp/$1"/finetuned_*.pt
  /usr/bin/time -f "%e %M" -o "$tmp/$1.time" "$bin" run "$2" --out "$tmp/$1" --verbose 0 --jobs "$jobs" >/dev/null 2>"$tmp/$1.err" ||
    [ $? -eq 1 ]  # exit 1: some runs failed (non-finite); the study is still complete
  rm -f "$tmp/$1/pretrained.pt" "$tmp/$1/sample.pt"  # not part of what the study writes
  echo "$(cut -d' ' -f1 "$tmp/$1.time") $(cut -d' ' -f2 "$tmp/$1.time") $(du -sb "$tmp/$1" | cut -f1)"
}
declare -A wall rss size
for n in 1000 10000 100000; do
  echo "bench_scale: $n samples ($((n * 9)) runs)..." >&2
  read -r wall[$n] rss[$n] size[$n] < <(measure "s$n" "$tmp/s$n.json")
done
million=""
if [ "${BNLAB_SCALE_MILLION:-1}" != 0 ]; then
  echo "bench_scale: 1,800,000 runs..." >&2
  read -r mwall mrss msize < <(measure million "$tmp/million.json")
  # Every aggregate of summary.json against the same figure computed by numpy from the store.
  mcheck=$("$py" - "$tmp/million" <<'PY'
import json, sqlite3, sys
import numpy as np
d = sys.argv[1]
s = json.load(open(d + "/summary.json"))
con = sqlite3.connect(d + "/study.sqlite")
bad = 0
for a in s["aggregates"]:
    rows = con.execute("SELECT status, final_gap FROM runs WHERE grid = ? AND strategy = ?", (a["grid"], a["strategy"])).fetchall()
    gaps = np.array([g for st, g in rows if st != "failed"])
    want = dict(runs=len(rows), failed=sum(st == "failed" for st, _ in rows), diverged=sum(st == "diverged" for st, _ in rows))
    for k, v in want.items():
        bad += a[k] != v
    for k, v in (("median", np.median(gaps)), ("p25", np.percentile(gaps, 25)), ("p75", np.percentile(gaps, 75)),
                 ("p90", np.percentile(gaps, 90)), ("mean", gaps.mean())):
        bad += not abs(a["final_gap"][k] - v) <= 1e-12 * max(1.0, abs(v)) + 1e-300
total = con.execute("SELECT count(*) FROM runs").fetchone()[0]
print(f"{total} {len(s['aggregates'])} {bad}")
PY
)
  read -r mruns mgroups mbad <<< "$mcheck"
  million="yes"
fi
finetune() { "$py" -c "import json,sys; print(json.load(open(sys.argv[1]))['timings_s']['finetune'])" "$tmp/s$1/manifest.json"; }
r() { "$py" -c "import sys; print(f'{eval(sys.argv[1]):.2f}')" "$1"; }
mib() { "$py" -c "import sys; print(f'{int(sys.argv[1]) / 1024:.0f}')" "$1"; }
mb() { "$py" -c "import sys; print(f'{int(sys.argv[1]) / 1e6:.1f}')" "$1"; }
us() { "$py" -c "import sys; print(f'{1e6 * float(sys.argv[1]) / float(sys.argv[2]):.1f}')" "$1" "$2"; }

out="$root/BENCHMARKS-scale.md"
{
  echo "# Benchmarks: studies at full scale"
  echo
  echo "Made by \`scripts/bench_scale.sh\` on $(date -u +%Y-%m-%d), $(nproc) cores, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n 1),"
  echo "$(free -g | awk '/^Mem:/ {print $2}') GiB. \`configs/seed_repro.json\`, N samples x 9 presets x 10 epochs, \`--jobs $jobs\`, cached weights,"
  echo "plots on. Whole command: wall time of \`bnlab run\` (start-up, fine-tuning, the store, summaries, plots). Run directory:"
  echo "everything the study writes (the store, summaries, plots, progress; not the cached weights or sample.pt)."
  echo "Fine-tuning per run: manifest.json's \`timings_s.finetune\` (the engines and the store's inserts) / runs."
  echo
  echo "| N samples | runs | whole command (s) | fine-tuning per run (us) | peak RSS (MiB) | run directory (MB) | bytes per run |"
  echo "|---|---|---|---|---|---|---|"
  for n in 1000 10000 100000; do
    echo "| $n | $((n * 9)) | ${wall[$n]} | $(us "$(finetune $n)" $((n * 9))) | $(mib "${rss[$n]}") | $(mb "${size[$n]}") | $(( size[$n] / (n * 9) )) |"
  done
  echo
  echo "| target (issue 14) | measured | ratio to the target |"
  echo "|---|---|---|"
  echo "| 100,000 samples, whole command <= 25 s | ${wall[100000]} s | $(r "${wall[100000]} / 25") |"
  echo "| peak RSS <= 1 GiB | $(mib "${rss[100000]}") MiB | $(r "${rss[100000]} / 1048576") |"
  echo "| run directory <= 300 MB | $(mb "${size[100000]}") MB | $(r "${size[100000]} / 300e6") |"
  echo "| fine-tuning per run flat within 20% (100,000 vs 1,000) | $(us "$(finetune 100000)" 900000) vs $(us "$(finetune 1000)" 9000) us | $(r "$(finetune 100000) / 900000 / ($(finetune 1000) / 9000)") |"
  echo "| peak RSS at 100,000 within 1.5x of 10,000 | $(mib "${rss[100000]}") vs $(mib "${rss[10000]}") MiB | $(r "${rss[100000]} / ${rss[10000]} / 1.5") |"
  if [ -n "$million" ]; then
    echo "| a study of >= 1,000,000 runs completes | $mruns runs in $mwall s, peak RSS $(mib "$mrss") MiB, $(mb "$msize") MB | $(r "1000000 / $mruns") |"
    echo "| its summaries equal queries on its store | $mgroups groups, $mbad figures differ (counts exact; median, IQR, p90, mean of the final gap within 1e-12 relative, numpy) | |"
  fi
  echo
  echo "The floor for the store is the data itself: 20 float64 curve points and 10 figures per run, 240 bytes; the"
  echo "store's bytes per run above include SQLite's records, the strategy and grid names and the page overhead."
} > "$out.tmp"
mv "$out.tmp" "$out"
cat "$out"
