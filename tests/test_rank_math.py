"""rank.py against dense math: torch.linalg.svd / svdvals of the d×k product, in float64."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratool import rank as R
from loratool.errors import ValidationError


def dense_svdvals(B, A, scale):
    return torch.linalg.svdvals(scale * (B.double() @ A.double()))


def factors(d, k, r, seed, *, inner=None, zero=None, dtype=torch.float32):
    """B d×r, A r×k from a seed; ``inner`` < r makes B rank-deficient, ``zero`` zeroes B or A."""
    g = torch.Generator().manual_seed(seed)
    if inner is not None and inner < r:
        B = torch.randn(d, inner, generator=g) @ torch.randn(inner, r, generator=g)
    else:
        B = torch.randn(d, r, generator=g)
    A = torch.randn(r, k, generator=g) / math.sqrt(k)
    if zero == "B":
        B = torch.zeros_like(B)
    elif zero == "A":
        A = torch.zeros_like(A)
    return B.to(dtype), A.to(dtype)


def assert_spectrum_matches(S, B, A, scale):
    """The factored spectrum is the dense one: relative 1e-4 of σ₁, the rest of the dense ≈ 0."""
    ref = dense_svdvals(B, A, scale)
    m = min(B.shape[0], A.shape[1], B.shape[1])
    assert S.shape == (m,)
    assert bool((S[:-1] >= S[1:]).all()), "descending"
    top = float(ref[0]) if ref.numel() else 0.0
    atol = 1e-4 * top
    torch.testing.assert_close(S.double(), ref[:m], rtol=1e-4, atol=atol)
    if ref.numel() > m:  # values past min(d, k, r) are structurally zero
        assert float(ref[m:].abs().max()) <= 1e-5 * top + 1e-30


shapes = st.tuples(
    st.integers(1, 40),  # d
    st.integers(1, 40),  # k
    st.integers(1, 48),  # r: often > min(d, k)/2, sometimes > min(d, k)
    st.integers(0, 2**31 - 1),  # seed
    st.floats(-4, 4).filter(lambda s: abs(s) > 1e-3),  # scale, negative included
)


@settings(max_examples=150, deadline=None)
@given(shapes, st.sampled_from([None, "deficient", "B", "A"]))
def test_factored_svdvals_match_dense(shape, variant):
    d, k, r, seed, scale = shape
    inner = max(1, r // 3) if variant == "deficient" else None
    zero = variant if variant in ("B", "A") else None
    B, A = factors(d, k, r, seed, inner=inner, zero=zero)
    S = R.factored_svdvals(B, A, scale)
    assert S.dtype == torch.float32
    assert_spectrum_matches(S, B, A, scale)
    if zero:
        assert float(S.abs().max()) == 0.0


@settings(max_examples=80, deadline=None)
@given(shapes, st.booleans())
def test_factored_svd_reconstructs_and_is_orthonormal(shape, deficient):
    d, k, r, seed, scale = shape
    B, A = factors(d, k, r, seed, inner=max(1, r // 2) if deficient else None)
    U, S, Vh = R.factored_svd(B, A, scale)
    assert_spectrum_matches(S, B, A, scale)
    dense = scale * (B.double() @ A.double())
    torch.testing.assert_close(
        ((U.double() * S.double()) @ Vh.double()),
        dense,
        rtol=0,
        atol=1e-5 * float(dense.norm()) + 1e-12,
    )
    m = S.numel()
    eye = torch.eye(m, dtype=torch.float64)
    torch.testing.assert_close(U.double().T @ U.double(), eye, rtol=0, atol=1e-5)
    torch.testing.assert_close(Vh.double() @ Vh.double().T, eye, rtol=0, atol=1e-5)


def test_factored_svdvals_of_half_precision_and_large_rank():
    B, A = factors(64, 96, 80, seed=3)  # r > min(d, k)
    for dt in (torch.float16, torch.bfloat16):
        Bh, Ah = B.to(dt), A.to(dt)
        S = R.factored_svdvals(Bh, Ah, 2.0)
        assert S.dtype == torch.float32
        assert_spectrum_matches(S, Bh.float(), Ah.float(), 2.0)


def test_float64_input_stays_float64():
    B, A = factors(30, 20, 6, seed=1, dtype=torch.float64)
    S = R.factored_svdvals(B, A, 1.5)
    assert S.dtype == torch.float64
    torch.testing.assert_close(S, dense_svdvals(B, A, 1.5)[:6], rtol=1e-10, atol=1e-12)


def test_mismatched_factors_are_refused():
    with pytest.raises(ValidationError, match="ranks differ"):
        R.factored_svdvals(torch.randn(5, 3), torch.randn(4, 6))
    with pytest.raises(ValidationError, match="2-D"):
        R.factored_svdvals(torch.randn(5, 3, 1), torch.randn(3, 6))


# -- effective-rank measures --------------------------------------------------------------------


def test_exact_rank_three_module_has_numerical_rank_three():
    g = torch.Generator().manual_seed(7)
    B = torch.randn(128, 3, generator=g) @ torch.randn(3, 16, generator=g)  # r = 16, rank 3
    A = torch.randn(16, 96, generator=g)
    rep = R.rank_report(B, A, scale=0.125)
    assert rep["rank"] == 16
    assert rep["shape"] == [128, 96]
    assert rep["numerical_rank"] == 3
    assert rep["energy_rank"] <= 3
    assert len(rep["singular_values"]) == 16
    assert rep["energy"][2] == pytest.approx(1.0, abs=1e-10)
    assert rep["energy"][-1] == 1.0


def test_measures_on_known_spectra():
    for n in (1, 4, 16):
        flat = torch.full((n,), 2.5)
        assert R.entropy_rank(flat) == pytest.approx(n, rel=1e-12)
        assert R.stable_rank(flat) == pytest.approx(n, rel=1e-12)
        assert R.energy_rank(flat, 1.0) == n
        assert R.numerical_rank(flat, (n, n)) == n
    # One dominant value: both soft measures approach 1.
    spiky = torch.tensor([1.0, 1e-6, 1e-6, 1e-6])
    assert R.stable_rank(spiky) == pytest.approx(1.0, abs=1e-10)
    assert R.entropy_rank(spiky) == pytest.approx(1.0, abs=1e-4)
    assert R.numerical_rank(spiky, (4, 4)) == 4  # 1e-6 > 4·eps32
    assert R.numerical_rank(spiky, (100_000, 4)) == 1  # tolerance grows with the shape
    # σ² = 9, 4, 1 (total 14): shares 9/14, 13/14, 1.
    s = torch.tensor([3.0, 2.0, 1.0])
    assert R.energy_rank(s, 0.5) == 1
    assert R.energy_rank(s, 9 / 14) == 1
    assert R.energy_rank(s, 0.65) == 2
    assert R.energy_rank(s, 13 / 14) == 2
    assert R.energy_rank(s, 0.93) == 3
    assert R.stable_rank(s) == pytest.approx(14 / 9)
    p = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64) / 6
    assert R.entropy_rank(s) == pytest.approx(math.exp(float(-(p * p.log()).sum())))
    assert R.cumulative_energy(s) == pytest.approx([9 / 14, 13 / 14, 1.0])
    # Order of the input does not matter.
    assert R.energy_rank(torch.tensor([1.0, 3.0, 2.0]), 0.65) == 2


def test_measures_on_zero_spectrum():
    z = torch.zeros(5)
    assert R.numerical_rank(z, (10, 10)) == 0
    assert R.energy_rank(z, 0.99) == 0
    assert R.stable_rank(z) == 0.0
    assert R.entropy_rank(z) == 0.0
    assert R.cumulative_energy(z) == [0.0] * 5
    rep = R.rank_report(torch.zeros(10, 4), torch.randn(4, 7))
    assert rep["numerical_rank"] == rep["energy_rank"] == 0
    assert rep["singular_values"] == [0.0] * 4
    with pytest.raises(ValidationError):
        R.energy_rank(z, 0.0)


# -- truncate --------------------------------------------------------------------------------------


def dense_best(B, A, scale, k):
    U, S, Vh = torch.linalg.svd(scale * (B.double() @ A.double()), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k], S


@pytest.mark.parametrize("d,k,r", [(64, 48, 12), (40, 200, 24), (20, 10, 16)])
def test_truncate_to_full_rank_is_lossless(d, k, r):
    B, A = factors(d, k, r, seed=d + k)
    B2, A2, kept = R.truncate(B, A, 0.75, rank=r)
    assert kept == pytest.approx(1.0, abs=1e-12)
    assert B2.shape[1] == A2.shape[0] == min(d, k, r)
    ref = 0.75 * (B.double() @ A.double())
    assert float((B2.double() @ A2.double() - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("keep", [1, 3, 7])
def test_truncate_keeps_exactly_the_top_k_energy(keep):
    B, A = factors(80, 60, 12, seed=11)
    B2, A2, kept = R.truncate(B, A, 2.0, rank=keep)
    best, S = dense_best(B, A, 2.0, keep)
    s2 = S.square()
    assert kept == pytest.approx(float(s2[:keep].sum() / s2.sum()), rel=1e-5)
    assert B2.shape == (80, keep) and A2.shape == (keep, 60)
    assert float((B2.double() @ A2.double() - best).norm() / best.norm()) < 1e-5
    # Balanced factors: ‖B2 columns‖ = ‖A2 rows‖ = √σ.
    torch.testing.assert_close(B2.norm(dim=0), A2.norm(dim=1), rtol=1e-4, atol=0)


def test_truncate_by_energy():
    B, A = factors(50, 70, 10, seed=5)
    S = dense_svdvals(B, A, 1.0)
    share = torch.cumsum(S.square(), 0) / S.square().sum()
    for e in (0.5, 0.9, 0.99, 1.0):
        expect = int((share < e - 1e-12).sum()) + 1
        B2, A2, kept = R.truncate(B, A, 1.0, energy=e)
        assert B2.shape[1] == min(expect, 10)
        assert kept >= e - 1e-6


def test_truncate_zero_and_argument_errors():
    B2, A2, kept = R.truncate(torch.zeros(8, 4), torch.zeros(4, 6), 1.0, energy=0.9)
    assert kept == 1.0 and B2.shape == (8, 1) and float(B2.abs().max()) == 0.0
    with pytest.raises(ValidationError, match="exactly one"):
        R.truncate(torch.randn(8, 4), torch.randn(4, 6), 1.0)
    with pytest.raises(ValidationError, match="exactly one"):
        R.truncate(torch.randn(8, 4), torch.randn(4, 6), 1.0, rank=2, energy=0.5)


# -- lowrank_from_dense -----------------------------------------------------------------------------


def rank_r_matrix(d, k, r, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(d, r, generator=g) @ torch.randn(r, k, generator=g)) / math.sqrt(r)


@pytest.mark.parametrize("exact_limit", [4096, 16], ids=["exact", "randomized"])
@pytest.mark.parametrize("d,k", [(300, 400), (500, 260)])
def test_lowrank_from_dense_recovers_a_rank_r_matrix(exact_limit, d, k):
    M = rank_r_matrix(d, k, 6, seed=d)
    B, A, err = R.lowrank_from_dense(M, rank=6, exact_limit=exact_limit)
    assert B.shape == (d, 6) and A.shape == (6, k)
    measured = float((M.double() - B.double() @ A.double()).norm() / M.double().norm())
    assert measured < 1e-5
    assert err == pytest.approx(measured, rel=0.05, abs=1e-7)
    # energy mode finds the rank on both paths
    B, A, err = R.lowrank_from_dense(M, energy=0.999999, exact_limit=exact_limit)
    assert B.shape[1] == 6 and err < 1e-5


def test_lowrank_from_dense_truncation_error_and_determinism():
    g = torch.Generator().manual_seed(2)
    M = torch.randn(400, 300, generator=g)
    S = torch.linalg.svdvals(M.double())
    best = float(S[8:].square().sum().sqrt() / S.square().sum().sqrt())
    B, A, err = R.lowrank_from_dense(M, rank=8)
    assert err == pytest.approx(best, rel=1e-5)
    # randomized: a little worse than the optimum, the same on every call, RNG untouched
    state = torch.random.get_rng_state()
    r1 = R.lowrank_from_dense(M, rank=8, exact_limit=16, seed=5)
    r2 = R.lowrank_from_dense(M, rank=8, exact_limit=16, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(r1[0], r2[0]) and torch.equal(r1[1], r2[1])
    assert best <= r1[2] < best * 1.1
    # energy on the randomized path keeps at least the share asked for
    B, A, err = R.lowrank_from_dense(M, energy=0.3, exact_limit=16)
    assert 1 - err**2 >= 0.3 - 1e-6
    exact_k = int((torch.cumsum(S.square(), 0) / S.square().sum() < 0.3).sum()) + 1
    assert exact_k <= B.shape[1] <= exact_k + 3


def test_lowrank_from_dense_rank_not_much_smaller_uses_exact_svd():
    M = torch.randn(300, 200, generator=torch.Generator().manual_seed(9))
    exact = R.lowrank_from_dense(M, rank=150)
    forced = R.lowrank_from_dense(M, rank=150, exact_limit=16)  # 160 > 200/4: exact anyway
    assert torch.equal(exact[0], forced[0])


def test_lowrank_from_dense_zero_and_errors():
    B, A, err = R.lowrank_from_dense(torch.zeros(30, 20), rank=4)
    assert err == 0.0 and B.shape == (30, 4) and A.shape == (4, 20)
    B, A, err = R.lowrank_from_dense(torch.zeros(30, 20), energy=0.9)
    assert err == 0.0 and B.shape == (30, 1)
    B, A, err = R.lowrank_from_dense(torch.randn(30, 20), rank=50)  # clamps to min(d, k)
    assert B.shape == (30, 20) and err < 1e-5
    with pytest.raises(ValidationError):
        R.lowrank_from_dense(torch.randn(3, 4, 5), rank=2)
    with pytest.raises(ValidationError):
        R.lowrank_from_dense(torch.randn(3, 4), rank=2, energy=0.5)


# -- factor_dense: randomized SVD against the exact one -------------------------------------------


def spectrum_matrix(d, k, spectrum, seed=0):
    """U·diag(σ)·Vᵀ with orthonormal U, V (float64 QR) and the σ given: a known spectrum."""
    g = torch.Generator().manual_seed(seed)
    n = len(spectrum)
    U = torch.linalg.qr(torch.randn(d, n, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(k, n, generator=g, dtype=torch.float64)).Q
    return ((U * torch.tensor(spectrum, dtype=torch.float64)) @ V.T).float()


def optimum(M, k):
    """Eckart–Young: the least relative Frobenius error of any rank-k approximation."""
    S = torch.linalg.svdvals(M.double())
    return float(S[k:].square().sum().sqrt() / S.square().sum().sqrt())


def measured(M, f):
    return float((M.double() - f.B.double() @ f.A.double()).norm() / M.double().norm())


SPECTRA = {
    "flat": [1.0] * 120,
    "decaying": [1 / (i + 1) ** 0.5 for i in range(120)],  # slow: the hard case
    "exponential": [math.exp(-i / 12) for i in range(120)],
}


@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.parametrize("k", [8, 24])
def test_randomized_within_one_percent_of_the_exact_svd(name, k):
    M = spectrum_matrix(300, 420, SPECTRA[name], seed=k)
    f = R.factor_dense(M, R.RankRule("rank", k))
    assert f.method == "randomized" and f.rank == k and f.q == k + 10
    best = optimum(M, k)
    assert best * (1 - 1e-5) <= f.error <= best * 1.01  # measured to ~1e-5 of itself
    assert f.error == pytest.approx(measured(M, f), rel=1e-4)  # measured, not estimated
    exact = R.factor_dense(M, R.RankRule("rank", k), exact=True)
    assert exact.method == "exact" and exact.error == pytest.approx(best, rel=1e-4)


def test_randomized_recovers_an_exactly_low_rank_matrix_exactly():
    M = spectrum_matrix(300, 420, [3.0, 2.0, 1.5, 1.0, 0.5, 0.25, 0.1])
    for rule in (
        R.RankRule("rank", 7),
        R.RankRule("energy", 0.999999),
        R.RankRule("sv_fro", 0.9999999),
        R.RankRule("sv_ratio", 1000),
        R.RankRule("sv_epsilon", 1e-3),
    ):
        f = R.factor_dense(M, rule)
        assert f.method == "randomized", rule
        assert f.rank == 7, rule  # the exact rank, recovered exactly
        assert f.error < 1e-6 and measured(M, f) < 1e-6, rule
    f = R.factor_dense(M, R.RankRule("rank", 12))
    assert f.rank == 12 and f.error < 1e-6  # asking for more costs nothing in error


def test_dynamic_rules_on_randomized_match_exact():
    M = spectrum_matrix(300, 420, SPECTRA["exponential"])
    for rule in (
        R.RankRule("energy", 0.9),
        R.RankRule("sv_fro", 0.95),
        R.RankRule("sv_ratio", 20),
        R.RankRule("sv_epsilon", 0.2),
        R.RankRule("energy", 0.999, max_rank=30),
    ):
        fast = R.factor_dense(M, rule)
        slow = R.factor_dense(M, rule, exact=True)
        assert fast.method == "randomized" and slow.method == "exact"
        assert abs(fast.rank - slow.rank) <= 1, rule
        if rule.method in ("energy", "sv_fro") and rule.max_rank is None:
            # never short of the share asked for
            share = rule.value if rule.method == "energy" else rule.value**2
            assert 1 - fast.error**2 >= share - 1e-6
        if rule.max_rank is not None:
            assert fast.rank == slow.rank == rule.max_rank
    # sv_cumulative needs Σσ, hence every σ: always the exact SVD
    assert R.factor_dense(M, R.RankRule("sv_cumulative", 0.5)).method == "exact"


def test_randomized_is_seeded_and_leaves_the_global_rng_alone():
    M = spectrum_matrix(200, 300, SPECTRA["decaying"])
    state = torch.random.get_rng_state()
    a = R.factor_dense(M, R.RankRule("rank", 6), seed=3)
    b = R.factor_dense(M, R.RankRule("rank", 6), seed=3)
    c = R.factor_dense(M, R.RankRule("rank", 6), seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.B, b.B) and torch.equal(a.A, b.A)
    assert not torch.equal(a.B, c.B)
    assert c.error == pytest.approx(a.error, rel=0.01)


def test_factor_dense_small_and_zero_matrices():
    M = spectrum_matrix(20, 30, [1.0, 0.5, 0.25])
    f = R.factor_dense(M, R.RankRule("rank", 8))  # 2·(8 + 10) > 20: exact
    assert f.method == "exact" and f.rank == 8 and f.error < 1e-6
    z = R.factor_dense(torch.zeros(30, 20), R.RankRule("energy", 0.9))
    assert z.rank == 1 and z.error == 0.0
    h = R.factor_dense(M, R.RankRule("rank", 2), out_dtype=torch.bfloat16)
    assert h.B.dtype == torch.bfloat16
    assert h.error == pytest.approx(measured(M, h), rel=1e-4)  # measured after rounding


@pytest.mark.parametrize("noise", [3.0, 0.3, 0.1, 1e-3, 0.0])
def test_measured_error_is_the_float64_residual(noise):
    # Factors of a rank-5 part; the noise sets the error from ~0.9 down to 0 (exact).
    g = torch.Generator().manual_seed(11)
    B, A = torch.randn(400, 5, generator=g), torch.randn(5, 300, generator=g)
    M = B @ A + noise * torch.randn(400, 300, generator=g)
    want = float((M.double() - B.double() @ A.double()).norm() / M.double().norm())
    got = R.measured_error(M, B, A)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
    bf = B.to(torch.bfloat16), A.to(torch.bfloat16)  # on the factors as stored
    want = float((M.double() - bf[0].double() @ bf[1].double()).norm() / M.double().norm())
    assert R.measured_error(M, *bf) == pytest.approx(want, rel=1e-5, abs=1e-7)
