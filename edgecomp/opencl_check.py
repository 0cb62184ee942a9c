"""Check the OpenCL kernels edgecomp generates (Mali boards) numerically on a CPU.

The PyPI TVM runtimes have no OpenCL device API, so the kernels of a GPU build cannot run
through TVM here. This module runs them itself on PoCL (a CPU OpenCL implementation, through
pyopencl) and compares the results with the same PrimFunc built for the host CPU:

1. Build each scheduled PrimFunc with ``tvm.tirx.build`` for the OpenCL target (x86 llvm
   host, so no cross toolchain is needed), keeping the module as it is just before
   ``MakePackedAPI``: its host function then still lists, in launch order, every
   ``call_ffi_kernel`` with the buffers it passes and its blockIdx/threadIdx extents, and
   the global workspaces the runtime would allocate.
2. Take each kernel's OpenCL C from the built module's source and launch it with pyopencl:
   global size = blockIdx extent * threadIdx extent, local size = threadIdx extent.
3. Reference: the same PrimFunc with its thread bindings turned into serial loops, built for
   llvm and run on the host. Outputs and workspaces start as NaN on the device, so an
   element no kernel writes shows up as a mismatch.

``run_main_on_opencl`` chains the kernels of a lowered module the way the Relax VM calls them
(walking ``main``'s ``call_tir`` bindings), for end-to-end checks against ONNX Runtime.

Needs ``pip install pyopencl pocl-binary-distribution`` (checked: pyopencl 2026.1.4, whose
wheel bundles PoCL 3.0-rc2 built on LLVM 14, with pocl-binary-distribution 3.0).
"""

from __future__ import annotations

import ctypes
import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.ir import expr as ir_expr

from edgecomp.errors import EdgecompError

INSTALL_HINT = "pip install pyopencl pocl-binary-distribution"
_POCL_PLATFORM = "Portable Computing Language"
_LAUNCH_AXES = {"x": 0, "y": 1, "z": 2}


@dataclass(frozen=True)
class KernelArg:
    """A buffer a kernel receives: a parameter of its PrimFunc or a global workspace."""

    kind: str  # "param" or "workspace"
    index: int


@dataclass(frozen=True)
class KernelLaunch:
    """One OpenCL kernel launch, as the TVM runtime would issue it."""

    name: str
    source: str
    args: tuple[KernelArg, ...]
    grid: tuple[int, int, int]  # blockIdx extents (work groups)
    block: tuple[int, int, int]  # threadIdx extents (work-group size)

    def __str__(self) -> str:
        return f"{self.name} grid={self.grid} block={self.block}"


@dataclass(frozen=True)
class DeviceProgram:
    """All kernel launches of one PrimFunc, in order, and the workspaces they share."""

    func_name: str
    launches: tuple[KernelLaunch, ...]
    workspaces: tuple[tuple[int, str], ...]  # (elements, dtype) per global workspace


@dataclass(frozen=True)
class KernelCheck:
    """The result of checking one PrimFunc's kernels against its host build."""

    name: str
    kernels: tuple[str, ...]
    max_abs_err: float
    ok: bool


# ---------------------------------------------------------------------------------------------
# PoCL through pyopencl
# ---------------------------------------------------------------------------------------------


def require_pyopencl() -> Any:
    """Import pyopencl, or raise EdgecompError naming the pip packages to install."""
    try:
        import pyopencl
    except ImportError as err:
        raise EdgecompError(
            f"checking OpenCL kernels needs pyopencl and PoCL: {INSTALL_HINT}"
        ) from err
    return pyopencl


