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
shopt -s inherit_errexit  # a failure inside $(...) stops the script too
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${1:-}" = "--scale" ]; then exec "$root/scripts/bench_scale.sh"; fi
"$root/scripts/setup.sh"
"$root/scripts/build.sh" bnlab_app bench_step bench_roofline bench_kernels bench_store >&2
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
    if name == "study":  # the peer's study (train and frozen), and each strategy alone
        json.dump(dict(base, finetune=finetune, strategies=["train", "frozen"]), open(sys.argv[2] + "/peer.json", "w"))
        for s in ("train", "frozen"):
            json.dump(dict(base, finetune=finetune, strategies=[s]), open(sys.argv[2] + f"/peer_{s}.json", "w"))
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

# Against the strongest Python peer (bench/bench_peer.py, checked against bnlab's curves before it
# is timed) and against this core's measured limits (bench_roofline). bnlab: best of seven runs of
# each strategy alone, 1 job, no exports (the peer writes nothing either).
echo "bench: the peer study (train, frozen) in bnlab and in Python; the machine's limits..." >&2
best_phase() {  # CONFIG -> "PHASE ENGINES": the best of seven runs, us per sample-epoch, of the
  # fine-tuning phase and of the workers' time in the engines (timings_s.finetune_engines: the
  # phase less its set-up, the sinks and the wait for the store's writer; what the peer times)
  local best="" engines=""
  for i in 1 2 3 4 5 6 7; do
    rm -rf "$tmp/peer_best"; cp -r "$tmp/cache_batched" "$tmp/peer_best"; rm -f "$tmp/peer_best"/finetuned_*.pt
    "$bin" run "$1" --out "$tmp/peer_best" --verbose 0 --no-plots --jobs 1 --export none >/dev/null
    best=$(val "$tmp/peer_best/manifest.json" "min(${best:-1e30}, m['timings_s']['finetune'] * 1e6 / $(( samples * 10 )))")
    engines=$(val "$tmp/peer_best/manifest.json" "min(${engines:-1e30}, m['timings_s']['finetune_engines'] * 1e6 / $(( samples * 10 )))")
  done
  echo "$best $engines"
}
best_train=$(best_phase "$tmp/peer_train.json")  # (inherit_errexit: a failed run stops the script)
best_frozen=$(best_phase "$tmp/peer_frozen.json")
read -r bn_train bn_train_engines <<< "$best_train"
read -r bn_frozen bn_frozen_engines <<< "$best_frozen"
rm -rf "$tmp/peer_run"; cp -r "$tmp/cache_batched" "$tmp/peer_run"; rm -f "$tmp/peer_run"/finetuned_*.pt
"$bin" run "$tmp/peer.json" --out "$tmp/peer_run" --verbose 0 --no-plots --jobs 1 >/dev/null
/usr/bin/python3 "$root/bench/bench_peer.py" "$tmp/peer_run" --repeat 3 > "$tmp/peer.out"
"$build/bin/bench_roofline" > "$tmp/roof.out"
"$build/bin/bench_kernels" 3000 > "$tmp/kern.out"
mkdir -p "$tmp/store"
"$build/bin/bench_store" "$tmp/store" 1000 64 7 > "$tmp/store.out"
"$build/bin/bench_store" "$tmp/store" 20000 160 3 >> "$tmp/store.out"
# store_us RUNS FIELD: bench_store's us per run (field 7: the inserts; 9: with seal()), or a failure.
store_us() { awk -v n="$1" -v f="$2" '$1 == "store_insert" && $3 == n { print $f }' "$tmp/store.out" | grep . ; }
store_1k=$(store_us 1000 7); store_1k_sealed=$(store_us 1000 9)
store_20k=$(store_us 20000 7); store_20k_sealed=$(store_us 20000 9)
peer() { sed -n "s/^$1 //p" "$tmp/peer.out"; }
roof() { sed -n "s/^$1 //p" "$tmp/roof.out"; }

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
  echo "is manifest.json's \`timings_s.finetune\` (preparing each strategy's model, fine-tuning, storing every run, rewriting progress.json while it runs; its final state is written after the phase's clock stops, while the reports are written); the whole command"
  echo "adds loading the cached weights, writing every report and process start-up. curves.csv at 1 and $(nproc) jobs: $cross."
  echo "The 32-lane engine step is $(step batched train 32) us per lane (train preset). Memory flatness over 3000 epochs is a test:"
  echo "\`Memory.FlatAcrossEpochs\` in tests/integration/test_batched.cpp."
  echo
  echo "## Against the strongest Python peer and against the machine"
  echo
  echo "The study: seed_repro, $samples samples, 10 epochs, strategies train and frozen, 1 job, 1 thread. bnlab: the fine-tuning"
  echo "phase of each strategy alone, best of seven runs, no exports; the phase includes storing every run in study.sqlite, which"
  echo "the peer does not do, and 'bnlab, engines only' is the part of it the workers spent preparing models, fine-tuning and collecting curves"
  echo "(\`timings_s.finetune_engines\`; the work the peer's timing covers). The peer: \`bench/bench_peer.py\`, nine ways to write this study"
  echo "in PyTorch (stacked [K, out, in] tensors with autograd, functorch vmap, hand-written batched backward eager and TorchScript,"
  echo "lanes-last tensors in bnlab's float order, with and without two shortcuts exact for this study), each checked against"
  echo "bnlab's curves.csv (max |diff| <= 1e-5) before it is timed; the best that passes is the peer."
  echo
  echo "| approach | train, us/sample-epoch | frozen, us/sample-epoch | curves check |"
  echo "|---|---|---|---|"
  printf '| **bnlab** (fine-tuning phase) | %.2f | %.2f | (the reference) |\n' "$bn_train" "$bn_frozen"
  printf '| bnlab, engines only | %.2f | %.2f | (the same runs) |\n' "$bn_train_engines" "$bn_frozen_engines"
  /usr/bin/python3 - "$tmp/peer.out" <<'PY'
