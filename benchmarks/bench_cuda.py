"""GPU benchmark of the CUDA kernels and of certification on the GPU (docs/design.md §5).

    python benchmarks/bench_cuda.py [--quick] [--no-write | --results PATH]

(a) Noisy views: drs_ext.noisy_views vs the plain-PyTorch pipeline users write today (x.repeat,
    torch.randn_like, indexing of the diagonal sub-image, 4-neighbour fill with F.pad shifts,
    then .to(out_dtype)), 3x32x32 and 3x224x224, num=1000 draws (ImageNet in 4 calls of 250
    draws, 300 MB of float32 views each, as a certify loop would batch them), partition
    "diag" x fill "neighbors" and "none", float32 and float16 output, both under
    torch.inference_mode() as certification runs them.
(b) Bandwidth: the bytes the op writes once / its time, as a fraction of the device-to-device
    copy bandwidth measured in the same run ((bytes read + bytes written) / time of a 1 GiB copy).
(c) CERTIFY end to end (n0=100, n=100,000, alpha=0.001, sigma=0.25) of a CIFAR ResNet-110 with
    random weights: SmoothedClassifier / DualSmoothedClassifier vs a Cohen et al.-style loop
    (repeat, randn_like, model, argmax, .cpu() + bincount per batch; for DRS the views of (a)),
    images per second, in float32 and with autocast(float16) + channels_last.
GPU times are CUDA-event medians after warm-up; the pipelines run alternately in the same run.
Prints markdown tables and writes them to benchmarks/RESULTS.md (or --results PATH) under
"## GPU", keeping the other sections: once after (a, b), so that a run cut short keeps them, and
again after (c). Without a CUDA device, or with a build of drs_ext without CUDA kernels, it says
so and exits 0.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from common import RESULTS, provenance, write_section
from torch import nn

import drs_ext
from drs_ext.cli.bench import PlainViews, copy_bandwidth, gpu_ms, table
from drs_ext.models import CifarResNet
from drs_ext.smoothing import DualSmoothedClassifier, SmoothedClassifier
from drs_ext.stats import lower_confidence_bound

SEED = 1234
NUM_CLASSES = 10


# ---------------------------------------------------------------------------------------------
# (a) + (b) noisy views.


def check_against_cpu() -> float:
    """max |CUDA - CPU| of a small call: the timed kernel computes the right thing."""
    x = torch.rand(2, 3, 32, 32)
    diff = 0.0
    for partition in ("diag", "none"):
        kw = {"num": 16, "seed": SEED, "partition": partition}
        cpu = drs_ext.noisy_views(x, 0.25, **kw)  # type: ignore[arg-type]
        cuda = drs_ext.noisy_views(x.cuda(), 0.25, **kw)  # type: ignore[arg-type]
        diff = max(diff, float((cuda.cpu() - cpu).abs().max()))
    return diff


def fused_views(
    x: torch.Tensor,
    stream: torch.Tensor,
    num: int,
    chunk: int,
    sigma: float,
    partition: str,
    dtype: torch.dtype,
) -> None:
    """num draws of x's views, `chunk` per noisy_views call."""
    for start in range(0, num, chunk):
        drs_ext.noisy_views(
            x[None],
            sigma,
            num=chunk,
            seed=SEED,
            offset=start,
            stream=stream,
            partition=partition,
            out_dtype=dtype,
        )


def plain_views(plain: PlainViews, num: int, chunk: int, sigma: float, dtype: torch.dtype) -> None:
    """The same draws through the plain pipeline."""
    for _ in range(0, num, chunk):
        plain.views(chunk, sigma, dtype)


