#!/usr/bin/env bash
# The command line as a user meets it: help, version, exit codes, messages, nothing half-written.
# Usage: test_cli.sh BNLAB_BINARY SOURCE_DIR
set -u -o pipefail
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
check bad_isa 2 "BNLAB_ISA=sse9: not an instruction set this CPU runs (it runs portable" -- env BNLAB_ISA=sse9 "$bin" --version
check forced_isa 0 "LibTorch" -- env BNLAB_ISA=portable "$bin" --version
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
bad set_member 'finetune.sets[1]: index 100 is beyond the data (100 samples: 0..99)' '{"name": "t", "data": {"samples": 100}, "finetune": {"sets": [[1, 2], [3, 100]]}}'
bad set_draw 'finetune.sets.size: cannot draw a set of 200 distinct samples from 100' '{"name": "t", "data": {"samples": 100}, "finetune": {"sets": {"count": 2, "size": 200}}}'
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
bad number_overflow 'number_overflow.json:1:23: the number 1e999 is beyond the range of a double' '{"name": "t", "seed": 1e999}'
bad dup_key 'dup_key.json:3:3: duplicate key "finetune" (first at line 2, column 3' $'{\n  "finetune": {"epochs": 2},\n  "finetune": {"epochs": 3},\n  "name": "t"}'
bad dup_key_nested 'dup_key_nested.json:1:41: duplicate key "epochs" (first at line 1, column 28' '{"name": "t", "finetune": {"epochs": 2, "epochs": 3}}'
/usr/bin/python3 -c 'print("[" * 300000 + "]" * 300000)' > "$tmp/deep.json"  # a SIGSEGV once
check deep 2 "deep.json:1:129: objects and arrays nested deeper than 128 levels" -- "$bin" run "$tmp/deep.json" --out "$tmp/out_deep"
if [ -e "$tmp/out_deep" ]; then echo "FAIL deep wrote $tmp/out_deep"; failed=$((failed+1)); else passed=$((passed+1)); fi
truncate -s 300M "$tmp/huge.json"  # sparse: refused by its size before a byte is read
check huge_config 2 "huge.json: 314572800 bytes; bnlab reads the config file of up to 256 MiB" -- "$bin" run "$tmp/huge.json" --out "$tmp/out_huge"
if [ -e "$tmp/out_huge" ]; then echo "FAIL huge_config wrote $tmp/out_huge"; failed=$((failed+1)); else passed=$((passed+1)); fi
rm -f "$tmp/huge.json"
check set_dup_key 2 'column 12 of the value: duplicate key "a"' -- "$bin" run "$src/configs/smoke/keras_nll.json" --out "$tmp/sd" --set 'grid={"a": [1], "a": [2]}'
check set_overflow 2 'the number 1e400 is beyond the range of a double' -- "$bin" run "$src/configs/smoke/keras_nll.json" --out "$tmp/sd" --set 'finetune.optimizer.lr=1e400'
if [ -e "$tmp/sd" ]; then echo "FAIL set_dup_key/set_overflow wrote $tmp/sd"; failed=$((failed+1)); else passed=$((passed+1)); fi
# A study bigger than the machine (40 billion parameters): refused before any model is built.
check memory 2 "this study needs about" -- "$bin" run "$src/configs/seed_repro.json" --out "$tmp/mem" --set 'model.hidden=[200000, 200000]'
if [ -e "$tmp/mem" ]; then echo "FAIL memory wrote $tmp/mem"; failed=$((failed+1)); else passed=$((passed+1)); fi
# One of two synonyms overridden replaces the other: the main job becomes a study.
check set_synonym 0 '"count": 1000' -- "$bin" validate "$src/configs/seed_repro.json" --set 'finetune.samples={"count": 1000}'
check config_is_dir 2 "is not a regular file" -- "$bin" run "$tmp"

