#!/bin/bash
#SBATCH --array=1-16
#SBATCH --cpus-per-task=4
#SBATCH --output=slurm-%A_%a.out
# One shard of a study per Slurm array task (README, "Beyond one machine").
# Usage: sbatch [--array=1-N] [--cpus-per-task=C] scripts/slurm_study.sh CONFIG SHARDS_DIR N
# Task I runs shard I/N into SHARDS_DIR/I (pretraining, or reusing, the weights itself); N is
# given, not read from the array, so that one task can be resubmitted alone (--array=I).
# BNLAB names the binary (default: build/bin/bnlab, relative to the submission directory).
set -euo pipefail
config="$1"; shards="$2"; n="$3"
exec "${BNLAB:-build/bin/bnlab}" run "$config" --out "$shards/$SLURM_ARRAY_TASK_ID" \
  --shard "$SLURM_ARRAY_TASK_ID/$n" --jobs "${SLURM_CPUS_PER_TASK:-1}" --verbose 1
