#!/usr/bin/env bash
# Runs the CUDA backend's kernels and host logic on the CPU: compiles src/c/cuda/engine.cu with
# the host C++ compiler against tests/cuda_emulator/cuda_emulator.h (CUDA's fp16/bf16 headers
# needed, no GPU, no driver), links it with the C core, and compares every variant, mode and
# dtype with the CPU backend (tests/cuda_emulator/compare.c). Not a GPU test: see docs/cuda.md.
#   tools/cuda_emulate.sh [BUILD_DIR]     (default: a temporary folder)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cuda=${CUDA_HOME:-/usr/local/cuda}
out=${1:-$(mktemp -d)}
mkdir -p "$out"
start=$SECONDS
cmake -S "$root" -B "$out/cfg" -DBNCORE_CUDA=OFF -DBNCORE_TESTS=OFF > "$out/cfg.log" || { cat "$out/cfg.log"; exit 1; }
inc=(-I"$root/src/c/include" -I"$out/cfg/include" -I"$out/cfg/private" -I"$root/src/c")
defs=(-DBNCORE_BUILDING -DBNCORE_WITH_CUDA -DBNCORE_CUDA_EMULATE -DBN_CUDA_THREADS=16)
objs=()
for src in status tensor plan variants context api state cpu/engine cpu/kernels; do
  obj="$out/$(basename "$src").o"
  [ "$src" = cpu/engine ] && obj="$out/cpu_engine.o"
  [ "$src" = cpu/kernels ] && obj="$out/cpu_kernels.o"
  cc -std=c11 -O2 -fopenmp -ffp-contract=off "${defs[@]}" "${inc[@]}" -c "$root/src/c/$src.c" -o "$obj"
  objs+=("$obj")
done
c++ -std=c++20 -O2 -ffp-contract=off "${defs[@]}" "${inc[@]}" -I"$root/tests/cuda_emulator" -I"$cuda/include" \
  -x c++ -c "$root/src/c/cuda/engine.cu" -o "$out/cuda_engine.o"
cc -std=c11 -O2 "${inc[@]}" -c "$root/tests/cuda_emulator/compare.c" -o "$out/compare.o"
c++ -fopenmp "$out/compare.o" "$out/cuda_engine.o" "${objs[@]}" -o "$out/compare" -lpthread -lm
echo "built in $((SECONDS - start)) s"
"$out/compare"
