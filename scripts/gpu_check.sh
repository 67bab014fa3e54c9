#!/usr/bin/env bash
# The GPU run of the CUDA kernels, in one command for a machine with a CUDA GPU and a CUDA torch
# already installed (it installs nothing else: numpy, scipy, pytest, tqdm, matplotlib and
# scikit-learn must be there). Builds drs_ext with its CUDA kernels against that torch, then
#   test     python_tests/test_cuda.py, then the rest of the suite (the CPU tests on that torch;
#            test_cmake_build.py left out: CI runs it, and CMake's CUDA probe of a CUDA torch is
#            slow and tells nothing about the kernels);
#   bench    benchmarks/bench_cuda.py, which rewrites the "## GPU" section of $OUT/RESULTS.md (a
#            copy of benchmarks/RESULTS.md), after (a, b) and again after (c), so a run stopped by
#            a time limit still brings back what it measured; copied back into benchmarks/ at the
#            end;
#   profile  benchmarks/trace_views.py (torch.profiler: where the time of the calls bench times
#            goes: host lead-in, views kernels, finiteness check, idle), then
#            benchmarks/profile_views.py under Nsight Compute (ncu): per views kernel its time, DRAM
#            bytes, issue activity, instructions, launch shape and warp stall reasons (barrier
#            waits show the cost of blocks whose threads have unequal item counts) (diagnoses:
#            their failure fails nothing);
#   tune     benchmarks/tune_diag.py: the diag kernel in other launch shapes (block size, chunk
#            size, tile size) timed side by side with the library's call, each checked bit for
#            bit against it (builds benchmarks/tune/diag_tune.cu: a minute or two; not in all);
#   all      test, bench and profile (the default), most telling first: test_cuda.py, bench,
#            profile, and the rest of the suite last.
# Logs go to $OUT (default gpu_out/).
#
# Usage: bash scripts/gpu_check.sh [test|bench|profile|tune|all] [arguments for bench_cuda.py]
set -euo pipefail
cd "$(dirname "$0")/.."
stage="${1:-all}"
shift || true
case "$stage" in
  test | bench | profile | tune | all) ;;
  *) echo "gpu_check: unknown stage '$stage' (test, bench, profile, tune or all)" >&2; exit 2 ;;
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
# setuptools links C++ extensions, and torch.utils.cpp_extension.load (the test harnesses of
# python_tests/host) compiles them, with $CXX when it is set. A compiler that links libstdc++
# statically into shared objects gives each extension a private copy of it beside the process's
# libstdc++.so.6, and the two disagree: formatting an integer into a TORCH_CHECK message then
# crashes the process (seen on the lent H100 image, CXX=/opt/gcc/bin/g++, 2026-11-22: the
# harness .so had no libstdc++.so.6 in ldd and its own codecvt symbols). Build with the system
# g++ there, and check the result below.
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
# The GPU's clocks, power, temperature and throttle reasons every 250 ms while this script runs
# ($out/clocks.csv), and each stage's start time in $out/stages.txt to line them up with: the
# kernels are bound by instruction issue, so their times follow the SM clock, and bench_cuda.py
# (long runs) and ncu (single launches) may not see the same one.
clocks_pid=""
if command -v nvidia-smi >/dev/null 2>&1; then
  fields=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu
  reasons=clocks_throttle_reasons.active  # left out where the driver does not know it
  if nvidia-smi --query-gpu="$fields,$reasons" --format=csv >/dev/null 2>&1; then
    fields+=",$reasons"
  fi
  nvidia-smi --query-gpu="$fields" --format=csv -lms 250 >"$out/clocks.csv" 2>&1 &
  clocks_pid=$!
  trap 'kill "$clocks_pid" 2>/dev/null || true' EXIT
fi
stage_start() { echo "$1 $(date '+%Y/%m/%d %H:%M:%S.%3N')" >>"$out/stages.txt"; }
test_cuda() {
  stage_start test_cuda
  timeout 240 python3 -m pytest python_tests/test_cuda.py -v -rs -p no:cacheprovider \
    -o faulthandler_timeout=100 2>&1 | tee "$out/test_cuda.log" || status=1
}
test_rest() {
  stage_start test_rest
  timeout 300 python3 -m pytest python_tests -q -p no:cacheprovider \
    --ignore python_tests/test_cuda.py --ignore python_tests/test_cmake_build.py 2>&1 \
    | tee "$out/test_all.log" || status=1
}
bench() {
  stage_start bench
  cp benchmarks/RESULTS.md "$out/RESULTS.md"
  python3 benchmarks/bench_cuda.py --results "$out/RESULTS.md" "$@" 2>&1 \
    | tee "$out/bench_cuda.log" || status=1
  cp "$out/RESULTS.md" benchmarks/RESULTS.md
}
profile() {
  local metrics=gpu__time_duration.sum,dram__bytes_write.sum,dram__bytes_read.sum
  metrics+=,sm__inst_executed.sum,smsp__issue_active.avg.pct_of_peak_sustained_active
  metrics+=,dram__throughput.avg.pct_of_peak_sustained_elapsed
  metrics+=,sm__warps_active.avg.pct_of_peak_sustained_active
  metrics+=,launch__grid_size,launch__shared_mem_per_block_dynamic,launch__registers_per_thread
  stage_start trace
  timeout 120 python3 benchmarks/trace_views.py 2>&1 | tee "$out/trace_views.txt" \
    || echo "gpu_check: the trace failed (see $out/trace_views.txt)"
  stage_start ncu
  if ! command -v ncu >/dev/null 2>&1; then
    echo "gpu_check: ncu not found: no profile" | tee "$out/ncu_views.txt"
  elif ! timeout 200 ncu --clock-control none -k 'regex:noisy_views_(diag|none)' \
    --metrics "$metrics" --section WarpStateStats python3 benchmarks/profile_views.py \
    >"$out/ncu_views.txt" 2>&1; then
    echo "gpu_check: the profile failed (see $out/ncu_views.txt)"
  fi
}
tune() {
  stage_start tune
  timeout 500 python3 benchmarks/tune_diag.py 2>&1 | tee "$out/tune_diag.txt" || status=1
}
case "$stage" in
  test) test_cuda; test_rest ;;
  tune) tune ;;
  bench) bench "$@" ;;
  profile) profile ;;
  all) test_cuda; bench "$@"; profile; test_rest ;;
esac
exit "$status"
