"""Calibrated refit: each decomposed layer's last factor and bias, by least squares.

Without training, a factor chain only approximates its dense layer, and the errors of the
layers before it add up. With calibration inputs, edgecomp refits, layer by layer in network
order, the chain's last factor (CP's ``U``, Tucker-2's ``U_out``, GKPD's ``A``, the fully
connected layer's ``B``) and a change to its bias so that the chain's output matches the dense
network's output of that layer, on the inputs that the already decomposed and refit network
feeds it:

    min over (L, d) of || Z L + d - T ||,   Z = the chain up to its last factor, on those inputs,
                                            T = the dense layer's output in the dense network.

The first factors stay as the rank policy chose them; only a linear least-squares problem per
layer is solved (no gradient, no training). Each layer's inputs come from compiling the network
decomposed so far for the host and running it on the calibration data, so the refit costs one
such run per decomposed layer. GKPD's last factor ``A`` is shared by the ``K2`` output channel
groups (each group reads its own slice of the permuted intermediate): their rows are stacked
into one problem, each group with its own bias change (see :func:`_refit_gkpd`). A refit that
would raise a layer's output error on the calibration inputs is discarded.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import tvm
from tvm import relax
from tvm.ir import IRModule
from tvm.ir.expr import Constant

from edgecomp.decompose import conv2d_nchw
from edgecomp.progress import console

if TYPE_CHECKING:
    from edgecomp.passes.decompose_conv import DecomposeConv, LayerRecord, _Plan

# Candidate layers a decomposed layer leaves in ``main``, per method: a chain is one call of its
# composite function (no candidate), an SVD two thinner layers with constant weights.
_CHAIN_CANDIDATES = {"cp": 0, "tucker": 0, "kronecker": 0, "svd": 2}


def refit_plans(
    mod: IRModule,
    owner: DecomposeConv,
    plans: dict[int, _Plan],
    records: dict[int, LayerRecord],
    dense_inputs: list[np.ndarray],
) -> dict[int, _Plan]:
    """Refit every plan of ``main`` in network order; return the refit plans by layer index.

    ``records`` get ``refit_error`` = (output error before, after) on the calibration inputs,
    against the dense network's output of the layer.
    """
    from edgecomp.passes.decompose_conv import _candidates, _fc_weight, _Rewriter, layer_inputs

    main = mod["main"]
    bound = {b.var: b.value for block in main.body.blocks for b in block.bindings}
    calls = _candidates(main, owner.fc)
    done: dict[int, _Plan] = {}
    shift = 0
    for i in sorted(plans):
        plan = plans[i]
        start = time.perf_counter()
        if done:  # this layer's input in the network decomposed (and refit) so far
            current = _Rewriter(mod, owner, None, fixed=done).run()
            assert owner.calib is not None  # refit needs it (checked by DecomposeConv)
            x = layer_inputs(current, owner.calib, fc=owner.fc)[i + shift]
        else:
            x = dense_inputs[i]
        call = calls[i]
        if plan.kind == "fc":
            weight = _fc_weight(call, bound.get)
            assert weight is not None
            target = dense_inputs[i].reshape(-1, weight.shape[0]).astype(np.float64) @ weight
        else:
            attrs = call.args[1].value.numpy(), plan.geom
            target = _dense_conv(dense_inputs[i], *attrs)
        has_bias = _has_constant_bias(main, call, bound)
        refit = _refit_gkpd if plan.method == "kronecker" else _refit
        new_plan, errors = refit(plan, x, target, has_bias)
        records[i].refit_error = errors
        console.print(
            f"  refit {records[i].name:8} output error {errors[0]:.4f} -> {errors[1]:.4f}"
            f"  ({time.perf_counter() - start:.1f} s)",
            soft_wrap=True,
        )
        done[i] = new_plan
        shift += _CHAIN_CANDIDATES[plan.method] - 1
    return done


def _dense_conv(x: np.ndarray, weight: np.ndarray, geom) -> np.ndarray:  # noqa: ANN001
    groups = x.shape[1] // weight.shape[1]
    conv = (geom.strides, geom.padding, geom.dilation)
    parts = zip(np.split(x, groups, axis=1), np.split(weight, groups, axis=0), strict=True)
    return np.concatenate([conv2d_nchw(xg, wg, *conv) for xg, wg in parts], axis=1)


def _has_constant_bias(main: relax.Function, call: relax.Call, bound: dict) -> bool:
    """Whether ``call``'s result feeds ``add(result, constant bias)``, the importer's bias."""
    var = next((v for v, value in bound.items() if value.same_as(call)), None)
    for value in bound.values():
        if (
            isinstance(value, relax.Call)
            and value.op.same_as(tvm.ir.Op.get("relax.add"))
            and var is not None
            and value.args[0].same_as(var)
        ):
            rhs = value.args[1]
            rhs = bound.get(rhs, rhs) if isinstance(rhs, relax.Var) else rhs
            if isinstance(rhs, relax.Call) and rhs.op.same_as(tvm.ir.Op.get("relax.reshape")):
                rhs = rhs.args[0]
            return isinstance(rhs, Constant)
    return False


def _refit(
    plan: _Plan, x: np.ndarray, target: np.ndarray, has_bias: bool
) -> tuple[_Plan, tuple[float, float]]:
    """Least-squares refit of one plan's last factors (and bias change) on inputs ``x``."""
    groups = len(plan.factors)
    if plan.kind == "fc":
        xs, ts = [x.reshape(-1, plan.factors[0].a.shape[0])], [target]
    else:
        xs = np.split(x, groups, axis=1)
        ts = np.split(target, groups, axis=1)
    new_factors, deltas = [], []
    before_parts, after_parts = [], []
    for f, xg, tg in zip(plan.factors, xs, ts, strict=True):
        z, last = _inner(plan, f, xg)  # z [M, R], last [R, K_g]
        t = tg.reshape(-1, last.shape[1]) if plan.kind == "fc" else _rows(tg)
        design = np.concatenate([z, np.ones((len(z), 1))], axis=1) if has_bias else z
        gram = design.T @ design
        gram += 1e-8 * max(float(np.trace(gram)) / len(gram), 1e-30) * np.eye(len(gram))
        theta = np.linalg.solve(gram, design.T @ t)
        old = z @ last
        new = design @ theta
        if np.linalg.norm(new - t) > np.linalg.norm(old - t):  # never worse than the policy's
            theta = np.concatenate([last, np.zeros((1, last.shape[1]))]) if has_bias else last
            new = old
        before_parts.append(old - t)
        after_parts.append(new - t)
        new_factors.append(_with_last(plan, f, theta[: last.shape[0]]))
        deltas.append(theta[-1] if has_bias else np.zeros(last.shape[1]))
    norm = np.sqrt(sum(float(np.sum(_rows(p) ** 2)) for p in ts)) if plan.kind != "fc" else None
    norm = norm if norm is not None else float(np.linalg.norm(target))
    before = np.sqrt(sum(float(np.sum(p**2)) for p in before_parts)) / max(norm, 1e-30)
    after = np.sqrt(sum(float(np.sum(p**2)) for p in after_parts)) / max(norm, 1e-30)
    delta = np.concatenate(deltas).astype(np.float32) if has_bias else None
    return replace(plan, factors=new_factors, bias_delta=delta), (float(before), float(after))


