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

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
