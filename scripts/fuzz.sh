#!/usr/bin/env bash
# Builds a libFuzzer target (clang, with AddressSanitizer and UndefinedBehaviorSanitizer; the
# readers are torch-free, so everything they run is instrumented) and runs it on its committed
# seed corpus fuzz/corpus/TARGET/ for SECONDS (default 20). New inputs go to a scratch corpus,
# so the committed one only changes by hand. Targets (fuzz/fuzz_TARGET.cpp):
#   config  config parsing, --set overrides and validation, round trip through the resolved config
#   json    the bounded JSON reader every JSON input goes through, and the Keras model-config reader
#   pickle  the pickle reader behind PyTorch files
#   store   a study.sqlite as merge, export, golden and check open it
# Usage: scripts/fuzz.sh [SECONDS] [TARGET]   (default TARGET: config)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
seconds="${1:-20}"
target="${2:-config}"
case "$target" in config|json|pickle|store) ;; *) echo "fuzz.sh: unknown target \"$target\" (config, json, pickle, store)" >&2; exit 2 ;; esac
out="${BNLAB_BUILD_DIR:-$root/build}/fuzz"
mkdir -p "$out/corpus_$target"
bin="$out/fuzz_$target"
lib="$root/lib/src"
srcs=("$root/fuzz/fuzz_$target.cpp" "$lib/config.cpp" "$lib/model_spec.cpp" "$lib/text.cpp" "$lib/json_input.cpp"
      "$lib/run_dir.cpp" "$lib/pickle.cpp" "$lib/store.cpp" "$lib/report.cpp" "$lib/tools.cpp")
if [ ! -x "$bin" ] || [ -n "$(find "${srcs[@]}" "$root/lib/include" "$lib" -name '*.hpp' -newer "$bin" 2>/dev/null)" ] ||
   [ -n "$(find "${srcs[@]}" -newer "$bin" 2>/dev/null)" ]; then
  clang++ -std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -I"$root/lib/include" -I"$lib" "${srcs[@]}" -lsqlite3 -o "$bin"
fi
dict=()
[ "$target" = config ] && dict=(-dict="$root/fuzz/config.dict")
cd "$out"
UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  "$bin" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
  ${dict[@]+"${dict[@]}"} "$out/corpus_$target" "$root/fuzz/corpus/$target"
