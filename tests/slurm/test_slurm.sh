#!/usr/bin/env bash
# The README's Slurm array job on a real (single-node) Slurm: the shards of a study as an array,
# then `bnlab merge`, exactly as the README writes it (its code block is run verbatim), must
# equal the unsharded run; and one array task cancelled midway, resubmitted alone, then
# merged, must too. The cluster (munged, slurmctld, slurmd) is started here and stopped by pid.
# Usage: test_slurm.sh BNLAB_BINARY SOURCE_DIR
set -euo pipefail
bin="$(realpath "$1")"; src="$(realpath "$2")"
tmp="$(mktemp -d)"
source "$src/tests/slurm/cluster.sh"
trap 'cluster_down; rm -rf "$tmp"' EXIT
cluster_up "$tmp/cluster"
echo "slurm: node up ($(sinfo -h -o '%N %c CPUs %T'))"

wait_queue() {  # until no job is left in the queue
  for _ in $(seq 1500); do
    [ -z "$(squeue -h -o %i)" ] && return 0
    sleep 0.2
  done
  echo "FAIL: jobs still queued after 300 s:"; squeue; return 1
}
same_study() {  # same_study DIR_A DIR_B: the store's rows and the deterministic outputs are equal
  /usr/bin/python3 - "$1" "$2" <<'PY'
import sqlite3, sys
a, b = sys.argv[1:3]
def rows(d):
    con = sqlite3.connect(f"file:{d}/study.sqlite?mode=ro", uri=True)
    return [con.execute(f"SELECT * FROM {t} ORDER BY run").fetchall() for t in ("runs", "epochs")]
ra, rb = rows(a), rows(b)
if ra != rb:
    sys.exit(f"FAIL: the stores differ ({len(ra[0])} vs {len(rb[0])} runs)")
import os
for f in ("summary.csv", "summary.md", "curves.csv", "metrics.jsonl"):  # the text exports only for small studies
    if os.path.exists(f"{a}/{f}") != os.path.exists(f"{b}/{f}"):
        sys.exit(f"FAIL: {f} is in one of {a}, {b} only")
    if os.path.exists(f"{a}/{f}") and open(f"{a}/{f}", "rb").read() != open(f"{b}/{f}", "rb").read():
        sys.exit(f"FAIL: {f} differs")
print(f"  {len(ra[0])} runs and {len(ra[1])} curves equal, exports byte-identical")
PY
}
workdir() {  # workdir DIR CONFIG: a submission directory laid out as the README assumes
  mkdir -p "$1/build/bin" "$1/scripts"
  ln -s "$bin" "$1/build/bin/bnlab"
  ln -s "$src/scripts/slurm_study.sh" "$1/scripts/slurm_study.sh"
  cp "$2" "$1/study.json"
}

# 1. The README's block, verbatim, on the smoke study.
block="$(awk '/<!-- slurm-array -->/ {on = 1; next} on && /^```sh/ {next} on && /^```/ {exit} on {print}' "$src/README.md")"
[ -n "$block" ] || { echo "FAIL: no slurm-array block in README.md"; exit 1; }
workdir "$tmp/readme" "$src/configs/smoke/study.json"
(cd "$tmp/readme" && bash -euo pipefail -c "$block")
wait_queue
[ -f "$tmp/readme/study_merged/summary.md" ] || { echo "FAIL: the merge job wrote nothing"; cat "$tmp"/readme/slurm-*.out; exit 1; }
"$bin" run "$tmp/readme/study.json" --out "$tmp/readme/single" --verbose 0 --no-plots
echo "slurm: README array job (4 shards) + merge vs the unsharded run:"
same_study "$tmp/readme/study_merged" "$tmp/readme/single"

# 2. One task cancelled midway (scancel: Slurm sends SIGTERM, bnlab stops after the runs in
# flight; SIGKILL at random moments is faults_signals' part), resubmitted alone, then merged.
/usr/bin/python3 - "$src/configs/seed_repro.json" "$tmp/big.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c["finetune"].pop("sample")
c["finetune"]["samples"] = {"count": 60000, "seed": 3}
json.dump(c, open(sys.argv[2], "w"))
PY
workdir "$tmp/kill" "$tmp/big.json"
cd "$tmp/kill"
job="$(sbatch --parsable --array=1-4 --cpus-per-task=1 scripts/slurm_study.sh study.json shards 4)"
for _ in $(seq 1500); do [ -f shards/2/progress.json ] && break; sleep 0.2; done
[ -f shards/2/progress.json ] || { echo "FAIL: task 2 never started fine-tuning"; exit 1; }
# progress.json appears as fine-tuning begins; the resubmission below must find stored runs, so the
# cancel waits for the writer's first transaction (64 runs, within milliseconds).
stored_now() { /usr/bin/python3 -c 'import sqlite3; print(sqlite3.connect("shards/2/study.sqlite").execute("SELECT COUNT(*) FROM runs").fetchone()[0])'; }
for _ in $(seq 200); do [ "$(stored_now)" -gt 0 ] && break; sleep 0.05; done
scancel "${job}_2"
wait_queue
stored="$(stored_now)"
# Slurm's cancel may reach bnlab as SIGTERM (it then stops after the runs in flight) or SIGKILL.
if [ "$stored" -ge 135000 ]; then echo "FAIL: task 2 finished all its 135000 runs before it was killed; nothing was tested"; exit 1; fi
echo "slurm: task 2 cancelled midway ($stored of 135000 runs stored); resubmitting it alone"
again="$(sbatch --parsable --array=2 --cpus-per-task=1 scripts/slurm_study.sh study.json shards 4)"
wait_queue
grep "resuming:" "slurm-${again}_2.out" || { echo "FAIL: the resubmitted task did not resume"; cat "slurm-${again}_2.out"; exit 1; }
"$bin" merge shards/* -o merged --no-plots 2>/dev/null >/dev/null
"$bin" run study.json --out single --verbose 0 --no-plots
echo "slurm: killed, resubmitted and merged vs the unsharded run:"
same_study merged single
echo "slurm: all checks passed"
