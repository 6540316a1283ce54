#!/usr/bin/env bash
# Compiles the CUDA backend with `ptxas -v` and fails when any kernel spills registers
# (spill stores or loads other than 0 bytes), printing a per-architecture summary.
#   tools/check_spills.sh BUILD_DIR [ARCHITECTURES]
# BUILD_DIR: a configured build (for the generated headers); ARCHITECTURES: nvcc -arch list,
# default "sm_80 sm_90" (the default build's machine code).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:?usage: tools/check_spills.sh BUILD_DIR [ARCHITECTURES]}
archs=${2:-"sm_80 sm_90"}
nvcc=${CUDACXX:-nvcc}
command -v "$nvcc" > /dev/null || { echo "check_spills: no nvcc"; exit 1; }
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for arch in $archs; do
  start=$SECONDS
  "$nvcc" -std=c++17 -O3 --fmad=false -arch="$arch" -Xptxas -v -DBNCORE_BUILDING -DBNCORE_WITH_CUDA \
    -I"$root/src/c/include" -I"$build/include" -I"$build/private" \
    -c "$root/src/c/cuda/engine.cu" -o /dev/null > "$log" 2>&1 || { cat "$log"; exit 1; }
  kernels=$(grep -c "Compiling entry function" "$log" || true)
  bad=$(grep -E "[0-9]+ bytes spill (stores|loads)" "$log" | grep -vcE "^.*0 bytes spill stores, 0 bytes spill loads" || true)
  maxreg=$(grep -oE "Used [0-9]+ registers" "$log" | grep -oE "[0-9]+" | sort -n | tail -1)
  echo "$arch: $kernels kernels, at most ${maxreg:-0} registers per thread, $bad with spills ($((SECONDS - start)) s)"
  if [ "$bad" -ne 0 ]; then
    grep -B3 -E "[1-9][0-9]* bytes spill" "$log"
    exit 1
  fi
done
echo "check_spills: no register spills"
