"""Launch shapes of the diag views kernel, side by side on a GPU: block size x chunk size x tile
size, for the choices the launcher makes by rule (csrc/cuda/noisy_views_kernel.cu).

    python benchmarks/tune_diag.py [--repeats R]

Builds benchmarks/tune/diag_tune.cu (torch.utils.cpp_extension.load, nvcc; the build is kept in
the temp directory), which runs the library's own diag kernel (fill "neighbors", float32 output)
with the shape it is given: 256 threads at 4 blocks per multiprocessor as the library launches
it, or 128 threads at 8 (the same 64-register cap), a chunk of 1 .. as many 48 KiB allows, and
a tile of tile_elems packed elements. For each setting (the CIFAR launch that Nsight Compute
profiles, the certify-sized CIFAR call, an ImageNet call) it checks every shape's views against
drs_ext.noisy_views bit for bit, then times all of them and the library's call alternately
(CUDA-event medians after warm-up, as benchmarks/bench_cuda.py times). Compare the shapes with
each other: a shape's call is the op alone (torch.ops.drs_tune.diag_views, one kernel), while
the library's call also passes through drs_ext.noisy_views's Python wrapper and launches
assert_finite_kernel, which shows in calls as small as the certify-sized one. Prints a markdown
table per setting and writes nothing. Without a CUDA device or drs_ext's CUDA kernels it says so and
exits 0.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import tempfile

import torch
from common import cuda_kernels_missing
from torch.utils import cpp_extension

import drs_ext
from drs_ext.bench import copy_bandwidth, gpu_ms, table

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIGMA, SEED = 0.25, 1
THREADS = (256, 128)

# (label, images, (C, H, W), num, tile sizes to try); the launcher's tile is 4096 elements.
SETTINGS: list[tuple[str, int, tuple[int, int, int], int, tuple[int, ...]]] = [
    (
        "CIFAR 3x32x32, 12 images x 1000 draws (Nsight Compute's launch)",
        12,
        (3, 32, 32),
        1000,
        (4096,),
    ),
    ("CIFAR 3x32x32, 1 image x 1000 draws (certify-sized call)", 1, (3, 32, 32), 1000, (4096,)),
    ("ImageNet 3x224x224, 1 image x 250 draws", 1, (3, 224, 224), 250, (4096, 2048, 1024)),
]


def build() -> object:
    """torch.ops.drs_tune, compiled from benchmarks/tune/diag_tune.cu."""
    csrc = ROOT / "csrc"
    build_dir = pathlib.Path(tempfile.gettempdir()) / "drs_tune_build"
    build_dir.mkdir(exist_ok=True)
    flags = ["-O3", "-std=c++20"]
    cpp_extension.load(
        name="drs_tune",
        sources=[str(ROOT / "benchmarks" / "tune" / "diag_tune.cu")],
        extra_include_paths=[str(csrc), str(csrc / "include"), str(csrc / "cuda")],
        extra_cflags=flags,
        extra_cuda_cflags=[*flags, "--expt-relaxed-constexpr"],
        build_directory=str(build_dir),
        is_python_module=False,
    )
    return torch.ops.drs_tune


def tune_setting(
    ops: object,
    images: int,
    shape: tuple[int, int, int],
    num: int,
    tiles: tuple[int, ...],
    repeats: int,
    copy_bw: float,
) -> list[list[str]]:
    x = torch.rand(images, *shape, device="cuda")
    library = functools.partial(drs_ext.noisy_views, x, SIGMA, num=num, seed=SEED)
    expected = library()
    fns, rows = {"library": library}, {}
    for tile_elems in tiles:
        tile_rows, tile_count, window, largest = ops.diag_geometry(*shape, tile_elems)
        for threads in THREADS:
            for chunk in range(1, largest + 1):
                fn = functools.partial(
                    ops.diag_views, x, SIGMA, num, SEED, threads, chunk, tile_elems
                )
                equal = torch.equal(fn(), expected)
                name = f"{threads}/{tile_elems}/{chunk}"
                fns[name] = fn
                blocks = images * 2 * -(-num // chunk) * tile_count
                rows[name] = [
                    str(threads),
                    f"{tile_rows} ({tile_count})",
                    f"{window}",
                    str(chunk),
                    str(blocks),
                    "yes" if equal else "**no**",
                ]
    written = expected.element_size() * expected.numel()
    del expected
    with torch.inference_mode():
        ms = gpu_ms(fns, warmup=3, repeats=repeats)
    out = [
        [
            "library call",
            "",
            "",
            "launcher's",
            "",
            "(reference)",
            f"{ms['library']:.3f}",
            f"{100 * written / (ms['library'] * 1e-3) / copy_bw:.0f}%",
            "1.00x",
        ]
    ]
    for name, row in sorted(rows.items(), key=lambda item: ms[item[0]]):
        out.append(
            row
            + [
                f"{ms[name]:.3f}",
                f"{100 * written / (ms[name] * 1e-3) / copy_bw:.0f}%",
                f"{ms['library'] / ms[name]:.2f}x",
            ]
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per shape")
    args = parser.parse_args(argv)
    if cuda_kernels_missing("tune_diag"):
        return 0
    ops = build()
    copy_bw = copy_bandwidth(warmup=3, repeats=15)
    props = torch.cuda.get_device_properties(0)
    print(
        f"# {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
        f"copy {copy_bw / 1e9:.0f} GB/s; medians of {args.repeats} CUDA-event timings"
    )
    header = [
        "threads",
        "tile rows (tiles)",
        "window bytes",
        "chunk",
        "blocks",
        "equal",
        "ms",
        "of copy BW",
        "vs library",
    ]
    for label, images, shape, num, tiles in SETTINGS:
        rows = tune_setting(ops, images, shape, num, tiles, args.repeats, copy_bw)
        print(f"\n### {label}\n\n{table(header, rows)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
