"""RefuseChains: choose which factor chains run as one fused kernel (T1000), inline the others.

``DecomposeConv`` emits every decomposed convolution as a call to the chain's composite function
(:mod:`edgecomp.passes.factor_chains`), whose attributes carry its spec and whose arguments are
its factors. Run op by op, the chain materialises every intermediate map at full size. For each
chain this pass either

- fuses it: the call, with the bias add (a constant ``[1, K, 1, 1]`` or ``[K, 1, 1]``) and, for
  CP and Tucker-2, the ReLU that follow it, becomes a call to an ``edgecomp.fused_chain.<kind>``
  composite; legalization (:class:`~edgecomp.kernels.fused_chain.LegalizeFusedChains`) emits
  its one kernel, whose schedule computes the intermediates per output tile; or
- inlines it: its plain ops replace the call, and run as separate kernels.

A chain is fused on CPU targets when it has one group and, in mode ``auto``, when the fused
kernel does not lose on it while its intermediates are small anyway (:func:`fusing_pays`) and
its unfused ops hold more memory at once than any other op of the model (:func:`lowers_peak`):
otherwise fusing would not lower the model's planned peak, and the fused kernel pays for its
memory saving with the halo recompute of its input projection (VGG-19's 28 x 28 chains run at
half the speed of the same chain as separate ops, bench/fused_vs_unfused.py). Mode ``all``
fuses every chain it can, ``none`` none; GPU targets get none
(:class:`~edgecomp.kernels.fused_chain.FusedChainRule` has no GPU schedule yet).

Plain convolutions are never matched as chains: only the composite functions are.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import tvm
from tvm import relax
from tvm.ir import IRModule
from tvm.ir.expr import Constant
from tvm.relax.expr_functor import PyExprMutator, PyExprVisitor, mutator, visitor
from tvm.target import Target

from edgecomp.kernels.chain_memory import unfused_intermediates, vector_fill
from edgecomp.kernels.chain_spec import ATTR_KIND, ChainSpec
from edgecomp.kernels.target_info import cpu_info, is_gpu
from edgecomp.passes.factor_chains import chain_call, chain_of, emit_chain_ops

# What ``lower(refuse=...)`` and ``edgecomp compile --refuse`` take: fuse the chains whose fusing
# can lower the planned peak, every chain, or none.
REFUSE_MODES = ("auto", "all", "none")
RELU = tvm.ir.Op.get("relax.nn.relu")
# Chain kinds the fused kernel computes (with one group).
FUSABLE = ("cp", "tucker2", "gkpd")


@dataclass
class _Chain:
    """A chain call of a function: its spec and factors, and what fusing it would take in."""

    spec: ChainSpec
    call: relax.Call
    weights: list[relax.Expr]
    root: relax.Call  # the last call fusing replaces: the chain, its bias add, or the ReLU
    bias: np.ndarray | None = None


def _static_shape(expr: relax.Expr) -> tuple[int, ...] | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return tuple(int(v) for v in ty.shape.values)
    except (TypeError, AttributeError):  # symbolic dimension
        return None


def _bias_of(
    add: relax.Expr, chain: _Chain, var2val: dict[relax.Var, relax.Expr]
) -> np.ndarray | None:
    """The bias vector when ``add`` is ``add(chain output, bias)``, else None.

    ``bias`` broadcasts as ``[1, K, 1, 1]`` or ``[K, 1, 1]``: a float32 constant, possibly behind
    a variable and a ``reshape`` of its K values (the ONNX importer's form before folding).
    """
    if not (isinstance(add, relax.Call) and add.op == tvm.ir.Op.get("relax.add")):
        return None
    k = chain.spec.out_channels
    # The operand as added must broadcast per channel, and leave the chain's shape unchanged.
    if _static_shape(add.args[1]) not in ((1, k, 1, 1), (k, 1, 1)):
        return None
    if _static_shape(add) != _static_shape(chain.call):
        return None
    const = add.args[1]
    while isinstance(const, relax.Var) and const in var2val:
        const = var2val[const]
    if isinstance(const, relax.Call) and const.op == tvm.ir.Op.get("relax.reshape"):
        const = const.args[0]  # reshape keeps the element order: K values, channel by channel
        while isinstance(const, relax.Var) and const in var2val:
            const = var2val[const]
    if not isinstance(const, Constant) or str(const.value.dtype) != "float32":
        return None
    if int(np.prod(const.value.shape)) != k:
        return None
    return const.value.numpy().reshape(k)


# ------------------------------------------------------------------------------- the pass
@visitor
class _UseCounter(PyExprVisitor):  # type: ignore[misc]
    """How many times each variable is read in a function."""

    def __init__(self) -> None:
        self.uses: dict[relax.Var, int] = {}

    def visit_var_(self, op: relax.Var) -> None:
        self.uses[op] = self.uses.get(op, 0) + 1

    def visit_dataflow_var_(self, op: relax.DataflowVar) -> None:
        self.uses[op] = self.uses.get(op, 0) + 1


def _find_chains(mod: IRModule, func: relax.Function) -> list[_Chain]:
    """The chain calls of ``func`` in program order, each with the bias add and ReLU after it
    that fusing would take in (a bias add or ReLU whose input has no other reader)."""
    var2val = relax.analysis.get_var2val(func)
    val2var = {v: k for k, v in var2val.items()}
    counter = _UseCounter()
    counter.visit_expr(func)
    users: dict[relax.Var, list[relax.Expr]] = {}
    for value in var2val.values():
        if isinstance(value, relax.Call):
            for arg in value.args:
                if isinstance(arg, relax.Var):
                    users.setdefault(arg, []).append(value)

    def sole_user(call: relax.Call) -> relax.Call | None:
        """The call that is the only reader of ``call``'s result (reading it first), if any."""
        var = val2var.get(call)
        if var is None or counter.uses.get(var, 0) != 1:
            return None
        (user,) = users.get(var, [None])
        return user if isinstance(user, relax.Call) and user.args[0].same_as(var) else None

    found = []
    for value in var2val.values():  # bindings in program order
        unit = chain_of(mod, value)
        if unit is None or unit[2]:  # not a chain, or fused already
            continue
        spec, weights, _ = unit
        chain = _Chain(spec, value, weights, value)
        user = sole_user(value)
        bias = _bias_of(user, chain, var2val) if user is not None else None
        if user is not None and bias is not None:
            chain.bias, chain.root = bias, user
            chain.spec = replace(chain.spec, bias=True)
            relu = sole_user(user)
            if relu is not None and relu.op == RELU and spec.kind != "gkpd":
                chain.spec = replace(chain.spec, relu=True)
                chain.root = relu
        found.append(chain)
    return found


# Intermediates up to this size stay in cache between the separate ops anyway, so fusing them
# saves little memory that matters: 1 MiB is the smallest L2 of the boards edgecomp targets
# (Cortex-A72 cluster; Zen 5 per core).
SMALL_INTERMEDIATE_BYTES = 1024 * 1024


def fusing_pays(spec: ChainSpec, lanes: int) -> bool:
    """Whether to fuse ``spec``; False only when fusing is slower AND the intermediates are small.

    Slower: the fused CP / Tucker-2 kernel vectorizes its projections along the rows x columns
    of a tile, so a map whose ``Ho * Wo`` pixels cannot fill one vector register (``lanes``
    fp32 lanes) runs them at a fraction of the vector width. Measured on the x86 host (Zen 5,
    AVX-512, 16 lanes, 2 threads; ``bench/fused_vs_unfused.py``): VGG-19's 14 x 14 chains
    (196 pixels: 4-lane vectors) take 5.9-6.4 ms fused vs 0.9-1.1 ms unfused (0.16-0.18x),
    whatever the rank block (44 to 444). Small: the largest intermediate of the unfused chain
    fits :data:`SMALL_INTERMEDIATE_BYTES` (there 764 x 14 x 14 floats, 0.6 MB). GKPD chains
    are always fused (not measured).
    """
    if spec.kind == "gkpd":
        return True
    ho, wo = spec.out_hw
    if vector_fill(ho * wo, lanes) >= 1.0:
        return True
    largest = max(unfused_intermediates(spec).values())
    return largest > SMALL_INTERMEDIATE_BYTES


def tensor_bytes(ty: object) -> int:
    """Bytes of a value of Relax type ``ty``: a static tensor or a tuple of them (else 0)."""
    if isinstance(ty, relax.TupleType):
        return sum(tensor_bytes(f) for f in ty.fields)
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return 0
    try:
        elements = int(np.prod([int(d) for d in ty.shape.values]))
    except (TypeError, AttributeError):  # symbolic dimension
        return 0
    return elements * max(1, tvm.runtime.DataType(str(ty.dtype)).bits // 8)


def footprint(call: relax.Call, constants: frozenset[relax.Var] = frozenset()) -> int:
    """Bytes live while ``call`` runs: its tensor inputs that are not constants, and its output.

    ``constants`` are variables bound to values computed from constants only (a weight's
    transpose). A lower bound of what the planned memory holds at that point (other live
    tensors come on top), the same for every op, so it ranks them.
    """
    inputs = sum(
        tensor_bytes(a.ty) for a in call.args if isinstance(a, relax.Var) and a not in constants
    )
    return inputs + tensor_bytes(call.ty)


# Ops whose input and output maps are both live while they run, whatever follows: FuseOps folds
# elementwise ops (bias, ReLU, dropout ...) into the kernel before them, so those add nothing.
MAP_OPS = ("relax.nn.conv2d", "relax.nn.max_pool2d", "relax.nn.avg_pool2d", "relax.matmul")


def largest_footprint(func: relax.Function, constants: tuple[relax.Var, ...] = ()) -> int:
    """The largest :func:`footprint` of the :data:`MAP_OPS` calls of ``func`` (chain calls are
    not among them); ``constants``: parameters that are weights."""
    known = set(constants)
    largest = 0
    for var, value in relax.analysis.get_var2val(func).items():  # in program order
        if not isinstance(value, relax.Call):
            continue
        args = [a for a in value.args if isinstance(a, (relax.Var, Constant))]
        if args and all(isinstance(a, Constant) or a in known for a in args):
            known.add(var)
        elif getattr(value.op, "name", "") in MAP_OPS:
            largest = max(largest, footprint(value, frozenset(known)))
    return largest


def lowers_peak(mod: IRModule, chain: _Chain, floor: int) -> bool:
    """Whether fusing ``chain`` can lower the planned peak: one of its ops, run separately,
    holds more than ``floor`` bytes at once (its input and output intermediate maps)."""
    func = mod[chain.call.op]
    return largest_footprint(func, tuple(func.params[1:])) > floor


@mutator
class _Refuser(PyExprMutator):  # type: ignore[misc]
    """Replaces each fused chain's root by a call of its fused composite, and each other chain
    call by its plain ops."""

    def __init__(self, mod: IRModule, fused: list[_Chain], inlined: list[_Chain]) -> None:
        super().__init__(mod)
        self.fused = {c.root: c for c in fused}
        self.inlined = {c.call: c for c in inlined}

    def visit_call_(self, op: relax.Call) -> relax.Expr:
        chain = self.fused.get(op)
        if chain is not None:
            data = self.visit_expr(chain.call.args[0])
            bias = relax.const(chain.bias) if chain.bias is not None else None
            return chain_call(self.builder_, chain.spec, data, chain.weights, bias, fused=True)
        chain = self.inlined.get(op)
        if chain is not None:
            data = self.visit_expr(chain.call.args[0])
            plain = replace(chain.spec, bias=False, relu=False)  # the bias add, ReLU stay after
            return emit_chain_ops(self.builder_, plain, data, chain.weights)
        return super().visit_call_(op)


def count_chains(mod: IRModule) -> int:
    """How many factor chains (fused or not) the Relax functions of ``mod`` call."""
    return sum(
        chain_of(mod, value) is not None
        for _, func in mod.functions_items()
        if isinstance(func, relax.Function)
        for value in relax.analysis.get_var2val(func).values()
    )


def fused_chain_calls(mod: IRModule) -> int:
    """How many calls of ``mod``'s Relax functions go to a fused-chain kernel."""
    calls = 0
    for _, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        for value in relax.analysis.get_var2val(func).values():
            if isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.call_tir"):
                callee = mod[value.args[0]]
                calls += bool(callee.attrs and ATTR_KIND in callee.attrs)
    return calls


@tvm.transform.module_pass(opt_level=0, name="RefuseChains")
class RefuseChains:
    """Fuse the factor chains worth it into one kernel each (T1000 re-fusion), inline the rest.

    Parameters
    ----------
    target : Target, optional
        The compilation target (default: the current one); its vector width enters
        :func:`fusing_pays`. GPU targets get every chain inlined.
    mode : {"auto", "all", "none"}
        Fuse the chains :func:`fusing_pays` and :func:`lowers_peak` pick, every chain that can
        be fused (to measure or test the fused kernel), or none.
    """

    def __init__(self, target: Target | None = None, mode: str = "auto") -> None:
        self.target = target
        self.mode = mode

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        """Rewrite every Relax function of ``mod``; PrimFuncs are left alone."""
        target = self.target or Target.current(allow_none=True)
        mode = "none" if target is not None and is_gpu(target) else self.mode
        lanes = cpu_info(target).lanes
        changed = False
        # A shallow copy: ``mod[gvar] = ...`` below writes in place, and the caller's module
        # (compile's decomposed module, which its report lowers again) must stay as it was.
        mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        for gvar, func in list(mod.functions_items()):
            if not isinstance(func, relax.Function) or func.attrs and "Composite" in func.attrs:
                continue
            found = _find_chains(mod, func)
            if not found:
                continue
            floor = largest_footprint(func)
            fused = [
                c
                for c in found
                if mode != "none"
                and c.spec.kind in FUSABLE
                and c.spec.groups == 1
                and (mode == "all" or (fusing_pays(c.spec, lanes) and lowers_peak(mod, c, floor)))
            ]
            inlined = [c for c in found if all(c is not f for f in fused)]
            refuser = _Refuser(mod, fused, inlined)
            new_func = refuser.visit_expr(func)
            mod = refuser.builder_.get()
            mod[gvar] = new_func
            changed = True
        if changed:  # the replaced chains' calls and composite functions are now unused
            mod = relax.transform.DeadCodeElimination()(mod)
        return mod
