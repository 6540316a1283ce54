#!/usr/bin/env bash
# On a machine with a CUDA GPU (made for one H200): install bncore with its CUDA backend for
# that GPU only (CMAKE_CUDA_ARCHITECTURES, default 90), run the `cuda` tests and the GPU bench,
# and print a summary. About 8 minutes: the install (~2 min), the tests, the bench (~3 min).
#   tools/gpu_check.sh [ARCHITECTURES]
set -euo pipefail
cd "$(dirname "$0")/.."
archs=${1:-90}
export PIP_DISABLE_PIP_VERSION_CHECK=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || { echo "no GPU"; exit 2; }

start=$SECONDS
echo "== install with CUDA (architectures $archs)"
pip install -q ".[test]" -Ccmake.define.BNCORE_CUDA=ON -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$archs"
python -c "import bncore; print(bncore.build_info()); assert bncore.cuda_available(), 'bncore sees no device'"
install_s=$((SECONDS - start))

echo "== the cuda tests"
start=$SECONDS
set +e
timeout 300 python -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider | tee /tmp/bncore_cuda_tests.log
tests_rc=${PIPESTATUS[0]}
set -e
tests_s=$((SECONDS - start))

echo "== the GPU bench"
start=$SECONDS
set +e
timeout 240 python -m bncore.bench.gpu --repeats 11 | tee /tmp/bncore_gpu_bench.log
bench_rc=${PIPESTATUS[0]}
set -e
bench_s=$((SECONDS - start))

echo "== summary"
echo "install: ${install_s} s; cuda tests: rc ${tests_rc}, ${tests_s} s: $(tail -1 /tmp/bncore_cuda_tests.log)"
echo "bench: rc ${bench_rc}, ${bench_s} s: $(grep '^summary' /tmp/bncore_gpu_bench.log || echo 'no summary')"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
