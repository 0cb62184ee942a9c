"""Start-up hook for every Python process on an edgecomp device (RPC server and its workers).

`edgecomp device emulate` copies it into the emulated device's site folder (on its
PYTHONPATH) and sets EDGECOMP_DEVICE=1; a real board puts this folder on its PYTHONPATH (see
deploy/README.md). In every process the server starts, it sets up:

- ``edgecomp.device_arch``: the device's machine name (``aarch64``, ``armv7l``), so the host
  refuses a package built for another architecture with a clear message instead of a loader
  error;
- ``sys.executable`` pointing at the emulated device's Python wrapper (EDGECOMP_PYTHON), so the
  worker processes TVM's RPC server starts run on the device too;
- ``libtvm_runtime_extra.so`` loaded globally, so MetaSchedule's RPC runner finds
  ``tvm.contrib.random.random_fill_for_measure``.
"""

import os

if os.environ.get("EDGECOMP_DEVICE") == "1":
    import ctypes
    import platform
    import sys
    from pathlib import Path

    # Under qemu-user, sys.executable is the sysroot's binary, which this machine cannot exec;
    # TVM's servers start their workers with sys.executable, so point it at the wrapper.
    if os.environ.get("EDGECOMP_PYTHON"):
        sys.executable = os.environ["EDGECOMP_PYTHON"]

    import tvm

    extra = Path(tvm.__file__).resolve().parent / "lib" / "libtvm_runtime_extra.so"
    if extra.is_file():
        ctypes.CDLL(str(extra), mode=ctypes.RTLD_GLOBAL)

    @tvm.register_global_func("edgecomp.device_arch", override=True)
    def _device_arch() -> str:
        return platform.machine()
