"""edgecomp: a deploy-to-edge compiler for convolutional networks on Apache TVM.

The data flows one way: ONNX model -> Relax import -> decompose -> re-fuse -> legalize with
edgecomp kernels -> schedule -> build / cross-compile -> (tune over RPC) -> export package.
"""

from edgecomp.errors import EdgecompError

__version__ = "0.1.0"

__all__ = ["EdgecompError", "__version__"]
