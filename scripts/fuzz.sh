#!/usr/bin/env bash
# Builds the libFuzzer target for config parsing and validation (clang, with AddressSanitizer
# and UndefinedBehaviorSanitizer; torch-free, so everything it runs is instrumented) and runs it
# on the committed seed corpus for SECONDS (default 20). New inputs go to a scratch corpus, so
# the committed one only changes by hand. Usage: scripts/fuzz.sh [SECONDS]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
seconds="${1:-20}"
out="${BNLAB_BUILD_DIR:-$root/build}/fuzz"
mkdir -p "$out/corpus"
bin="$out/fuzz_config"
srcs=("$root/fuzz/fuzz_config.cpp" "$root/lib/src/config.cpp" "$root/lib/src/model_spec.cpp" "$root/lib/src/text.cpp" "$root/lib/src/json_input.cpp" "$root/lib/src/run_dir.cpp")
if [ ! -x "$bin" ] || [ -n "$(find "${srcs[@]}" "$root/lib/include" "$root/lib/src/text.hpp" -newer "$bin" 2>/dev/null)" ]; then
  clang++ -std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -I"$root/lib/include" -I"$root/lib/src" "${srcs[@]}" -o "$bin"
fi
cd "$out"
UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  "$bin" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
  -dict="$root/fuzz/config.dict" "$out/corpus" "$root/fuzz/corpus"
