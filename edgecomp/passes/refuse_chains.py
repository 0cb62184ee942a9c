"""RefuseChains: replace each CP / Tucker-2 / GKPD factor chain by one fused ``call_tir`` (T1000).

``DecomposeConv`` leaves a dense convolution as a chain of plain ``relax.nn.conv2d`` ops (NCHW /
OIHW, float32, constant weights). Run op by op, the chain materialises every intermediate map at
full size. This pass finds each chain and replaces it, with the bias add that follows it, by a
call to one TE compute (:mod:`edgecomp.kernels.fused_chain`) whose schedule computes the
intermediates per output tile.

Chains recognised, exactly (anything else is returned unchanged):

- CP rank R: conv 1x1 (C->R) -> conv groups=R (kh,1), strides (sh,1), padding (pt,0,pb,0),
  dilation (dh,1) -> conv groups=R (1,kw), strides (1,sw), padding (0,pl,0,pr), dilation (1,dw)
  -> conv 1x1 (R->K).
- Tucker-2: conv 1x1 (C->R3) -> conv kh x kw (R3->R4) -> conv 1x1 (R4->K).
- GKPD rank R (the form assumed until DecomposeConv fixes its own; see :func:`gkpd_chain`):
  ``conv(x, WB, groups=C1, padding=p, dilation=d)`` with WB ``[C1*R*K2, C2, kh2, kw2]`` (B
  repeated for every channel group) -> reshape ``[N, C1, R, K2, Hz, Wz]`` -> permute
  ``(0, 3, 2, 1, 4, 5)`` -> reshape ``[N, K2*R*C1, Hz, Wz]`` -> ``conv(., WA, groups=K2,
  strides=s, dilation=(kh2*dh, kw2*dw))`` with WA ``[K2*K1, R*C1, kh1, kw1]`` (A repeated for
  every k2) -> reshape ``[N, K2, K1, Ho, Wo]`` -> permute ``(0, 2, 1, 3, 4)`` -> reshape
  ``[N, K, Ho, Wo]``.

each optionally followed by ``add(chain, bias)`` with a constant bias of shape ``[1, K, 1, 1]``
or ``[K, 1, 1]``, and that by ``relu`` (CP, Tucker-2). Every intermediate of a chain must have
no other user (else fusing would compute it twice), and no op may belong to two chains.

GPU targets are left unfused: :class:`~edgecomp.kernels.fused_chain.FusedChainRule` has no GPU
schedule yet. So are CP / Tucker-2 chains the fused kernel is measured to lose on while their
intermediates are small anyway (:func:`fusing_pays`), and chains whose unfused ops never hold
as much memory at once as some other op of the model (:func:`footprint`): fusing them would not
lower the model's planned peak, and the fused kernel pays for its memory saving with the halo
recompute of its input projection (VGG-19's 28 x 28 chains run at half the speed of the same
chain as separate ops, bench/fused_vs_unfused.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import tvm
from tvm import relax
from tvm.ir import IRModule
from tvm.ir.expr import Constant
from tvm.relax.dpl import DFPattern, is_const, is_op, wildcard
from tvm.relax.expr_functor import PyExprMutator, PyExprVisitor, mutator, visitor
from tvm.target import Target

from edgecomp.kernels.chain_memory import (
    TILE_BUDGET_BYTES,
    choose_tiles,
    unfused_intermediates,
    vector_fill,
)
from edgecomp.kernels.chain_spec import ATTR_KIND, ChainSpec, ConvGeometry, pad_ranks
from edgecomp.kernels.fused_chain import emit_fused_chain
from edgecomp.kernels.target_info import cpu_info, is_gpu, num_cores

# What ``lower(refuse=...)`` and ``edgecomp compile --refuse`` take: fuse the chains whose fusing
# can lower the planned peak, every chain, or none.
REFUSE_MODES = ("auto", "all", "none")
RELU = tvm.ir.Op.get("relax.nn.relu")


def _conv(data: DFPattern) -> DFPattern:
    return is_op("relax.nn.conv2d")(data, is_const())


def _reshape(data: DFPattern) -> DFPattern:
    return is_op("relax.reshape")(data, wildcard())


# Patterns, declared up front. Each names the input and the ops of the chain in data-flow order.
CP_INPUT = wildcard()
CP_OPS = [_conv(CP_INPUT)]
for _ in range(3):
    CP_OPS.append(_conv(CP_OPS[-1]))

TUCKER_INPUT = wildcard()
TUCKER_OPS = [_conv(TUCKER_INPUT)]
for _ in range(2):
    TUCKER_OPS.append(_conv(TUCKER_OPS[-1]))

GKPD_INPUT = wildcard()
GKPD_OPS = [_conv(GKPD_INPUT)]
GKPD_OPS.append(_reshape(GKPD_OPS[-1]))
GKPD_OPS.append(is_op("relax.permute_dims")(GKPD_OPS[-1]))
GKPD_OPS.append(_reshape(GKPD_OPS[-1]))
GKPD_OPS.append(_conv(GKPD_OPS[-1]))
GKPD_OPS.append(_reshape(GKPD_OPS[-1]))
GKPD_OPS.append(is_op("relax.permute_dims")(GKPD_OPS[-1]))
GKPD_OPS.append(_reshape(GKPD_OPS[-1]))


@dataclass
class _Chain:
    """A matched chain: what the fused call needs, and the calls it replaces."""

    spec: ChainSpec
    data: relax.Expr
    weights: list[np.ndarray]
    calls: list[relax.Call]
    bias: np.ndarray | None = None


# ------------------------------------------------------------------------------- checks
def _ints(values: object) -> tuple[int, ...]:
    return tuple(int(v) for v in values)  # type: ignore[attr-defined]


def _static_shape(expr: relax.Expr) -> tuple[int, ...] | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    if str(ty.dtype) != "float32":
        return None
    try:
        return _ints(ty.shape.values)
    except (TypeError, AttributeError):  # symbolic dimension
        return None


ConvInfo = tuple[np.ndarray, int, tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def _conv_info(call: relax.Call) -> ConvInfo | None:
    """(weight, groups, strides, padding, dilation) of a plain NCHW/OIHW float32 conv2d."""
    attrs = call.attrs
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW"):
        return None
    if attrs.out_dtype is not None and str(attrs.out_dtype) not in ("", "void", "float32"):
        return None
    if _static_shape(call.args[0]) is None:
        return None
    weight = call.args[1].value.numpy()
    if weight.dtype != np.float32:
        return None
    return (
        weight,
        int(attrs.groups),
        _ints(attrs.strides),
        _ints(attrs.padding),
        _ints(attrs.dilation),
    )


def _conv_infos(calls: list[relax.Call]) -> list[ConvInfo] | None:
    """:func:`_conv_info` of every call, or None if any of them is not a plain conv."""
    infos = [_conv_info(c) for c in calls]
    return [i for i in infos if i is not None] if all(i is not None for i in infos) else None


def _is_pointwise(info: ConvInfo, groups: int = 1) -> bool:
    w, g, strides, padding, dilation = info
    return (
        w.shape[2:] == (1, 1)
        and g == groups
        and strides == (1, 1)
        and padding == (0, 0, 0, 0)
        and dilation == (1, 1)
    )


def cp_chain(matched: dict[DFPattern, relax.Expr]) -> _Chain | None:
    """The CP chain behind a match of ``CP_OPS[-1]``, or None if shapes/attributes disagree."""
    calls = [matched[p] for p in CP_OPS]
    infos = _conv_infos(calls)
    shape = _static_shape(calls[0].args[0])
    if infos is None or shape is None:
        return None
    first, vert, horiz, last = infos
    r = first[0].shape[0]
    if not (_is_pointwise(first) and _is_pointwise(last) and last[0].shape[1] == r):
        return None
    wv, gv, sv, pv, dv = vert
    wh, gh, sh_, ph, dh_ = horiz
    if wv.shape[:2] != (r, 1) or wv.shape[3] != 1 or gv != r:
        return None
    if sv[1] != 1 or pv[1] != 0 or pv[3] != 0 or dv[1] != 1:
        return None
    if wh.shape[:3] != (r, 1, 1) or gh != r:
        return None
    if sh_[0] != 1 or ph[0] != 0 or ph[2] != 0 or dh_[0] != 1:
        return None
    geom = ConvGeometry((sv[0], sh_[1]), (pv[0], ph[1], pv[2], ph[3]), (dv[0], dh_[1]))
    spec = ChainSpec(
        "cp",
        shape,
        last[0].shape[0],
        (wv.shape[2], wh.shape[3]),
        (r,),
        geom,
        False,  # type: ignore[arg-type]
    )
    return _Chain(spec, matched[CP_INPUT], [i[0] for i in infos], calls)


def tucker2_chain(matched: dict[DFPattern, relax.Expr]) -> _Chain | None:
    """The Tucker-2 chain behind a match of ``TUCKER_OPS[-1]``, or None."""
    calls = [matched[p] for p in TUCKER_OPS]
    infos = _conv_infos(calls)
    shape = _static_shape(calls[0].args[0])
    if infos is None or shape is None:
        return None
    first, core, last = infos
    wc, gc, sc, pc, dc = core
    r3, r4 = first[0].shape[0], wc.shape[0]
    if not (_is_pointwise(first) and _is_pointwise(last)):
        return None
    if gc != 1 or wc.shape[1] != r3 or last[0].shape[1] != r4:
        return None
    spec = ChainSpec(
        "tucker2",
        shape,
        last[0].shape[0],
        (wc.shape[2], wc.shape[3]),
        (r3, r4),  # type: ignore[arg-type]
        ConvGeometry(sc, pc, dc),
        False,  # type: ignore[arg-type]
    )
    return _Chain(spec, matched[TUCKER_INPUT], [i[0] for i in infos], calls)


def gkpd_chain(matched: dict[DFPattern, relax.Expr]) -> _Chain | None:
    """The GKPD chain behind a match of ``GKPD_OPS[-1]``, with its factors A and B, or None.

    The repeated weights are checked to be exact repeats, so the factors taken from the first
    copy reproduce the chain.
    """
    calls = [matched[p] for p in GKPD_OPS]
    conv_b, r1, p1, r2, conv_a, r3, p2, r4 = calls
    info_b, info_a = _conv_info(conv_b), _conv_info(conv_a)
    shape = _static_shape(conv_b.args[0])
    if info_b is None or info_a is None or shape is None:
        return None
    shapes = [_static_shape(c) for c in (r1, r2, r3, r4)]
    if any(s is None for s in shapes) or len(shapes[0]) != 6 or len(shapes[2]) != 5:
        return None
    n, c1, rank, k2, hz, wz = shapes[0]
    if _ints(p1.attrs.axes) != (0, 3, 2, 1, 4, 5) or _ints(p2.attrs.axes) != (0, 2, 1, 3, 4):
        return None
    wb, gb, sb, pb, db = info_b
    wa, ga, sa, pa, da = info_a
    c2, kh2, kw2 = wb.shape[1:]
    k1 = wa.shape[0] // max(k2, 1)
    kh1, kw1 = wa.shape[2:]
    ok = (
        gb == c1
        and shape[1] == c1 * c2
        and wb.shape[0] == c1 * rank * k2
        and sb == (1, 1)
        and ga == k2
        and wa.shape[:2] == (k2 * k1, rank * c1)
        and pa == (0, 0, 0, 0)
        and da == (kh2 * db[0], kw2 * db[1])
        and shapes[1] == (n, k2 * rank * c1, hz, wz)
        and shapes[2][:3] == (n, k2, k1)
        and shapes[3] == (n, k1 * k2, *shapes[2][3:])
    )
    if not ok:
        return None
    b_all = wb.reshape(c1, rank, k2, c2, kh2, kw2)
    a_all = wa.reshape(k2, k1, rank, c1, kh1, kw1)
    if not (
        np.array_equal(b_all, np.broadcast_to(b_all[:1], b_all.shape))
        and np.array_equal(a_all, np.broadcast_to(a_all[:1], a_all.shape))
    ):
        return None
    b = np.ascontiguousarray(b_all[0])  # [R, K2, C2, kh2, kw2]
    a = np.ascontiguousarray(a_all[0].transpose(1, 0, 2, 3, 4))  # [R, K1, C1, kh1, kw1]
    spec = ChainSpec(
        "gkpd",
        shape,
        k1 * k2,
        (kh1 * kh2, kw1 * kw2),  # type: ignore[arg-type]
        (rank, k1, c1, kh1, kw1, k2, c2, kh2, kw2),
        ConvGeometry(sa, pb, db),
        False,  # type: ignore[arg-type]
    )
    return _Chain(spec, matched[GKPD_INPUT], [a, b], calls)


CHAINS = [(CP_OPS[-1], cp_chain), (TUCKER_OPS[-1], tucker2_chain), (GKPD_OPS[-1], gkpd_chain)]


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
    if _static_shape(add) != _static_shape(chain.calls[-1]):
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


def _find_chains(func: relax.Function) -> dict[relax.Call, _Chain]:
    """Chains of ``func`` keyed by the call that ends them (the bias add when one follows)."""
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

    claimed: set[relax.Call] = set()
    found: dict[relax.Call, _Chain] = {}
    for value in var2val.values():  # bindings in program order: earlier chains claim first
        if not isinstance(value, relax.Call):
            continue
        for pattern, build in CHAINS:
            matched = pattern.extract_matched_expr(value, var2val)
            chain = build(matched) if matched is not None else None
            if chain is None or any(c in claimed for c in chain.calls):
                continue
            inner = [val2var.get(c) for c in chain.calls[:-1]]
            if any(v is None or counter.uses.get(v, 0) != 1 for v in inner):
                continue  # an intermediate with another reader must stay materialised
            root: relax.Call = chain.calls[-1]
            user = sole_user(root)
            bias = _bias_of(user, chain, var2val) if user is not None else None
            if user is not None and bias is not None:
                chain.bias = bias
                chain.spec = replace(chain.spec, bias=True)
                root = user
                relu = sole_user(root)
                if relu is not None and relu.op == RELU and chain.spec.kind != "gkpd":
                    chain.spec = replace(chain.spec, relu=True)
                    root = relu
            claimed.update(chain.calls)
            found[root] = chain
            break
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


def _peak_floor(func: relax.Function, chains: dict[relax.Call, _Chain]) -> int:
    """The largest :func:`footprint` of the :data:`MAP_OPS` calls of ``func`` outside chains."""
    in_chains = {c for chain in chains.values() for c in chain.calls} | set(chains)
    constants: set[relax.Var] = set()
    floor = 0
    for var, value in relax.analysis.get_var2val(func).items():  # in program order
        if not isinstance(value, relax.Call):
            continue
        args = [a for a in value.args if isinstance(a, (relax.Var, Constant))]
        if args and all(isinstance(a, Constant) or a in constants for a in args):
            constants.add(var)
        elif value not in in_chains and getattr(value.op, "name", "") in MAP_OPS:
            floor = max(floor, footprint(value, frozenset(constants)))
    return floor


def lowers_peak(chain: _Chain, floor: int) -> bool:
    """Whether fusing ``chain`` can lower the planned peak: one of its ops, run separately,
    holds more than ``floor`` bytes at once (its input and output intermediate maps)."""
    return max(footprint(c) for c in chain.calls) > floor


@mutator
class _Refuser(PyExprMutator):  # type: ignore[misc]
    def __init__(
        self,
        mod: IRModule,
        chains: dict[relax.Call, _Chain],
        threads: int,
        lanes: int,
        budget: int,
    ) -> None:
        super().__init__(mod)
        self.chains = chains
        self.threads = threads
        self.lanes = lanes
        self.budget = budget

    def visit_call_(self, op: relax.Call) -> relax.Expr:
        chain = self.chains.get(op)
        if chain is None:
            return super().visit_call_(op)
        spec, padded = pad_ranks(chain.spec, chain.weights)
        rows, rank_block = choose_tiles(spec, self.threads, self.lanes, budget=self.budget)
        weights = [relax.const(w) for w in padded]
        bias = relax.const(chain.bias) if chain.bias is not None else None
        data = self.visit_expr(chain.data)
        return emit_fused_chain(self.builder_, spec, data, weights, bias, rows, rank_block)


def count_chains(mod: IRModule) -> int:
    """How many factor chains the Relax functions of ``mod`` hold (fused or not)."""
    return sum(
        len(_find_chains(f)) for _, f in mod.functions_items() if isinstance(f, relax.Function)
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
    """Fuse every decomposed-convolution chain into one tiled kernel (T1000 re-fusion).

    Parameters
    ----------
    target : Target, optional
        The compilation target (default: the current one). Its ``num-cores`` sets how many
        tiles run at once, which the tile choice balances; GPU targets are left unfused.
    always : bool
        Fuse every chain found, also those :func:`fusing_pays` or :func:`lowers_peak` would
        leave unfused (to measure or test the fused kernel on them).
    """

    def __init__(self, target: Target | None = None, always: bool = False) -> None:
        self.target = target
        self.always = always

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        """Rewrite every Relax function of ``mod``; PrimFuncs are left alone."""
        target = self.target or Target.current(allow_none=True)
        if target is not None and is_gpu(target):
            return mod
        threads = max(1, num_cores(target)) if target is not None else 1
        info = cpu_info(target)
        lanes = info.lanes
        # Per-thread tile budget: the L2 share the target table gives a core's working set, if
        # larger than the default. On the x86 host (640 KiB) it lets 56 x 56 chains run as one
        # whole-map tile, whose input projection vectorizes over rows x columns instead of 56
        # columns, and 112 x 112 chains use 28-row tiles: VGG conv3 chain 0.47x -> 0.67x of
        # unfused, conv2 0.64x -> 0.73x (bench/fused_vs_unfused.py, 2 threads); memory saved
        # per layer still >= 95%. 224 x 224 layers get bigger tiles with no measurable change.
        budget = max(TILE_BUDGET_BYTES, info.panel_bytes)
        changed = False
        for gvar, func in list(mod.functions_items()):
            if not isinstance(func, relax.Function):
                continue
            found = _find_chains(func)
            floor = _peak_floor(func, found)
            chains = {
                root: chain
                for root, chain in found.items()
                if self.always or (fusing_pays(chain.spec, lanes) and lowers_peak(chain, floor))
            }
            if not chains:
                continue
            refuser = _Refuser(mod, chains, threads, lanes, budget)
            new_func = refuser.visit_expr(func)
            mod = refuser.builder_.get()
            mod[gvar] = new_func
            changed = True
        if changed:  # the replaced chains' ops are now unused
            mod = relax.transform.DeadCodeElimination()(mod)
        return mod
