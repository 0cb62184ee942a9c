"""Top-1 without fine-tuning, with and without the calibrated refit, against conv-FLOP
reduction and model size, per method (CP, Tucker-2, GKPD).

Model: the bundled digits CNN (``edgecomp/zoo/digits_cnn.onnx``, ``bench/train_digits_cnn.py``).
Two test sets: its held-out split (450 real images), and a harder version of the same images
(each shifted by up to 3 pixels, rotated by up to 15 degrees, plus Gaussian noise of 0.15,
seeded) on which the dense model sits well below 100%. Calibration: 200 images of the
*training* split (never the test images), with the same perturbations for the harder set.
Refit: :mod:`edgecomp.passes.refit` (GKPD chains are not refit, so its two rows are equal).
Every model is built by edgecomp for the host and run there.

Run:  PYTHONPATH=. .venv/bin/python bench/accuracy_refit.py
Writes bench/results/accuracy_refit.md and accuracy_refit.png.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_vs_flops import top1  # noqa: E402
from train_digits_cnn import preprocess, split  # noqa: E402

from edgecomp.analyze import weight_bytes  # noqa: E402
from edgecomp.frontend import import_onnx  # noqa: E402
from edgecomp.models import bundled_model_path  # noqa: E402
from edgecomp.passes.decompose_conv import decompose_conv  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = {"cp": "CP", "tucker": "Tucker-2", "kronecker": "GKPD"}


def perturb(x: np.ndarray, seed: int) -> np.ndarray:
    """Shift (<= 3 px), rotate (<= 15 degrees) and add noise (sigma 0.15) to [N, 1, 32, 32]."""
    from scipy.ndimage import rotate, shift

    rng = np.random.default_rng(seed)
    out = np.empty_like(x)
    for i, img in enumerate(x[:, 0]):
        img = rotate(img, rng.uniform(-15, 15), reshape=False, order=1)
        img = shift(img, rng.integers(-3, 4, size=2), order=0)
        out[i, 0] = img + rng.normal(0, 0.15, img.shape)
    return out.astype(np.float32)


def data() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(test images, labels, calibration images) for the clean and the harder set."""
    from sklearn.datasets import load_digits

    d = load_digits()
    train, test = split()
    x_test, y_test = preprocess(d.images[test]), d.target[test]
    calib = preprocess(d.images[train[np.random.default_rng(1).permutation(len(train))[:200]]])
    return {
        "clean": (x_test, y_test, calib),
        "harder": (perturb(x_test, 2), y_test, perturb(calib, 3)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[2, 3, 4, 6, 8])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args()
    os.environ.setdefault("EDGECOMP_NO_FACTOR_CACHE", "1")
    mod, _ = import_onnx(onnx.load(bundled_model_path()))
    dense_bytes = weight_bytes(mod)
    sets = data()
    dense = {name: top1(mod, x, y) for name, (x, y, _) in sets.items()}
    print(f"dense: {dense}, weights {dense_bytes / 1e3:.1f} kB", flush=True)
    rows = []
    for set_name, (x, y, calib) in sets.items():
        for method in args.methods:
            for target in args.targets:
                policy = f"flops={target:g}x"
                for refit in (False, True):
                    new, report = decompose_conv(
                        mod, method, policy, calib=calib if refit else None, refit=refit
                    )
                    before = sum(r.flops_before for r in report)
                    after = sum(r.flops_before if r.skipped else r.flops_after for r in report)
                    acc = top1(new, x, y)
                    size = weight_bytes(new) / dense_bytes
                    rows.append(
                        (set_name, METHODS[method], target, before / after, size, refit, acc)
                    )
                    print(
                        f"{set_name:6} {METHODS[method]:9} {policy:9} {before / after:.2f}x "
                        f"size {size:.2f} refit {refit!s:5} top-1 {acc:.2f}%",
                        flush=True,
                    )
    lines = []
    for set_name in sets:
        lines += [
            f"**{set_name}** test set: dense top-1 **{dense[set_name]:.2f}%**",
            "",
            "| method | per-layer target | conv-FLOP reduction | weights / dense | top-1 no refit "
            "| top-1 refit | refit gain (points) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if r[0] != set_name or r[5]:
                continue
            with_refit = next(q for q in rows if q[:3] == r[:3] and q[5])
            lines.append(
                f"| {r[1]} | flops={r[2]:g}x | {r[3]:.2f}x | {r[4]:.2f} | {r[6]:.2f} "
                f"| {with_refit[6]:.2f} | {with_refit[6] - r[6]:+.2f} |"
            )
        lines.append("")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "accuracy_refit.md").write_text(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for row, set_name in enumerate(sets):
        for col, (xi, label) in enumerate(((3, "conv-FLOP reduction (x)"), (4, "weights / dense"))):
            ax = axes[row][col]
            for name in METHODS.values():
                for refit, style in ((False, "--"), (True, "-")):
                    pts = [(r[xi], r[6]) for r in rows if r[0] == set_name and r[1] == name
                           and r[5] == refit]  # fmt: skip
                    if pts:
                        ax.plot(*zip(*pts, strict=True), style, marker="o",
                                label=f"{name}{' + refit' if refit else ''}")  # fmt: skip
            ax.axhline(dense[set_name], color="gray", linestyle=":", label="dense")
            ax.set_xlabel(label)
            ax.set_ylabel(f"top-1 % ({set_name})")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("digits CNN, no fine-tuning: with (solid) and without (dashed) refit")
    fig.tight_layout()
    fig.savefig(RESULTS / "accuracy_refit.png", dpi=110)
    print(f"wrote {RESULTS / 'accuracy_refit.md'} and accuracy_refit.png")


if __name__ == "__main__":
    main()