def _rows(y: np.ndarray) -> np.ndarray:
    """``[N, K, H, W]`` -> ``[N*H*W, K]``."""
    return np.moveaxis(y, 1, -1).reshape(-1, y.shape[1]).astype(np.float64)


def _inner(plan: _Plan, f, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """The chain up to its last factor on ``x`` as rows ``[M, R]``, and the last factor
    ``[R, K]`` (so the chain's output is their product)."""
    if plan.kind == "fc":
        return x.astype(np.float64) @ f.a, f.b.astype(np.float64)
    g = plan.geom
    assert g is not None  # a conv plan
    conv = (g.strides, g.padding, g.dilation)
    if plan.method == "svd":  # a 1x1 conv: A as a 1x1 kernel with the conv's geometry
        kernel = np.ascontiguousarray(f.a.T)[:, :, None, None]
        return _rows(conv2d_nchw(x, kernel, *conv)), f.b.astype(np.float64)
    if plan.method == "cp":  # S, V, H as one rank-R conv: G[r, c, i, j] = S[c, r] V[i, r] H[j, r]
        kernel = np.einsum("cr,ir,jr->rcij", f.s, f.v, f.h)
        return _rows(conv2d_nchw(x, kernel, *conv)), f.u.T.astype(np.float64)
    # Tucker-2: G[a, c, i, j] = sum_b core[a, b, i, j] U_in[c, b]
    kernel = np.einsum("abij,cb->acij", f.core, f.u_in)
    return _rows(conv2d_nchw(x, kernel, *conv)), f.u_out.T.astype(np.float64)


def _with_last(plan: _Plan, f, last: np.ndarray):  # noqa: ANN001, ANN202
    """``f`` with its last factor replaced (``last`` is ``[R, K]``); the weight error is that
    of the refit chain's weight."""
    last32 = np.ascontiguousarray(last, dtype=np.float32)
    if plan.kind == "fc" or plan.method == "svd":
        return replace(f, b=last32)
    if plan.method == "cp":
        return replace(f, u=np.ascontiguousarray(last32.T))
    return replace(f, u_out=np.ascontiguousarray(last32.T))


def _refit_gkpd(
    plan: _Plan, x: np.ndarray, target: np.ndarray, has_bias: bool, chunk: int = 16
) -> tuple[_Plan, tuple[float, float]]:
    """Least-squares refit of a GKPD chain's ``A`` (and bias change) on inputs ``x``.

    With ``z[c1, r, k2]`` the first conv's output (``B_r`` on input channel group ``c1``), output
    channel ``k1*K2 + k2`` is ``sum over (r, c1, i1, j1) of A_r[k1, c1, i1, j1]`` times a strided
    patch of ``z[c1, r, k2]`` (:mod:`edgecomp.decompose.kronecker`): for every ``k2`` a problem
    ``Z_k2 A + d_k2 = T_k2`` in the same ``A [R*C1*kh1*kw1, K1]``. The ``K2`` problems are
    stacked; the per-channel bias changes ``d_k2`` are eliminated by centering each group's rows.
    Only Gram matrices are kept, accumulated over ``chunk`` samples at a time.
    """
    (f,) = plan.factors
    g = plan.geom
    assert g is not None  # a conv plan
    (k1, c1, kh1, kw1), (k2, c2, kh2, kw2) = f.shapes
    r = f.rank
    (sh, sw), (dh, dw) = g.strides, g.dilation
    n_feat = r * c1 * kh1 * kw1
    wb = f.b.reshape(r * k2, c2, kh2, kw2)
    ho, wo = target.shape[2:]
    gram, cross = np.zeros((n_feat, n_feat)), np.zeros((n_feat, k1))
    z_sum, t_sum = np.zeros((k2, n_feat)), np.zeros((k2, k1))
    t_sq, rows = 0.0, 0
    for s in range(0, len(x), chunk):
        xs = np.split(x[s : s + chunk], c1, axis=1)
        z = np.stack([conv2d_nchw(xg, wb, (1, 1), g.padding, g.dilation) for xg in xs], axis=1)
        z = z.reshape(len(z), c1, r, k2, *z.shape[-2:])  # [n, C1, R, K2, Hz, Wz]
        t = target[s : s + chunk].reshape(len(z), k1, k2, ho, wo).astype(np.float64)
        for q in range(k2):
            patches = [
                z[:, :, :, q, i * kh2 * dh :: sh, j * kw2 * dw :: sw][..., :ho, :wo]
                for i in range(kh1)
                for j in range(kw1)
            ]  # each [n, C1, R, Ho, Wo]
            zq = np.stack(patches, axis=3).transpose(0, 4, 5, 2, 1, 3).reshape(-1, n_feat)
            tq = _rows(t[:, :, q])
            gram += zq.T @ zq
            cross += zq.T @ tq
            z_sum[q] += zq.sum(axis=0)
            t_sum[q] += tq.sum(axis=0)
            t_sq += float(np.sum(tq**2))
        rows += len(z) * ho * wo

    def error(a: np.ndarray, d: np.ndarray) -> float:
        """|| Z_k2 A + d_k2 - T_k2 || over every k2, relative to || T ||, from the sums."""
        sq = np.sum(a * (gram @ a)) - 2 * np.sum(a * cross) + t_sq
        sq += 2 * np.sum(d * (z_sum @ a - t_sum)) + rows * np.sum(d**2)
        return float(np.sqrt(max(sq, 0.0) / max(t_sq, 1e-30)))

    old = f.a.transpose(0, 2, 3, 4, 1).reshape(n_feat, k1).astype(np.float64)
    lhs, rhs = gram, cross
    if has_bias:  # center each group: d_k2 = mean(T_k2) - mean(Z_k2) A
        lhs = gram - z_sum.T @ z_sum / rows
        rhs = cross - z_sum.T @ t_sum / rows
    lhs = lhs + 1e-8 * max(float(np.trace(lhs)) / n_feat, 1e-30) * np.eye(n_feat)
    a = np.linalg.solve(lhs, rhs)
    d = (t_sum - z_sum @ a) / rows if has_bias else np.zeros((k2, k1))
    before, after = error(old, np.zeros((k2, k1))), error(a, d)
    if after > before:  # never worse than the policy's
        a, d, after = old, np.zeros((k2, k1)), before
    new_a = a.reshape(r, c1, kh1, kw1, k1).transpose(0, 4, 1, 2, 3).astype(np.float32)
    delta = d.T.reshape(-1).astype(np.float32) if has_bias else None  # channel k1*K2 + k2
    new = replace(f, a=np.ascontiguousarray(new_a))
    return replace(plan, factors=[new], bias_delta=delta), (before, after)
