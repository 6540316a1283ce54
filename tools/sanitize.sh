#!/usr/bin/env bash
# ASan + UBSan over bncore. Part 1 (CI runs at least this): the C library and its tests, ctest.
# Part 2: the extension built with the same option into its own venv, then pytest (default: the
# whole suite), the forged-capsule tests and a fuzz_dlpack run under LD_PRELOAD of the ASan runtime.
# usage: tools/sanitize.sh [--c-only] [--deps VENV] [--fuzz-runs N] [-- PYTEST_ARGS...]
#   --deps VENV  reuse VENV's installed packages (numpy, torch, pytest, ...) instead of installing them
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BNCORE_SANITIZE_BUILD:-$root/build/sanitize}
san=address,undefined
c_only=0 deps="" fuzz_runs=100000
while [ $# -gt 0 ]; do
  case $1 in
    --c-only) c_only=1 ;;
    --deps) deps=$2; shift ;;
    --fuzz-runs) fuzz_runs=$2; shift ;;
    --) shift; break ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$build"
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
part() { echo "== $1 ($(( SECONDS - t0 )) s)"; t0=$SECONDS; }
t0=$SECONDS

part "C library and tests with -fsanitize=$san"
cmake -S "$root" -B "$build/c" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DBNCORE_SANITIZE=$san > "$build/c.log"
cmake --build "$build/c" -j 2 >> "$build/c.log" || { tail -50 "$build/c.log"; exit 1; }
ASAN_OPTIONS=detect_leaks=1 ctest --test-dir "$build/c" --output-on-failure
part "ctest done"
[ "$c_only" = 1 ] && exit 0

python3 -m venv "$build/venv"
# shellcheck disable=SC1091
. "$build/venv/bin/activate"
if [ -n "$deps" ]; then
  "$deps/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
    > "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/bncore-deps.pth"
  extra=""
else
  pip install -q scikit-build-core cython numpy
  extra="[test]"
fi
pip install -q --no-build-isolation -Cbuild-dir="$build/py" -Ccmake.build-type=RelWithDebInfo \
  -Ccmake.define.BNCORE_SANITIZE=$san "$root$extra"
part "extension built"

logs="$build/logs"; rm -rf "$logs"; mkdir -p "$logs"
# libstdc++ first too: torch throws C++ exceptions, and ASan's __cxa_throw needs the real one at start-up
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0:log_path=$logs/asan UBSAN_OPTIONS=$UBSAN_OPTIONS:log_path=$logs/ubsan
cd "$root"
status=0
python -m pytest -q -p no:cacheprovider "$@" || status=$?
part "pytest done (status $status)"
python -m pytest -q -p no:cacheprovider tests/test_forged_capsules.py tests/test_fuzz_smoke.py || status=$?
python tools/fuzz_dlpack.py --random --runs "$fuzz_runs" || status=$?
part "forged capsules and fuzz done"
if compgen -G "$logs/*" > /dev/null; then
  echo "sanitizer reports:"; cat "$logs"/*; exit 1
fi
exit $status