# CSV data: file, line and column.
printf 'a,b,y\n1,2,3\n4,5\n' > "$tmp/ragged.csv"
bad csv_ragged 'ragged.csv:3: row has 2 cells, the header has 3' '{"name": "t", "data": {"source": "csv", "path": "ragged.csv", "target_columns": ["y"]}, "model": {"loss": "mse"}, "finetune": {"sample": 0}}'
printf 'a,b,y\n1,"2,3\n4,5,6\n' > "$tmp/unterminated.csv"
bad csv_unterminated 'unterminated.csv:2:3: unterminated quoted field' '{"name": "t", "data": {"source": "csv", "path": "unterminated.csv", "target_columns": ["y"]}, "model": {"loss": "mse"}, "finetune": {"sample": 0}}'
printf 'a;b;y\n1;2;3\n4;5;6\n' > "$tmp/semi.csv"
printf 'a,b,y\n1,2,3\nNA,5,6\n7,8,9\n10,,12\n13,14,15\n' > "$tmp/dropped.csv"
printf 'a,b,y\n1,2,3\n\xEF\xBB\xBF4,5,6\n' > "$tmp/bom.csv"
# Files as users have them, run for real: dropped rows and labels 1..5 are recorded in data.json and summary.md.
small='"pretrain": {"epochs": 1, "batch_size": 2}, "finetune": {"epochs": 2, "sample": 1}, "strategies": ["train", "frozen"]'
printf '{"name": "dropped", "data": {"source": "csv", "path": "dropped.csv", "target_columns": ["y"], "missing": "drop_rows"}, "model": {"loss": "mse", "hidden": [4]}, %s}' "$small" > "$tmp/dropped.json"
check csv_drop_rows 0 "dropped.csv: 5 rows, 2 dropped for missing values (lines 3, 5), 3 used; sample indices count the rows used" -- "$bin" run "$tmp/dropped.json" --out "$tmp/dropped" --no-plots
check csv_drop_rows_record 0 '"dropped_lines": [' -- cat "$tmp/dropped/data.json"
check csv_drop_rows_summary 0 "2 dropped for missing values (data.missing drop_rows; lines in data.json), 3 used" -- cat "$tmp/dropped/summary.md"
check csv_drop_rows_resolved 0 '"sample_indices": "remaining_rows"' -- cat "$tmp/dropped/config.resolved.json"
printf 'a,b,label\n0.1,1,5\n0.4,0,1\n0.9,1,3\n0.3,0,5\n0.7,1,1\n0.2,0,3\n' > "$tmp/labels15.csv"
printf '{"name": "labels", "data": {"source": "csv", "path": "labels15.csv", "target_columns": ["label"]}, "model": {"loss": "cross_entropy", "hidden": [4]}, %s}' "$small" > "$tmp/labels15.json"
check csv_labels 0 "classes (class = label): 0 = 1, 1 = 3, 2 = 5" -- "$bin" run "$tmp/labels15.json" --out "$tmp/labels15" --no-plots
check csv_labels_summary 0 "Classes (class = label in the file): 0 = 1, 1 = 3, 2 = 5." -- cat "$tmp/labels15/summary.md"
check csv_labels_resolved 0 '"class_labels": [' -- cat "$tmp/labels15/config.resolved.json"
# The resolved config runs again as it is, to the same mapping.
check csv_labels_rerun 0 "" -- "$bin" run "$tmp/labels15/config.resolved.json" --out "$tmp/labels15b" --no-plots --verbose 0
check csv_labels_rerun_same 0 "" -- cmp "$tmp/labels15/data.json" "$tmp/labels15b/data.json"
# The real file of issue 16 (quoted header), as data/fair.csv holds it.
check real_fair 0 "fair.csv: 6366 rows" -- "$bin" run "$src/configs/real_fair.json" --out "$tmp/fair" --no-plots --set pretrain.epochs=1 --set finetune.samples.count=2 --set finetune.epochs=2

