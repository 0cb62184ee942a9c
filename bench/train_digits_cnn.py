"""Train the small CNN bundled with edgecomp (``edgecomp/zoo/digits_cnn.onnx``).

Data: scikit-learn's ``load_digits`` (1797 real 8x8 handwritten digits, offline), split 75/25
stratified with a fixed seed, each image scaled to [0, 1] and upsampled 4x by pixel repetition
to 1x1x32x32 (the same preprocessing is reproducible with numpy: :func:`preprocess`).

The network (3x3 convs with 32-64 channels so that decomposing them means something)::

    input 1x1x32x32 -> conv 1->32 -> relu -> maxpool2 -> conv 32->64 -> relu -> maxpool2
                    -> conv 64->64 -> relu -> maxpool2 -> flatten -> gemm 1024->10 -> logits

Training needs PyTorch (a training-only dependency; edgecomp never imports it). The ONNX graph
is written with ``onnx.helper`` from the trained weights so that it does not depend on the
exporter. Run: ``PYTHONPATH=. python bench/train_digits_cnn.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SEED = 0
TEST_SIZE = 0.25
UPSAMPLE = 4
EPOCHS = 30
ZOO = Path(__file__).resolve().parent.parent / "edgecomp" / "zoo"


def preprocess(images: np.ndarray) -> np.ndarray:
    """load_digits ``images`` (N, 8, 8) in 0..16 -> float32 (N, 1, 32, 32) in [0, 1]."""
    x = images.astype(np.float32) / 16.0
    x = x.repeat(UPSAMPLE, axis=1).repeat(UPSAMPLE, axis=2)
    return x[:, None, :, :]


def split() -> tuple[np.ndarray, np.ndarray]:
    """Train and held-out indices into ``load_digits()`` (deterministic)."""
    y = load_digits().target
    idx = np.arange(len(y))
    train, test = train_test_split(idx, test_size=TEST_SIZE, random_state=SEED, stratify=y)
    return np.sort(train), np.sort(test)


def held_out() -> tuple[np.ndarray, np.ndarray]:
    """The held-out images (N, 1, 32, 32) float32 and labels, as used for the accuracy."""
    d = load_digits()
    _, test = split()
    return preprocess(d.images[test]), d.target[test]


def _train() -> dict[str, np.ndarray]:
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    d = load_digits()
    train, _ = split()
    x = torch.from_numpy(preprocess(d.images[train]))
    y = torch.from_numpy(d.target[train]).long()
    net = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 10),
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(SEED)
    for epoch in range(EPOCHS):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            b = perm[i : i + 64]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x[b]), y[b])
            loss.backward()
            opt.step()
        print(f"epoch {epoch + 1}/{EPOCHS} loss {loss.item():.4f}")
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in net.state_dict().items()}
    return {
        "conv1.weight": sd["0.weight"],
        "conv1.bias": sd["0.bias"],
        "conv2.weight": sd["3.weight"],
        "conv2.bias": sd["3.bias"],
        "conv3.weight": sd["6.weight"],
        "conv3.bias": sd["6.bias"],
        "fc.weight": sd["10.weight"],
        "fc.bias": sd["10.bias"],
    }


def build_onnx(w: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The digits CNN as an ONNX graph (opset 17, static batch 1) from its weights."""
    nodes = []
    prev = "input"
    for i in (1, 2, 3):
        nodes += [
            helper.make_node(
                "Conv",
                [prev, f"conv{i}.weight", f"conv{i}.bias"],
                [f"conv{i}"],
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
            ),
            helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"]),
            helper.make_node(
                "MaxPool", [f"relu{i}"], [f"pool{i}"], kernel_shape=[2, 2], strides=[2, 2]
            ),
        ]
        prev = f"pool{i}"
    return classifier_model("digits_cnn", nodes, prev, w)


def classifier_model(
    name: str, nodes: list[onnx.NodeProto], prev: str, w: dict[str, np.ndarray]
) -> onnx.ModelProto:
    """The ONNX model of a digits classifier: ``nodes`` from ``input`` (1x1x32x32) to ``prev``,
    then flatten and the fully connected layer ``fc.weight`` / ``fc.bias`` to ``logits``."""
    nodes = nodes + [
        helper.make_node("Flatten", [prev], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        initializer=[numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def accuracy(model: onnx.ModelProto) -> float:
    """Top-1 accuracy (%) of an ONNX model on the held-out digits, via onnxruntime."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x, y = held_out()
    pred = [int(np.argmax(sess.run(None, {"input": xi[None]})[0])) for xi in x]
    return 100.0 * float(np.mean(np.array(pred) == y))


def main() -> None:
    model = build_onnx(_train())
    acc = accuracy(model)
    ZOO.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(ZOO / "digits_cnn.onnx"))
    train, test = split()
    info = {
        "model": "digits_cnn.onnx",
        "task": "sklearn.datasets.load_digits, 10 classes",
        "input": {"name": "input", "shape": [1, 1, 32, 32], "dtype": "float32"},
        "output": {"name": "logits", "shape": [1, 10], "dtype": "float32"},
        "preprocess": "image / 16, then repeat each pixel 4x4 (8x8 -> 32x32)",
        "split": {
            "method": "train_test_split stratified",
            "test_size": TEST_SIZE,
            "random_state": SEED,
        },
        "training": {
            "script": "bench/train_digits_cnn.py",
            "framework": "torch (CPU)",
            "optimizer": "Adam lr=1e-3",
            "batch": 64,
            "epochs": EPOCHS,
            "seed": SEED,
        },
        "held_out_top1_percent": round(acc, 2),
        "n_train": len(train),
        "n_test": len(test),
        "test_indices": test.tolist(),
    }
    (ZOO / "digits_cnn.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"held-out top-1: {acc:.2f}% ({len(test)} images) -> {ZOO / 'digits_cnn.onnx'}")


if __name__ == "__main__":
    main()
