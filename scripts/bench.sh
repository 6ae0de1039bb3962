#!/usr/bin/env bash
# Benchmarks bnlab against the obvious Python PyTorch eager script (bench/bench_torch.py) in one
# run, on the same machine, with 1 intra-op thread on both sides, and writes BENCHMARKS.md.
# bnlab's torch engine (torch::nn + autograd, --engine torch) is measured too, as "before".
# Timing is a benchmark, never a pass/fail test.
# Usage: scripts/bench.sh [STUDY_SAMPLES]   (default 1000 for bnlab, 200 for Python and for the
#                                            torch engine; every rate is per sample-epoch)
#        scripts/bench.sh --scale           only the scale section (scripts/bench_scale.sh:
#                                            studies of up to 1.8 million runs, BENCHMARKS-scale.md)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${1:-}" = "--scale" ]; then exec "$root/scripts/bench_scale.sh"; fi
"$root/scripts/setup.sh"
"$root/scripts/build.sh" bnlab_app bench_step >&2
build="${BNLAB_BUILD_DIR:-$root/build}"
bin="$build/bin/bnlab"
samples="${1:-1000}"
slow_samples=200
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
rss() { echo $(( $(sed -n 's/^rss_kb //p' "$1") / 1024 )); }
timed() { local out="$1"; shift; /usr/bin/time -f "rss_kb %M" -o "$out" "$@"; }

echo "bench: Python script (pretraining, steps, study of $slow_samples samples)..." >&2
timed "$tmp/py.rss" /usr/bin/python3 "$root/bench/bench_torch.py" "$slow_samples" > "$tmp/py.out"
py() { sed -n "s/^$1 //p" "$tmp/py.out"; }

# The configs: seed_repro with one pretraining epoch (as the Python script), and the study.
/usr/bin/python3 - "$root/configs/seed_repro.json" "$tmp" "$samples" "$slow_samples" <<'PY'
import json, sys
base = json.load(open(sys.argv[1]))
c = dict(base, pretrain=dict(base["pretrain"], epochs=1), strategies=["frozen"])
json.dump(c, open(sys.argv[2] + "/pre.json", "w"))
for name, count in (("study", int(sys.argv[3])), ("study_slow", int(sys.argv[4]))):
    finetune = {k: v for k, v in base["finetune"].items() if k != "sample"}
    finetune["samples"] = {"count": count, "seed": 1}
    json.dump(dict(base, finetune=finetune), open(sys.argv[2] + f"/{name}.json", "w"))
PY

echo "bench: bnlab pretraining (both engines)..." >&2
for engine in batched torch; do
  timed "$tmp/pre_$engine.rss" "$bin" run "$tmp/pre.json" --out "$tmp/pre_$engine" --engine "$engine" --verbose 0 --no-plots --force
done
echo "bench: fine-tuning steps..." >&2
"$build/bin/bench_step" "$root/configs/seed_repro.json" 3000 > "$tmp/step.out"

# Studies start from cached weights (pretraining is measured above), each in a fresh directory.
# One pretraining per engine for the study config, kept as the cache every measured run copies.
for engine in batched torch; do
  "$bin" run "$tmp/study_slow.json" --out "$tmp/cache_$engine" --engine "$engine" --verbose 0 --no-plots \
    --set 'strategies=["frozen"]' --set 'finetune.samples=[0]' >/dev/null 2>&1
done
echo "bench: bnlab studies..." >&2
run_study() {  # NAME CONFIG ENGINE JOBS
  # A copy of the cache run: bnlab reuses its weights (a folder holding only pretrained.pt is
  # not a bnlab run directory, and bnlab refuses it).
  rm -rf "$tmp/$1"; cp -r "$tmp/cache_$3" "$tmp/$1"; rm -f "$tmp/$1"/finetuned_*.pt
  timed "$tmp/$1.rss" "$bin" run "$2" --out "$tmp/$1" --engine "$3" --verbose 0 --no-plots --jobs "$4"
}
run_study study1 "$tmp/study.json" batched 1
run_study study2 "$tmp/study.json" batched "$(nproc)"
run_study torch1 "$tmp/study_slow.json" torch 1

