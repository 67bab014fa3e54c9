"""Benchmark of drs_ext.noisy_views against the plain-PyTorch pipeline users write today.

    python benchmarks/bench_noisy_views.py [--quick]

(a) Noisy views alone: drs_ext.noisy_views vs x.repeat + torch.randn_like (torch's own RNG) +
    indexing of the diagonal sub-images + the 4-neighbour fill with padding/shift ops, as a user
    adapts Cohen et al.'s core.py to DRS. CIFAR-sized 3x32x32 with num=1000 draws; ImageNet-sized
    3x224x224 with num=100 (num=1000 would be 600 MB of float32 per branch), reported per 1000.
(b) The sampling of CERTIFY end to end for a small CNN (n0 selection + n estimation draws in
    batches): repeat, randn_like, model, argmax, bincount vs noisy_views + model + vote_counts,
    same model and draws, for RS (partition "none") and DRS (partition "diag", two models).
Both pipelines are timed alternately in one run: warm-up, then the median of several repeats.
A noise check compares mean and std of (view - clean image) on kept pixels with (0, sigma).

Prints markdown tables and writes them to benchmarks/RESULTS.md under "## CPU", keeping the
other sections of that file.
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch
from common import RESULTS, provenance, write_section
from torch import nn

import drs_ext
from drs_ext.cli.bench import PlainViews, device_description, median_ms, table

SIGMA = 0.5
SEED = 1234
NUM_CLASSES = 10


def ours_views(x: torch.Tensor, num: int, partition: str, offset: int = 0) -> torch.Tensor:
    return drs_ext.noisy_views(
        x[None], SIGMA, num=num, seed=SEED, offset=offset, partition=partition
    )[0]


def bench_views(args: argparse.Namespace) -> list[list[str]]:
    configs = [("CIFAR 3x32x32", (3, 32, 32), 1000)]
    if not args.quick:
        configs.append(("ImageNet 3x224x224", (3, 224, 224), 100))
    rows = []
    for label, shape, num in configs:
        x = torch.rand(shape)
        for partition in ("diag", "none"):
            plain = PlainViews(x, partition)
            ms = median_ms(
                {
                    "plain": functools.partial(plain.views, num, SIGMA),
                    "ours": functools.partial(ours_views, x, num, partition),
                },
                args.warmup,
                args.repeats,
            )
            scale = 1000 / num
            rows.append(
                [
                    label,
                    "diag x neighbors" if partition == "diag" else "none",
                    f"{num}" if num == 1000 else f"{num} (times x{scale:g})",
                    f"{ms['plain'] * scale:.1f}",
                    f"{ms['ours'] * scale:.1f}",
                    f"{ms['plain'] / ms['ours']:.1f}x",
                ]
            )
            print("  " + " | ".join(rows[-1]), flush=True)
    return rows


class SmallCNN(nn.Sequential):
    """A CIFAR-sized CNN: three 3x3 convolutions, global average pooling, a linear head."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, NUM_CLASSES),
        )


def plain_certify_counts(
    plain: PlainViews, models: list[nn.Module], draws: int, batch: int
) -> torch.Tensor:
    """Cohen et al.'s _sample_noise loop, one pass per branch: (P, K) votes."""
    counts = torch.zeros(len(models), NUM_CLASSES, dtype=torch.int64)
    for p, model in enumerate(models):
        remaining = draws
        while remaining > 0:
            this_batch = min(batch, remaining)
            remaining -= this_batch
            predictions = model(plain.branch(p, this_batch, SIGMA)).argmax(1)
            counts[p] += torch.bincount(predictions, minlength=NUM_CLASSES)
    return counts


def ours_certify_counts(
    x: torch.Tensor, partition: str, models: list[nn.Module], draws: int, batch: int, offset: int
) -> torch.Tensor:
    """noisy_views draws every branch of a batch at once; vote_counts replaces argmax+bincount."""
    counts = torch.zeros(len(models), NUM_CLASSES, dtype=torch.int64)
    for start in range(0, draws, batch):
        views = ours_views(x, min(batch, draws - start), partition, offset + start)
        for p, model in enumerate(models):
            counts[p] += drs_ext.vote_counts(model(views[p])[None])[0]
    return counts


def certify_plain(plain: PlainViews, models: list[nn.Module], n0: int, n: int, batch: int) -> None:
    with torch.inference_mode():
        plain_certify_counts(plain, models, n0, batch)
        plain_certify_counts(plain, models, n, batch)


def certify_ours(
    x: torch.Tensor, partition: str, models: list[nn.Module], n0: int, n: int, batch: int
) -> None:
    with torch.inference_mode():
        ours_certify_counts(x, partition, models, n0, batch, 0)
        ours_certify_counts(x, partition, models, n, batch, 1 << 48)


def certify_model_only(inputs: list[torch.Tensor], models: list[nn.Module]) -> None:
    """The model's share of both: the same forward passes on prepared views."""
    with torch.inference_mode():
        for views in inputs:
            for model in models:
                model(views)