import collections, sys
rows = collections.OrderedDict()
for line in open(sys.argv[1]):
    f = line.split()
    if f and f[0] == "peer":
        rows.setdefault(f[1], {})[f[2]] = (float(f[3]), float(f[4]), f[5])
for name, r in rows.items():
    cell = lambda s: f"{r[s][0]:.2f}" if s in r else "-"
    ok = all(v[2] == "ok" for v in r.values())
    worst = max(v[1] for v in r.values())
    print(f"| {name} | {cell('train')} | {cell('frozen')} | {'ok' if ok else 'FAIL'} (max diff {worst:.2g}) |")
PY
  echo
  peer_all=$(peer peer_best); peer_plain=$(peer peer_best_no_shortcuts)
  echo "The peer: $peer_all us per sample-epoch (mean over the two strategies); without this study's shortcuts: $peer_plain."
  /usr/bin/python3 - "$bn_train" "$bn_frozen" "$peer_all" "$peer_plain" "$bn_train_engines" "$bn_frozen_engines" <<'PY'
import sys
bn = (float(sys.argv[1]) + float(sys.argv[2])) / 2
engines = (float(sys.argv[5]) + float(sys.argv[6])) / 2
for label, arg in (("the peer", sys.argv[3]), ("the peer without shortcuts", sys.argv[4])):
    name, us = arg.split()[0], float(arg.split()[1])
    print(f"bnlab's phase ({bn:.2f} us, the mean of the two) is {us / bn:.1f}x faster than {label} ({name}); its engines "
          f"({engines:.2f} us) {us / engines:.1f}x.")
PY
  echo
  echo "The machine, measured by \`bench_roofline\` in this run: peak without FMA $(roof 'peak_gflops avx512') GFLOP/s (AVX-512),"
  echo "$(roof 'peak_gflops avx2') (AVX2), $(roof 'peak_gflops portable') (SSE, the portable path); read bandwidth $(roof 'bandwidth_gbs L1 read') GB/s from L1,"
  echo "$(roof 'bandwidth_gbs L2 read') GB/s from L2; a load-and-store sweep of L2 $(roof 'bandwidth_gbs L2 update') GB/s (bytes read plus written)."
  /usr/bin/python3 - "$tmp/step.out" "$tmp/roof.out" "$bn_train" "$bn_frozen" "$bn_train_engines" "$bn_frozen_engines" <<'PY'
import sys
model = dict(zip(*[iter(next(l for l in open(sys.argv[1]) if l.startswith("model ")).split()[1:])] * 2))
roof = {" ".join(l.split()[:-1]): float(l.split()[-1]) for l in open(sys.argv[2]) if not l.startswith("#")}
M, D, W, B = (int(model[k]) for k in ("dense_macs", "dx_macs", "weights", "biases"))
# Per sample-epoch, Dense layers and SGD only: two forward passes (fit, inference) of 2 flops per
# multiply-add, the input gradients (2 per multiply-add), the weight gradient and its update
# (product, times -lr, add: 3 per weight; 2 per bias). Bytes: the weights and biases read once by
# the paired forward passes and read and written once by the fused backward and update.
flops = 4 * M + 2 * D + 3 * W + 2 * B
bytes_ = 12 * (W + B)
# Under train the backward pass stops at the topmost BatchNorm (one row's batch statistics pass
# down an exactly zero gradient): the Dense layers below it are read by the inference pass only,
# their fit outputs kept from the last step, and since every lane holds the same weights there,
# from one shared copy per group of 16 lanes (counted here as if from L2). Under frozen a layer's fit pass is its inference pass
# and runs once. Each line counts what bnlab computes in an epoch's steady state, not the full
# pass (a work item's first pair and last inference pass differ: the executed rates are a
# little low).
SW, SB, SD, KT, KF = (int(model.get(k, 0)) for k in ("train_skipped_weights", "train_skipped_biases", "train_skipped_dx_macs",
                                                    "train_kept_fit_macs", "frozen_shared_fit_macs"))