@functools.cache
def _opencl() -> tuple[Any, Any, Any]:
    """pyopencl, a context and a queue on PoCL's CPU device (made once per process)."""
    cl = require_pyopencl()
    try:
        platforms = [p for p in cl.get_platforms() if p.name == _POCL_PLATFORM]
    except cl.Error as err:
        raise EdgecompError(f"no OpenCL platform found ({err}): {INSTALL_HINT}") from err
    if not platforms:
        raise EdgecompError(f"PoCL is not installed as an OpenCL platform: {INSTALL_HINT}")
    device = platforms[0].get_devices()[0]
    _work_around_unknown_cpu(cl, device)
    context = cl.Context([device])
    return cl, context, cl.CommandQueue(context)


def _work_around_unknown_cpu(cl: Any, device: Any) -> None:
    """Let PoCL compile on CPUs newer than its LLVM.

    PoCL 3.0 asks LLVM for the host CPU name and passes it to clang as ``-target-cpu``. Its
    LLVM 14 does not know newer CPUs (e.g. AMD Zen 5), answers ``generic``, and clang rejects
    that name, so no kernel builds. PoCL 3.0 has no option to override the name (later PoCL
    reads ``POCL_LLVM_CPU_NAME``), so point the device's ``llvm_cpu`` field at ``x86-64``, the
    baseline every x86-64 CPU runs. Done only when a probe kernel fails with exactly that error.
    """
    probe = "__kernel void probe(__global float* a) { a[0] = 1.0f; }"
    try:
        cl.Program(cl.Context([device]), probe).build()
        return
    except cl.Error as err:
        if "unknown target CPU 'generic'" not in str(err):
            raise EdgecompError(f"PoCL cannot build a trivial kernel: {err}") from err
    words = (ctypes.c_void_p * 256).from_address(device.int_ptr)
    readable = _readable_ranges()

    def c_string(address: int | None, size: int) -> bytes:
        if not address or not any(lo <= address and address + size <= hi for lo, hi in readable):
            return b""
        return ctypes.string_at(address, size)

    # The field holding "generic" follows the one holding the LLVM triple (struct
    # _cl_device_id: llvm_target_triplet, llvm_cpu); require both to be sure of the field.
    slots = [
        i
        for i in range(1, len(words))
        if c_string(words[i], 8) == b"generic\0" and c_string(words[i - 1], 7) == b"x86_64-"
    ]
    if len(slots) != 1:
        raise EdgecompError(
            "PoCL's LLVM does not know this CPU and the workaround found no unique llvm_cpu"
            " field; install a PoCL built with a newer LLVM"
        )
    libc = ctypes.CDLL(None)
    libc.strdup.restype = ctypes.c_void_p
    libc.strdup.argtypes = [ctypes.c_char_p]
    words[slots[0]] = libc.strdup(b"x86-64")  # malloc'ed: PoCL may free it on teardown


