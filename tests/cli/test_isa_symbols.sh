#!/usr/bin/env bash
# The instruction-set files of the lane kernels (lane_kernels_avx2.cpp, lane_kernels_avx512.cpp)
# must define exactly one global symbol each, their kernels() table. Anything else they define
# with external or weak linkage (an inline function or a template of a shared header, emitted
# out of line) could be the copy the linker keeps for the whole program, and then run AVX-512
# code on a CPU without it. Usage: test_isa_symbols.sh OBJECT...  (the library's object files)
set -euo pipefail
checked=0
objects=()
for arg in "$@"; do  # CMake passes $<TARGET_OBJECTS:...> as one ;-separated list
  IFS=';' read -ra parts <<< "$arg"
  objects+=("${parts[@]}")
done
for obj in "${objects[@]}"; do
  case "$obj" in
    *lane_kernels_avx2.cpp.o) isa=avx2 ;;
    *lane_kernels_avx512.cpp.o) isa=avx512 ;;
    *) continue ;;
  esac
  symbols=$(nm -C -g --defined-only "$obj" | awk '{ $1 = ""; $2 = ""; sub(/^  /, ""); print }')
  want="bnlab::lanes::$isa::kernels()"
  if [ "$symbols" != "$want" ]; then
    echo "FAIL: $obj defines, beyond $want:" >&2
    printf '%s\n' "$symbols" | grep -vxF "$want" >&2 || true
    exit 1
  fi
  checked=$((checked + 1))
done
if [ "$checked" -ne 2 ]; then
  echo "FAIL: expected the two instruction-set objects among the arguments, found $checked" >&2
  exit 1
fi
echo "ok: each instruction-set object defines only its kernels()"
