"""Smaller and faster: AlexNet and VGG-19 with convolutions and fully connected layers decomposed,
against ONNX Runtime on the dense model (size and host latency).

``light_model`` weights (seeded He-normal), batch 1, 2 threads (ORT ``intra_op_num_threads=2``,
``TVM_NUM_THREADS=2``). CP at ``flops=3x`` per conv layer (the first conv, 3 input channels,
stays dense) and truncated SVD at ``flops=3x`` per fully connected layer (the 1000-class head
included), re-fusion ``auto``. Size: the model's weight bytes, and ``model.so`` as exported.
Latency: best of blocks, each contender timed in a block after a pause (ORT's and TVM's pools
spin), as ``bench/end_to_end.py`` does. Factorizations come from the factor cache when it has
them (``EDGECOMP_CACHE``).

Run:  PYTHONPATH=. .venv/bin/python bench/compress_end_to_end.py [--models alexnet vgg19]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import tvm  # noqa: E402
from tvm import relax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blocks_vs_ort import cpu_model  # noqa: E402
from end_to_end import best_of, decompose_to, ort_session  # noqa: E402

from edgecomp.analyze import weight_bytes  # noqa: E402
from edgecomp.frontend import import_onnx  # noqa: E402
from edgecomp.models import light_model  # noqa: E402
from edgecomp.passes.decompose_conv import decompose_conv  # noqa: E402
from edgecomp.pipeline import lower  # noqa: E402
from edgecomp.progress import layer_progress  # noqa: E402
from edgecomp.targets import load_board  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def so_bytes(ex: tvm.runtime.Executable) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.so"
        ex.export_library(str(path))
        return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["alexnet", "vgg19"])
    parser.add_argument("--policy", default="flops=3x")
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument(
        "--model-ratio",
        type=float,
        default=0.0,
        help="decompose the convs to this reduction of the whole model's conv FLOPs (the "
        "per-layer target raised for the layers that stay dense, as bench/end_to_end.py does); "
        "fully connected layers still get --policy",
    )
    args = parser.parse_args()
    target = load_board("host").tvm_target()
    rows = []
    for name in args.models:
        model = light_model(name, seed=0)
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
        sess = ort_session(model)
        feed = {sess.get_inputs()[0].name: x}
        (ref,) = sess.run(None, feed)
        mod, _ = import_onnx(model)
        start = time.perf_counter()
        with layer_progress(f"{name}: decomposing (cp, {args.policy}, fc too)") as on_layer:
            conv_ratio = 0.0
            if args.model_ratio:
                # Convs first, to the model-level ratio; then the fc layers (the second pass
                # leaves the chains' own 1x1 and depthwise convs alone).
                convs_done, conv_ratio = decompose_to(mod, "cp", args.model_ratio)
                new, report = decompose_conv(
                    convs_done, "cp", args.policy, fc=True, on_layer=on_layer
                )
            else:
                new, report = decompose_conv(mod, "cp", args.policy, fc=True, on_layer=on_layer)
        seconds = time.perf_counter() - start
        convs = [r for r in report if r.kind == "conv"]
        fcs = [r for r in report if r.kind == "fc"]

        def ratio(part: list) -> float:  # noqa: ANN001
            before = sum(r.flops_before for r in part)
            return before / sum(r.flops_before if r.skipped else r.flops_after for r in part)

        ex = tvm.compile(lower(new, target), target=target)
        vm = relax.VirtualMachine(ex, tvm.cpu())
        data = tvm.runtime.tensor(x)
        out = vm["main"](data).numpy()
        err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        dense_ex = tvm.compile(lower(mod, target), target=target)
        dense_vm = relax.VirtualMachine(dense_ex, tvm.cpu())
        best = best_of(
            {
                "ort": functools.partial(sess.run, None, feed),
                "dense": functools.partial(dense_vm["main"], data),
                "decomposed": functools.partial(vm["main"], data),
            },
            args.repeat,
        )
        row = {
            "model": name,
            "conv_flops_x": conv_ratio or ratio(convs),
            "fc_flops_x": ratio(fcs),
            "weights_mb": (weight_bytes(mod) / 1e6, weight_bytes(new) / 1e6),
            "so_mb": (so_bytes(dense_ex) / 1e6, so_bytes(ex) / 1e6),
            "ms": {k: v * 1e3 for k, v in best.items()},
            "rel_output_change": err,
            "decompose_s": seconds,
        }
        rows.append(row)
        print(row, flush=True)
    lines = [
        f"CP convs + SVD fc at `{args.policy}` per layer, host ({cpu_model()}, 2 threads).",
        "",
        "| model | conv FLOPs down | fc FLOPs down | weights MB dense -> decomposed (ratio) "
        "| model.so MB | ORT dense ms | edgecomp dense ms | edgecomp decomposed ms "
        "| decomposed / ORT | output change vs dense | decomposition s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        (wb, wa), (sb, sa), ms = r["weights_mb"], r["so_mb"], r["ms"]
        lines.append(
            f"| {r['model']} | {r['conv_flops_x']:.2f}x | {r['fc_flops_x']:.2f}x "
            f"| {wb:.1f} -> {wa:.1f} ({wa / wb:.2f}) | {sb:.1f} -> {sa:.1f} "
            f"| {ms['ort']:.1f} | {ms['dense']:.1f} | {ms['decomposed']:.1f} "
            f"| {ms['decomposed'] / ms['ort']:.2f} | {r['rel_output_change']:.3f} "
            f"| {r['decompose_s']:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    suffix = "_".join(args.models)
    (RESULTS / f"compress_end_to_end_{suffix}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
