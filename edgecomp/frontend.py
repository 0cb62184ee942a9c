"""Import: ONNX model -> Relax IRModule, with the checks that give a user clear errors.

Weights become constants of the module (``keep_params_in_input=False``) so that the graph
passes (decomposition, re-fusion) can see them and the built library carries them inside.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import onnx
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from edgecomp.errors import EdgecompError

_ONNX_DTYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.BOOL: "bool",
}


@dataclass(frozen=True)
class TensorSpec:
    """Name, static shape and dtype of one model input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict[str, object]:
        """The spec as written into manifest.json."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @staticmethod
    def from_json(d: dict[str, object]) -> TensorSpec:
        """Read a spec back from manifest.json."""
        return TensorSpec(str(d["name"]), tuple(int(x) for x in d["shape"]), str(d["dtype"]))  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ModelSignature:
    """The inputs and outputs of an imported model, in call order."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def parse_input_shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    """Parse ``--input-shape name:1x3x224x224`` values into ``{name: (1, 3, 224, 224)}``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or min(shape) < 1:
            raise EdgecompError(
                f"--input-shape {spec!r} does not parse: write NAME:DIMS, e.g. data:1x3x224x224"
            )
        shapes[name] = shape
    return shapes


def model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs of a model: graph inputs that are not initializers."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _input_specs(
    model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]
) -> list[TensorSpec]:
    inputs = model_inputs(model)
    names = [i.name for i in inputs]
    unknown = sorted(set(input_shapes) - set(names))
    if unknown:
        raise EdgecompError(
            f"--input-shape names {', '.join(unknown)}, which the model does not have;"
            f" its inputs are: {', '.join(names)}"
        )
    specs = []
    for value in inputs:
        ttype = value.type.tensor_type
        dtype = _ONNX_DTYPES.get(ttype.elem_type)
        if dtype is None:
            raise EdgecompError(
                f"input {value.name!r} has ONNX element type {ttype.elem_type}, which edgecomp"
                " does not support"
            )
        if value.name in input_shapes:
            shape = input_shapes[value.name]
        else:
            dims = [d.dim_value if d.HasField("dim_value") else 0 for d in ttype.shape.dim]
            if any(d <= 0 for d in dims):
                shown = "x".join(
                    str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
                    for d in ttype.shape.dim
                )
                raise EdgecompError(
                    f"input {value.name!r} has a dynamic shape ({shown}): give it with"
                    f" --input-shape {value.name}:1x3x224x224 (your sizes)"
                )
            shape = tuple(dims)
        specs.append(TensorSpec(value.name, tuple(shape), dtype))
    return specs


def _check_inference_mode(node: onnx.NodeProto, index: int) -> None:
    """Refuse a BatchNormalization exported in training mode: it normalizes with the batch's
    own statistics (and updates the running ones), which TVM's importer would silently treat
    as the inference form, giving wrong numbers."""
    if node.op_type != "BatchNormalization":
        return
    training = any(a.name == "training_mode" and a.i != 0 for a in node.attribute)
    if training or len([o for o in node.output if o]) > 1:
        where = f"node {node.name!r}" if node.name else f"node #{index}"
        raise EdgecompError(
            f"BatchNormalization at {where} is in training mode (training_mode=1 or running"
            " statistics as outputs): edgecomp compiles inference graphs; export the model in"
            " eval mode (e.g. model.eval() before torch.onnx.export)"
        )


def check_supported(model: onnx.ModelProto) -> None:
    """Raise EdgecompError naming the first op (and its node) that TVM's importer lacks."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    supported = _get_convert_map()
    for index, node in enumerate(model.graph.node):
        _check_inference_mode(node, index)
        if node.domain not in ("", "ai.onnx") or node.op_type not in supported:
            where = f"node {node.name!r}" if node.name else f"node #{index}"
            domain = f" (domain {node.domain})" if node.domain not in ("", "ai.onnx") else ""
            raise EdgecompError(
                f"unsupported ONNX op {node.op_type}{domain} at {where}: edgecomp cannot import"
                " it; replace it in the model (e.g. re-export with a different opset) or remove it"
            )


def import_onnx(
    model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None
) -> tuple[tvm.IRModule, ModelSignature]:
    """Import an ONNX model into Relax, with all input shapes static.

    Parameters
    ----------
    model
        A loaded ONNX model (see :func:`edgecomp.models.load_onnx`).
    input_shapes
        Shapes for inputs whose ONNX shape has dynamic dimensions, by input name.

    Returns
    -------
    The Relax module (function ``main``, weights as constants) and its signature.
    """
    check_supported(model)
    inputs = _input_specs(model, input_shapes or {})
    try:
        mod = from_onnx(
            model,
            shape_dict={s.name: list(s.shape) for s in inputs},
            dtype_dict={s.name: s.dtype for s in inputs},
            keep_params_in_input=False,
        )
    except Exception as err:  # the importer raises many kinds; the user needs the message
        raise EdgecompError(
            f"TVM could not import the model: {str(err).strip().splitlines()[-1]}"
        ) from err
    mod = inference_graph(mod)
    outputs = _output_specs(mod, [o.name for o in model.graph.output])
    return mod, ModelSignature(tuple(inputs), tuple(outputs))


def inference_graph(mod: tvm.IRModule) -> tvm.IRModule:
    """The imported graph as inference runs it: BatchNormalization folded into the convolution
    before it where there is one, else into a multiply-add; dropout removed."""
    from edgecomp.passes.remove_dropout import RemoveDropout

    mod = relax.transform.FoldBatchnormToConv2D()(mod)
    mod = relax.transform.DecomposeOpsForInference()(mod)
    # Fold the scaled weights and shifts now: decomposition needs constant weights, and
    # ConvertLayout crashes on the scalar operands the folding leaves.
    mod = relax.transform.FoldConstant()(mod)
    return RemoveDropout()(mod)  # type: ignore[operator]  # module_pass makes it callable


def _output_specs(mod: tvm.IRModule, names: list[str]) -> list[TensorSpec]:
    ret = mod["main"].ret_ty  # TVM 0.27 calls Relax struct info "types"
    infos = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    specs = []
    for name, info in zip(names, infos, strict=True):
        if not isinstance(info, relax.TensorType) or info.shape is None:
            raise EdgecompError(f"output {name!r} is not a tensor of known shape")
        try:
            shape = tuple(int(d) for d in info.shape.values)
        except TypeError as err:
            raise EdgecompError(
                f"output {name!r} has a shape that depends on the input ({info.shape});"
                " give static shapes with --input-shape"
            ) from err
        specs.append(TensorSpec(name, shape, str(info.dtype)))
    return specs