def _readable_ranges() -> list[tuple[int, int]]:
    """Readable address ranges of this process (so the struct scan never faults)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, perms = line.split()[:2]
            if perms.startswith("r"):
                lo, hi = (int(x, 16) for x in span.split("-"))
                ranges.append((lo, hi))
    return ranges


@functools.cache
def _cl_kernel(source: str, name: str) -> Any:
    """Compile one kernel's program on PoCL (cached: the e2e run reuses the check's builds)."""
    cl, context, _ = _opencl()
    try:
        return getattr(cl.Program(context, source).build(), name)
    except cl.Error as err:
        raise EdgecompError(f"PoCL could not compile OpenCL kernel {name}: {err}") from err


# ---------------------------------------------------------------------------------------------
# Extracting the kernels and their launches from TVM
# ---------------------------------------------------------------------------------------------


@tvm.ir.instrument.pass_instrument
class _BeforeMakePackedAPI:
    """Keeps the module as it is before ``MakePackedAPI`` hides buffers behind packed args."""

    def __init__(self) -> None:
        self.mod: tvm.IRModule | None = None

    def run_before_pass(self, mod: tvm.IRModule, info: tvm.transform.PassInfo) -> None:
        if info.name == "tirx.MakePackedAPI":
            self.mod = mod


def _kernel_sources(source: str) -> dict[str, str]:
    """Split the OpenCL module's source into one program per kernel.

    TVM writes one ``// Function: NAME`` section per kernel, each with the prototypes of all
    kernels; compiling the sections separately avoids redefinitions of anything they share.
    """
    parts = re.split(r"^// Function: (\S+)\n", source, flags=re.M)
    preamble = parts[0]
    return {parts[i]: preamble + parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _extent(value: Any, what: str) -> int:
    if not isinstance(value, tirx.IntImm):
        raise EdgecompError(f"{what} is not a constant ({value}); only static shapes are checked")
    return int(value.value)


def build_device_program(
    name: str, func: tirx.PrimFunc, target: tvm.target.Target
) -> DeviceProgram:
    """Build a scheduled PrimFunc for the OpenCL target and list its kernel launches.

    Parameters
    ----------
    name : str
        The PrimFunc's name in its module.
    func : tvm.tirx.PrimFunc
        A PrimFunc scheduled for the GPU (e.g. from ``edgecomp.pipeline.lower``).
    target : tvm.target.Target
        The OpenCL target (its host is replaced by x86 llvm: no cross toolchain needed).

    Returns
    -------
    DeviceProgram
        The kernels in launch order, with their OpenCL source and launch sizes.
    """
    device_target = tvm.target.Target(target, host="llvm")
    grab = _BeforeMakePackedAPI()
    try:
        with tvm.transform.PassContext(instruments=[grab]):
            built = tvm.tirx.build(
                tvm.IRModule({name: func.with_attr("global_symbol", name)}), target=device_target
            )
    except Exception as err:  # TVM raises a mix of TVMError and FFI errors
        raise EdgecompError(
            f"PrimFunc {name} does not build for {target.kind.name}: {err}"
            " (lower the module with edgecomp.pipeline.lower first)"
        ) from err
    assert grab.mod is not None  # MakePackedAPI runs in every TIR build pipeline
    sources: dict[str, str] = {}
    for module in built.imports:
        sources.update(_kernel_sources(module.inspect_source()))
    host = grab.mod[name]

    # Which buffer each kernel argument is: a parameter, a workspace, or an alias of either.
    params = list(host.params)
    workspaces: list[tuple[int, str]] = []
    origin: list[tuple[Any, KernelArg]] = [(p, KernelArg("param", i)) for i, p in enumerate(params)]
    calls: list[Any] = []

    def lookup(var: Any) -> KernelArg:
        for known, arg in origin:
            if known.same_as(var):
                return arg
        raise EdgecompError(f"{name}: kernel argument {var} is not a buffer of the function")

    def buffer_of(expr: Any) -> KernelArg:
        if isinstance(expr, ir_expr.Call) and expr.op.name == "tirx.buffer_data":
            return lookup(expr.args[0])
        raise EdgecompError(
            f"{name}: kernel argument {expr} is not a buffer; shapes must be static"
        )

    def visit(node: Any) -> None:
        if isinstance(node, tirx.stmt.AllocBuffer):
            size = math.prod(_extent(d, f"{name}: workspace size") for d in node.buffer.shape)
            origin.append((node.buffer, KernelArg("workspace", len(workspaces))))
            workspaces.append((size, str(node.buffer.dtype)))
        elif isinstance(node, tirx.stmt.DeclBuffer) and node.data is not None:
            origin.append((node.buffer, buffer_of(node.data)))
        elif isinstance(node, ir_expr.Call) and node.op.name == "tirx.call_ffi_kernel":
            calls.append(node)

    # Pre-order: definitions come before the calls that use them.
    tvm_ffi.structural_walk(
        host.body,
        ((tirx.stmt.AllocBuffer, tirx.stmt.DeclBuffer, ir_expr.Call), visit),
        order="pre",
    )
    launches = []
    for call in calls:
        kernel = call.args[0].value
        tags = list(call.attrs.launch_params)
        if kernel not in sources:
            raise EdgecompError(f"{name}: no OpenCL source for kernel {kernel}")
        n_args = len(call.args) - 1 - len(tags)
        sizes = {"blockIdx": [1, 1, 1], "threadIdx": [1, 1, 1]}
        for tag, value in zip(tags, call.args[1 + n_args :], strict=True):
            scope, _, axis = tag.partition(".")
            if scope not in sizes or axis not in _LAUNCH_AXES:
                raise EdgecompError(f"{name}: kernel {kernel} has launch parameter {tag}")
            sizes[scope][_LAUNCH_AXES[axis]] = _extent(value, f"{kernel} {tag} extent")
        launches.append(
            KernelLaunch(
                name=kernel,
                source=sources[kernel],
                args=tuple(buffer_of(a) for a in call.args[1 : 1 + n_args]),
                grid=tuple(sizes["blockIdx"]),  # type: ignore[arg-type]
                block=tuple(sizes["threadIdx"]),  # type: ignore[arg-type]
            )
        )
    if not launches:
        # TVM builds an unscheduled PrimFunc for OpenCL without complaint, as host loops over
        # device memory; on the board that would not run, so say what is missing.
        raise EdgecompError(
            f"PrimFunc {name} launches no OpenCL kernel: its loops are not bound to GPU threads"
            " (schedule it, e.g. with edgecomp.pipeline.lower)"
        )
    return DeviceProgram(name, tuple(launches), tuple(workspaces))


# ---------------------------------------------------------------------------------------------
# Running: device (PoCL) and host reference (llvm)
# ---------------------------------------------------------------------------------------------


def _nan_like(size: int, dtype: str) -> np.ndarray:
    """A fresh buffer as uninitialised device memory would be: NaN where the dtype has it."""
    fill = np.nan if np.issubdtype(np.dtype(dtype), np.floating) else 0
    return np.full(size, fill, dtype=dtype)


def run_device_program(program: DeviceProgram, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Run a PrimFunc's kernels on PoCL.

    Parameters
    ----------
    program : DeviceProgram
        From :func:`build_device_program` (its launches may be edited, e.g. to test a failure).
    arrays : sequence of numpy.ndarray
        One array per PrimFunc parameter, inputs and outputs alike (not modified).

    Returns
    -------
    list of numpy.ndarray
        Every parameter's contents after the last kernel, in parameter order.
    """
    cl, context, queue = _opencl()
    flags = cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR
    hosts = [np.ascontiguousarray(a).copy() for a in arrays]
    params = [cl.Buffer(context, flags, hostbuf=h) for h in hosts]
    spaces = [cl.Buffer(context, flags, hostbuf=_nan_like(n, dt)) for n, dt in program.workspaces]
    for launch in program.launches:
        kernel = _cl_kernel(launch.source, launch.name)
        for i, arg in enumerate(launch.args):
            kernel.set_arg(i, (params if arg.kind == "param" else spaces)[arg.index])
        global_size = tuple(g * b for g, b in zip(launch.grid, launch.block, strict=True))
        cl.enqueue_nd_range_kernel(queue, kernel, global_size, launch.block)
    for host, buffer in zip(hosts, params, strict=True):
        cl.enqueue_copy(queue, host, buffer)
    queue.finish()
    return hosts


