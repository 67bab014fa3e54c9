"""Instructions per output of the noisy_views CUDA kernels, counted in their SASS (no GPU needed).

    python benchmarks/lab/sass_counts.py [--cuobjdump PATH] [--arch sm_90]

Compiles csrc/cuda/noisy_views_kernel.cu to a cubin with scripts/nvcc_check.sh's flags, disassembles
it with cuobjdump and walks the hot loop of each kernel: the straight-line path one iteration
executes, following unconditional branches, taking a conditional branch only where it jumps over a
slow path (a CALL: sqrt or division out of range), and adding the loop control up to the backward
branch. Loops:
  none   the per-sample loop of write_chunk_group: 4 outputs per iteration;
  diag   per sample of a chunk: phase 1, draw_samples<true> (a whole group: 4 normals, 8
         outputs), and phase 2, store_item's fill_slot loop (8 outputs). An item's index math
         runs once for all samples of its chunk and is not counted.
These are static counts, a bound on issue, not a measurement (profile_views.py under Nsight Compute
measures the instructions executed). cuobjdump is not part of a pip torch: `pip download --no-deps
nvidia-cuda-cuobjdump -d D && unzip -o D/*.whl -d D/x` gives D/x/nvidia/cu13/bin/cuobjdump.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FILLS = {"0": "neighbors", "1": "pair", "2": "bilinear", "3": "zeros"}
DTYPES = {"N3c104HalfE": "float16", "N3c108BFloat16E": "bfloat16"}  # float32 otherwise


def torch_flags() -> list[str]:
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    flags = ["-I" + p for p in include_paths()] + ["-I" + sysconfig.get_paths()["include"]]
    return flags + [f for f in COMMON_NVCC_FLAGS if f != "--expt-relaxed-constexpr"]


def sass_of_kernels(nvcc: str, cuobjdump: str, arch: str) -> dict[str, list[tuple[int, str]]]:
    """{mangled kernel name: [(address, instruction)]} of noisy_views_kernel.cu."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "views.cubin"
        subprocess.run(
            [nvcc, "-cubin", "-O3", "-std=c++20", f"-arch={arch}",
             "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DDRS_WITH_CUDA",
             "-DTORCH_API_INCLUDE_EXTENSION_H", "--expt-relaxed-constexpr",
             f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'csrc' / 'include'}", *torch_flags(),
             str(ROOT / "csrc" / "cuda" / "noisy_views_kernel.cu"), "-o", str(cubin)],
            check=True,
        )  # fmt: skip
        text = subprocess.run(
            [cuobjdump, "-sass", str(cubin)], check=True, capture_output=True, text=True
        ).stdout
    kernels = {}
    for part in re.split(r"\n\s*Function : ", text)[1:]:
        name, body = part.split("\n", 1)
        code = []
        for line in body.split("\n"):
            m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*/\* 0x", line)
            if m:
                code.append((int(m.group(1), 16), re.sub(r"\s+", " ", m.group(2))))
        kernels[name.strip()] = code
    return kernels


def branch_target(ins: str) -> int | None:
    m = re.match(r"(?:@!?U?P\w+ )?BRA (?:!?U?P\w+, )?0x([0-9a-f]+)$", ins)
    return int(m.group(1), 16) if m else None


def walk(
    code: list[tuple[int, str]], start: int, stop: re.Pattern[str], stops: int, vector_path: bool
) -> int:
    """Instructions from index start through the stops-th instruction matching stop; vector_path:
    take a conditional branch over element-wise stores (to the vector store)."""
    index = {a: k for k, (a, _) in enumerate(code)}
    k, count, seen = start, 0, 0
    while True:
        ins = code[k][1]
        count += 1
        if count > len(code):
            raise RuntimeError(f"sass_counts: no end of the path from {code[start][0]:#x}")
        if stop.search(ins):
            seen += 1
            if seen == stops:
                return count
        target = branch_target(ins)
        if target is not None and not ins.startswith("@"):
            k = index[target]
            continue
        if target is not None and target > code[k][0]:
            skipped = [i for _, i in code[k + 1 : index[target]]]
            # A slow path: a short stretch with a call (sqrt, division), not a whole branch.
            slow_path = len(skipped) <= 20 and any(i.startswith("CALL") for i in skipped)
            element_stores = any(re.match(r"STG\.E(\.U16)? ", i) for i in skipped)
            if slow_path or (vector_path and element_stores):
                k = index[target]
                continue
        k += 1


