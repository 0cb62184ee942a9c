"""Factorizations and rank policies (edgecomp.decompose), against numpy references."""

from __future__ import annotations

import numpy as np
import pytest

from edgecomp.decompose import (
    ConvGeom,
    candidate_shapes,
    canonical_method,
    chain_cost,
    choose_rank,
    conv2d_nchw,
    cp_decompose,
    cp_max_rank,
    dense_cost,
    kronecker_decompose,
    parse_policy,
    tucker2_decompose,
)
from edgecomp.decompose.kronecker import kronecker_spectrum
from edgecomp.errors import EdgecompError

RNG = np.random.default_rng(0)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_cp_recovers_a_kernel_of_known_rank():
    factors = [RNG.standard_normal((d, 5)) for d in (24, 16, 3, 3)]
    w = np.einsum("kr,cr,ir,jr->kcij", *factors).astype(np.float32)
    exact = cp_decompose(w, 5)
    assert exact.rank == 5 and exact.u.shape == (24, 5) and exact.h.shape == (3, 5)
    assert exact.error < 1e-4 and rel(exact.weight(), w) < 1e-4
    assert cp_decompose(w, 4).error > 1e-2  # one term short cannot be exact


@pytest.mark.parametrize("shape", [(16, 4, 3, 3), (4, 16, 3, 3), (8, 8, 5, 1)])
def test_cp_at_full_rank_is_exact(shape):
    w = RNG.standard_normal(shape).astype(np.float32)
    f = cp_decompose(w, cp_max_rank(shape))
    assert f.rank == np.prod(shape) // max(shape)
    assert rel(f.weight(), w) < 1e-6


def test_tucker2_full_rank_is_exact_and_error_falls_with_rank():
    w = RNG.standard_normal((12, 8, 3, 3)).astype(np.float32)
    assert rel(tucker2_decompose(w, (12, 8)).weight(), w) < 1e-6
    errors = [tucker2_decompose(w, (r, r)).error for r in (2, 4, 6, 8)]
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.3
    f = tucker2_decompose(w, (6, 4))
    assert f.ranks == (6, 4) and f.core.shape == (6, 4, 3, 3)
    assert abs(f.error - rel(f.weight(), w)) < 1e-6


def test_kronecker_recovers_a_sum_of_known_products_and_reports_every_rank():
    a_shape, b_shape = (4, 2, 3, 1), (2, 4, 1, 3)
    a = RNG.standard_normal((2, *a_shape))
    b = RNG.standard_normal((2, *b_shape))
    w = (np.kron(a[0], b[0]) + np.kron(a[1], b[1])).astype(np.float32)
    assert w.shape == (8, 8, 3, 3)
    assert ((a_shape, b_shape)) in candidate_shapes(w.shape)
    f = kronecker_decompose(w, 2, (a_shape, b_shape))
    assert f.shapes == (a_shape, b_shape) and f.error < 1e-5 and rel(f.weight(), w) < 1e-5
    spectrum = kronecker_spectrum(w, (a_shape, b_shape))
    assert spectrum[0] == pytest.approx(1.0) and spectrum[2] < 1e-6 < spectrum[1]
    # The error policy finds the shapes and the rank by itself.
    geom = ConvGeom((8, 16, 16), w.shape, (1, 1), (1, 1, 1, 1), (1, 1))
    rank, found = choose_rank("kronecker", parse_policy("error=0.001"), w, geom)
    assert rank <= 2 and found.error < 1e-3


def test_kronecker_full_rank_is_exact_for_every_candidate_shape():
    w = RNG.standard_normal((8, 4, 3, 3)).astype(np.float32)
    for shapes in candidate_shapes(w.shape):
        full = int(min(np.prod(shapes[0]), np.prod(shapes[1])))
        assert rel(kronecker_decompose(w, full, shapes).weight(), w) < 1e-5, shapes