def bench_views(args: argparse.Namespace, copy_bw: float) -> list[list[str]]:
    sigma, num = 0.25, 1000
    configs = [("CIFAR 3x32x32", (3, 32, 32), num)]
    if not args.quick:
        configs.append(("ImageNet 3x224x224", (3, 224, 224), 250))
    rows = []
    for label, shape, chunk in configs:
        x = torch.rand(shape, device="cuda")
        stream = torch.zeros(1, dtype=torch.int64, device="cuda")
        for partition in ("diag", "none"):
            plain = PlainViews(x, partition)
            branches = 2 if partition == "diag" else 1
            for dtype in (torch.float32, torch.float16):
                fused = functools.partial(
                    fused_views, x, stream, num, chunk, sigma, partition, dtype
                )
                baseline = functools.partial(plain_views, plain, num, chunk, sigma, dtype)
                # Under inference mode, as certification calls the op (drs_ext.smoothing) and as
                # bench_noisy_views.py times the CPU kernels. Outside it, each call also passes
                # through the Python autograd kernel of torch.library.register_autograd: about
                # 20 us of host time on an H100 host, which shows only in calls as small as
                # CIFAR's, whose GPU work takes about as long.
                with torch.inference_mode():
                    ms = gpu_ms({"plain": baseline, "fused": fused}, args.warmup, args.repeats)
                written = branches * num * x.numel() * torch.finfo(dtype).bits // 8
                rows.append(
                    [
                        label,
                        "diag x neighbors" if partition == "diag" else "none",
                        str(dtype).removeprefix("torch."),
                        f"{num}" if chunk == num else f"{num} ({num // chunk} x {chunk})",
                        f"{ms['plain']:.3f}",
                        f"{ms['fused']:.3f}",
                        f"{ms['plain'] / ms['fused']:.1f}x",
                        f"{written / (ms['fused'] * 1e-3) / 1e9:.0f}",
                        f"{100 * written / (ms['fused'] * 1e-3) / copy_bw:.0f}%",
                        f"{100 * written / (ms['plain'] * 1e-3) / copy_bw:.0f}%",
                    ]
                )
                print("  " + " | ".join(rows[-1]), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# (c) certification of a CIFAR ResNet-110.


def resnet110() -> nn.Module:
    """Cohen et al.'s CIFAR base classifier (drs_ext.models.CifarResNet, depth 110, 1.7M
    parameters) with random weights, its residual branches scaled down (batch-norm weight 0.2)
    so that the random network's activations stay bounded in float16."""
    model = CifarResNet(num_classes=NUM_CLASSES, depth=110)
    for block in model.layers:
        nn.init.constant_(block.bn2.weight, 0.2)
    return model


class CohenLoop:
    """Cohen et al.'s core.Smooth.certify, one pass per branch (DRS: the views of (a)), with
    the same model options as the smoothing classes: every batch syncs for .cpu()."""

    def __init__(
        self,
        models: list[nn.Module],
        sigma: float,
        autocast_dtype: torch.dtype | None,
        channels_last: bool,
    ) -> None:
        self.models = models
        self.sigma = sigma
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last

    def counts(self, x: torch.Tensor, num: int, batch_size: int) -> np.ndarray:
        partition = "none" if len(self.models) == 1 else "diag"
        plain = PlainViews(x, partition)
        counts = np.zeros((len(self.models), NUM_CLASSES), dtype=np.int64)
        with torch.inference_mode():
            for p, model in enumerate(self.models):
                remaining = num
                while remaining > 0:
                    this_batch = min(batch_size, remaining)
                    remaining -= this_batch
                    batch = plain.branch(p, this_batch, self.sigma)
                    if self.channels_last:
                        batch = batch.contiguous(memory_format=torch.channels_last)
                    with torch.autocast(
                        "cuda",
                        dtype=self.autocast_dtype or torch.float32,
                        enabled=self.autocast_dtype is not None,
                    ):
                        predictions = model(batch).argmax(1)
                    counts[p] += np.bincount(predictions.cpu().numpy(), minlength=NUM_CLASSES)
        return counts

    def certify(
        self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int
    ) -> tuple[int, float]:
        """(top class, lower confidence bound of its probability); the radius is omitted."""
        c_hat = int(self.counts(x, n0, batch_size).sum(axis=0).argmax())
        counts = self.counts(x, n, batch_size)[:, c_hat]
        # RS bound, or the DRS bound with alpha/2 per branch (docs/design.md §2.4); timing only.
        split = alpha / len(self.models)
        return c_hat, min(lower_confidence_bound(int(k), n, split) for k in counts)


FAST_OPTIONS = (
    "float32, noise not prefetched",
    "float32",
    "autocast fp16 + channels_last",
    "autocast fp16 + channels_last + CUDA graph",
)


def bench_certify(args: argparse.Namespace) -> list[list[str]]:
    sigma, alpha = 0.25, 0.001
    n0, n, batch = 100, args.n, args.batch
    torch.manual_seed(0)
    images = [torch.rand(3, 32, 32, device="cuda") for _ in range(args.images)]
    rows = []
    for method in ("RS", "DRS"):
        for option in FAST_OPTIONS:
            fast = option.startswith("autocast")
            graph = option.endswith("CUDA graph")
            prefetch = not option.endswith("not prefetched")
            autocast_dtype = torch.float16 if fast else None
            memory_format = torch.channels_last if fast else torch.contiguous_format
            models = [
                resnet110().cuda().eval().to(memory_format=memory_format)
                for _ in range(1 if method == "RS" else 2)
            ]
            options = {
                "autocast_dtype": autocast_dtype,
                "channels_last": fast,
                "cuda_graph": graph,
                "prefetch_noise": prefetch,
            }
            smoothed: SmoothedClassifier | DualSmoothedClassifier
            if method == "RS":
                smoothed = SmoothedClassifier(models[0], NUM_CLASSES, sigma, **options)
            else:
                smoothed = DualSmoothedClassifier(
                    models[0], models[1], NUM_CLASSES, sigma, **options
                )
            cohen = CohenLoop(models, sigma, autocast_dtype, fast)
            runs: dict[str, Callable[..., object]] = {
                "Cohen-style loop": functools.partial(
                    cohen.certify, n0=n0, alpha=alpha, batch_size=batch
                ),
                "drs_ext": functools.partial(
                    smoothed.certify, n0=n0, alpha=alpha, batch_size=batch, seed=SEED
                ),
            }
            seconds: dict[str, float] = {}
            for name, run in runs.items():
                run(images[0], n=2 * batch)  # warm-up: cuDNN autotuning, allocator
                torch.cuda.synchronize()
                start = time.perf_counter()
                for x in images:
                    run(x, n=n)
                torch.cuda.synchronize()
                seconds[name] = (time.perf_counter() - start) / len(images)
            base = seconds["Cohen-style loop"]
            for name, sec in seconds.items():
                rows.append(
                    [
                        method,
                        name,
                        option,
                        f"{sec:.2f}",
                        f"{1 / sec:.3f}",
                        f"{base / sec:.2f}x",
                    ]
                )
                print("  " + " | ".join(rows[-1]), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# Report.


def report(args: argparse.Namespace, sections: list[str], final: bool) -> None:
    """Prints the finished report and writes the "## GPU" section of the results file."""
    body = "\n\n".join(sections)
    if final:
        print("\n" + body)
    if not args.no_write:
        write_section("GPU", body, args.results)
        print(f"wrote {args.results}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CIFAR views, n=10,000, 1 image")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument(
        "--results", default=RESULTS, help="the results file whose '## GPU' section is rewritten"
    )
    parser.add_argument("--images", type=int, default=None, help="images certified per setting")
    parser.add_argument("--batch", type=int, default=1000, help="certify batch size")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device (torch.cuda.is_available() is False); nothing to do.")
        return 0
    if not drs_ext.built_with_cuda:
        print(
            "bench_cuda: drs_ext was built without its CUDA kernels; rebuild on a machine with "
            "CUDA (pip install --no-build-isolation -e .) to run this benchmark."
        )
        return 0
    # The command that reruns these figures; where they were written is no part of it.
    command = " ".join(
        ["python", "benchmarks/bench_cuda.py"]
        + ["--quick"] * args.quick
        + [f"--images {args.images}"] * (args.images is not None)
        + [f"--batch {args.batch}"] * (args.batch != 1000)
    )
    args.warmup, args.repeats = (2, 5) if args.quick else (3, 15)
    args.n = 10_000 if args.quick else 100_000
    args.images = args.images or (1 if args.quick else 2)
    torch.backends.cudnn.benchmark = True
    props = torch.cuda.get_device_properties(0)
    device = (
        f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs), "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, drs_ext {drs_ext.__version__} "
        f"(archs {drs_ext.cuda_archs or 'default'})"
    )
    print(f"# {device}\n# median of {args.repeats} runs after {args.warmup} warm-up runs")
    diff = check_against_cpu()
    print(f"check: max |CUDA - CPU| = {diff:.2e}")
    copy_bw = copy_bandwidth(args.warmup, args.repeats)
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)")
    print("(a, b) noisy views")
    views = bench_views(args, copy_bw)
    header = (
        provenance(device, command) + f"  \nKernel times are medians of {args.repeats} CUDA-event "
        f"timings after {args.warmup} warm-up runs, both pipelines timed alternately in the "
        f"same run. Check: max |CUDA - CPU| of the op = {diff:.1e}. Device-to-device copy "
        f"bandwidth: {copy_bw / 1e9:.0f} GB/s (bytes read + written / time, 1 GiB copy)."
    )
    views_section = (
        "### (a, b) Noisy views\n\n"
        "Plain: `x.repeat` + `torch.randn_like` (+ for diag: indexing of the diagonal "
        "sub-image, noise in sub-image space, 4-neighbour fill with `F.pad` shifts), both "
        "branches, then `.to(dtype)`. drs_ext: one `noisy_views` call per chunk with "
        "`out_dtype`. Both under `torch.inference_mode()`, as certification runs them; a timing "
        "starts with the GPU idle, so it includes the host time of launching the call (most of "
        "a CIFAR call). 'of copy BW': bytes of the views written once / time, over the copy "
        "bandwidth above (the memory-bandwidth floor of the op; the plain pipeline is "
        "credited with the same bytes).\n\n"
        + table(
            [
                "input",
                "partition x fill",
                "out dtype",
                "draws",
                "plain ms",
                "drs_ext ms",
                "speed-up",
                "drs_ext GB/s",
                "drs_ext of copy BW",
                "plain of copy BW",
            ],
            views,
        )
    )
    # (a, b) is written before (c) starts, so that a run cut short (a time limit) keeps it.
    unmeasured = "### (c) CERTIFY, CIFAR ResNet-110\n\nNot measured: the run stopped before (c)."
    report(args, [header, views_section, unmeasured], final=False)
    print(f"(c) CERTIFY, ResNet-110, n0=100, n={args.n}")
    certify = bench_certify(args)
    certify_section = (
        f"### (c) CERTIFY, CIFAR ResNet-110\n\n"
        f"n0 = 100, n = {args.n:,}, alpha = 0.001, sigma = 0.25, batch {args.batch}, "
        f"{args.images} image(s) per row after a warm-up certify; random weights; "
        "`torch.backends.cudnn.benchmark = True`. Cohen-style loop: per batch `repeat`, "
        "`randn_like` (DRS: the plain views of (a) per branch), model, `argmax`, `.cpu()` "
        "+ `bincount`. drs_ext: `SmoothedClassifier` / `DualSmoothedClassifier` (noisy_views "
        "for both branches, vote_counts on the device, one copy per sample_counts call). "
        "'autocast fp16 + channels_last': the classes' `autocast_dtype=torch.float16, "
        "channels_last=True`, the model converted to channels_last, and the same for the "
        "loop. '+ CUDA graph' adds `cuda_graph=True` (the model call captured once per batch "
        "shape and replayed; the Cohen-style loop has no such option and runs as before). "
        "drs_ext draws the next batch's views on a side stream while the model runs "
        "(`prefetch_noise=True`, the default) except in the 'noise not prefetched' rows.\n\n"
        + table(
            ["method", "pipeline", "options", "s / image", "images / s", "speed-up"],
            certify,
        )
    )
    report(args, [header, views_section, certify_section], final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
