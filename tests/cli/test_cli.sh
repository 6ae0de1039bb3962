#!/usr/bin/env bash
# The command line as a user meets it: help, version, exit codes, messages, nothing half-written.
# Usage: test_cli.sh BNLAB_BINARY SOURCE_DIR
set -u
bin="$1"; src="$2"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
passed=0; failed=0

check() {  # check NAME WANT_RC PATTERN -- command...
  local name="$1" want="$2" pattern="$3"; shift 4
  local out rc
  out="$("$@" 2>&1)"; rc=$?
  if [ "$rc" -ne "$want" ]; then
    echo "FAIL $name: exit $rc, want $want"; echo "$out" | head -5; failed=$((failed+1)); return
  fi
  if [ -n "$pattern" ] && ! grep -qF -- "$pattern" <<<"$out"; then
    echo "FAIL $name: output lacks \"$pattern\""; echo "$out" | head -5; failed=$((failed+1)); return
  fi
  if grep -q "Exception raised from\|terminate called" <<<"$out"; then
    echo "FAIL $name: stack trace in output"; failed=$((failed+1)); return
  fi
  passed=$((passed+1))
}

check help 0 "run CONFIG" -- "$bin" --help
check version 0 "LibTorch" -- "$bin" --version
check run_help 0 "--set" -- "$bin" run --help
check no_args 2 "usage: bnlab" -- "$bin"
check unknown_command 2 "unknown command \"fly\"" -- "$bin" fly
check unknown_flag 2 "bogus" -- "$bin" run "$src/configs/smoke/keras_nll.json" --bogus
check missing_config_arg 2 "missing CONFIG" -- "$bin" run
check missing_file 2 "no_such.json: cannot read the config file" -- "$bin" run "$tmp/no_such.json"

printf '{"name": "bad", "modle": {}, "finetune": {"epochs": 0}}' > "$tmp/bad.json"
check bad_config 2 "bad.json: modle: unknown key; did you mean \"model\"?" -- "$bin" run "$tmp/bad.json" --out "$tmp/out_bad"
check bad_config_all 2 "finetune.epochs: must be >= 1" -- "$bin" run "$tmp/bad.json" --out "$tmp/out_bad"
if [ -e "$tmp/out_bad" ]; then echo "FAIL bad_config wrote $tmp/out_bad"; failed=$((failed+1)); else passed=$((passed+1)); fi

printf '{\n  "name": "x",\n  "seed": 1,,\n}' > "$tmp/malformed.json"
check malformed 2 "malformed.json:3:13: malformed JSON" -- "$bin" run "$tmp/malformed.json"
check bad_set 2 "finetune.epoch: unknown key; did you mean \"epochs\"?" -- "$bin" run "$src/configs/smoke/keras_nll.json" --set finetune.epoch=3
check bad_threads 2 "--threads: must be >= 1" -- "$bin" run "$src/configs/smoke/keras_nll.json" --threads 0 --out "$tmp/t0"
check validate 0 "\"semantics\": \"keras\"" -- "$bin" validate "$src/configs/seed_repro.json"

check smoke_run 0 "Epoch 5/5 - loss: " -- "$bin" run "$src/configs/smoke/keras_nll.json" --out "$tmp/ok"
check other_experiment 2 "holds results of experiment \"smoke_keras_nll\"" -- "$bin" run "$src/configs/smoke/torch_mse.json" --out "$tmp/ok"
check force 0 "" -- "$bin" run "$src/configs/smoke/torch_mse.json" --out "$tmp/ok" --force --verbose 0

check explain 0 "| frozen | yes |" -- "$bin" explain "$src/configs/smoke/keras_nll.json" --out "$tmp/ok2"
check explain_json 0 "" -- test -s "$tmp/ok2/explain.json"
check explain_strategy 2 "no strategy \"bogus\"" -- "$bin" explain "$src/configs/smoke/keras_nll.json" --out "$tmp/ok2" --strategy bogus
check explain_sample 2 "--sample: index 99999 is beyond the data" -- "$bin" explain "$src/configs/smoke/keras_nll.json" --out "$tmp/ok2" --sample 99999


