"""DecomposeConv: replace each dense constant-weight ``relax.nn.conv2d`` by its factor chain.

Each CP / Tucker-2 / GKPD chain is emitted as one unit: a call of the chain's composite function
with the factors as constant arguments (:mod:`edgecomp.passes.factor_chains`, the contract with
:mod:`edgecomp.passes.refuse_chains`, which fuses or inlines it).

A grouped conv (groups=g) is g independent convs: CP and Tucker-2 decompose each group's kernel
at one common rank and emit the same chain with every conv grouped g ways (the depthwise convs
g*R ways); GKPD takes groups=1 only. A 1x1 conv (groups 1) is a matrix product: a truncated SVD
makes it two thinner 1x1 convs (C->R with its stride, R->K), plain ops as for a fully connected
layer. A bias add after the conv is left where it is (it now follows the chain). Layers where
decomposing does not pay stay dense, with the reason in :attr:`DecomposeConv.report`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.ir import IRModule
from tvm.ir.expr import Constant
from tvm.relax.expr_functor import PyExprMutator, mutator

from edgecomp.decompose import (
    ConvGeom,
    RankPolicy,
    canonical_method,
    chain_cost,
    choose_rank,
    conv2d_nchw,
    dense_cost,
    parse_policy,
)
from edgecomp.decompose.norms import relative_error
from edgecomp.decompose.rank import choose_fc_rank, factorize, fc_cost, tucker_ranks
from edgecomp.errors import EdgecompError
from edgecomp.kernels.chain_spec import ChainSpec, ConvGeometry
from edgecomp.passes.factor_chains import chain_call

# Below this many input or output channels a chain's extra ops and memory traffic outweigh
# the saving (a first layer on a 1- or 3-channel image is the usual case).
MIN_CHANNELS = 8
# A fully connected layer with fewer inputs or outputs (a 10-class head) costs little and holds
# the decision itself: factorizing it saves next to nothing and costs accuracy.
MIN_FC = 32


@dataclass
class LayerRecord:
    """What DecomposeConv did to one conv layer (``rank`` 0 and ``skipped`` set when left dense)."""

    name: str
    weight_shape: tuple[int, ...]  # OIHW for a conv, [N_in, N_out] for a fully connected layer
    input_shape: tuple[int, ...]
    method: str  # cp / tucker / kronecker for a conv, svd for a fully connected layer
    rank: int | tuple[int, int] = 0
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0  # multiply-adds, bias excluded
    flops_after: int = 0
    weight_error: float | None = None
    output_error: float | None = None
    skipped: str | None = None
    factor_shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # GKPD: A and B
    kind: str = "conv"  # or "fc" (Gemm / MatMul with a constant weight)
    seconds: float = 0.0  # time spent choosing the rank and factorizing
    refit_error: tuple[float, float] | None = None  # output error before / after --calib refit


def _no_rank_reason(policy: RankPolicy) -> str:
    """Why a layer stays dense when the policy finds no rank for it."""
    if policy.kind in ("error", "output"):
        return f"no rank meets {policy} with a FLOP saving (the budget needs more terms)"
    return f"no rank meets {policy} with a FLOP saving"


def _ints(xs) -> tuple[int, ...]:  # noqa: ANN001 - an Array of IntImm
    return tuple(int(x) for x in xs)


def _is_dense_candidate(call: relax.Expr) -> bool:
    """A conv2d whose weight is a constant: the calls this pass numbers and looks at."""
    return (
        isinstance(call, relax.Call)
        and call.op == tvm.ir.Op.get("relax.nn.conv2d")
        and isinstance(call.args[1], Constant)
    )


def _fc_weight(
    call: relax.Expr, lookup: Callable[[relax.Expr], relax.Expr | None]
) -> np.ndarray | None:
    """The ``[N_in, N_out]`` weight of a fully connected layer: a ``matmul`` of a 2-D input by a
    2-D constant, or by the transpose of one (how ONNX ``Gemm`` with ``transB=1`` imports);
    ``lookup`` maps a variable to the value bound to it."""
    if not (isinstance(call, relax.Call) and call.op == tvm.ir.Op.get("relax.matmul")):
        return None
    rhs = call.args[1]
    if isinstance(rhs, Constant):
        w = rhs.value.numpy()
        return w if w.ndim == 2 else None
    bound = lookup(rhs) if isinstance(rhs, relax.Var) else None
    if (
        isinstance(bound, relax.Call)
        and bound.op == tvm.ir.Op.get("relax.permute_dims")
        and isinstance(bound.args[0], Constant)
    ):
        w = bound.args[0].value.numpy()
        axes = bound.attrs.axes
        if w.ndim == 2 and (axes is None or [int(a) for a in axes] == [1, 0]):
            return np.ascontiguousarray(w.T)
    return None


def _is_fc_candidate(call: relax.Expr, lookup: Callable[[relax.Expr], relax.Expr | None]) -> bool:
    shape = _static_shape(call.args[0]) if isinstance(call, relax.Call) and call.args else None
    return shape is not None and len(shape) == 2 and _fc_weight(call, lookup) is not None


def _static_shape(expr: relax.Expr) -> tuple[int, ...] | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return _ints(ty.shape.values)
    except (TypeError, AttributeError):
        return None


def _candidates(func: relax.Function, fc: bool) -> list[relax.Call]:
    """Candidate conv (and, with ``fc``, fully connected) calls of ``func`` in binding order
    (the order the mutator sees them)."""
    calls = []
    if isinstance(func.body, relax.SeqExpr):
        bound = {b.var: b.value for block in func.body.blocks for b in block.bindings}
        for block in func.body.blocks:
            calls += [
                b.value
                for b in block.bindings
                if _is_dense_candidate(b.value) or (fc and _is_fc_candidate(b.value, bound.get))
            ]
    return calls


def layer_inputs(
    mod: IRModule, calib: np.ndarray, fc: bool = False, outputs: bool = False
) -> list[np.ndarray]:
    """The input of every candidate layer of ``main`` for each calibration sample.

    Compiles a copy of ``main`` that returns those inputs (or, with ``outputs``, the layers'
    outputs, before any bias), for the host, and runs it on the VM. Returns one array
    ``[N, ...]`` per layer, in binding order.
    """
    main = mod["main"]
    params = list(main.params)
    if len(params) != 1:
        raise EdgecompError(
            f"--calib supports single-input models; this one has {len(params)} inputs"
        )
    in_shape = _static_shape(params[0])
    samples = _calib_samples(calib, in_shape)
    # The other functions (chains' composites) come along: ``main`` may call them.
    others = {gv: f for gv, f in mod.functions_items() if gv.name_hint != "main"}
    flat = relax.transform.ToNonDataflow()(IRModule({"main": main}))["main"]
    calls = _candidates(flat, fc)
    if not calls:
        return []
    wanted = calls if outputs else [c.args[0] for c in calls]
    if outputs:  # the calls are bound to variables: return those
        by_value = {
            b.value: b.var
            for block in flat.body.blocks
            for b in block.bindings  # type: ignore[attr-defined]
        }
        wanted = [by_value[c] for c in calls]
    body = relax.BlockBuilder().normalize(
        relax.SeqExpr(flat.body.blocks, relax.Tuple(wanted))  # type: ignore[attr-defined]
    )
    probe = IRModule(others)
    probe["main"] = relax.Function(flat.params, body)
    vm = relax.VirtualMachine(tvm.compile(probe, target=tvm.target.Target("llvm")), tvm.cpu())
    outs: list[list[np.ndarray]] = [[] for _ in calls]
    for x in samples:
        res = vm["main"](tvm.runtime.tensor(x))
        for i, r in enumerate(res):
            outs[i].append(r.numpy())
    return [np.concatenate(o, axis=0) for o in outs]


def conv_layer_inputs(mod: IRModule, calib: np.ndarray) -> list[np.ndarray]:
    """The input of every candidate conv of ``main`` (:func:`layer_inputs` without fc layers)."""
    return layer_inputs(mod, calib)


def _calib_samples(calib: np.ndarray, in_shape: tuple[int, ...] | None) -> list[np.ndarray]:
    """Split calibration data into model inputs: ``in_shape`` itself, or ``[N, *in_shape[1:]]``
    for a batch-1 model, or ``[N, *in_shape]``."""
    calib = np.asarray(calib)
    want = "x".join(map(str, in_shape or ()))
    if in_shape is not None and calib.dtype.kind == "f":
        if calib.shape == in_shape:
            return [calib.astype(np.float32)]
        if calib.ndim == len(in_shape) + 1 and calib.shape[1:] == in_shape:
            return [s.astype(np.float32) for s in calib]
        if in_shape[0] == 1 and calib.ndim == len(in_shape) and calib.shape[1:] == in_shape[1:]:
            return [s[None].astype(np.float32) for s in calib]
    raise EdgecompError(
        f"--calib data of shape {calib.shape} ({calib.dtype}) does not fit the model input "
        f"{want}: give float data shaped {want} or N x {want}"
    )


LayerCallback = Callable[[LayerRecord | None, int, int], None]


@dataclass
class _Plan:
    """How one candidate layer is rewritten: its factors (one per group) and, after a refit,
    the change to add to the bias that follows it."""

    kind: str  # "conv" or "fc"
    method: str
    geom: ConvGeom | None
    factors: list
    bias_delta: np.ndarray | None = None


@tvm.ir.transform.module_pass(opt_level=0, name="DecomposeConv")
class DecomposeConv:
    """Rewrite dense conv2d layers into CP / Tucker-2 / GKPD factor chains, and fully connected
    layers (``matmul`` by a constant) into two thinner ones (truncated SVD).

    Parameters
    ----------
    method : str
        ``cp``, ``tucker`` or ``kronecker`` (aliases ``tucker2``, ``gkpd``).
    policy : str or RankPolicy
        A rank policy (see :mod:`edgecomp.decompose.rank`), e.g. ``flops=2x``; fully connected
        layers get the same policy, over their params / multiply-adds.
    calib : np.ndarray, optional
        Calibration inputs for ``main``; needed by ``output=e`` and, when given, every layer's
        output error is reported.
    force : bool
        Emit the chain even when it saves no FLOPs (used to test chains at full rank).
    fc : bool
        Also factorize fully connected layers (``Gemm`` / ``MatMul`` with a constant weight).
    refit : bool
        With ``calib``: refit each decomposed layer's last factor and bias by least squares so
        its output on the calibration inputs matches the dense network's, layer by layer in
        network order (see :mod:`edgecomp.passes.refit`).
    on_layer : callable, optional
        Called with (record, layers done, layers in all) as each layer is decided, and once
        with record None before the first.

    Attributes
    ----------
    report : list of LayerRecord
        Filled when the pass runs: one record per constant-weight conv2d (and fc layer).
    """

    def __init__(
        self,
        method: str,
        policy: str | RankPolicy,
        calib: np.ndarray | None = None,
        force: bool = False,
        fc: bool = False,
        refit: bool = False,
        on_layer: LayerCallback | None = None,
    ) -> None:
        self.method = canonical_method(method)
        self.policy = parse_policy(policy)
        if self.policy.kind == "output" and calib is None:
            raise EdgecompError(
                "--rank-policy output=... needs calibration inputs: pass --calib FILE.npy"
            )
        if refit and calib is None:
            raise EdgecompError("refitting decomposed layers needs calibration inputs (--calib)")
        self.calib = calib
        self.force = force  # emit chains even without a FLOP saving (full-rank exactness tests)
        self.fc = fc
        self.refit = refit
        self.on_layer = on_layer
        self.report: list[LayerRecord] = []

    def transform_module(self, mod: IRModule, ctx: tvm.transform.PassContext) -> IRModule:
        """Run the rewrite on every Relax function of ``mod``."""
        self.report = []
        inputs: list[np.ndarray] | None = None
        has_main = "main" in [g.name_hint for g in mod.get_global_vars()]
        if self.calib is not None and has_main:
            inputs = layer_inputs(mod, self.calib, fc=self.fc)
        total = sum(
            len(_candidates(f, self.fc))
            for _, f in mod.functions_items()
            if isinstance(f, relax.Function)
        )
        if self.on_layer is not None:
            self.on_layer(None, 0, total)
        rewriter = _Rewriter(mod, self, inputs, total)
        new = rewriter.run()
        if self.refit and self.calib is not None and has_main:
            from edgecomp.passes.refit import refit_plans

            plans = refit_plans(mod, self, rewriter.plans, rewriter.records, inputs or [])
            new = _Rewriter(mod, self, None, total, fixed=plans).run()
        return relax.transform.DeadCodeElimination()(new) if self.fc else new


def decompose_conv(
    mod: IRModule,
    method: str,
    policy: str | RankPolicy,
    calib: np.ndarray | None = None,
    force: bool = False,
    fc: bool = False,
    refit: bool = False,
    on_layer: LayerCallback | None = None,
) -> tuple[IRModule, list[LayerRecord]]:
    """Run :class:`DecomposeConv` on ``mod``; return the new module and the per-layer report.

    The function form for Python callers: errors reach them as :class:`EdgecompError`
    rather than through TVM's pass machinery.
    """
    transform = DecomposeConv(
        method, policy, calib=calib, force=force, fc=fc, refit=refit, on_layer=on_layer
    )
    new = transform.transform_module(mod, tvm.transform.PassContext.current())
    return new, transform.report


@mutator
class _Rewriter(PyExprMutator):
    """Decides every candidate layer (or applies ``fixed`` plans, keyed by candidate index of
    ``main``; layers without one stay dense) and emits the chains."""

    def __init__(
        self,
        mod: IRModule,
        owner: DecomposeConv,
        layer_inputs: list[np.ndarray] | None,
        total: int = 0,
        fixed: dict[int, _Plan] | None = None,
    ) -> None:
        super().__init__(mod)
        self.mod = mod
        self.owner = owner
        self.layer_inputs = layer_inputs
        self.total = total
        self.fixed = fixed
        self.plans: dict[int, _Plan] = {}
        self.records: dict[int, LayerRecord] = {}
        self.calib_on = False
        self.index = 0
        self.counts = {"conv": 0, "fc": 0}
        self.bias_delta: dict[int, np.ndarray] = {}  # handle of a chain's last call -> delta
        self.error: EdgecompError | None = None

    def run(self) -> IRModule:
        for gv, func in self.mod.functions_items():
            if isinstance(func, relax.Function):
                self.calib_on = gv.name_hint == "main"
                self.index = 0
                self.builder_.update_func(gv, self.visit_expr(func))
                if self.error is not None:  # kept aside: it would lose its type in TVM's FFI
                    raise self.error
        return self.builder_.get()

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        new = super().visit_call_(call)
        if self.bias_delta and call.op == tvm.ir.Op.get("relax.add"):
            return self._shift_bias(new)
        kind = (
            "conv"
            if _is_dense_candidate(call)
            else "fc"
            if self.owner.fc and _is_fc_candidate(call, self.lookup_binding)
            else None
        )
        if kind is None:
            return new
        i = self.index
        self.index += 1
        name = f"{kind}{self.counts[kind]}"
        self.counts[kind] += 1
        if self.fixed is not None:
            plan = self.fixed.get(i) if self.calib_on else None
            return new if plan is None else self._emit(plan, new.args[0])
        x_in = self.layer_inputs[i] if self.layer_inputs is not None and self.calib_on else None
        start = time.perf_counter()
        # The weight and attrs come from the original call; the data from the visited one.
        try:
            if kind == "conv":
                record, plan = self._decide(call, name, x_in)
            else:
                record, plan = self._decide_fc(call, name, x_in)
        except EdgecompError as err:
            self.error = self.error or err
            return new
        record.seconds = time.perf_counter() - start
        self.owner.report.append(record)
        if self.owner.on_layer is not None:
            self.owner.on_layer(record, len(self.owner.report), self.total)
        if plan is None:
            return new
        if self.calib_on:
            self.plans[i], self.records[i] = plan, record
        return self._emit(plan, new.args[0])

    def _emit(self, plan: _Plan, data: relax.Expr) -> relax.Expr:
        if plan.kind == "fc":
            (f,) = plan.factors
            y = self.builder_.emit(relax.op.matmul(data, relax.const(f.a)))
            out = relax.op.matmul(y, relax.const(np.ascontiguousarray(f.b)))
        elif plan.method == "svd":  # a 1x1 conv: two thinner 1x1 convs
            (f,) = plan.factors
            g = plan.geom
            assert g is not None  # a conv plan
            geom = {"strides": g.strides, "padding": g.padding, "dilation": g.dilation}
            y = self.builder_.emit(_conv(data, f.a.T[:, :, None, None], **geom))
            out = _conv(y, f.b.T[:, :, None, None])
        else:
            spec, weights = chain_unit(plan, _static_shape(data))
            consts = [relax.const(np.ascontiguousarray(w, dtype=np.float32)) for w in weights]
            out = chain_call(self.builder_, spec, data, consts)
        if plan.bias_delta is not None:
            out = self.builder_.emit(out)
            self.bias_delta[out.__chandle__()] = plan.bias_delta
        return out

    def _shift_bias(self, add: relax.Call) -> relax.Expr:
        """``add(chain, bias)`` with the refit's change folded into the constant bias."""
        lhs, rhs = add.args
        delta = self.bias_delta.get(lhs.__chandle__()) if isinstance(lhs, relax.Var) else None
        if delta is None:
            return add
        bound = self.lookup_binding(rhs) if isinstance(rhs, relax.Var) else rhs
        if isinstance(bound, relax.Call) and bound.op == tvm.ir.Op.get("relax.reshape"):
            bound = bound.args[0]
        if not isinstance(bound, Constant):
            return add
        shape = _static_shape(rhs) or (delta.size,)
        bias = bound.value.numpy().reshape(-1) + delta
        return relax.op.add(lhs, relax.const(bias.reshape(shape).astype(np.float32)))

    def _decide_fc(self, call: relax.Call, name: str, x_in: np.ndarray | None):  # noqa: ANN202
        weight = _fc_weight(call, self.lookup_binding)
        assert weight is not None  # a candidate
        in_shape = _static_shape(call.args[0]) or ()
        record = LayerRecord(name, tuple(weight.shape), in_shape, "svd", kind="fc")
        rows = int(in_shape[0]) if in_shape else 1
        record.params_before = fc_cost(weight.shape)[0]
        record.flops_before = record.params_before * rows
        if weight.dtype != np.float32:
            record.skipped = f"weight dtype {weight.dtype} (only float32)"
            return record, None
        if min(weight.shape) < MIN_FC:
            record.skipped = f"small fully connected layer (min(N_in, N_out) < {MIN_FC})"
            return record, None
        x = None if x_in is None else x_in.reshape(-1, weight.shape[0]).astype(np.float64)
        return self._low_rank(record, weight, x, rows, "fc", None)

    def _decide_pointwise(
        self, record: LayerRecord, weight: np.ndarray, geom: ConvGeom, x_in: np.ndarray | None
    ):  # noqa: ANN202
        """A 1x1 conv as the matrix product it is: truncated SVD, as a fully connected layer."""
        record.method = "svd"
        matrix = np.ascontiguousarray(weight[:, :, 0, 0].T)  # [C, K]
        pixels = record.flops_before // max(record.params_before, 1)
        x = None if x_in is None else _pixel_rows(_strided(x_in, geom))
        return self._low_rank(record, matrix, x, pixels, "conv", geom)

    def _low_rank(  # noqa: ANN202
        self,
        record: LayerRecord,
        matrix: np.ndarray,
        x: np.ndarray | None,
        rows: int,
        kind: str,
        geom: ConvGeom | None,
    ):
        """Truncated SVD of a ``[N_in, N_out]`` weight applied to ``rows`` rows per inference
        (a fully connected layer, or a 1x1 conv's pixels); ``x``: calibration rows."""
        rank, factors = choose_fc_rank(self.owner.policy, matrix, x)
        if factors is None:
            record.skipped = _no_rank_reason(self.owner.policy)
            return record, None
        record.rank = rank
        record.params_after = fc_cost(matrix.shape, rank)[0]
        record.flops_after = record.params_after * rows
        record.weight_error = factors.error
        if x is not None:
            record.output_error = relative_error(x @ factors.weight(), x @ matrix)
        if record.params_after >= record.params_before and not self.owner.force:
            record.skipped = f"no FLOP saving at rank {rank}"
            record.params_after = record.flops_after = 0
            return record, None
        return record, _Plan(kind, "svd", geom, [factors])

    def _decide(self, call: relax.Call, name: str, x_in: np.ndarray | None):  # noqa: ANN202
        weight = call.args[1].value.numpy()
        attrs = call.attrs
        method = self.owner.method
        in_shape = _static_shape(call.args[0]) or ()
        record = LayerRecord(name, tuple(weight.shape), in_shape, method)  # type: ignore[arg-type]
        k, c, kh, kw = weight.shape if weight.ndim == 4 else (0, 0, 0, 0)
        groups = int(attrs.groups)
        reason = None
        if (attrs.data_layout, attrs.kernel_layout) != ("NCHW", "OIHW") or weight.ndim != 4:
            reason = f"layout {attrs.data_layout}/{attrs.kernel_layout} (only NCHW/OIHW)"
        elif len(in_shape) != 4:
            reason = "input shape is not static"
        else:
            conv = (_ints(attrs.strides), _ints(attrs.padding), _ints(attrs.dilation))
            geom = ConvGeom(in_shape[1:], weight.shape, *conv)  # type: ignore[arg-type]
            record.params_before, record.flops_before = dense_cost(geom)
            # A grouped conv is `groups` independent convs: each is decomposed on its own.
            k //= groups
            group = ConvGeom((c, *in_shape[2:]), (k, c, kh, kw), *conv)  # type: ignore[arg-type]
            if weight.dtype != np.float32:
                reason = f"weight dtype {weight.dtype} (only float32)"
            elif groups != 1 and method == "kronecker":
                reason = f"grouped conv (groups={groups}; GKPD takes groups=1 only)"
            elif c == 1 and groups > 1:
                reason = f"depthwise conv (groups={groups})"
            elif kh == 1 and kw == 1 and groups > 1:
                reason = f"grouped 1x1 conv (groups={groups})"
            elif min(k, c) < MIN_CHANNELS:
                per = " per group" if groups > 1 else ""
                reason = f"tiny channel count{per} (K={k}, C={c} < {MIN_CHANNELS})"
        if reason is not None:
            record.skipped = reason
            return record, None
        if kh == 1 and kw == 1:
            return self._decide_pointwise(record, weight, geom, x_in)
        weights = weight.reshape(groups, k, c, kh, kw)
        inputs: list[np.ndarray | None] = (
            [None] * groups if x_in is None else list(np.split(x_in, groups, axis=1))
        )
        chosen = [
            choose_rank(method, self.owner.policy, w, group, xg)
            for w, xg in zip(weights, inputs, strict=True)
        ]
        if any(f is None for _, f in chosen):
            record.skipped = _no_rank_reason(self.owner.policy)
            return record, None
        # One rank for every group (the grouped convs of the chain need equal group sizes):
        # the largest any group asked for.
        rank = max(r for r, _ in chosen)
        factors = [
            f if r == rank else factorize(method, w, rank)
            for (r, f), w in zip(chosen, weights, strict=True)
        ]
        shapes = factors[0].shapes if method == "kronecker" else None
        cost = chain_cost(method, group, rank, shapes)
        record.params_after, record.flops_after = cost[0] * groups, cost[1] * groups
        record.rank = tucker_ranks(group.w_shape, rank) if method == "tucker" else rank
        record.factor_shapes = shapes
        approx = np.concatenate([f.weight() for f in factors], axis=0)
        record.weight_error = relative_error(approx, weight)
        if x_in is not None:  # group by group, the output channels in order
            pairs = zip(np.split(x_in, groups, axis=1), weights, factors, strict=True)
            ref, out = zip(
                *(
                    (conv2d_nchw(x, w, *conv), conv2d_nchw(x, f.weight(), *conv))
                    for x, w, f in pairs
                ),
                strict=True,
            )  # noqa: E501
            record.output_error = relative_error(np.concatenate(out, 1), np.concatenate(ref, 1))
        if record.flops_after >= record.flops_before and not self.owner.force:
            record.skipped = f"no FLOP saving at rank {record.rank}"
            record.params_after = record.flops_after = 0
            return record, None
        return record, _Plan("conv", method, geom, factors)


