"""The independent reference: the same ONNX model run by ONNX Runtime on this machine."""

from __future__ import annotations

import os

import numpy as np

from edgecomp.errors import EdgecompError


def onnxruntime_outputs(
    model: str | os.PathLike[str] | bytes, inputs: dict[str, np.ndarray], threads: int = 0
) -> list[np.ndarray]:
    """Run ``model`` (a path or serialized bytes) with ONNX Runtime's CPU provider."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise EdgecompError(
            "checking against ONNX Runtime needs it: pip install onnxruntime"
        ) from err
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return list(session.run(None, inputs))


def max_abs_error(outputs: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """Largest absolute difference over all outputs."""
    return max(float(np.max(np.abs(o - r))) for o, r in zip(outputs, reference, strict=True))
