"""Top-1 accuracy against conv-FLOP reduction for CP, Tucker-2 and GKPD, without fine-tuning.

The model is the trained CNN bundled with edgecomp (``edgecomp/zoo/digits_cnn.onnx``, trained by
``bench/train_digits_cnn.py`` on scikit-learn's digits); accuracy is on its held-out split (450
images). Each method runs at per-layer FLOP targets (``--rank-policy flops=Tx``); the reduction
reported is of the whole model's conv multiply-adds (the first conv, 1 input channel, stays
dense). Every decomposed model is built by edgecomp for the host and run there.

Run:  PYTHONPATH=. .venv/bin/python bench/accuracy_vs_flops.py
Writes bench/results/accuracy_vs_flops.md and .png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import tvm
from tvm import relax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_digits_cnn import held_out  # noqa: E402

from edgecomp.build import build  # noqa: E402
from edgecomp.frontend import import_onnx  # noqa: E402
from edgecomp.models import bundled_model_path  # noqa: E402
from edgecomp.passes.decompose_conv import decompose_conv  # noqa: E402
from edgecomp.targets import load_board  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = {"cp": "CP", "tucker": "Tucker-2", "kronecker": "GKPD"}


def top1(mod: tvm.IRModule, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy (%) of a Relax model built by edgecomp for the host."""
    vm = relax.VirtualMachine(build(mod, load_board("host")), tvm.cpu())
    pred = [int(np.argmax(vm["main"](tvm.runtime.tensor(xi[None])).numpy())) for xi in x]
    return 100.0 * float(np.mean(np.array(pred) == y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[1.5, 2, 3, 4, 6])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args()

    x, y = held_out()
    mod, _ = import_onnx(onnx.load(bundled_model_path()))
    dense = top1(mod, x, y)
    rows = []
    for method in args.methods:
        for target in args.targets:
            start = time.perf_counter()
            new, report = decompose_conv(mod, method, f"flops={target:g}x")
            seconds = time.perf_counter() - start
            before = sum(r.flops_before for r in report)
            after = sum(r.flops_before if r.skipped else r.flops_after for r in report)
            ranks = ", ".join(
                str(r.rank if not isinstance(r.rank, tuple) else "x".join(map(str, r.rank)))
                for r in report
                if r.skipped is None
            )
            acc = top1(new, x, y)
            rows.append((METHODS[method], target, before / after, ranks, acc, acc - dense, seconds))
            print(f"{METHODS[method]:9} flops={target:g}x  {before / after:.2f}x  top-1 {acc:.2f}%")

    lines = [
        f"Bundled digits CNN, held-out top-1 of the dense model: **{dense:.2f}%** (450 images).",
        "",
        "| method | per-layer target | model conv-FLOP reduction | ranks (conv2, conv3) "
        "| top-1 % | change (points) | decomposition s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, target, ratio, ranks, acc, drop, seconds in rows:
        lines.append(
            f"| {name} | flops={target:g}x | {ratio:.2f}x | {ranks} | {acc:.2f} | {drop:+.2f} "
            f"| {seconds:.1f} |"
        )
    table = "\n".join(lines)
    print()
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "accuracy_vs_flops.md").write_text(table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r[0] for r in rows):
        pts = [(r[2], r[4]) for r in rows if r[0] == name]
        ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    ax.axhline(dense, color="gray", linestyle="--", label=f"dense ({dense:.2f}%)")
    ax.axhline(dense - 1, color="gray", linestyle=":", label="1-point drop")
    ax.set_xlabel("conv-FLOP reduction of the model (x)")
    ax.set_ylabel("held-out top-1 (%)")
    ax.set_title("digits CNN: accuracy vs conv FLOPs, no fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "accuracy_vs_flops.png", dpi=120)
    print(f"\nwrote {RESULTS / 'accuracy_vs_flops.md'} and accuracy_vs_flops.png")


if __name__ == "__main__":
    main()
