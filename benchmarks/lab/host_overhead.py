"""Host time of one noisy_views call on CUDA, and of the layers it passes through.

    python benchmarks/lab/host_overhead.py

A CIFAR-sized call (one 3x32x32 image, 1000 draws, diag x neighbors: about 20 us of GPU work) is
launch-bound, so what it costs is host time. Each row is the wall time per call of 300 calls in
a row, read on the host before synchronising (launches are asynchronous), after 30 warm-up calls:
  public call           drs_ext.noisy_views in grad mode, through the Python autograd kernel of
                        torch.library.register_autograd (x needs no grad);
  under inference mode  the same call; inference mode skips the autograd kernel, as in
                        certification (drs_ext.smoothing);
  CUDA kernel only      the op redispatched straight to its CUDA registration;
  x + 1                 one elementwise launch, for scale.
Prints a table and writes nothing. Without a CUDA device or a build of drs_ext with its CUDA
kernels it says so and exits 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

import drs_ext

CALLS, WARMUP = 300, 30


def host_us_per_call(fn: Callable[[], object]) -> float:
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(CALLS):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * elapsed / CALLS


def main() -> None:
    if not (torch.cuda.is_available() and drs_ext.built_with_cuda):
        print("host_overhead: needs a CUDA device and drs_ext built with its CUDA kernels")
        return
    x = torch.rand(1, 3, 32, 32, device="cuda")
    stream = torch.zeros(1, dtype=torch.int64, device="cuda")
    op = torch.ops.drs_ext.noisy_views.default
    cuda_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    args = (x, [0.25], 1000, 1, 0, stream, "diag", "neighbors", None)

    def public() -> object:
        return drs_ext.noisy_views(x, 0.25, num=1000, seed=1, stream=stream)

    def inference() -> object:
        with torch.inference_mode():
            return public()

    rows = {
        "public call": public,
        "under inference mode": inference,
        "CUDA kernel only": lambda: op.redispatch(cuda_only, *args),
        "x + 1": lambda: x + 1,
    }
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| call | host us per call |\n|---|---|")
    for name, fn in rows.items():
        print(f"| {name} | {host_us_per_call(fn):.1f} |")


if __name__ == "__main__":
    main()