GEOM = ConvGeom((32, 16, 16), (64, 32, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
W = RNG.standard_normal(GEOM.w_shape).astype(np.float32)


@pytest.mark.parametrize("method", ["cp", "tucker", "kronecker"])
@pytest.mark.parametrize("kind, pick", [("flops", 1), ("params", 0)])
def test_reduction_policies_take_the_largest_rank_within_budget(method, kind, pick):
    rank, f = choose_rank(method, parse_policy(f"{kind}=3x"), W, GEOM)
    shapes = f.shapes if method == "kronecker" else None
    assert chain_cost(method, GEOM, rank, shapes)[pick] * 3 <= dense_cost(GEOM)[pick]
    assert chain_cost(method, GEOM, rank + 1, shapes)[pick] * 3 > dense_cost(GEOM)[pick]


@pytest.mark.parametrize("method, budget", [("cp", 0.6), ("tucker", 0.6), ("kronecker", 0.9)])
def test_error_budget_takes_the_smallest_rank_under_it(method, budget):
    # A random kernel is hard to compress: GKPD reaches 0.6 only past the FLOP break-even.
    rank, f = choose_rank(method, parse_policy(f"error={budget}"), W, GEOM)
    assert f.error <= budget
    if method == "kronecker":  # the smallest rank is per factor shape
        assert kronecker_spectrum(W, f.shapes)[rank - 1] > budget
    else:
        _, one_less = choose_rank(method, parse_policy(f"rank={rank - 1}"), W, GEOM)
        assert one_less.error > budget
    if method != "cp":  # (CP would run ALS at every rank of the binary search)
        assert choose_rank(method, parse_policy("error=0.01"), W, GEOM) == (0, None)


def test_output_policy_measures_the_layer_output_on_calibration_inputs():
    x = RNG.standard_normal((4, 32, 16, 16)).astype(np.float32)
    rank, f = choose_rank("tucker", parse_policy("output=0.5"), W, GEOM, x)
    ref = conv2d_nchw(x, W, (1, 1), (1, 1, 1, 1))
    assert rel(conv2d_nchw(x, f.weight(), (1, 1), (1, 1, 1, 1)), ref) <= 0.5
    _, one_less = choose_rank("tucker", parse_policy(f"rank={rank - 1}"), W, GEOM)
    assert rel(conv2d_nchw(x, one_less.weight(), (1, 1), (1, 1, 1, 1)), ref) > 0.5


def test_policy_strings_parse_and_print():
    assert str(parse_policy("flops=2x")) == "flops=2x"
    assert str(parse_policy(" rank = 8 ")) == "rank=8"
    assert str(parse_policy("rank=full")) == "rank=full"
    assert str(parse_policy("error=0.05")) == "error=0.05"


@pytest.mark.parametrize(
    "text, message",
    [
        ("bogus", "does not parse; allowed: rank=R | rank=full | params=3x"),
        ("flops=two", "does not parse"),
        ("rank=0", "rank must be an integer >= 1"),
        ("rank=2.5", "rank must be an integer >= 1"),
        ("flops=1x", "flops reduction must be > 1"),
        ("error=2", "error budget must be in (0, 1)"),
    ],
)
def test_bad_policies_name_the_flag_and_what_is_allowed(text, message):
    with pytest.raises(EdgecompError, match=r"--rank-policy") as err:
        parse_policy(text)
    assert message in str(err.value)


def test_unknown_method_and_rank_above_full_are_refused():
    with pytest.raises(EdgecompError, match=r"--decompose 'svd' is not a method; allowed: cp"):
        canonical_method("svd")
    with pytest.raises(EdgecompError, match=r"rank=289 exceeds the full rank 288 .* 1\.\.288"):
        choose_rank("cp", parse_policy("rank=289"), W, GEOM)
    with pytest.raises(EdgecompError, match=r"needs calibration inputs \(--calib"):
        choose_rank("cp", parse_policy("output=0.1"), W, GEOM)
