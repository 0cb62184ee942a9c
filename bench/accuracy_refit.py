"""Top-1 without fine-tuning, with and without the calibrated refit, against conv-FLOP
reduction and model size, per method (CP, Tucker-2, GKPD).

Two models. The bundled digits CNN (``edgecomp/zoo/digits_cnn.onnx``, 3 convs,
``bench/train_digits_cnn.py``) on two test sets: its held-out split (450 real images), and a
harder version of the same images (each shifted by up to 3 pixels, rotated by up to 15 degrees,
plus Gaussian noise of 0.15, seeded: :func:`perturb`). And the deeper digits VGG
(``edgecomp/zoo/digits_vgg.onnx``, six 3x3 convs in three stacks, ``bench/train_digits_vgg.py``)
trained and tested on a twice as strong perturbation (``HARDEST``: shifts up to 6 pixels,
rotations up to 30 degrees, noise 0.5; the "hardest" test set). Calibration: 200 images of the
*training* split (never the test images), with the test set's perturbation (other seeds).
Refit: :mod:`edgecomp.passes.refit` (CP, Tucker-2 and GKPD). Every model is built by edgecomp
for the host and run there.

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
from edgecomp.passes.decompose_conv import decompose_conv  # noqa: E402
from edgecomp.resources import zoo_path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = {"cp": "CP", "tucker": "Tucker-2", "kronecker": "GKPD"}
MODELS = {"digits CNN": "digits_cnn.onnx", "digits VGG": "digits_vgg.onnx"}
CASES = [("digits VGG", "hardest"), ("digits CNN", "clean"), ("digits CNN", "harder")]
# The digits VGG's task (bench/train_digits_vgg.py): trained on the "harder" perturbation, it
# reaches 98.7% on it, so it is trained and tested on twice as strong a one.
HARDEST = {"max_shift": 6, "max_angle": 30, "noise": 0.5}
GOAL_TARGET = 3.0  # the goal: at 3x with refit, the best method within 1 point of dense


def perturb(
    x: np.ndarray, seed: int, max_shift: int = 3, max_angle: float = 15, noise: float = 0.15
) -> np.ndarray:
    """Shift (<= ``max_shift`` px), rotate (<= ``max_angle`` degrees) and add Gaussian noise
    (sigma ``noise``) to [N, 1, 32, 32], seeded; the defaults make the "harder" test set."""
    from scipy.ndimage import rotate, shift

    rng = np.random.default_rng(seed)
    out = np.empty_like(x)
    for i, img in enumerate(x[:, 0]):
        img = rotate(img, rng.uniform(-max_angle, max_angle), reshape=False, order=1)
        img = shift(img, rng.integers(-max_shift, max_shift + 1, size=2), order=0)
        out[i, 0] = img + rng.normal(0, noise, img.shape)
    return out.astype(np.float32)


def data() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(test images, labels, calibration images) for the clean, the harder, the hardest set."""
    from sklearn.datasets import load_digits

    d = load_digits()
    train, test = split()
    x_test, y_test = preprocess(d.images[test]), d.target[test]
    calib = preprocess(d.images[train[np.random.default_rng(1).permutation(len(train))[:200]]])
    return {
        "clean": (x_test, y_test, calib),
        "harder": (perturb(x_test, 2), y_test, perturb(calib, 3)),
        "hardest": (perturb(x_test, 2, **HARDEST), y_test, perturb(calib, 3, **HARDEST)),
    }


