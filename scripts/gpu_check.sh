#!/usr/bin/env bash
# The GPU run of the CUDA kernels, in one command for a machine with a CUDA GPU and a CUDA torch
# already installed (it installs nothing else: numpy, scipy, pytest, tqdm, matplotlib and
# scikit-learn must be there). Builds drs_ext with its CUDA kernels against that torch, then
#   test   the test suite: first the tests with "cuda" in their id (the CUDA kernels and the
#          device runs of the other tests), then the rest (test_cmake_build.py left out: CI runs
#          it, and CMake's CUDA probe of a CUDA torch is slow and tells nothing about the kernels);
#   bench  benchmarks/bench_cuda.py, which rewrites the "## GPU" section of $OUT/RESULTS.md (a copy
#          of benchmarks/RESULTS.md), after (a, b) and again after (c), so a run stopped by a time
#          limit still brings back what it measured; copied back into benchmarks/ at the end;
#   build  the build alone (benchmarks/lab/gpu_profile.sh starts with it);
#   all    test and bench (the default), most telling first: the "cuda" tests, bench, the rest.
# Logs go to $OUT (default gpu_out/).
#
# Usage: bash scripts/gpu_check.sh [test|bench|build|all] [arguments for bench_cuda.py]
set -euo pipefail
cd "$(dirname "$0")/.."
stage="${1:-all}"
shift || true
case "$stage" in
  test | bench | build | all) ;;
  *) echo "gpu_check: unknown stage '$stage' (test, bench, build or all)" >&2; exit 2 ;;
esac
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if ! python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: torch sees no CUDA GPU here (torch.cuda.is_available() is False)" >&2
  exit 2
fi
python3 -c 'import torch; p = torch.cuda.get_device_properties(0); print(p.name, f"{p.total_memory / 2**30:.0f} GiB",
"| torch", torch.__version__, "| CUDA", torch.version.cuda)' | tee "$out/device.txt"
# setuptools links C++ extensions with $CXX when it is set. A compiler that links libstdc++
# statically into shared objects gives the extension a private copy of it beside the process's
# libstdc++.so.6, and the two disagree: formatting an integer into a TORCH_CHECK message then
# crashes the process (as with CXX=/opt/gcc/bin/g++ on a lent H100 image: the .so had no
# libstdc++.so.6 in ldd and its own codecvt symbols). Build with the system g++ there, and check
# the result below.
if [[ -n "${CXX:-}" ]]; then
  probe="$(mktemp -d)"
  echo 'int f() { return 1; }' >"$probe/p.cpp"
  if "$CXX" -shared -fPIC "$probe/p.cpp" -o "$probe/p.so" 2>/dev/null \
    && ! ldd "$probe/p.so" | grep -q 'libstdc++'; then
    echo "gpu_check: CXX=$CXX links libstdc++ statically into shared objects; using g++" \
      | tee "$out/build.log"
    export CXX=g++
  fi
  rm -rf "$probe"
fi
# An editable build against the torch that is there (no requirements.txt: it pins the CPU torch).
python3 -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e . \
  2>&1 | tee -a "$out/build.log"
python3 -c 'import drs_ext, sys; print("drs_ext CUDA kernels:", drs_ext.built_with_cuda,
drs_ext.cuda_archs); sys.exit(0 if drs_ext.built_with_cuda else 1)' | tee -a "$out/build.log"
so="$(python3 -c 'import drs_ext._C as c; print(c.__file__)')"
if ! ldd "$so" | grep -q 'libstdc++'; then
  echo "gpu_check: $so does not link libstdc++.so.6 dynamically (a static copy: see above)" >&2
  exit 1
fi

# Each step runs even if an earlier one failed; the exit status says whether any did. The tests
# have time limits so that a hung kernel leaves the later steps their time (the device tool stops
# a command at 10 minutes); pytest prints each test's name (-v) and, for a test running over 100 s,
# the stacks of every thread (faulthandler), so the log says where it hung.
status=0
pytest_args=(python_tests -p no:cacheprovider --ignore python_tests/test_cmake_build.py)
test_cuda() {
  timeout 240 python3 -m pytest "${pytest_args[@]}" -k cuda -v -rs -o faulthandler_timeout=100 \
    2>&1 | tee "$out/test_cuda.log" || status=1
}
test_rest() {
  timeout 300 python3 -m pytest "${pytest_args[@]}" -k 'not cuda' -q 2>&1 \
    | tee "$out/test_rest.log" || status=1
}
bench() {
  cp benchmarks/RESULTS.md "$out/RESULTS.md"
  python3 benchmarks/bench_cuda.py --results "$out/RESULTS.md" "$@" 2>&1 \
    | tee "$out/bench_cuda.log" || status=1
  cp "$out/RESULTS.md" benchmarks/RESULTS.md
}
case "$stage" in
  build) ;;
  test) test_cuda; test_rest ;;
  bench) bench "$@" ;;
  all) test_cuda; bench "$@"; test_rest ;;
esac
exit "$status"
