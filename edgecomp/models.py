"""Model files: loading ONNX with clear errors, and the models edgecomp's tests and benchmarks use.

The ONNX package ships Model Zoo architectures (``onnx/backend/test/data/light``) whose weights
are ``ConstantOfShape`` placeholders; :func:`light_model` replaces them with seeded He-normal
tensors so that speed, memory and numerics can be measured on real network shapes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgecomp.errors import EdgecompError
from edgecomp.resources import zoo_path

BUNDLED_MODEL = "digits_cnn.onnx"


def load_onnx(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load and check an ONNX file; raise EdgecompError when it is missing or not ONNX."""
    p = Path(path)
    if not p.is_file():
        raise EdgecompError(f"model file {p} does not exist")
    try:
        model = onnx.load(str(p))
    except Exception as err:  # protobuf raises DecodeError, onnx raises others
        raise EdgecompError(f"{p} is not an ONNX model ({type(err).__name__}: {err})") from err
    if not model.graph.node:
        raise EdgecompError(f"{p} is not an ONNX model (no graph nodes; is it an ONNX file?)")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0]
        raise EdgecompError(f"{p} is not a valid ONNX model: {first}") from err
    return model


def bundled_model_path() -> Path:
    """The small trained CNN shipped with edgecomp (digits, 1x1x32x32 input)."""
    return zoo_path(BUNDLED_MODEL)


def light_model_path(name: str) -> Path:
    """Path of one of the ONNX package's "light" Model Zoo models (``alexnet``, ``vgg19`` ...)."""
    folder = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    aliases = {"alexnet": "bvlc_alexnet"}
    path = folder / f"light_{aliases.get(name, name)}.onnx"
    if not path.is_file():
        known = sorted(p.stem.removeprefix("light_") for p in folder.glob("light_*.onnx"))
        raise EdgecompError(f"no light model {name!r}; known: {', '.join(known)}")
    return path


def light_model(name: str, seed: int = 0) -> onnx.ModelProto:
    """A light Model Zoo model with its placeholder weights replaced by seeded random tensors.

    Every ``ConstantOfShape`` whose shape input is a graph initializer becomes an initializer
    drawn He-normal (std = sqrt(2 / fan_in)); 1-D tensors (biases) are small uniform values.
    The shape-only graph inputs that fed the placeholders are removed.
    """
    model = onnx.load(str(light_model_path(name)))
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    rng = np.random.default_rng(seed)
    kept_nodes, new_inits = [], []
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in inits:
            shape = tuple(int(d) for d in inits[node.input[0]])
            new_inits.append(numpy_helper.from_array(_random_weight(rng, shape), node.output[0]))
        else:
            kept_nodes.append(node)
    used = {i for n in kept_nodes for i in n.input}
    graph_inits = [t for t in graph.initializer if t.name in used] + new_inits
    inputs = [i for i in graph.input if i.name in used and i.name not in inits]
    new_graph = helper.make_graph(
        kept_nodes, graph.name, inputs, list(graph.output), initializer=graph_inits
    )
    out = helper.make_model(new_graph, opset_imports=model.opset_import)
    # IR >= 4 lets initializers stand without a matching graph input.
    out.ir_version = max(model.ir_version, 7)
    onnx.checker.check_model(out)
    return out


def _random_weight(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    if len(shape) <= 1:
        return rng.uniform(-0.05, 0.05, size=shape).astype(np.float32)
    fan_in = int(np.prod(shape[1:]))
    if len(shape) == 2:  # Gemm weights in these models are (out, in) with transB=1
        fan_in = shape[1]
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