work = {"train": (flops - 2 * SD - 3 * SW - 2 * SB - 2 * KT, bytes_ - 12 * (SW + SB) + 4 * (SW + SB) / 16),
        "frozen": (flops - 2 * KF, bytes_)}
peak = roof.get("peak_gflops avx512") or roof.get("peak_gflops avx2") or roof["peak_gflops portable"]
bw = roof.get("bandwidth_gbs L2 read")
for label, us, us_e in (("train", float(sys.argv[3]), float(sys.argv[5])), ("frozen", float(sys.argv[4]), float(sys.argv[6]))):
    flops_l, bytes_l = work[label]
    gf = flops_l / us / 1e3
    line = f"Roofline, {label}: {flops_l / 1e3:.1f} kFLOP and {bytes_l / 1e3:.1f} KB of weights per sample-epoch"
    if flops_l != flops:
        why = {"train": "the backward below the topmost BatchNorm is exactly zero and skipped, the fit pass there repeats the last",
               "frozen": "the fit pass is the inference pass"}[label]
        line += f" (the full pass is {flops / 1e3:.1f} kFLOP; {why})"
    line += f"; bnlab {gf:.1f} GFLOP/s, {100 * gf / peak:.0f}% of the peak"
    if flops_l != flops:
        line += f" (the full pass's work in that time: {flops / us / 1e3:.1f} GFLOP/s, {100 * flops / us / 1e3 / peak:.0f}%)"
    if bw:
        floor = max(flops_l / peak / 1e3, bytes_l / bw / 1e3)
        line += f"; the L2 floor (bytes / L2 read bandwidth) is {bytes_l / bw / 1e3:.2f} us, bnlab is at {100 * floor / us:.0f}% of the roofline"
    gf_e = flops_l / us_e / 1e3
    line += (f". The engines alone ({us_e:.2f} us): {gf_e:.1f} GFLOP/s, {100 * gf_e / peak:.0f}% of the peak"
             + (f" ({100 * flops / us_e / 1e3 / peak:.0f}% as the full pass)" if flops_l != flops else ""))
    print(line + ".")
ai = flops / bytes_
print(f"\nArithmetic intensity {ai:.2f} flop per byte of weights: a lane group's weights (16 lanes of {4 * (W + B) / 1e3:.0f} KB) exceed L1, so")
if bw:
    print(f"the attainable rate is min(peak, intensity x L2 bandwidth) = {min(peak, ai * bw):.0f} GFLOP/s; see docs/performance.md.")
PY
  echo
  echo "The Dense kernels alone (\`bench_kernels\`: one group of 16 lanes, its 311 KB of weights in L2, best of five), against"
  echo "the L2 bandwidth above: the paired forward pass and the single one (frozen's layers)"
  echo "read each weight vector (64 bytes) once, the fused backward and SGD step reads and writes it (128 bytes); forward_same"
  echo "(the weights every lane shares, train's below its topmost BatchNorm) reads one plain copy, 4 bytes per weight, from L1."
  echo
  echo "| kernel | layer (in x out) | ns per call | ns per weight vector | GB/s |"
  echo "|---|---|---|---|---|"
  awk '$1 == "kernel" { printf "| %s | %s | %.0f | %.3f | %.0f |\n", $2, $3, $5, $7, $9 }' "$tmp/kern.out"
  echo
  echo "The study store's writer thread inserts finished runs while the workers fine-tune; what it has not inserted when the"
  echo "last work item ends, the phase waits for. \`bench_store\` (Store::insert of 10-epoch runs into a fresh store, best of"
  printf 'several): %s us per run over 1,000 runs (64 per transaction), %s over 20,000 (160 per transaction); with the\n' \
    "$store_1k" "$store_20k"
  printf "copy of the log into the file at the end (seal), %s and %s. The fine-tuning above takes %.1f (train) and\n" \
    "$store_1k_sealed" "$store_20k_sealed" \
    "$(/usr/bin/python3 -c "print($bn_train * 10)")"
  printf '%.1f us (frozen) per run of 10 epochs.\n' \
    "$(/usr/bin/python3 -c "print($bn_frozen * 10)")"
} > "$out.tmp"
mv "$out.tmp" "$out"
cat "$out"

# The scale section: studies as large as the machine holds.
"$root/scripts/bench_scale.sh"