def bench_certify(args: argparse.Namespace) -> list[list[str]]:
    n0, n, batch = 100, 1000, 500
    x = torch.rand(3, 32, 32)
    torch.manual_seed(0)
    inputs = [
        torch.rand(min(batch, size - start), 3, 32, 32)
        for size in (n0, n)
        for start in range(0, size, batch)
    ]
    rows = []
    for method, partition in (("RS", "none"), ("DRS", "diag")):
        models = [SmallCNN().eval() for _ in range(1 if partition == "none" else 2)]
        plain = PlainViews(x, partition)
        ms = median_ms(
            {
                "plain": functools.partial(certify_plain, plain, models, n0, n, batch),
                "ours": functools.partial(certify_ours, x, partition, models, n0, n, batch),
                "model": functools.partial(certify_model_only, inputs, models),
            },
            args.warmup,
            args.repeats,
        )
        rows.append(
            [
                f"{method} ({partition}, {len(models)} model{'s' * (len(models) > 1)})",
                f"{n0} + {n}",
                f"{ms['plain']:.1f}",
                f"{ms['ours']:.1f}",
                f"{ms['model']:.1f}",
                f"{ms['plain'] / ms['ours']:.2f}x",
            ]
        )
        print("  " + " | ".join(rows[-1]), flush=True)
    return rows


def noise_check() -> list[list[str]]:
    """mean and std of (view - clean) on the kept pixels of every branch, for both pipelines."""
    torch.manual_seed(SEED)
    x = torch.rand(3, 32, 32)
    num = 1000
    rows = []
    for partition in ("diag", "none"):
        plain = PlainViews(x, partition)
        for name, views in (
            ("plain (torch.randn_like)", torch.stack(plain.views(num, SIGMA))),
            ("drs_ext.noisy_views", ours_views(x, num, partition)),
        ):
            if partition == "none":
                diffs = (views - x).flatten()
            else:
                diffs = torch.cat([(views[p] - x)[..., plain.masks[p]].flatten() for p in (0, 1)])
            rows.append(
                [
                    partition,
                    name,
                    f"{diffs.numel()}",
                    f"{diffs.mean().item():+.5f}",
                    f"{SIGMA / diffs.numel() ** 0.5:.5f}",
                    f"{diffs.std().item():.5f}",
                    f"{SIGMA}",
                ]
            )
    # The plain pipeline computes the same function as drs_ext's reference fill.
    plain = PlainViews(x, "diag")
    torch.manual_seed(0)
    views = plain.branch(1, 3, SIGMA)
    sub = drs_ext.reference.sub_image(views, 1)
    refill = drs_ext.reference.fill(sub, 1, x.shape[-1], "neighbors")
    assert torch.allclose(views, refill, atol=1e-6), "plain pipeline does not fill like drs_ext"
    return rows


# ---------------------------------------------------------------------------------------------
# Report.


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CIFAR only, fewer repeats")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()
    args.warmup, args.repeats = (1, 5) if args.quick else (2, 11)
    command = "python benchmarks/bench_noisy_views.py" + (" --quick" if args.quick else "")
    device = device_description("cpu")
    print(f"# {device}\n# sigma={SIGMA}; median of {args.repeats} runs after {args.warmup} warm-up")

    print("(a) noisy views")
    views = bench_views(args)
    print("(b) CERTIFY sampling, small CNN")
    certify = bench_certify(args)
    noise = noise_check()

    body = "\n\n".join(
        [
            provenance(device, command) + f"  \nsigma = {SIGMA}; each figure is the median of "
            f"{args.repeats} runs after {args.warmup} warm-up runs, both pipelines timed "
            "alternately in the same run. Ratio = plain / drs_ext.",
            "### (a) Noisy views\n\n"
            "Plain: `x.repeat` + `torch.randn_like` (+ for diag: indexing of the diagonal "
            "sub-image, noise in sub-image space, 4-neighbour fill with `F.pad` shifts), for both "
            "branches. ImageNet-sized rows run num=100 draws and report the time scaled to 1000 "
            "draws (num=1000 would be 600 MB of float32 output per branch); outputs that large are "
            "fresh pages on every call, whose first-touch faults both pipelines pay.\n\n"
            + table(
                [
                    "input",
                    "partition x fill",
                    "num",
                    "plain ms / 1000 draws",
                    "drs_ext ms / 1000 draws",
                    "ratio",
                ],
                views,
            ),
            "### (b) CERTIFY sampling, end to end\n\n"
            "n0 = 100 selection + n = 1000 estimation draws in batches of 500 through a small "
            "CNN (3 convs, 16/32/64 channels, random weights). Plain: Cohen et al.'s loop "
            "(repeat, randn_like, model, argmax, bincount; DRS: per branch, with the views of "
            "(a)). drs_ext: noisy_views (both branches at once) + model + vote_counts. "
            "'model' times the same forward passes alone, on prepared inputs.\n\n"
            + table(
                [
                    "method",
                    "draws",
                    "plain ms",
                    "drs_ext ms",
                    "model ms",
                    "ratio",
                ],
                certify,
            ),
            "### Noise check\n\n"
            "(view - clean image) on the kept pixels of every branch, CIFAR-sized, 1000 draws: "
            "both pipelines give N(0, sigma^2) noise.\n\n"
            + table(
                ["partition", "pipeline", "values", "mean", "std error of mean", "std", "sigma"],
                noise,
            ),
        ]
    )
    print("\n" + body)
    if not args.no_write:
        write_section("CPU", body)
        print(f"\nwrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