bad csv_bom_inside 'bom.csv:3:1: a UTF-8 byte-order mark inside the file' '{"name": "t", "data": {"source": "csv", "path": "bom.csv", "target_columns": ["y"]}, "model": {"loss": "mse"}, "finetune": {"sample": 0}}'
printf 'a,b,y\n1,2,3\n4,x5,6\n' > "$tmp/text.csv"
bad csv_text 'text.csv:3:3: column 2 ("b"): feature column "b" is not numeric (its first non-numeric value: "x5")' '{"name": "t", "data": {"source": "csv", "path": "text.csv", "target_columns": ["y"]}, "model": {"loss": "mse"}, "finetune": {"sample": 0}}'
printf 'a,b,y\n1,nan,3\n4,5,6\n' > "$tmp/nan.csv"
bad csv_nan 'nan.csv:2:3: column 2 ("b"): missing value "nan"; set data.missing to "drop_rows"' '{"name": "t", "data": {"source": "csv", "path": "nan.csv", "target_columns": ["y"]}, "model": {"loss": "mse"}, "finetune": {"sample": 0}}'
printf 'a,b,y\n1,2,3\n4,5,inf\n' > "$tmp/inf.csv"
bad csv_inf 'inf.csv:3:5: column 3 ("y"): value "inf" is not finite in float32' '{"name": "t", "data": {"source": "csv", "path": "inf.csv", "target_columns": ["y"]}, "model": {"loss": "mse"}, "finetune": {"sample": 0}}'
# A quoted field that runs over a line break: the row it belongs to is counted from its first line.
printf 'a,b,y\n1,2,3\n4,"5\n6",7,8\n9,10,11\n' > "$tmp/ragged_quoted.csv"
bad csv_ragged_in_quotes 'ragged_quoted.csv:3: row has 4 cells, the header has 3' '{"name": "t", "data": {"source": "csv", "path": "ragged_quoted.csv", "target_columns": ["y"]}, "model": {"loss": "mse"}, "finetune": {"sample": 0}}'
printf 'a,b,y\n1,2,3\n4;5;6\n' > "$tmp/mixed.csv"
bad csv_mixed_delimiters "mixed.csv:3: row has 1 cells, the header has 3 (it holds ';': mixed delimiters? data.delimiter is \",\")" '{"name": "t", "data": {"source": "csv", "path": "mixed.csv", "target_columns": ["y"]}, "model": {"loss": "mse"}, "finetune": {"sample": 0}}'
bad csv_wrong_delimiter 'set data.delimiter to ";" (it is ",")' '{"name": "t", "data": {"source": "csv", "path": "semi.csv", "target_columns": ["y"]}, "model": {"loss": "mse"}, "finetune": {"sample": 0}}'
printf 'name,a,y\nalice,1,3\nbob,4,6\n' > "$tmp/names.csv"
bad csv_text_column 'names.csv:2:1: column 1 ("name"): feature column "name" is not numeric (its first non-numeric value: "alice"); leave it out by listing the features in data.feature_columns, e.g. ["a"]' '{"name": "t", "data": {"source": "csv", "path": "names.csv", "target_columns": ["y"]}, "model": {"loss": "mse"}, "finetune": {"sample": 0}}'
printf 'a,label\n1,1\n2,2.5\n3,1\n' > "$tmp/labels.csv"
bad csv_label_not_whole 'labels.csv:3:3: column 2 ("label"): class label "2.5" is not a whole number' '{"name": "t", "data": {"source": "csv", "path": "labels.csv", "target_columns": ["label"]}, "model": {"loss": "cross_entropy"}, "finetune": {"sample": 0}}'
bad csv_sample_beyond_remaining 'finetune.sample: index 3 is beyond the data' '{"name": "t", "data": {"source": "csv", "path": "dropped.csv", "target_columns": ["y"], "missing": "drop_rows"}, "model": {"loss": "mse"}, "finetune": {"sample": 3}}'
printf 'a,b,y\n1,2,3\n4,5,x6\n' > "$tmp/target_text.csv"
bad csv_target_text 'target_text.csv:3:5: column 3 ("y"): not a number: "x6"' '{"name": "t", "data": {"source": "csv", "path": "target_text.csv", "target_columns": ["y"]}, "model": {"loss": "mse"}, "finetune": {"sample": 0}}'
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

# Output folders: only a new folder, an empty one or bnlab's own run directory; a user's file is
# never replaced or removed, --force or not; a second bnlab on one directory is refused.
same() {  # same NAME FILE CONTENT: the file still holds exactly CONTENT
  if [ "$(cat "$2" 2>/dev/null)" = "$3" ]; then passed=$((passed+1)); else echo "FAIL $1: $2 was changed"; failed=$((failed+1)); fi
}
echo "mine" > "$tmp/a_file"
check out_is_file 2 "a_file: is a file, not a folder" -- "$bin" run "$src/configs/smoke/keras_nll.json" --out "$tmp/a_file"
same out_is_file "$tmp/a_file" "mine"
mkdir "$tmp/user"; echo "a,b" > "$tmp/user/curves.csv"
for f in "" --force; do
  check "user_folder$f" 2 "user: the folder is not empty and is not a bnlab run directory (it holds curves.csv)" -- "$bin" run "$src/configs/smoke/keras_nll.json" --out "$tmp/user" $f