def _serial_threads(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The PrimFunc with every thread-bound loop made serial: same values, runs on a CPU.

    Schedulable TIR keeps each cooperative stage (shared-memory fetch, reduction, epilogue)
    in its own loop nest, so running the bound loops one after another keeps the semantics.
    """

    def serial(loop: tirx.For) -> tirx.For:
        if loop.kind != tirx.ForKind.THREAD_BINDING:
            return loop
        return tirx.For(
            loop.loop_var,
            loop.min,
            loop.extent,
            tirx.ForKind.SERIAL,
            loop.body,
            None,
            loop.annotations,
            loop.step,
        )

    return tvm_ffi.structural_map(func, (tirx.For, serial))


@functools.cache
def _host_build(name: str, func: tirx.PrimFunc) -> Any:
    ref = _serial_threads(func).with_attr("global_symbol", name)
    if "target" in ref.attrs:
        ref = ref.without_attr("target")
    try:
        return tvm.tirx.build(tvm.IRModule({name: ref}), target="llvm")
    except Exception as err:  # TVM raises a mix of TVMError and FFI errors
        raise EdgecompError(f"PrimFunc {name} does not build for the host: {err}") from err


def run_host_reference(
    name: str, func: tirx.PrimFunc, arrays: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """Run the PrimFunc, thread bindings made serial, built for the host CPU (llvm).

    Takes and returns one array per parameter, like :func:`run_device_program`.
    """
    tensors = [tvm.runtime.tensor(np.ascontiguousarray(a).copy()) for a in arrays]
    _host_build(name, func)[name](*tensors)
    return [t.numpy() for t in tensors]


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def written_params(func: tirx.PrimFunc) -> list[int]:
    """Indices of the parameters the PrimFunc stores to: its outputs."""
    stored: list[Any] = []
    tvm_ffi.structural_walk(func.body, (tirx.stmt.BufferStore, lambda s: stored.append(s.buffer)))
    return [i for i, p in enumerate(func.params) if any(p.same_as(b) for b in stored)]


def random_arguments(func: tirx.PrimFunc, rng: np.random.Generator) -> list[np.ndarray]:
    """Arguments for a PrimFunc: random normal inputs, NaN outputs (zeros for integers)."""
    outputs = set(written_params(func))
    arrays = []
    for i, param in enumerate(func.params):
        shape = tuple(_extent(d, f"parameter {param.name} shape") for d in param.shape)
        dtype = str(param.dtype)
        if i in outputs:
            arrays.append(_nan_like(math.prod(shape), dtype).reshape(shape))
        elif np.issubdtype(np.dtype(dtype), np.floating):
            arrays.append(rng.standard_normal(shape).astype(dtype))
        else:  # indices and masks: zero is valid for every gather
            arrays.append(np.zeros(shape, dtype=dtype))
    return arrays


def max_abs_error(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> float:
    """Largest absolute difference over the arrays; inf when a NaN or a shape differs."""
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        if g.shape != w.shape or np.isnan(g).any() or np.isnan(w).any():
            return math.inf
        if g.size:
            worst = max(worst, float(np.max(np.abs(g.astype(np.float64) - w))))
    return worst


def outputs_match(
    got: Sequence[np.ndarray], want: Sequence[np.ndarray], rtol: float, atol: float
) -> bool:
    """True when every array matches in shape and, elementwise, within ``atol + rtol*|want|``."""
    return all(
        g.shape == w.shape and np.allclose(g, w, rtol=rtol, atol=atol, equal_nan=False)
        for g, w in zip(got, want, strict=True)
    )


def check_primfunc(
    name: str,
    func: tirx.PrimFunc,
    target: tvm.target.Target,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    seed: int = 0,
) -> KernelCheck:
    """Run one PrimFunc's OpenCL kernels on PoCL and compare its outputs with the host build."""
    program = build_device_program(name, func, target)
    arrays = random_arguments(func, np.random.default_rng(seed))
    outputs = written_params(func)
    got = [run_device_program(program, arrays)[i] for i in outputs]
    want = [run_host_reference(name, func, arrays)[i] for i in outputs]
    return KernelCheck(
        name=name,
        kernels=tuple(str(launch) for launch in program.launches),
        max_abs_err=max_abs_error(got, want),
        ok=outputs_match(got, want, rtol, atol),
    )


def _prim_funcs(mod: tvm.IRModule) -> list[tuple[str, tirx.PrimFunc]]:
    funcs = [(gv.name_hint, f) for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)]
    return sorted(funcs, key=lambda item: item[0])