def goal(rows: list[tuple], case: str, dense: float) -> list[str]:
    """The issue's goal at ``GOAL_TARGET``: the best method with refit within 1 point of dense,
    and the refit better than no refit at equal FLOPs (the refit does not change FLOPs)."""
    pairs = {
        r[1]: (r[6], next(q[6] for q in rows if q[:3] == r[:3] and q[5]))
        for r in rows
        if r[0] == case and r[2] == GOAL_TARGET and not r[5]
    }
    if not pairs:
        return []
    best = max(pairs, key=lambda m: pairs[m][1])
    gap = pairs[best][1] - dense
    gains = ", ".join(f"{m} {b - a:+.2f}" for m, (a, b) in pairs.items())
    all_gains = [
        next(q[6] for q in rows if q[:3] == r[:3] and q[5]) - r[6]
        for r in rows
        if r[0] == case and not r[5]
    ]
    return [
        f"Goal at flops={GOAL_TARGET:g}x: best with refit {best} {pairs[best][1]:.2f}% "
        f"({gap:+.2f} points from dense: {'met' if gap >= -1 else 'NOT met'}, within 1 point "
        f"wanted); refit gain at flops={GOAL_TARGET:g}x: {gains} "
        f"({'met' if min(b - a for a, b in pairs.values()) > 0 else 'not met'} for every "
        f"method). Over all rows the refit is better in {sum(g > 0 for g in all_gains)}, "
        f"equal in {sum(g == 0 for g in all_gains)}, worse in {sum(g < 0 for g in all_gains)} "
        f"of {len(all_gains)}.",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[2, 3, 4, 6, 8])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    os.environ.setdefault("EDGECOMP_NO_FACTOR_CACHE", "1")
    sets = data()
    rows: list[tuple] = []
    dense: dict[str, float] = {}
    for model, set_name in [(m, s) for m, s in CASES if m in args.models]:
        mod, _ = import_onnx(onnx.load(zoo_path(MODELS[model])))
        dense_bytes = weight_bytes(mod)
        case = f"{model}, {set_name}"
        x, y, calib = sets[set_name]
        dense[case] = top1(mod, x, y)
        print(f"{case}: dense top-1 {dense[case]:.2f}%", flush=True)
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
                    rows.append((case, METHODS[method], target, before / after, size, refit, acc))
                    print(
                        f"{case:18} {METHODS[method]:9} {policy:9} {before / after:.2f}x "
                        f"size {size:.2f} refit {refit!s:5} top-1 {acc:.2f}%",
                        flush=True,
                    )
        write(rows, dense)  # after every case, so that a partial run leaves its results


def write(rows: list[tuple], dense: dict[str, float]) -> None:
    """The tables (with the goal check) and the plot, for the cases in ``dense``."""
    lines = []
    for case in dense:
        lines += [
            f"**{case}** test set: dense top-1 **{dense[case]:.2f}%**",
            "",
            "| method | per-layer target | conv-FLOP reduction | weights / dense | top-1 no refit "
            "| top-1 refit | refit gain (points) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if r[0] != case or r[5]:
                continue
            with_refit = next(q for q in rows if q[:3] == r[:3] and q[5])
            lines.append(
                f"| {r[1]} | flops={r[2]:g}x | {r[3]:.2f}x | {r[4]:.2f} | {r[6]:.2f} "
                f"| {with_refit[6]:.2f} | {with_refit[6] - r[6]:+.2f} |"
            )
        lines += ["", *goal(rows, case, dense[case])]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "accuracy_refit.md").write_text(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(dense), 2, figsize=(10, 3.5 * len(dense)), squeeze=False)
    for row, case in enumerate(dense):
        for col, (xi, label) in enumerate(((3, "conv-FLOP reduction (x)"), (4, "weights / dense"))):
            ax = axes[row][col]
            for name in METHODS.values():
                for refit, style in ((False, "--"), (True, "-")):
                    pts = [(r[xi], r[6]) for r in rows if r[0] == case and r[1] == name
                           and r[5] == refit]  # fmt: skip
                    if pts:
                        ax.plot(*zip(*pts, strict=True), style, marker="o",
                                label=f"{name}{' + refit' if refit else ''}")  # fmt: skip
            ax.axhline(dense[case], color="gray", linestyle=":", label="dense")
            ax.set_xlabel(label)
            ax.set_ylabel("top-1 %")
            ax.set_title(case, fontsize=9)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("digits CNN and VGG, no fine-tuning: with (solid) and without (dashed) refit")
    fig.tight_layout()
    fig.savefig(RESULTS / "accuracy_refit.png", dpi=110)
    plt.close(fig)
    print(f"wrote {RESULTS / 'accuracy_refit.md'} and accuracy_refit.png")


if __name__ == "__main__":
    main()