def _conv(x: relax.Expr, w: np.ndarray, **kw: object) -> relax.Call:
    weight = relax.const(np.ascontiguousarray(w, dtype=np.float32))
    return relax.op.nn.conv2d(x, weight, out_dtype="float32", **kw)  # type: ignore[arg-type]


def _strided(x: np.ndarray, g: ConvGeom) -> np.ndarray:
    """The input pixels a 1x1 conv of geometry ``g`` reads (its padding and stride applied)."""
    pt, pl, pb, pr = g.padding
    x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    return x[:, :, :: g.strides[0], :: g.strides[1]]


def _pixel_rows(x: np.ndarray) -> np.ndarray:
    """``[N, C, H, W]`` -> ``[N*H*W, C]`` in float64."""
    return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1]).astype(np.float64)


def chain_unit(plan: _Plan, in_shape: tuple[int, ...] | None) -> tuple[ChainSpec, list]:
    """The chain spec and factors (one set per group, concatenated) of a CP / Tucker-2 / GKPD
    plan on an input of ``in_shape``: what its composite function takes."""
    g, fs = plan.geom, plan.factors
    assert g is not None and in_shape is not None  # a conv plan: static shapes were checked
    geom = ConvGeometry(tuple(g.strides), tuple(g.padding), tuple(g.dilation))  # type: ignore[arg-type]
    k, kernel, groups = g.w_shape[0], tuple(g.w_shape[2:]), len(fs)

    def cat(*parts: list[np.ndarray]) -> list[np.ndarray]:
        return [np.concatenate(p, axis=0) for p in parts]

    if plan.method == "cp":
        s, v, h, u = cat(
            [f.s.T for f in fs], [f.v.T for f in fs], [f.h.T for f in fs], [f.u for f in fs]
        )
        weights = [
            s[:, :, None, None],
            v[:, None, :, None],
            h[:, None, None, :],
            u[..., None, None],
        ]
        ranks: tuple[int, ...] = (fs[0].rank,)
        kind = "cp"
    elif plan.method == "tucker":
        u_in, core, u_out = cat([f.u_in.T for f in fs], [f.core for f in fs], [f.u_out for f in fs])
        weights = [u_in[:, :, None, None], core, u_out[:, :, None, None]]
        ranks, kind = (u_in.shape[0] // groups, core.shape[0] // groups), "tucker2"
    else:
        (f,) = fs
        (k1, c1, kh1, kw1), (k2, c2, kh2, kw2) = f.shapes
        weights, ranks, kind = [f.a, f.b], (f.rank, k1, c1, kh1, kw1, k2, c2, kh2, kw2), "gkpd"
    spec = ChainSpec(kind, in_shape, k, kernel, ranks, geom, False, groups=groups)  # type: ignore[arg-type]
    return spec, weights
