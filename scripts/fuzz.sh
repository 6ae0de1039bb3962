#!/usr/bin/env bash
# Builds a libFuzzer target (clang, with AddressSanitizer and UndefinedBehaviorSanitizer; the
# readers are torch-free, so everything they run is instrumented) and runs it on its committed
# seed corpus fuzz/corpus/TARGET/ for SECONDS (default 20). New inputs go to a scratch corpus,
# so the committed one only changes by hand. Targets (fuzz/fuzz_TARGET.cpp):
#   config  config parsing, --set overrides and validation, round trip through the resolved config
#   json    the bounded JSON reader every JSON input goes through, and the Keras model-config reader
#   pickle  the pickle reader behind PyTorch files
#   store   a study.sqlite as merge, export, golden and check open it, then golden and merge on it
#   golden  a golden file as check meets it, against a real run directory (with --junit)
#   csv     the RFC 4180 reader behind data.path (first byte: the delimiter)
# Usage: scripts/fuzz.sh [SECONDS] [TARGET]   (default TARGET: config)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
seconds="${1:-20}"
target="${2:-config}"
targets="config json pickle store golden csv"
case " $targets " in *" $target "*) ;; *) echo "fuzz.sh: unknown target \"$target\" ($targets)" >&2; exit 2 ;; esac
out="${BNLAB_BUILD_DIR:-$root/build}/fuzz"
mkdir -p "$out/corpus_$target"
bin="$out/fuzz_$target"
lib="$root/lib/src"
# bnlab's torch-free sources are compiled once into $out/core for every target (ctest runs the
# targets in parallel: one builds while the others wait on the lock), then linked with each one.
# tensorboard.cpp includes the Event proto's code, which the CMake build generates with protoc
# into the build folder's lib/ (scripts/build.sh has run before any fuzz target).
core=(config model_spec text json_input run_dir pickle store wal_vfs report html_report tensorboard tools csv)
gen="${BNLAB_BUILD_DIR:-$root/build}/lib"
[ -f "$gen/tensorboard_event.pb.cc" ] || { echo "fuzz.sh: $gen/tensorboard_event.pb.cc is missing: run scripts/build.sh first" >&2; exit 2; }
flags=(-std=c++17 -O1 -g -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined -I"$root/lib/include" -I"$lib" -I"$gen")
(
  flock 9
  mkdir -p "$out/core"
  for name in "${core[@]}"; do
    obj="$out/core/$name.o"
    if [ ! -f "$obj" ] || [ "$lib/$name.cpp" -nt "$obj" ] || [ -n "$(find "$lib" "$root/lib/include" -name '*.hpp' -newer "$obj")" ]; then
      clang++ "${flags[@]}" -c "$lib/$name.cpp" -o "$obj.tmp" && mv "$obj.tmp" "$obj"
    fi
  done
  obj="$out/core/tensorboard_event.pb.o"
  if [ ! -f "$obj" ] || [ "$gen/tensorboard_event.pb.cc" -nt "$obj" ]; then
    clang++ "${flags[@]}" -w -c "$gen/tensorboard_event.pb.cc" -o "$obj.tmp" && mv "$obj.tmp" "$obj"
  fi
) 9>"$out/.core.lock"
objs=()
for name in "${core[@]}" tensorboard_event.pb; do objs+=("$out/core/$name.o"); done
if [ ! -x "$bin" ] || [ "$root/fuzz/fuzz_$target.cpp" -nt "$bin" ] || [ -n "$(find "${objs[@]}" -newer "$bin")" ]; then
  clang++ "${flags[@]}" -fsanitize=fuzzer "$root/fuzz/fuzz_$target.cpp" "${objs[@]}" -lsqlite3 -lprotobuf -o "$bin.tmp"
  mv "$bin.tmp" "$bin"
fi
dict=()
[ "$target" = config ] && dict=(-dict="$root/fuzz/config.dict")
cd "$out"
BNLAB_FUZZ_STORE="$root/fuzz/corpus/store/smoke_keras_nll.sqlite" UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  "$bin" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
  ${dict[@]+"${dict[@]}"} "$out/corpus_$target" "$root/fuzz/corpus/$target"