done
same user_folder "$tmp/user/curves.csv" "a,b"
if [ "$(ls -A "$tmp/user")" = "curves.csv" ]; then passed=$((passed+1)); else echo "FAIL user_folder: bnlab wrote into it"; failed=$((failed+1)); fi
check own_dir 0 "" -- "$bin" run "$src/configs/smoke/keras_nll.json" --out "$tmp/own" --verbose 0 --no-plots
check ledger 0 "summary.csv" -- cat "$tmp/own/.bnlab-files"
echo "my notes" > "$tmp/own/notes.txt"
check own_dir_again 0 "" -- "$bin" run "$src/configs/smoke/keras_nll.json" --out "$tmp/own" --verbose 0 --no-plots
same own_dir_notes "$tmp/own/notes.txt" "my notes"
# A file with a name bnlab writes, put there by the user (not in the ledger): refused up front.
rm "$tmp/own/summary.md"; echo "my summary" > "$tmp/own/summary.md"; sed -i '/^summary.md$/d' "$tmp/own/.bnlab-files"
for f in "" --force; do
  check "user_file_in_run_dir$f" 2 "own/summary.md: bnlab would write this file, but it did not write the one there" -- "$bin" run "$src/configs/smoke/keras_nll.json" --out "$tmp/own" --verbose 0 $f
done
same user_file_in_run_dir "$tmp/own/summary.md" "my summary"
rm "$tmp/own/summary.md"
check force_other_experiment 0 "" -- "$bin" run "$src/configs/smoke/torch_mse.json" --out "$tmp/own" --verbose 0 --no-plots --force
same force_other_notes "$tmp/own/notes.txt" "my notes"
# The lock: held by another process (util-linux flock), then by a real second bnlab.
flock -o "$tmp/own/.bnlab.lock" sleep 30 & holder=$!  # -o: the lock is flock's own, gone when it is killed
for _ in $(seq 100); do flock -n "$tmp/own/.bnlab.lock" true 2>/dev/null || break; sleep 0.1; done
check locked 2 "own: another bnlab process is writing this run directory" -- "$bin" run "$src/configs/smoke/torch_mse.json" --out "$tmp/own" --verbose 0
kill "$holder"; wait "$holder" 2>/dev/null
"$bin" run "$src/configs/seed_repro.json" --out "$tmp/busy" --verbose 0 --no-plots --jobs 1 --set 'finetune.samples={"count": 40000}' >/dev/null 2>&1 & first=$!
for _ in $(seq 300); do [ -e "$tmp/busy/progress.json" ] && break; sleep 0.1; done
check second_bnlab 2 "another bnlab process (pid $first) is writing this run directory" -- "$bin" run "$src/configs/seed_repro.json" --out "$tmp/busy" --verbose 0 --set 'finetune.samples={"count": 40000}'
wait "$first"; check first_bnlab_finished 0 "" -- test "$?" -eq 0
# Standalone outputs (-o FILE, --junit FILE): an existing file is refused unless it is bnlab's own kind.
echo "precious" > "$tmp/mine.pt"
check export_over_user_file 2 "mine.pt: already exists; bnlab never replaces a file it did not write" -- "$bin" export "$tmp/ok" --strategy frozen --format torch -o "$tmp/mine.pt"
same export_over_user_file "$tmp/mine.pt" "precious"
check golden_first 0 "" -- "$bin" golden "$tmp/ok" -o "$tmp/g.json"
check golden_again 0 "" -- "$bin" golden "$tmp/ok" -o "$tmp/g.json"
check golden_over_user_file 2 "mine.pt: already exists" -- "$bin" golden "$tmp/ok" -o "$tmp/mine.pt"
check junit_over_user_file 2 "mine.pt: already exists" -- "$bin" check "$tmp/ok" --golden "$tmp/g.json" --junit "$tmp/mine.pt"
same golden_junit_over_user_file "$tmp/mine.pt" "precious"
check merge_once 0 "" -- "$bin" merge "$tmp/ok" -o "$tmp/merged1" --no-plots
check merge_same_again 0 "" -- "$bin" merge "$tmp/ok" -o "$tmp/merged1" --no-plots
check merge_other_into_it 2 "merged1: already holds results (not a merge of these shards); pass --force to overwrite" -- "$bin" merge "$tmp/own" -o "$tmp/merged1" --no-plots
check merge_into_user_folder 2 "user: the folder is not empty and is not a bnlab run directory" -- "$bin" merge "$tmp/ok" -o "$tmp/user" --force
same merge_into_user_folder "$tmp/user/curves.csv" "a,b"

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