def is_backward(code: list[tuple[int, str]], k: int) -> bool:
    """Whether instruction k is a conditional branch back: a loop's."""
    target = branch_target(code[k][1])
    return code[k][1].startswith("@") and target is not None and target < code[k][0]


def loop_after(code: list[tuple[int, str]], begin: int, end: int) -> tuple[int, int]:
    """(head, latch length) of the last loop closed by a backward branch in code[begin:end]."""
    back = max(k for k in range(begin, end) if is_backward(code, k))
    head = next(k for k, (a, _) in enumerate(code) if a == branch_target(code[back][1]))
    sync = max(k for k in range(head, back) if code[k][1].startswith("BSYNC"))
    return head, back - sync + 1


def loops(code: list[tuple[int, str]], begin: int, end: int) -> list[tuple[int, int]]:
    """(head, backward branch) of each loop closed in code[begin:end]."""
    return [
        (next(h for h, (a, _) in enumerate(code) if a == branch_target(code[k][1])), k)
        for k in range(begin, end)
        if is_backward(code, k)
    ]


def loop_path(code: list[tuple[int, str]], head: int, back: int) -> int:
    """Instructions of one iteration of the loop from head to its backward branch."""
    return walk(code, head, re.compile(re.escape(code[back][1]) + "$"), 1, vector_path=False)


def diag_counts(code: list[tuple[int, str]], dtype: str) -> tuple[int, int]:
    bars = [k for k, (_, i) in enumerate(code) if i.startswith("BAR.SYNC")]
    # Phase 1's sample loops: the whole-group one stores its 4 values unpredicated.
    draw = next(
        loop_path(code, h, b)
        for h, b in loops(code, 0, bars[0])
        if sum(i.startswith("STS") for _, i in code[h:b]) == 4
    )
    # Phase 2's fill_slot loop: the innermost loop with the item's vector stores.
    stores = 2 if dtype == "float32" else 1
    fill = min(
        loop_path(code, h, b)
        for h, b in loops(code, bars[0], bars[1])
        if sum(i.startswith("STG.E.128") for _, i in code[h:b]) == stores
    )
    return draw, fill


def none_count(code: list[tuple[int, str]]) -> int:
    stg = next(k for k, (_, i) in enumerate(code) if re.match(r"STG\.E\.(128|64) ", i))
    back = next(k for k in range(stg, len(code)) if is_backward(code, k))
    head, latch = loop_after(code, 0, back + 1)
    return walk(code, head, re.compile(r"^STG\.E\.(128|64)"), 1, vector_path=True) + latch


def find_cuobjdump(given: str | None) -> str:
    if given:
        return given
    found = shutil.which("cuobjdump")
    if found is None:
        sys.exit("sass_counts: cuobjdump not found; pass --cuobjdump (see this script's header)")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuobjdump", help="path of cuobjdump (default: on PATH)")
    parser.add_argument("--nvcc", default=shutil.which("nvcc") or "nvcc")
    parser.add_argument("--arch", default="sm_90")
    args = parser.parse_args()
    kernels = sass_of_kernels(args.nvcc, find_cuobjdump(args.cuobjdump), args.arch)
    print(f"{args.arch}: instructions per loop iteration (straight-line path) and per output\n")
    print("| kernel | out dtype | draw per 8 outputs | fill per 8 outputs | per output |")
    print("|---|---|---|---|---|")
    for name, code in sorted(kernels.items()):
        m = re.search(r"noisy_views_(none|diag)_kernelI(?:LN3drs4FillE(\d)E)?", name)
        if not m:
            continue
        partition, fill = m.group(1), m.group(2)
        dtype = next((d for key, d in DTYPES.items() if key in name), "float32")
        if partition == "none":
            loop = none_count(code)
            print(f"| none | {dtype} | {loop} per 4 | | {loop / 4:.1f} |")
        else:
            draw, fill_count = diag_counts(code, dtype)
            per = (draw + fill_count) / 8
            print(f"| diag x {FILLS[fill]} | {dtype} | {draw} | {fill_count} | {per:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