# Bad input, one class at a time: exit 2, a message naming what and where, nothing written.
bad() {  # bad NAME PATTERN CONFIG_TEXT [extra args]
  local name="$1" pattern="$2" text="$3"; shift 3
  printf '%s' "$text" > "$tmp/$name.json"
  check "bad_$name" 2 "$pattern" -- "$bin" run "$tmp/$name.json" --out "$tmp/out_$name" "$@"
  if [ -e "$tmp/out_$name" ]; then echo "FAIL bad_$name wrote $tmp/out_$name"; failed=$((failed+1)); else passed=$((passed+1)); fi
}
bad wrong_type 'finetune.epochs: expected an integer, got a string "ten"' '{"name": "t", "finetune": {"epochs": "ten"}}'
bad momentum 'model.batchnorm.momentum: must be in [0, 1]' '{"name": "t", "model": {"batchnorm": {"momentum": 1.5}}}'
bad eps 'model.batchnorm.eps: must be > 0, got 0' '{"name": "t", "model": {"batchnorm": {"eps": 0}}}'
bad lr 'finetune.optimizer.lr: must be > 0, got -0.1' '{"name": "t", "finetune": {"optimizer": {"lr": -0.1}}}'
bad epochs 'pretrain.epochs: must be >= 1, got 0' '{"name": "t", "pretrain": {"epochs": 0}}'
bad batch 'finetune.batch_size: must be >= 1, got 0' '{"name": "t", "finetune": {"batch_size": 0}}'
bad sample 'finetune.sample: index 100 is beyond the data (100 samples: 0..99)' '{"name": "t", "data": {"samples": 100}, "finetune": {"sample": 100}}'
bad empty_name 'strategies[0].name: must not be empty' '{"name": "t", "strategies": [{"preset": "train", "name": ""}]}'
bad dup_name 'duplicate strategy name "frozen"' '{"name": "t", "strategies": ["frozen", "frozen"]}'
bad layer 'BatchNorm index 7 does not exist: the model has 2 BatchNorm layer(s)' '{"name": "t", "strategies": [{"preset": "frozen", "name": "f", "layers": [7]}]}'
bad preset 'valid presets: train, freeze_affine, momentum_zero' '{"name": "t", "strategies": ["freeze"]}'
bad activation 'model.activation: unknown value "swish"; valid values: relu, tanh, gelu, sigmoid, elu, leaky_relu, silu, softplus, linear' '{"name": "t", "model": {"activation": "swish"}}'
bad loss 'model.loss: unknown value "mae"; did you mean "mse"?; valid values: gaussian_nll, mse, cross_entropy' '{"name": "t", "model": {"loss": "mae"}}'
bad optimizer 'pretrain.optimizer.name: unknown value "lamb"; valid values: sgd, adam, adamw, rmsprop, rmsprop_keras' '{"name": "t", "pretrain": {"optimizer": {"name": "lamb"}}}'
bad torch_one 'runs BatchNorm in training mode on a batch of ONE sample' '{"name": "t", "model": {"batchnorm": {"semantics": "torch"}}, "strategies": ["train"]}'
bad layers_kind 'model.layers[1]: names no layer kind; did you mean "dense"?' '{"name": "t", "model": {"layers": [{"dense": 4}, {"dens": 3}]}}'
bad fold_between 'strategies[0].fold: BatchNorm "2" (after an activation) has no Linear directly before or after it' '{"name": "t", "model": {"layers": [{"dense": 4}, {"activation": "relu"}, {"batchnorm": {}}, {"activation": "tanh"}]}, "strategies": ["fold"]}'
bad fold_no_bn 'strategies[0].fold: there is nothing to fold: the model has no BatchNorm layer' '{"name": "t", "model": {"batchnorm": {"enabled": false}}, "strategies": ["fold"]}'
bad number_overflow 'invalid JSON: number overflow' '{"name": "t", "seed": 1e999}'
check config_is_dir 2 "is not a regular file" -- "$bin" run "$tmp"

# CSV data: file, line and column.
printf 'a,b,y\n1,2,3\n4,5\n' > "$tmp/ragged.csv"
bad csv_ragged 'ragged.csv:3: row has 2 cells, the header has 3' '{"name": "t", "data": {"source": "csv", "path": "ragged.csv", "target_columns": ["y"]}, "model": {"loss": "mse"}, "finetune": {"sample": 0}}'
printf 'a,b,y\n1,2,3\n4,x5,6\n' > "$tmp/text.csv"
bad csv_text 'text.csv:3: column 2 ("b"): not a number: "x5"' '{"name": "t", "data": {"source": "csv", "path": "text.csv", "target_columns": ["y"]}, "model": {"loss": "mse"}, "finetune": {"sample": 0}}'
printf 'a,b,y\n1,nan,3\n4,5,6\n' > "$tmp/nan.csv"
bad csv_nan 'nan.csv:2: column 2 ("b"): value "nan" is not finite' '{"name": "t", "data": {"source": "csv", "path": "nan.csv", "target_columns": ["y"]}, "model": {"loss": "mse"}, "finetune": {"sample": 0}}'
bad csv_column 'missing target column "z"' '{"name": "t", "data": {"source": "csv", "path": "nan.csv", "target_columns": ["z"]}, "model": {"loss": "mse"}, "finetune": {"sample": 0}}'