def check_opencl_kernels(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    seed: int = 0,
) -> list[KernelCheck]:
    """Check every PrimFunc of a lowered module: OpenCL kernels on PoCL against the host build.

    Parameters
    ----------
    mod : tvm.IRModule
        Module whose PrimFuncs are scheduled for the GPU target, e.g. the result of
        ``edgecomp.pipeline.lower(relax_mod, board.tvm_target())``; static shapes only.
    target : tvm.target.Target
        The OpenCL target (e.g. ``load_board("rk3399-mali").tvm_target()``).
    rtol, atol : float
        Tolerances, elementwise ``|opencl - host| <= atol + rtol * |host|``.
    seed : int
        Seed of the random inputs.

    Returns
    -------
    list of KernelCheck
        One record per PrimFunc, sorted by name.

    Raises
    ------
    EdgecompError
        When pyopencl / PoCL is not installed, or a PrimFunc does not build or launch.
    """
    _opencl()  # fail first, and clearly, when PoCL is missing
    return [check_primfunc(name, func, target, rtol, atol, seed) for name, func in _prim_funcs(mod)]


def run_main_on_opencl(
    mod: tvm.IRModule, target: tvm.target.Target, inputs: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """Run a lowered module's ``main`` with every kernel on PoCL, as the Relax VM would.

    Walks ``main``'s bindings in order; each ``call_tir`` runs that PrimFunc's kernels
    (buffers go through host memory between calls, which changes no value).

    Parameters
    ----------
    mod : tvm.IRModule
        Lowered module (``edgecomp.pipeline.lower``) whose ``main`` has static shapes and
        weights bound as constants.
    target : tvm.target.Target
        The OpenCL target.
    inputs : sequence of numpy.ndarray
        ``main``'s arguments.

    Returns
    -------
    list of numpy.ndarray
        ``main``'s outputs (one entry, or one per field of a returned tuple).
    """
    main = mod["main"]
    if len(main.params) != len(inputs):
        raise EdgecompError(f"main takes {len(main.params)} inputs, got {len(inputs)}")
    env: list[tuple[Any, Any]] = list(zip(main.params, inputs, strict=True))
    programs: dict[str, DeviceProgram] = {}
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def value(expr: Any) -> Any:
        if isinstance(expr, ir_expr.Var):
            for var, val in env:
                if var.same_as(expr):
                    return val
            raise EdgecompError(f"main uses {expr} before binding it")
        if isinstance(expr, ir_expr.GenericConst):
            return expr.value.numpy()
        if isinstance(expr, ir_expr.Tuple):
            return tuple(value(f) for f in expr.fields)
        if isinstance(expr, ir_expr.TupleGetItem):
            return value(expr.tuple_value)[expr.index]
        if isinstance(expr, ir_expr.Call) and expr.op.same_as(call_tir):
            return run_call(expr)
        raise EdgecompError(f"the OpenCL end-to-end run does not handle {type(expr).__name__}")

    def run_call(call: Any) -> Any:
        if len(call.args) != 2:
            raise EdgecompError("call_tir with symbolic shape arguments: static shapes only")
        name = call.args[0].name_hint
        if name not in programs:
            programs[name] = build_device_program(name, mod[name], target)
        args = value(call.args[1])
        out_ty = call.ty_args[0]
        out_types = list(out_ty.fields) if isinstance(out_ty, relax.TupleType) else [out_ty]
        outs = [
            _nan_like(math.prod(int(d) for d in t.shape), str(t.dtype)).reshape(
                tuple(int(d) for d in t.shape)
            )
            for t in out_types
        ]
        result = run_device_program(programs[name], [*args, *outs])[len(args) :]
        return tuple(result) if isinstance(out_ty, relax.TupleType) else result[0]

    _opencl()
    for block in main.body.blocks:
        for binding in block.bindings:
            env.append((binding.var, value(binding.value)))
    out = value(main.body.body)
    return list(out) if isinstance(out, tuple) else [out]
