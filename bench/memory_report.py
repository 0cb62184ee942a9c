"""The memory report (edgecomp.report) of a light Model Zoo model on the host board.

Prints the per-layer table and writes the JSON and PNG to ``--out``. With ``--cp 3`` every
3x3 convolution is first replaced by a CP chain (random factors, the rank that cuts its FLOPs
about 3x, as ``bench/fused_vs_unfused.py`` does) until ``DecomposeConv`` exists::

    TVM_NUM_THREADS=2 PYTHONPATH=. python bench/memory_report.py [--model vgg19] [--cp 3]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgecomp.frontend import import_onnx
from edgecomp.models import light_model
from edgecomp.report import format_report, memory_report, plot_report
from edgecomp.targets import load_board


def cp_model(model: onnx.ModelProto, reduction: float, seed: int = 0) -> onnx.ModelProto:
    """``model`` with each kxk Conv (k > 1, stride 1, groups 1) replaced by a CP chain.

    Chain: 1x1 C->R, depthwise kx1 (vertical padding), depthwise 1xk (horizontal padding), 1x1
    R->K with the original bias; R = K*C*k*k / (reduction * (C + 2k + K)).
    """
    rng = np.random.default_rng(seed)
    graph = model.graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w = weights.get(node.input[1]) if node.op_type == "Conv" else None
        if w is None or w.shape[2] == 1 or attrs.get("group", 1) != 1:
            nodes.append(node)
            continue
        k, c, kh, kw = w.shape
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        r = max(1, round(k * c * kh * kw / reduction / (c + kh + kw + k)))
        shapes = [(r, c, 1, 1), (r, 1, kh, 1), (r, 1, 1, kw), (k, r, 1, 1)]
        names = [f"{node.name}_cp{i}" for i in range(4)]
        for name, shape in zip(names, shapes, strict=True):
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
            graph.initializer.append(numpy_helper.from_array(value.astype("float32"), name))
        x, out = node.input[0], node.output[0]
        t = [f"{out}_t{i}" for i in range(3)]
        nodes += [
            helper.make_node("Conv", [x, names[0]], [t[0]]),
            helper.make_node(
                "Conv", [t[0], names[1]], [t[1]], group=r, pads=[pads[0], 0, pads[2], 0]
            ),
            helper.make_node(
                "Conv", [t[1], names[2]], [t[2]], group=r, pads=[0, pads[1], 0, pads[3]]
            ),
            helper.make_node("Conv", [t[2], names[3], *node.input[2:]], [out]),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg19")
    parser.add_argument("--out", default="/tmp/memory_report")
    parser.add_argument("--cp", type=float, default=0.0, help="CP chains at this FLOP reduction")
    parser.add_argument("--decompose", help="DecomposeConv method (cp, tucker, kronecker)")
    parser.add_argument("--policy", default="flops=3x", help="DecomposeConv rank policy")
    args = parser.parse_args()
    target = load_board("host").tvm_target()
    model = light_model(args.model)
    if args.cp:
        model = cp_model(model, args.cp)
    mod, _ = import_onnx(model, None)
    if args.decompose:
        from edgecomp.passes.decompose_conv import DecomposeConv

        mod = DecomposeConv(args.decompose, args.policy)(mod)
    report = memory_report(mod, target)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(format_report(report))
    print(f"wrote {plot_report(report, None, out / 'report.png')}")


if __name__ == "__main__":
    main()
