"""Train the deeper digits CNN (``edgecomp/zoo/digits_vgg.onnx``): VGG-like 3x3 stacks, trained
on the digits under shifts, rotations and noise, a harder task on which the dense model sits
well below 100% and the decomposition methods separate.

Data: the same images, split and preprocessing as :mod:`train_digits_cnn` (``load_digits``,
75/25 stratified, 1x32x32 in [0, 1]). Every epoch sees a fresh perturbation of the training
split (:func:`accuracy_refit.perturb` with ``accuracy_refit.HARDEST``: shift <= 6 px, rotation
<= 30 degrees, noise sigma 0.5); the accuracy is measured on the held-out split under that
perturbation (seed 2, the "hardest" test set of ``bench/accuracy_refit.py``). The perturbation
is twice that of the "harder" test set (3 px, 15 degrees, 0.15): trained on that one, this
network reaches 98.67% on it, too close to 100% for the methods to separate.

The network (no batch norm, so the ONNX graph is plain conv / relu / pool)::

    input 1x1x32x32 -> [conv 1->32, conv 32->32, maxpool2] -> [conv 32->64, conv 64->64,
    maxpool2] -> [conv 64->128, conv 128->128, maxpool2] -> flatten -> gemm 2048->10

every conv 3x3 with padding 1 and followed by a ReLU.

Training needs PyTorch (training only; edgecomp never imports it): ``pip install torch``. It
runs on one thread, seeded. Run: ``PYTHONPATH=. python bench/train_digits_vgg.py``.
"""

from __future__ import annotations

import json
import time

import numpy as np
import onnx
from accuracy_refit import HARDEST, perturb
from onnx import helper
from sklearn.datasets import load_digits
from train_digits_cnn import SEED, TEST_SIZE, ZOO, classifier_model, preprocess, split

CHANNELS = [32, 32, 64, 64, 128, 128]  # a 2x2 max pool after every second conv
EPOCHS = 15
LR = 1e-3
BATCH = 64
TEST_SEED = 2  # the perturbation of the held-out split (bench/accuracy_refit.py's "hardest")


def _train() -> tuple[dict[str, np.ndarray], float]:
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    d = load_digits()
    train, _ = split()
    x_clean = preprocess(d.images[train])
    y = torch.from_numpy(d.target[train]).long()
    layers: list[nn.Module] = []
    c_in = 1
    for i, c in enumerate(CHANNELS):
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU()]
        layers += [nn.MaxPool2d(2)] if i % 2 else []
        c_in = c
    net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * 4 * 4, 10))
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS)
    gen = torch.Generator().manual_seed(SEED)
    start = time.perf_counter()
    for epoch in range(EPOCHS):
        # A fresh augmentation every epoch.
        x = torch.from_numpy(perturb(x_clean, 1000 + epoch, **HARDEST))
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), BATCH):
            b = perm[i : i + BATCH]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x[b]), y[b])
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        sched.step()
        print(f"epoch {epoch + 1}/{EPOCHS} loss {total / len(x):.4f}", flush=True)
    seconds = time.perf_counter() - start
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    w = {}
    for i, conv in enumerate(convs, 1):
        w[f"conv{i}.weight"] = conv.weight.detach().numpy().astype(np.float32)
        w[f"conv{i}.bias"] = conv.bias.detach().numpy().astype(np.float32)
    fc = net[-1]
    w["fc.weight"] = fc.weight.detach().numpy().astype(np.float32)
    w["fc.bias"] = fc.bias.detach().numpy().astype(np.float32)
    return w, seconds


def build_onnx(w: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The VGG-like digits CNN as an ONNX graph (opset 17, static batch 1) from its weights."""
    nodes = []
    prev = "input"
    for i in range(1, len(CHANNELS) + 1):
        nodes += [
            helper.make_node(
                "Conv",
                [prev, f"conv{i}.weight", f"conv{i}.bias"],
                [f"conv{i}"],
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
            ),
            helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"]),
        ]
        prev = f"relu{i}"
        if i % 2 == 0:
            nodes.append(
                helper.make_node(
                    "MaxPool", [prev], [f"pool{i}"], kernel_shape=[2, 2], strides=[2, 2]
                )
            )
            prev = f"pool{i}"
    return classifier_model("digits_vgg", nodes, prev, w)


def accuracy(model: onnx.ModelProto, perturbed: bool = True) -> float:
    """Top-1 accuracy (%) on the held-out digits (``HARDEST``-perturbed with seed 2, or clean),
    via onnxruntime."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, ["CPUExecutionProvider"])
    d = load_digits()
    _, test = split()
    x = preprocess(d.images[test])
    x = perturb(x, TEST_SEED, **HARDEST) if perturbed else x
    pred = [int(np.argmax(sess.run(None, {"input": xi[None]})[0])) for xi in x]
    return 100.0 * float(np.mean(np.array(pred) == d.target[test]))


def main() -> None:
    weights, seconds = _train()
    model = build_onnx(weights)
    acc, clean = accuracy(model), accuracy(model, perturbed=False)
    onnx.save(model, str(ZOO / "digits_vgg.onnx"))
    train, test = split()
    info = {
        "model": "digits_vgg.onnx",
        "task": "sklearn.datasets.load_digits, 10 classes, shifted / rotated / noisy",
        "input": {"name": "input", "shape": [1, 1, 32, 32], "dtype": "float32"},
        "output": {"name": "logits", "shape": [1, 10], "dtype": "float32"},
        "preprocess": "image / 16, then repeat each pixel 4x4 (8x8 -> 32x32)",
        "perturbation": "bench/accuracy_refit.py perturb with HARDEST: rotate U(-30, 30) "
        "degrees, shift by integers in [-6, 6] px, add N(0, 0.5) noise",
        "split": {
            "method": "train_test_split stratified",
            "test_size": TEST_SIZE,
            "random_state": SEED,
            "test_indices": "as in digits_cnn.json",
        },
        "architecture": "3x [conv3x3, relu, conv3x3, relu, maxpool2] with "
        f"{CHANNELS} channels, then gemm 2048->10",
        "training": {
            "script": "bench/train_digits_vgg.py",
            "framework": "torch (CPU, 1 thread)",
            "augmentation": "a fresh perturbation of the training split every epoch "
            "(perturb seed 1000 + epoch)",
            "optimizer": f"Adam lr={LR:g}, cosine schedule",
            "batch": BATCH,
            "epochs": EPOCHS,
            "seed": SEED,
            "seconds": round(seconds, 1),
        },
        "held_out_perturbed_top1_percent": round(acc, 2),
        "perturbed_test_seed": TEST_SEED,
        "held_out_clean_top1_percent": round(clean, 2),
        "n_train": len(train),
        "n_test": len(test),
    }
    (ZOO / "digits_vgg.json").write_text(json.dumps(info, indent=1) + "\n")
    print(
        f"trained in {seconds:.0f} s; held-out top-1 {acc:.2f}% perturbed, {clean:.2f}% clean "
        f"({len(test)} images) -> {ZOO / 'digits_vgg.onnx'}"
    )


if __name__ == "__main__":
    main()
