"""The block forms people deploy, as small ONNX models built in code with seeded weights.

Each builder returns an ``onnx.ModelProto`` (opset 17, input ``x`` NCHW, one output ``y``):
a ResNet bottleneck, MobileNet v2 inverted residuals, a MobileNet v3 block with
squeeze-and-excitation, EfficientNet's MBConv (SiLU), a YOLOv5 / v8 C3 block (SiLU), an
inception module, a fire module, a ShuffleNet unit, a DenseNet block, and a chain of the other
activations. Sizes default to where these blocks sit in their
ImageNet networks; tests pass smaller maps. Weights are He-normal, BatchNormalization
statistics drawn so that activations keep their scale.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class GraphBuilder:
    """Builds an ONNX graph node by node, tracking each value's channel count and map size."""

    def __init__(self, name: str, shape: tuple[int, int, int, int], seed: int = 0) -> None:
        self.name = name
        self.shape = shape
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.dims: dict[str, tuple[int, int, int]] = {"x": shape[1:]}
        self._count = 0

    def _name(self, op: str) -> str:
        self._count += 1
        return f"{op.lower()}{self._count}"

    def const(self, value: np.ndarray, hint: str) -> str:
        """Add an initializer; returns its name."""
        name = self._name(hint)
        self.inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def shape_const(self, dims: list[int]) -> str:
        """Add an int64 shape initializer; returns its name."""
        name = self._name("shape")
        self.inits.append(numpy_helper.from_array(np.array(dims, np.int64), name))
        return name

    def node(
        self,
        op: str,
        inputs: list[str],
        like: str,
        channels: int | None = None,
        hw: tuple[int, int] | None = None,
        **attrs: Any,
    ) -> str:
        """Append ``op``; its output has ``like``'s dims unless ``channels`` / ``hw`` say."""
        out = self._name(op)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        c, h, w = self.dims[like]
        self.dims[out] = (channels or c, *(hw or (h, w)))
        return out

    def conv(
        self,
        x: str,
        cout: int,
        k: int = 1,
        stride: int = 1,
        group: int = 1,
        bn: bool = True,
        bias: bool = False,
    ) -> str:
        """Conv (pad k // 2), optionally followed by BatchNormalization."""
        c, h, w = self.dims[x]
        std = np.sqrt(2.0 / (c // group * k * k))
        weight = self.rng.standard_normal((cout, c // group, k, k)) * std
        inputs = [x, self.const(weight, "w")]
        if bias:
            inputs.append(self.const(self.rng.uniform(-0.1, 0.1, cout), "b"))
        pad = k // 2
        hw = ((h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1)
        y = self.node(
            "Conv",
            inputs,
            x,
            cout,
            hw,
            kernel_shape=[k, k],
            strides=[stride] * 2,
            pads=[pad] * 4,
            group=group,
        )
        return self.bn(y) if bn else y

    def bn(self, x: str) -> str:
        """BatchNormalization (inference) with seeded statistics."""
        c = self.dims[x][0]
        scale = self.const(self.rng.uniform(0.5, 1.5, c), "gamma")
        shift = self.const(self.rng.uniform(-0.2, 0.2, c), "beta")
        mean = self.const(self.rng.uniform(-0.2, 0.2, c), "mean")
        var = self.const(self.rng.uniform(0.5, 1.5, c), "var")
        return self.node("BatchNormalization", [x, scale, shift, mean, var], x, epsilon=1e-5)

    def act(self, x: str, kind: str) -> str:
        """An activation: relu, relu6, hardswish, hardsigmoid, sigmoid, silu, leaky, prelu."""
        if kind == "relu6":
            lo = self.const(np.array(0.0), "lo")
            hi = self.const(np.array(6.0), "hi")
            return self.node("Clip", [x, lo, hi], x)
        if kind == "silu":
            return self.node("Mul", [x, self.node("Sigmoid", [x], x)], x)
        if kind == "leaky":
            return self.node("LeakyRelu", [x], x, alpha=0.1)
        if kind == "prelu":
            c = self.dims[x][0]
            slope = self.const(self.rng.uniform(0.05, 0.3, (c, 1, 1)), "slope")
            return self.node("PRelu", [x, slope], x)
        ops = {"relu": "Relu", "hardswish": "HardSwish", "sigmoid": "Sigmoid"}
        if kind == "hardsigmoid":
            return self.node("HardSigmoid", [x], x, alpha=1.0 / 6, beta=0.5)
        return self.node(ops[kind], [x], x)

    def add(self, a: str, b: str) -> str:
        """Elementwise sum (a residual connection)."""
        return self.node("Add", [a, b], a)

    def concat(self, xs: list[str]) -> str:
        """Channel concatenation."""
        channels = sum(self.dims[x][0] for x in xs)
        return self.node("Concat", xs, xs[0], channels, axis=1)

    def maxpool(self, x: str, k: int, stride: int, pad: int) -> str:
        """Max pooling."""
        _, h, w = self.dims[x]
        hw = ((h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1)
        return self.node(
            "MaxPool", [x], x, None, hw, kernel_shape=[k, k], strides=[stride] * 2, pads=[pad] * 4
        )

    def squeeze_excite(
        self, x: str, squeeze: int, act: str = "relu", gate: str = "hardsigmoid"
    ) -> str:
        """Global average pool, 1x1 conv + ``act``, 1x1 conv + ``gate``, scale the input
        (MobileNet v3: ReLU and HardSigmoid; EfficientNet: SiLU and Sigmoid)."""
        c = self.dims[x][0]
        pooled = self.node("GlobalAveragePool", [x], x, hw=(1, 1))
        s = self.act(self.conv(pooled, squeeze, bn=False, bias=True), act)
        s = self.act(self.conv(s, c, bn=False, bias=True), gate)
        return self.node("Mul", [x, s], x)

    def shuffle(self, x: str, groups: int) -> str:
        """Channel shuffle: reshape to (groups, C/groups), transpose, reshape back."""
        c, h, w = self.dims[x]
        split = self.shape_const([1, groups, c // groups, h, w])
        merged = self.shape_const([1, c, h, w])
        t = self.node("Reshape", [x, split], x)
        t = self.node("Transpose", [t], x, perm=[0, 2, 1, 3, 4])
        return self.node("Reshape", [t, merged], x)

    def model(self, y: str, batch: int | str = 1) -> onnx.ModelProto:
        """The finished model with ``y`` as its output ``y`` (an Identity names it)."""
        self.nodes.append(helper.make_node("Identity", [y], ["y"], name="output"))
        c, h, w = self.dims[y]
        graph = helper.make_graph(
            self.nodes,
            self.name,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *self.shape[1:]])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, c, h, w])],
            initializer=self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def resnet_bottleneck(c: int = 256, hw: int = 56, seed: int = 0) -> onnx.ModelProto:
    """Two ResNet-50 bottlenecks: identity shortcut, then stride 2 with a 1x1 projection."""
    g = GraphBuilder("resnet_bottleneck", (1, c, hw, hw), seed)
    mid = c // 4
    t = g.act(g.conv("x", mid), "relu")
    t = g.act(g.conv(t, mid, 3), "relu")
    y = g.act(g.add(g.conv(t, c), "x"), "relu")
    t = g.act(g.conv(y, 2 * mid), "relu")
    t = g.act(g.conv(t, 2 * mid, 3, stride=2), "relu")
    shortcut = g.conv(y, 2 * c, stride=2)
    return g.model(g.act(g.add(g.conv(t, 2 * c), shortcut), "relu"))


def mobilenet_v2(c: int = 24, hw: int = 56, seed: int = 0) -> onnx.ModelProto:
    """MobileNet v2 inverted residuals (expand 6, ReLU6): stride 1 with the residual, then
    stride 2 to ``c * 4 // 3`` channels."""
    g = GraphBuilder("mobilenet_v2", (1, c, hw, hw), seed)
    e = 6 * c
    t = g.act(g.conv("x", e), "relu6")
    t = g.act(g.conv(t, e, 3, group=e), "relu6")
    y = g.add(g.conv(t, c), "x")
    t = g.act(g.conv(y, e), "relu6")
    t = g.act(g.conv(t, e, 3, stride=2, group=e), "relu6")
    return g.model(g.conv(t, c * 4 // 3))


def mobilenet_v3(c: int = 40, hw: int = 28, seed: int = 0) -> onnx.ModelProto:
    """MobileNet v3 blocks: 1x1 expand + HardSwish, depthwise 5x5 + HardSwish,
    squeeze-and-excitation, 1x1 project with the residual; then a stride-2 depthwise 5x5."""
    g = GraphBuilder("mobilenet_v3", (1, c, hw, hw), seed)
    e = 3 * c
    t = g.act(g.conv("x", e), "hardswish")
    t = g.act(g.conv(t, e, 5, group=e), "hardswish")
    t = g.squeeze_excite(t, max(8, e // 4))
    y = g.add(g.conv(t, c), "x")
    t = g.act(g.conv(y, 2 * e), "hardswish")
    t = g.act(g.conv(t, 2 * e, 5, stride=2, group=2 * e), "hardswish")
    t = g.squeeze_excite(t, max(8, e // 2))
    return g.model(g.conv(t, 2 * c))


def efficientnet(c: int = 40, hw: int = 28, seed: int = 0) -> onnx.ModelProto:
    """EfficientNet-B0 MBConv blocks (SiLU everywhere, SE with SiLU and Sigmoid): expand 6,
    depthwise 5x5, squeeze-and-excitation, 1x1 project with the residual; then a stride-2
    depthwise 3x3 to ``2 * c`` channels."""
    g = GraphBuilder("efficientnet", (1, c, hw, hw), seed)
    e = 6 * c
    t = g.act(g.conv("x", e), "silu")
    t = g.act(g.conv(t, e, 5, group=e), "silu")
    t = g.squeeze_excite(t, max(4, c // 4), act="silu", gate="sigmoid")
    y = g.add(g.conv(t, c), "x")
    t = g.act(g.conv(y, e), "silu")
    t = g.act(g.conv(t, e, 3, stride=2, group=e), "silu")
    t = g.squeeze_excite(t, max(4, c // 4), act="silu", gate="sigmoid")
    return g.model(g.conv(t, 2 * c))


def yolo(c: int = 64, hw: int = 80, seed: int = 0) -> onnx.ModelProto:
    """A YOLOv5 / v8 C3-style block (Conv-BN-SiLU throughout): a 1x1 conv, two bottlenecks
    (3x3, 3x3, residual) on it, concatenated with a second 1x1 branch, a 1x1 conv to merge."""
    g = GraphBuilder("yolo", (1, c, hw, hw), seed)
    a = g.act(g.conv("x", c // 2), "silu")
    b = g.act(g.conv("x", c // 2), "silu")
    for _ in range(2):
        t = g.act(g.conv(a, c // 2, 3), "silu")
        a = g.add(g.act(g.conv(t, c // 2, 3), "silu"), a)
    return g.model(g.act(g.conv(g.concat([a, b]), c), "silu"))


def inception(c: int = 192, hw: int = 28, seed: int = 0) -> onnx.ModelProto:
    """GoogLeNet's inception (3a): 1x1, 1x1 -> 3x3, 1x1 -> 5x5, max-pool -> 1x1, concatenated."""
    g = GraphBuilder("inception", (1, c, hw, hw), seed)
    b1 = g.act(g.conv("x", c // 3, bn=False, bias=True), "relu")
    b2 = g.act(g.conv("x", c // 2, bn=False, bias=True), "relu")
    b2 = g.act(g.conv(b2, 2 * c // 3, 3, bn=False, bias=True), "relu")
    b3 = g.act(g.conv("x", c // 12, bn=False, bias=True), "relu")
    b3 = g.act(g.conv(b3, c // 6, 5, bn=False, bias=True), "relu")
    b4 = g.maxpool("x", 3, 1, 1)
    b4 = g.act(g.conv(b4, c // 6, bn=False, bias=True), "relu")
    return g.model(g.concat([b1, b2, b3, b4]))


def fire(c: int = 128, hw: int = 55, seed: int = 0) -> onnx.ModelProto:
    """SqueezeNet's fire module: 1x1 squeeze, 1x1 and 3x3 expand, concatenated (twice)."""
    g = GraphBuilder("fire", (1, c, hw, hw), seed)
    t = "x"
    for _ in range(2):
        s = g.act(g.conv(t, c // 8, bn=False, bias=True), "relu")
        e1 = g.act(g.conv(s, c // 2, bn=False, bias=True), "relu")
        e3 = g.act(g.conv(s, c // 2, 3, bn=False, bias=True), "relu")
        t = g.concat([e1, e3])
    return g.model(t)


def shufflenet(c: int = 240, hw: int = 28, groups: int = 3, seed: int = 0) -> onnx.ModelProto:
    """ShuffleNet v1 units: grouped 1x1, channel shuffle, depthwise 3x3, grouped 1x1, residual."""
    g = GraphBuilder("shufflenet", (1, c, hw, hw), seed)
    t = "x"
    for _ in range(2):
        mid = c // 4
        u = g.act(g.conv(t, mid, group=groups), "relu")
        u = g.shuffle(u, groups)
        u = g.conv(u, mid, 3, group=mid)
        t = g.act(g.add(g.conv(u, c, group=groups), t), "relu")
    return g.model(t)


def densenet(
    c: int = 64, hw: int = 28, growth: int = 32, layers: int = 4, seed: int = 0
) -> onnx.ModelProto:
    """A DenseNet block: per layer BN-ReLU-1x1 (4 x growth), BN-ReLU-3x3 (growth), its output
    concatenated to everything before it."""
    g = GraphBuilder("densenet", (1, c, hw, hw), seed)
    t = "x"
    for _ in range(layers):
        u = g.conv(g.act(g.bn(t), "relu"), 4 * growth, bn=False)
        u = g.conv(g.act(g.bn(u), "relu"), growth, 3, bn=False)
        t = g.concat([t, u])
    return g.model(t)


def activations(c: int = 16, hw: int = 14, seed: int = 0) -> onnx.ModelProto:
    """3x3 convolutions, each followed by one of the activations the blocks above do not use:
    LeakyReLU, PRelu, SiLU, Sigmoid."""
    g = GraphBuilder("activations", (1, c, hw, hw), seed)
    t = "x"
    for kind in ("leaky", "prelu", "silu", "sigmoid"):
        t = g.act(g.conv(t, c, 3, bias=True, bn=False), kind)
    return g.model(t)


BLOCKS: dict[str, Callable[..., onnx.ModelProto]] = {
    "resnet_bottleneck": resnet_bottleneck,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3": mobilenet_v3,
    "efficientnet": efficientnet,
    "yolo": yolo,
    "inception": inception,
    "fire": fire,
    "shufflenet": shufflenet,
    "densenet": densenet,
    "activations": activations,
}
# Small maps for tests (every block compiled for three boards and run under qemu).
TEST_SIZES: dict[str, dict[str, int]] = {
    "resnet_bottleneck": {"c": 32, "hw": 8},
    "mobilenet_v2": {"c": 8, "hw": 8},
    "mobilenet_v3": {"c": 16, "hw": 8},
    "efficientnet": {"c": 16, "hw": 8},
    "yolo": {"c": 16, "hw": 8},
    "inception": {"c": 48, "hw": 8},
    "fire": {"c": 32, "hw": 9},
    "shufflenet": {"c": 48, "hw": 8},
    "densenet": {"c": 16, "hw": 8, "growth": 8, "layers": 2},
    "activations": {"c": 8, "hw": 7},
}


def block_model(name: str, test_size: bool = False, seed: int = 0) -> onnx.ModelProto:
    """One of :data:`BLOCKS` by name, at its ImageNet size or (``test_size``) a small one."""
    return BLOCKS[name](**(TEST_SIZES[name] if test_size else {}), seed=seed)