val() { /usr/bin/python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$@"; }
pre_b=$(val "$tmp/pre_batched/manifest.json" "100000 / m['timings_s']['pretrain']")
pre_t=$(val "$tmp/pre_torch/manifest.json" "100000 / m['timings_s']['pretrain']")
epochs=$(( samples * 9 * 10 )); slow_epochs=$(( slow_samples * 9 * 10 ))
phase() { val "$tmp/$1/manifest.json" "$2 / m['timings_s']['finetune']"; }
whole() { val "$tmp/$1/manifest.json" "$2 / m['timings_s']['total']"; }
step() { sed -n "s/^step_us $1 $2 $3 //p" "$tmp/step.out"; }
ratio() { /usr/bin/python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}x')" "$1" "$2"; }
py_study=$(py study_sample_epochs_per_s)
cross=$(cmp -s "$tmp/study1/curves.csv" "$tmp/study2/curves.csv" && echo "byte-identical" || echo "DIFFERENT")

out="$root/BENCHMARKS.md"
{
  echo "# Benchmarks"
  echo
  echo "Made by \`scripts/bench.sh\` on $(date -u +%Y-%m-%d), $(nproc) cores, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n 1),"
  echo "LibTorch $(/usr/bin/python3 -c 'import torch; print(torch.__version__)') (Debian; the same library under bnlab and under Python), 1 intra-op thread everywhere."
  echo "Python is \`bench/bench_torch.py\`, the obvious eager script for the same model and work. \"torch engine\" is"
  echo "bnlab's \`--engine torch\` (torch::nn + autograd, what bnlab ran before the batched engine); \"bnlab\" is the default."
  echo "Ratios are speed over the Python script's speed, measured in this one run."
  echo
  echo "| measurement | bnlab | torch engine | Python PyTorch | bnlab / Python | issue 7 target |"
  echo "|---|---|---|---|---|---|"
  printf '| pretraining, samples/s (seed_repro, batch 256, Adam, 1 epoch) | %.0f | %.0f | %.0f | %s | 1.5x |\n' \
    "$pre_b" "$pre_t" "$(py pretrain_samples_per_s)" "$(ratio "$pre_b" "$(py pretrain_samples_per_s)")"
  for preset in frozen train; do
    label="frozen BN"; [ $preset = train ] && label="train-mode BN (Keras numerics)"
    printf '| fine-tuning step, %s, us/step (1 sample) | %.2f | %.2f | %.2f | %s | 3x |\n' "$label" \
      "$(step batched $preset 1)" "$(step torch $preset 1)" "$(py step_us_$preset)" "$(ratio "$(py step_us_$preset)" "$(step batched $preset 1)")"
  done
  printf '| per-sample study (9 presets x 10 epochs), sample-epochs/s, fine-tuning phase, 1 job | %.0f | %.0f | %.0f | %s | 50x |\n' \
    "$(phase study1 $epochs)" "$(phase torch1 $slow_epochs)" "$py_study" "$(ratio "$(phase study1 $epochs)" "$py_study")"
  printf '| the same, whole bnlab run command (start-up, reports, files), 1 job | %.0f | %.0f | %.0f | %s | |\n' \
    "$(whole study1 $epochs)" "$(whole torch1 $slow_epochs)" "$py_study" "$(ratio "$(whole study1 $epochs)" "$py_study")"
  printf '| fine-tuning phase, --jobs %s (all cores) | %.0f | | %.0f | %s | |\n' "$(nproc)" \
    "$(phase study2 $epochs)" "$py_study" "$(ratio "$(phase study2 $epochs)" "$py_study")"
  printf '| whole command, --jobs %s (all cores) | %.0f | | %.0f | %s | |\n' "$(nproc)" \
    "$(whole study2 $epochs)" "$py_study" "$(ratio "$(whole study2 $epochs)" "$py_study")"
  echo
  echo "Peak RSS (MiB): bnlab pretraining $(rss "$tmp/pre_batched.rss") (torch engine $(rss "$tmp/pre_torch.rss")); bnlab study $(rss "$tmp/study1.rss") with 1 job,"
  echo "$(rss "$tmp/study2.rss") with $(nproc) jobs (torch engine, $slow_samples samples: $(rss "$tmp/torch1.rss")); Python script, all three parts: $(rss "$tmp/py.rss")."
  echo
  echo "The study: bnlab $samples samples, Python and the torch engine $slow_samples (rates are per sample-epoch). The fine-tuning phase"
  echo "is manifest.json's \`timings_s.finetune\` (preparing each strategy's model, fine-tuning, progress files); the whole command"
  echo "adds loading the cached weights, writing every report and process start-up. curves.csv at 1 and $(nproc) jobs: $cross."
  echo "The 32-lane engine step is $(step batched train 32) us per lane (train preset). Memory flatness over 3000 epochs is a test:"
  echo "\`Memory.FlatAcrossEpochs\` in tests/integration/test_batched.cpp."
} > "$out.tmp"
mv "$out.tmp" "$out"
cat "$out"

# The scale section: studies as large as the machine holds.
"$root/scripts/bench_scale.sh"
