#!/usr/bin/env bash
# Compile-checks every .cu under csrc/ with nvcc, to object files in a temporary directory, for
# sm_80 and sm_90. Needs nvcc and the installed torch's headers only: no GPU and no CUDA build of
# torch (docs/design.md §3). -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE stands in for c10/cuda's generated
# cuda_cmake_macros.h, which the CPU wheel does not ship; nothing else is stubbed. The flags
# follow torch's CUDAExtension build (COMMON_NVCC_FLAGS) and setup.py.
#
# Usage: scripts/nvcc_check.sh     (env: NVCC, PYTHON, NVCC_CHECK_JOBS)
# Prints each command and its result; exits non-zero if any file fails to compile, if a kernel
# has a stack frame or spills registers (ptxas -v), or if a views kernel lacks vector stores (PTX).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
if [[ -z "${NVCC:-}" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    NVCC="$(command -v nvcc)"
  elif [[ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]; then
    NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
  else
    echo "nvcc_check: nvcc not found (put it on PATH or set NVCC / CUDA_HOME)" >&2
    exit 2
  fi
fi

mapfile -t SOURCES < <(find "$ROOT/csrc" -name '*.cu' | sort)
if ((${#SOURCES[@]} == 0)); then
  echo "nvcc_check: no .cu files under csrc/" >&2
  exit 2
fi

read -r -a TORCH_FLAGS <<<"$("$PYTHON" -c '
import sysconfig
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths
flags = ["-I" + p for p in include_paths()] + ["-I" + sysconfig.get_paths()["include"]]
print(" ".join(flags + [f for f in COMMON_NVCC_FLAGS if f != "--expt-relaxed-constexpr"]))
')"

FLAGS=(
  -c -O3 -std=c++20
  -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DDRS_WITH_CUDA -DTORCH_API_INCLUDE_EXTENSION_H
  --expt-relaxed-constexpr -Xcompiler -fPIC -Xptxas -v
  -gencode arch=compute_80,code=sm_80
  -gencode arch=compute_90,code=sm_90
  -I"$ROOT/csrc" -I"$ROOT/csrc/include" -I"$ROOT/csrc/cuda"
  "${TORCH_FLAGS[@]}"
)

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
JOBS="${NVCC_CHECK_JOBS:-$(nproc)}"

echo "nvcc_check: $("$NVCC" --version | tail -n 1)"
echo "nvcc_check: flags: ${FLAGS[*]}"

# Compile in parallel (JOBS at a time), then report in order.
pids=()
for i in "${!SOURCES[@]}"; do
  src="${SOURCES[$i]}"
  obj="$TMP/$(basename "${src%.cu}").o"
  mkdir -p "$TMP/keep$i"
  (
    rc=0
    # -keep: the PTX of each target stays in keep$i for the vector-store check below.
    "$NVCC" "${FLAGS[@]}" -keep -keep-dir "$TMP/keep$i" "$src" -o "$obj" >"$TMP/$i.log" 2>&1 ||
      rc=$?
    echo "$rc" >"$TMP/$i.rc"
  ) &
  pids+=($!)
  if ((${#pids[@]} >= JOBS)); then
    wait "${pids[0]}"
    pids=("${pids[@]:1}")
  fi
done
wait

failed=0
for i in "${!SOURCES[@]}"; do
  src="${SOURCES[$i]#"$ROOT"/}"
  rc="$(cat "$TMP/$i.rc")"
  if [[ "$rc" == 0 ]]; then
    echo "nvcc_check: OK    $src (sm_80, sm_90)"
  else
    echo "nvcc_check: FAIL  $src (exit $rc)"
    failed=1
  fi
  # ptxas -v reports each kernel's registers, stack frame and spills: printed as a summary, and
  # a kernel with a stack frame or spills fails the check (the kernels keep everything in
  # registers; a stack frame would also mean a local copy of the by-value launch parameters,
  # whose Philox round keys the kernels read from the constant bank).
  grep -v -e '^ptxas info' -e 'bytes stack frame' "$TMP/$i.log" | sed 's/^/    /' || true
  if [[ "$rc" == 0 ]]; then
    clean='^ *0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads'
    kernels="$(grep -c 'bytes stack frame' "$TMP/$i.log" || true)"
    heavy="$(grep 'bytes stack frame' "$TMP/$i.log" | grep -v -c "$clean" || true)"
    regs="$(grep -o 'Used [0-9]* registers' "$TMP/$i.log" | awk '{print $2}' | sort -n |
      sed -n '1p;$p' | paste -sd- -)"
    if [[ "$kernels" == 0 || "$heavy" != 0 ]]; then
      echo "nvcc_check: FAIL  $src: $heavy of $kernels kernels with a stack frame or spills"
      awk -v clean="$clean" '/Function properties for/ { name = $NF }
        /bytes stack frame/ && $0 !~ clean { print "    " name ": " $0 }' "$TMP/$i.log"
      failed=1
    else
      echo "nvcc_check: OK    $src: $kernels kernels, no stack frame or spills, $regs registers"
    fi
  fi
  # The noisy_views kernels are bound by their stores: each must write with vector stores
  # (st.global...v2 / v4 in the PTX of every target), which the compiler can silently split
  # (csrc/cuda/noisy_views_common.cuh, store_vec).
  if [[ "$rc" == 0 && "$src" == *noisy_views* ]]; then
    "$PYTHON" - "$TMP/keep$i" <<'PY' || failed=1
import re, sys
from pathlib import Path

ptx_files = sorted(Path(sys.argv[1]).glob("*.ptx"))
bad, kernels = [], 0
for ptx in ptx_files:
    text = ptx.read_text()
    # The views kernels, not assert_inputs_kernel (whose mangled name holds the file's name).
    for m in re.finditer(r"\.entry\s+(\S*noisy_views_(?:diag|none)_kernel\S*)\(", text):
        body = text[m.end() : text.find("\n}", m.end())]
        kernels += 1
        if not re.search(r"\bst\.global\S*\.v[24]\.", body):
            bad.append(f"{ptx.name}: {m.group(1)}")
if not ptx_files or not kernels or bad:
    print(f"nvcc_check: FAIL  vector stores: {len(ptx_files)} PTX files, {kernels} kernels")
    for b in bad:
        print(f"    no vector store in {b}")
    sys.exit(1)
print(f"nvcc_check: OK    vector stores in all {kernels} noisy_views kernels "
      f"({len(ptx_files)} PTX)")
PY
  fi
done
exit "$failed"
