"""Import: ONNX -> Relax, and the errors a user can cause there."""

from __future__ import annotations

import onnx
import pytest
from helpers import tiny_cnn
from onnx import helper

from edgecomp.errors import EdgecompError
from edgecomp.frontend import import_onnx, parse_input_shapes
from edgecomp.models import load_onnx


def test_signature_of_a_static_model(tmp_path):
    mod, sig = import_onnx(load_onnx(tiny_cnn(tmp_path / "m.onnx")))
    assert [(s.name, s.shape, s.dtype) for s in sig.inputs] == [("x", (1, 4, 8, 8), "float32")]
    assert [(s.name, s.shape, s.dtype) for s in sig.outputs] == [("logits", (1, 10), "float32")]
    assert "main" in [gv.name_hint for gv in mod.get_global_vars()]


def test_missing_file(tmp_path):
    with pytest.raises(EdgecompError, match=r"model file .*nope\.onnx does not exist"):
        load_onnx(tmp_path / "nope.onnx")


def test_not_an_onnx_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is a text file, not a protobuf\n" * 20)
    with pytest.raises(EdgecompError, match=r"bad\.onnx is not an ONNX model"):
        load_onnx(bad)


def test_unsupported_op_names_op_and_node(tmp_path):
    det = helper.make_node("Det", ["logits"], ["out"], name="my_det")
    model = onnx.load(str(tiny_cnn(tmp_path / "m.onnx", extra_node=det)))
    with pytest.raises(EdgecompError, match=r"unsupported ONNX op Det at node 'my_det'"):
        import_onnx(model)


def test_dynamic_input_needs_input_shape(tmp_path):
    model = load_onnx(tiny_cnn(tmp_path / "m.onnx", batch="N"))
    with pytest.raises(
        EdgecompError, match=r"input 'x' has a dynamic shape \(Nx4x8x8\).*--input-shape x:"
    ):
        import_onnx(model)
    _, sig = import_onnx(model, {"x": (2, 4, 8, 8)})
    assert sig.inputs[0].shape == (2, 4, 8, 8)
    assert sig.outputs[0].shape == (2, 10)


def test_input_shape_for_an_unknown_input(tmp_path):
    model = load_onnx(tiny_cnn(tmp_path / "m.onnx", batch="N"))
    with pytest.raises(
        EdgecompError,
        match=r"--input-shape names y, which the model does not have; its inputs are: x",
    ):
        import_onnx(model, {"y": (1, 4, 8, 8)})


@pytest.mark.parametrize("bad", ["x", "x:", "x:1xAx3", ":1x2", "x:0x3"])
def test_input_shape_flag_parse_errors(bad):
    with pytest.raises(EdgecompError, match="--input-shape .* does not parse"):
        parse_input_shapes([bad])


def test_input_shape_flag_parses():
    assert parse_input_shapes(["data_0:1x3x224x224", "a:b:2x3"]) == {
        "data_0": (1, 3, 224, 224),
        "a:b": (2, 3),
    }
