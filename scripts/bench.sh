#!/usr/bin/env bash
# Benchmarks bnlab against the obvious Python PyTorch eager script (bench/bench_torch.py) in one
# run, on the same machine, with 1 intra-op thread on both sides, and writes BENCHMARKS.md.
# Timing is a benchmark, never a pass/fail test.
# Usage: scripts/bench.sh [STUDY_SAMPLES]   (default 1000 for bnlab, 200 for Python; rates are per sample-epoch)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
"$root/scripts/build.sh" bnlab_app bench_step >&2
build="${BNLAB_BUILD_DIR:-$root/build}"
samples="${1:-1000}"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
rss() { sed -n 's/^rss_kb //p' "$1"; }

# Python side.
/usr/bin/time -f "rss_kb %M" -o "$tmp/py.rss" /usr/bin/python3 "$root/bench/bench_torch.py" 200 > "$tmp/py.out"
py() { sed -n "s/^$1 //p" "$tmp/py.out"; }

# bnlab side: pretraining (1 epoch, as the Python script), step latency, the per-sample study.
/usr/bin/python3 - "$root/configs/seed_repro.json" "$tmp" "$samples" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c["pretrain"]["epochs"] = 1
c["strategies"] = ["frozen"]
json.dump(c, open(sys.argv[2] + "/pre.json", "w"))
c = json.load(open(sys.argv[1]))
del c["finetune"]["sample"]
c["finetune"]["samples"] = {"count": int(sys.argv[3]), "seed": 1}
c["strategies"] = ["train", "frozen"]
json.dump(c, open(sys.argv[2] + "/study.json", "w"))
PY
/usr/bin/time -f "rss_kb %M" -o "$tmp/pre.rss" "$build/bin/bnlab" run "$tmp/pre.json" --out "$tmp/pre" --verbose 0 --no-plots --force
"$build/bin/bench_step" "$root/configs/seed_repro.json" 3000 > "$tmp/step.out"
cp "$tmp/pre/pretrained.pt" "$tmp/pre.pt"
for jobs in 1 2; do
  /usr/bin/time -f "rss_kb %M" -o "$tmp/study$jobs.rss" "$build/bin/bnlab" run "$tmp/study.json" --out "$tmp/study$jobs" \
    --verbose 0 --no-plots --jobs $jobs
done
val() { /usr/bin/python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$@"; }
pre_bn=$(val "$tmp/pre/manifest.json" "100000 / m['timings_s']['pretrain']")
study1=$(val "$tmp/study1/manifest.json" "$samples * 2 * 10 / m['timings_s']['finetune']")
study2=$(val "$tmp/study2/manifest.json" "$samples * 2 * 10 / m['timings_s']['finetune']")
step_f=$(sed -n 's/^step_us frozen //p' "$tmp/step.out"); step_t=$(sed -n 's/^step_us train //p' "$tmp/step.out")
ratio() { /usr/bin/python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}x')" "$1" "$2"; }

out="$root/BENCHMARKS.md"
{
  echo "# Benchmarks"
  echo
  echo "Made by \`scripts/bench.sh\` on $(date -u +%Y-%m-%d), $(nproc) cores, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n 1),"
  echo "LibTorch $(/usr/bin/python3 -c 'import torch; print(torch.__version__)') (Debian; the same library under bnlab and under Python), 1 intra-op thread on both sides."
  echo "The Python side is \`bench/bench_torch.py\`: the obvious eager script for the same model and work."
  echo
  echo "| measurement | bnlab | Python PyTorch | ratio (bnlab / Python speed) | issue 7 target |"
  echo "|---|---|---|---|---|"
  printf '| pretraining, samples/s (batch 256, Adam) | %.0f | %.0f | %s | 1.5x |\n' "$pre_bn" "$(py pretrain_samples_per_s)" "$(ratio "$pre_bn" "$(py pretrain_samples_per_s)")"
  printf '| fine-tuning step, frozen BN, us/step | %s | %s | %s | 3x |\n' "$step_f" "$(py step_us_frozen)" "$(ratio "$(py step_us_frozen)" "$step_f")"
  printf '| fine-tuning step, train-mode BN (Keras numerics), us/step | %s | %s | %s | 3x |\n' "$step_t" "$(py step_us_train)" "$(ratio "$(py step_us_train)" "$step_t")"
  printf '| per-sample study (train + frozen, 10 epochs), sample-epochs/s, 1 job | %.0f | %.0f | %s | 50x |\n' "$study1" "$(py study_sample_epochs_per_s)" "$(ratio "$study1" "$(py study_sample_epochs_per_s)")"
  printf '| the same, --jobs 2 (all cores) | %.0f | %.0f | %s | 50x |\n' "$study2" "$(py study_sample_epochs_per_s)" "$(ratio "$study2" "$(py study_sample_epochs_per_s)")"
  echo
  echo "Peak RSS: bnlab pretraining $(( $(rss "$tmp/pre.rss") / 1024 )) MiB, bnlab study $(( $(rss "$tmp/study1.rss") / 1024 )) MiB (1 job) / $(( $(rss "$tmp/study2.rss") / 1024 )) MiB (2 jobs); Python script (all three parts) $(( $(rss "$tmp/py.rss") / 1024 )) MiB."
  echo
  echo "bnlab's study has $samples samples, Python's 200: both rates are per sample-epoch, each including pretrained-weight reloads, the loss read before each update and the val_loss pass."
} > "$out.tmp"
mv "$out.tmp" "$out"
cat "$out"