# Checkpoints: truncated, corrupt, or of another architecture; nothing else changes.
"$bin" run "$src/configs/smoke/keras_nll.json" --out "$tmp/ck" --verbose 0
before="$(md5sum "$tmp/ck/curves.csv")"
cp "$tmp/ck/pretrained.pt" "$tmp/good.pt"
head -c 2000 "$tmp/good.pt" > "$tmp/ck/pretrained.pt"
check ckpt_truncated 2 "pretrained.pt: cannot read the checkpoint (truncated or corrupt" -- "$bin" run "$src/configs/smoke/keras_nll.json" --out "$tmp/ck"
head -c 3000 /dev/urandom > "$tmp/ck/pretrained.pt"
check ckpt_corrupt 2 "cannot read the checkpoint" -- "$bin" run "$src/configs/smoke/keras_nll.json" --out "$tmp/ck"
/usr/bin/python3 - "$tmp/good.pt" "$tmp/ck/pretrained.pt" <<'PY'
import sys, torch
ck = torch.load(sys.argv[1])
ck["state_dict"]["3.weight"] = torch.zeros(16, 17)   # the model needs [16, 16]
torch.save(ck, sys.argv[2])
PY
check ckpt_shape 2 'tensor "3.weight" has shape [16, 17] but the model needs [16, 16]' -- "$bin" run "$src/configs/smoke/keras_nll.json" --out "$tmp/ck"
if [ "$(md5sum "$tmp/ck/curves.csv")" != "$before" ]; then echo "FAIL checkpoint errors changed curves.csv"; failed=$((failed+1)); else passed=$((passed+1)); fi
cp "$tmp/good.pt" "$tmp/ck/pretrained.pt"
check ckpt_stale 0 "cache key changed, pretraining again" -- "$bin" run "$src/configs/smoke/keras_nll.json" --out "$tmp/ck" --set pretrain.epochs=1 --verbose 1
check ckpt_force 0 "none cached, pretraining" -- "$bin" run "$src/configs/smoke/keras_nll.json" --out "$tmp/ck" --force --verbose 1
check nan_run 1 "run(s) failed" -- "$bin" run "$src/configs/smoke/keras_nll.json" --out "$tmp/nan" --set 'grid={"optimizer.lr": [1e-6, 1e3]}' --verbose 1
check bad_shard 2 "--shard: expected I/N" -- "$bin" run "$src/configs/smoke/keras_nll.json" --out "$tmp/sh" --shard 3/2
check bad_jobs 2 "--jobs: must be >= 1" -- "$bin" run "$src/configs/smoke/keras_nll.json" --out "$tmp/sh" --jobs 0
check bad_engine 2 "--engine: expected auto, batched or torch, got \"gpu\"" -- "$bin" run "$src/configs/smoke/keras_nll.json" --out "$tmp/eng" --engine gpu
check bad_lanes 2 "--lanes: must be in [1, 100000], got 0" -- "$bin" run "$src/configs/smoke/keras_nll.json" --out "$tmp/eng" --lanes 0
if [ -e "$tmp/eng" ]; then echo "FAIL bad_engine/bad_lanes wrote $tmp/eng"; failed=$((failed+1)); else passed=$((passed+1)); fi
check engine_torch 0 "" -- "$bin" run "$src/configs/smoke/keras_nll.json" --out "$tmp/eng_t" --engine torch --verbose 0 --no-plots
check engine_recorded 0 '"torch_runs": 2' -- cat "$tmp/eng_t/manifest.json"
check engine_default 0 "" -- "$bin" run "$src/configs/smoke/keras_nll.json" --out "$tmp/eng_b" --lanes 1 --verbose 0 --no-plots
check engine_default_recorded 0 '"batched_runs": 2' -- cat "$tmp/eng_b/manifest.json"
check merge_missing 2 "no study.sqlite here" -- "$bin" merge "$tmp/nothing" -o "$tmp/m"
check export_missing 2 "no study.sqlite" -- "$bin" export "$tmp/nothing" --strategy frozen --format torch -o "$tmp/x.pt"
check bad_export 2 'report.export[0]: unknown export "curve"; did you mean "curves"?' -- "$bin" run "$src/configs/smoke/keras_nll.json" --out "$tmp/exp" --export curve
check bad_export_quote 2 "--export: expected auto, none or a comma-separated list" -- "$bin" run "$src/configs/smoke/keras_nll.json" --out "$tmp/exp" --export 'a"b'
if [ -e "$tmp/exp" ]; then echo "FAIL bad_export wrote $tmp/exp"; failed=$((failed+1)); else passed=$((passed+1)); fi
check export_none 0 "" -- "$bin" run "$src/configs/smoke/keras_nll.json" --out "$tmp/exp_none" --export none --verbose 0 --no-plots
if [ -e "$tmp/exp_none/curves.csv" ] || [ ! -e "$tmp/exp_none/study.sqlite" ] || [ ! -e "$tmp/exp_none/summary.md" ]; then
  echo "FAIL export_none: curves.csv written, or the store or summary.md missing"; failed=$((failed+1)); else passed=$((passed+1)); fi
check check_missing 2 "no study.sqlite here" -- "$bin" check "$tmp/nothing" --golden "$tmp/good.pt"

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
