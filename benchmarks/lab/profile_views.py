"""One drs_ext.noisy_views call per setting, for a profiler to attach to: gpu_profile.sh runs it
under Nsight Compute, which reports each kernel's time, DRAM bytes, issue activity and warp
instructions executed. 32 x warp instructions / outputs is the kernel's instructions per output,
to compare with the static counts of sass_counts.py.

    ncu -k regex:noisy_views --metrics sm__inst_executed.sum python benchmarks/lab/profile_views.py
"""

from __future__ import annotations

import torch

import drs_ext

# (name, (C, H, W), images, num, partition): about 300 MB of float32 views each, as in
# benchmarks/bench_cuda.py's views table; fill "neighbors". Then CIFAR diag launches of 3, 6 and
# 24 images, which the launcher gives chunks of 1, 2 and 8 samples (6000 blocks each on an H100;
# the 12 images above get chunks of 5, 4800 blocks): instructions per output against chunk size,
# to fit the set-up cost that a chunk's samples share. Nsight Compute's dynamic shared memory per
# block is the chunk size times a CIFAR window, 6 KiB. Last, the certify-sized CIFAR call that
# bench_cuda.py times (one image, 2000 planes: chunks of 1, too few blocks for larger ones).
SETTINGS: list[tuple[str, tuple[int, int, int], int, int, str]] = [
    ("cifar-diag", (3, 32, 32), 12, 1000, "diag"),
    ("cifar-none", (3, 32, 32), 24, 1000, "none"),
    ("imagenet-diag", (3, 224, 224), 1, 250, "diag"),
    ("imagenet-none", (3, 224, 224), 2, 250, "none"),
    ("cifar-diag-3-images", (3, 32, 32), 3, 1000, "diag"),
    ("cifar-diag-6-images", (3, 32, 32), 6, 1000, "diag"),
    ("cifar-diag-24-images", (3, 32, 32), 24, 1000, "diag"),
    ("cifar-diag-1-image", (3, 32, 32), 1, 1000, "diag"),
]


def main() -> None:
    if not torch.cuda.is_available() or not drs_ext.built_with_cuda:
        raise SystemExit("profile_views: needs a CUDA GPU and drs_ext built with CUDA kernels")
    for name, shape, images, num, partition in SETTINGS:
        x = torch.rand(images, *shape, device="cuda")
        out = drs_ext.noisy_views(x, 0.25, num=num, seed=1, partition=partition)
        torch.cuda.synchronize()
        print(f"{name}: kernel {partition}, {out.numel()} float32 outputs")


if __name__ == "__main__":
    main()
