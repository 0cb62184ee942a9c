"""What the schedule rules need to know about a target: vector lanes, registers, GPU or not.

Kept apart from the rules so that every kernel module reads the same answer for the same target.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.target import Target
from tvm.target.codegen import llvm_cpu_has_features


@dataclass(frozen=True)
class CpuInfo:
    """The register file one micro-kernel may use.

    Attributes
    ----------
    lanes : int
        fp32 lanes of one vector register (8 for AVX2, 16 for AVX-512, 4 for NEON).
    registers : int
        Number of vector registers (16 on AVX2 and armv7 NEON, 32 on AVX-512 and aarch64).
    panel_bytes : int
        Budget for one weight panel of a GEMM (``reduction x panel width`` floats), which is
        re-read for every register tile and must stay in the core's L2 next to the input rows.
    load_ports : int
        Vector loads per cycle: 2 on x86 cores since Haswell, 1 on Cortex-A72 / A53 (one load
        pipe), where a register tile must broadcast fewer inputs per multiply-add.
    """

    lanes: int
    registers: int
    panel_bytes: int = 384 * 1024
    load_ports: int = 2


def is_gpu(target: Target) -> bool:
    """True when kernels for ``target`` need thread bindings (OpenCL, Vulkan, CUDA ...)."""
    return "gpu" in target.keys


def cpu_info(target: Target | None) -> CpuInfo:
    """Vector lanes and register count for an LLVM target (AVX2 when the target says nothing).

    The host board asks for ``mcpu=haswell`` (AVX2) even on an AVX-512 machine, and LLVM's own
    vector-width query answers for the machine, not the target: so read the target's fields
    (and ask LLVM only whether the target's ``mcpu`` has AVX-512).
    """
    if target is None:
        return CpuInfo(lanes=8, registers=16)
    if target.kind.name != "llvm" and target.host is not None:
        target = target.host
    triple = str(target.attrs.get("mtriple", "") or "")
    mcpu = str(target.attrs.get("mcpu", "") or "")
    mattr = " ".join(str(a) for a in (target.attrs.get("mattr", None) or []))
    # L2 per core: Cortex-A72 1 MiB shared by 4, A53 512 KiB shared; AVX-512 parts >= 1 MiB.
    if triple.startswith(("aarch64", "arm64")):
        return CpuInfo(lanes=4, registers=32, panel_bytes=192 * 1024, load_ports=1)
    if triple.startswith(("arm", "thumb")):
        return CpuInfo(lanes=4, registers=16, panel_bytes=96 * 1024, load_ports=1)
    if "+avx512f" in mattr or (mcpu and _llvm_has_feature("avx512f", target)):
        return CpuInfo(lanes=16, registers=32, panel_bytes=640 * 1024)
    return CpuInfo(lanes=8, registers=16)


def _llvm_has_feature(feature: str, target: Target) -> bool:
    # LLVM knows which -mcpu values carry the feature (znver4/5, skylake-avx512, x86-64-v4 ...).
    try:
        return bool(llvm_cpu_has_features([feature], target))
    except Exception:  # an mcpu this LLVM does not know: assume the baseline
        return False


def num_cores(target: Target | None) -> int:
    """The target's ``num-cores`` (1 when unset): parallel loops want at least this many chunks."""
    if target is None:
        return 1
    host = target.host if target.kind.name != "llvm" and target.host is not None else target
    return int(host.attrs.get("num-cores", 1) or 1)
