#!/usr/bin/env bash
# Kernel diagnostics on a machine with a CUDA GPU: builds drs_ext as scripts/gpu_check.sh does,
# then
#   ncu     benchmarks/lab/profile_views.py under Nsight Compute: per views kernel its time, DRAM
#           bytes, issue activity, instructions, launch shape and warp stall reasons;
#   host    benchmarks/lab/host_overhead.py: host time per call of the layers a call goes through;
# while logging the GPU's clocks, power, temperature and throttle reasons every 250 ms
# ($OUT/clocks.csv): the kernels are bound by instruction issue, so their times follow the SM
# clock. A failed diagnosis fails nothing. Logs go to $OUT (default gpu_out/).
#
# Usage: bash benchmarks/lab/gpu_profile.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-gpu_out}"
export OUT="$out" PYTHONUNBUFFERED=1
bash scripts/gpu_check.sh build

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

metrics=gpu__time_duration.sum,dram__bytes_write.sum,dram__bytes_read.sum
metrics+=,sm__inst_executed.sum,smsp__issue_active.avg.pct_of_peak_sustained_active
metrics+=,dram__throughput.avg.pct_of_peak_sustained_elapsed
metrics+=,sm__warps_active.avg.pct_of_peak_sustained_active
metrics+=,launch__grid_size,launch__shared_mem_per_block_dynamic,launch__registers_per_thread
if ! command -v ncu >/dev/null 2>&1; then
  echo "gpu_profile: ncu not found: no profile" | tee "$out/ncu_views.txt"
elif ! timeout 200 ncu --clock-control none -k 'regex:noisy_views_(diag|none)' \
  --metrics "$metrics" --section WarpStateStats python3 benchmarks/lab/profile_views.py \
  >"$out/ncu_views.txt" 2>&1; then
  echo "gpu_profile: the profile failed (see $out/ncu_views.txt)"
fi
timeout 120 python3 benchmarks/lab/host_overhead.py 2>&1 | tee "$out/host_overhead.txt" \
  || echo "gpu_profile: host_overhead failed (see $out/host_overhead.txt)"
