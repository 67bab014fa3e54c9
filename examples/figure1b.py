"""Paper 002, Figure 1(b): upper bounds on the l2 radius of RS (Eq. 4) and DRS (Eq. 15).

σ = 1/sqrt(d), smoothed probability 0.999, DRS with two sub-images of d/2 pixels each.
Run: python examples/figure1b.py [out.png]
"""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from drs_ext.radius import curse_of_dimensionality_curve  # noqa: E402


def main(out: str = "figure1b.png") -> None:
    curve = curse_of_dimensionality_curve(np.unique(np.geomspace(2, 3 * 224 * 224, 60).astype(int)))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(curve["d"], curve["rs"], label="RS (Eq. 4)")
    ax.plot(curve["d"], curve["drs"], label="DRS (Eq. 15)")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="input dimension d",
        ylabel="upper bound of the l2 radius",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    for d, rs, drs in zip(curve["d"][::12], curve["rs"][::12], curve["drs"][::12], strict=True):
        print(f"d={d:>7}  RS bound={rs:.4g}  DRS bound={drs:.4g}  ratio={drs / rs:.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
