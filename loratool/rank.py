"""Rank math on LoRA factors: factored SVD, effective-rank measures, truncation, extraction.

Pure functions on 2-D tensors; no I/O and no adapter objects (``transform.py`` maps layer kinds
onto them). Throughout, B is d×r, A is r×k and the update they stand for is ΔW = scale·B·A.

Why factored: the d×k product of a 4096×11008 module is 45M entries and a dense SVD of it takes
tens of seconds, but its rank is at most r. With B = Q_B·R_B and Aᵀ = Q_A·R_A (reduced QR,
Q's columns orthonormal), ΔW = Q_B·(scale·R_B·R_Aᵀ)·Q_Aᵀ, so the singular values of ΔW are those
of the small core C = scale·R_B·R_Aᵀ and its singular vectors are Q_B·U_C and V_Cᵀ·Q_Aᵀ. Cost
O((d+k)·r²) instead of O(d·k·min(d, k)).

Precision: factors are upcast to float32 (float64 stays float64), the QRs run in that dtype
(Householder QR is backward stable, so singular values are accurate to about eps·σ₁), and the
r×r core is formed and decomposed in float64, where it costs nothing. Results are float32 (or
float64 for float64 input), rounded once at the end.
"""

from __future__ import annotations

import itertools
import math

from .errors import ValidationError

# The tolerance of numerical_rank is LAPACK's / numpy.matrix_rank's: σ₁·max(d, k)·eps, with eps
# that of float32, the precision every factor is computed in.
EPS_FLOAT32 = 2.0**-23


def _work_dtype(*tensors):
    import torch

    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_factors(B, A) -> None:
    if B.dim() != 2 or A.dim() != 2:
        raise ValidationError(
            f"factors must be 2-D (B d×r, A r×k), got B {list(B.shape)} and A {list(A.shape)}"
        )
    if B.shape[1] != A.shape[0]:
        raise ValidationError(
            f"B is {list(B.shape)} and A is {list(A.shape)}: their ranks differ ({B.shape[1]} vs {A.shape[0]})"
        )


def _core(B, A, scale: float, *, with_q: bool):
    """(Q_B, C, Q_A) with scale·B·A = Q_B·C·Q_Aᵀ; C in float64, Q_B/Q_A None unless with_q.

    Reduced QR of a d×r B with r > d gives Q d×d and R d×r, so C is min(d, r)×min(k, r) and its
    SVD yields min(d, k, r) singular values: every one ΔW can have that is not structurally 0.
    """
    import torch

    _check_factors(B, A)
    dt = _work_dtype(B, A)
    B = B.to(dt)
    # A.T of a row-major A is column-major, the layout LAPACK wants: no copy before geqrf.
    At = A.to(dt).T
    if with_q:
        Q_B, R_B = torch.linalg.qr(B, mode="reduced")
        Q_A, R_A = torch.linalg.qr(At, mode="reduced")
    else:
        Q_B = Q_A = None
        R_B = torch.linalg.qr(B, mode="r").R
        R_A = torch.linalg.qr(At, mode="r").R
    C = (R_B.to(torch.float64) @ R_A.to(torch.float64).T) * float(scale)
    return Q_B, C, Q_A


def factored_svd(B, A, scale: float = 1.0):
    """(U, S, Vh) of scale·B·A without forming the d×k product.

    U is d×m, S has m values in descending order, Vh is m×k, with m = min(d, k, r); the
    product U·diag(S)·Vh equals scale·B·A. Zero or rank-deficient factors are fine: their
    extra singular values come out as 0 (or at rounding level), U and Vh stay orthonormal.
    """
    import torch

    Q_B, C, Q_A = _core(B, A, scale, with_q=True)
    dt = Q_B.dtype
    Uc, S, Vhc = torch.linalg.svd(C, full_matrices=False)
    U = Q_B @ Uc.to(dt)
    Vh = Vhc.to(dt) @ Q_A.T
    return U, S.to(dt), Vh


def factored_svdvals(B, A, scale: float = 1.0):
    """The singular values of scale·B·A (descending, min(d, k, r) of them), via R factors only.

    Skips forming Q_B, Q_A and the singular vectors: about half the work of factored_svd.
    """
    import torch

    _, C, _ = _core(B, A, scale, with_q=False)
    return torch.linalg.svdvals(C).to(_work_dtype(B, A))


# -- effective-rank measures -------------------------------------------------------------------
# Each takes a 1-D tensor (or sequence) of singular values and is defined for an all-zero
# spectrum: every measure is 0 there, the rank of the zero matrix. They run in plain Python
# floats (float64) with math.fsum: for r values a few dozen torch calls on tiny tensors would
# cost more than the factored SVD itself.


def _spectrum(S) -> list[float]:
    """Non-negative, descending Python floats: the measures do not trust their input's order."""
    values = S.detach().flatten().tolist() if hasattr(S, "tolist") else [float(x) for x in S]
    return sorted((abs(x) for x in values), reverse=True)


def _cumulative(s: list[float]) -> list[float]:
    running = list(itertools.accumulate(x * x for x in s))
    total = running[-1] if running else 0.0
    if total == 0.0:
        return [0.0] * len(s)
    # Dividing by the running sum's own last value (not a separately rounded total) makes the
    # share exactly 1 from the last non-zero σ on, so energy_rank(S, 1.0) counts only those.
    return [x / total for x in running]


def _energy_rank(cum: list[float], threshold: float) -> int:
    if not 0 < threshold <= 1:
        raise ValidationError(f"energy threshold must be in (0, 1], got {threshold}")
    if not cum or cum[-1] == 0.0:
        return 0
    return next(i + 1 for i, e in enumerate(cum) if e >= threshold)  # cum[-1] is 1


def cumulative_energy(S) -> list[float]:
    """Cumulative share of Σσ² held by the first 1, 2, … singular values (all 0 when S is 0)."""
    return _cumulative(_spectrum(S))


def numerical_rank(S, shape) -> int:
    """Count of σᵢ > σ₁·max(d, k)·eps(float32): the rank the arithmetic can resolve."""
    s = _spectrum(S)
    if not s:
        return 0
    tol = s[0] * max(int(shape[0]), int(shape[1])) * EPS_FLOAT32
    return sum(1 for x in s if x > tol)


def energy_rank(S, threshold: float = 0.99) -> int:
    """The fewest singular values whose σ² hold ``threshold`` of Σσ² (0 for a zero spectrum)."""
    return _energy_rank(_cumulative(_spectrum(S)), threshold)


def stable_rank(S) -> float:
    """Σσ²/σ₁² (= ‖ΔW‖_F²/‖ΔW‖₂²): between 1 and the rank, insensitive to tiny σ."""
    s = _spectrum(S)
    if not s or s[0] == 0.0:
        return 0.0
    return math.fsum(x * x for x in s) / (s[0] * s[0])


def entropy_rank(S) -> float:
    """exp(H(p)) with p = σ/Σσ (Roy & Vetterli's effective rank): n for n equal σ."""
    s = _spectrum(S)
    total = math.fsum(s)
    if total == 0.0:
        return 0.0
    h = -math.fsum(p * math.log(p) for p in (x / total for x in s) if p > 0)
    return math.exp(h)


def rank_report(B, A, scale: float = 1.0, threshold: float = 0.99) -> dict:
    """Everything inspect-rank says about one module, from its factors.

    Keys: shape [d, k], rank (r, the stored rank), numerical_rank, energy_rank (at
    ``threshold``), stable_rank, entropy_rank, singular_values (descending, min(d, k, r) floats)
    and energy (cumulative share of Σσ² for the first 1, 2, … values).
    """
    values = factored_svdvals(B, A, scale).tolist()
    s = _spectrum(values)
    cum = _cumulative(s)
    shape = [int(B.shape[0]), int(A.shape[1])]
    return {
        "shape": shape,
        "rank": int(B.shape[1]),
        "numerical_rank": numerical_rank(s, shape),
        "energy_rank": _energy_rank(cum, threshold),
        "stable_rank": stable_rank(s),
        "entropy_rank": entropy_rank(s),
        "singular_values": s,
        "energy": cum,
    }


# -- truncation ----------------------------------------------------------------------------------


def _pick_rank(S, n: int, rank: int | None, energy: float | None) -> int:
    """How many leading singular values to keep: at least 1, at most n."""
    if (rank is None) == (energy is None):
        raise ValidationError("give exactly one of rank and energy")
    if rank is not None:
        if rank < 1:
            raise ValidationError(f"rank must be at least 1, got {rank}")
        return min(int(rank), n)
    return max(1, min(energy_rank(S, energy), n))


def _kept_energy(S, k: int) -> float:
    squares = [x * x for x in _spectrum(S)]
    total = math.fsum(squares)
    return 1.0 if total == 0.0 else math.fsum(squares[:k]) / total


def truncate(B, A, scale: float = 1.0, rank: int | None = None, energy: float | None = None):
    """Best rank-k approximation of scale·B·A, as factors for scale 1: (B2, A2, kept_energy).

    Give exactly one of ``rank`` (k = min(rank, min(d, k, r))) or ``energy`` (k = the fewest
    σ holding that share of Σσ², at least 1). B2 = U_k·√S_k (d×k) and A2 = √S_k·Vh_k (k×k_in),
    so B2·A2 = U_k·S_k·Vh_k, the Eckart–Young optimum, with the scale already inside: store
    them with alpha = k (or alpha = √k for rsLoRA) so the new scale is 1, or divide both by
    √s to keep a chosen scale s. √S on both sides balances their norms, as LoRA training does.
    kept_energy = Σ_{i<k} σᵢ² / Σ σᵢ² (1.0 when ΔW is 0).
    """
    U, S, Vh = factored_svd(B, A, scale)
    k = _pick_rank(S, S.numel(), rank, energy)
    root = S[:k].sqrt()
    B2 = U[:, :k] * root
    A2 = root[:, None] * Vh[:k]
    return B2.contiguous(), A2.contiguous(), _kept_energy(S, k)


# -- extraction from a dense ΔW --------------------------------------------------------------------


def _relative_residual(M, B, A, chunk_rows: int = 1024) -> float:
    """‖M − B·A‖_F / ‖M‖_F (0 when M is 0), a row block at a time to hold memory to one block."""
    import torch

    num = den = 0.0
    for i in range(0, M.shape[0], chunk_rows):
        block = M[i : i + chunk_rows]
        num += float((block - B[i : i + chunk_rows] @ A).square().sum(dtype=torch.float64))
        den += float(block.square().sum(dtype=torch.float64))
    return 0.0 if den == 0.0 else math.sqrt(num / den)


def _svd_lowrank(M, q: int, niter: int, seed: int):
    """torch.svd_lowrank (Halko et al.) with its random test matrix drawn from ``seed``.

    svd_lowrank draws from the global generator of M's device; fork_rng restores that
    generator's state afterwards, so the seed neither leaks nor depends on the caller's RNG.
    """
    import torch

    dev = M.device
    cuda = dev.type == "cuda"
    index = (dev.index if dev.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else []):
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        else:
            torch.random.default_generator.manual_seed(seed)
        U, S, V = torch.svd_lowrank(M, q=q, niter=niter)
    return U, S, V.T


def lowrank_from_dense(
    delta,
    rank: int | None = None,
    energy: float | None = None,
    *,
    exact_limit: int = 4096,
    oversample: int = 10,
    niter: int = 2,
    seed: int = 0,
):
    """Factors (B, A) for scale 1 with B·A ≈ delta, and ‖delta − B·A‖_F / ‖delta‖_F.

    Exact path: torch.linalg.svd when min(d, k) ≤ ``exact_limit``, or when the rank asked for
    is not much smaller than min(d, k) (rank + oversample > min(d, k)/4, where a randomized SVD
    saves little), or when ``energy`` cannot be reached cheaply (below). Randomized path:
    torch.svd_lowrank with q = rank + ``oversample`` columns and ``niter`` power iterations,
    its test matrix seeded by ``seed`` so the result is the same on every run.

    ``energy`` needs the spectrum's tail. Exact path: the full spectrum, so k is the exact
    energy rank. Randomized path: ‖delta‖_F² is computed exactly, and q doubles (from 64)
    until the estimated leading σ hold ``energy`` of it with ``oversample`` columns to spare;
    past min(d, k)/4 columns it falls back to the exact SVD. Estimated σ never exceed the true
    ones and B·A is an orthogonal projection of delta, so the share kept is at least
    ``energy`` — k may be a little above the exact energy rank, never short of the share.

    Returns float32 factors (float64 for float64 input) on delta's device: B d×k, A k×k_in,
    B = U_k·√S_k and A = √S_k·Vh_k. The error is measured, not inferred from σ: 0 when delta is 0.
    """
    import torch

    if delta.dim() != 2:
        raise ValidationError(f"delta must be 2-D, got shape {list(delta.shape)}")
    if (rank is None) == (energy is None):
        raise ValidationError("give exactly one of rank and energy")
    if rank is not None and rank < 1:
        raise ValidationError(f"rank must be at least 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise ValidationError(f"energy must be in (0, 1], got {energy}")
    M = delta.to(_work_dtype(delta))
    m = min(M.shape)

    def small(q: int) -> bool:
        return m <= exact_limit or q > m // 4

    if not bool(M.any()):
        # ΔW = 0: nothing to decompose (an SVD of a large zero matrix would still cost minutes).
        k = min(int(rank), m) if rank is not None else 1
        return M.new_zeros(M.shape[0], k), M.new_zeros(k, M.shape[1]), 0.0
    U = S = Vh = None
    if rank is not None:
        k = min(int(rank), m)
        if not small(k + oversample):
            U, S, Vh = _svd_lowrank(M, k + oversample, niter, seed)
    elif m > exact_limit:
        total = float(M.square().sum(dtype=torch.float64))
        target = torch.tensor([energy * total], dtype=torch.float64)
        q = min(64, m)
        while not small(q):
            U, S, Vh = _svd_lowrank(M, q, niter, seed)
            cum = torch.cumsum(S.to("cpu", torch.float64).square(), 0)
            hit = int(torch.searchsorted(cum, target)[0])  # first i with cum[i] >= target
            if hit + 1 + oversample <= q:
                k = hit + 1
                break
            U = S = Vh = None
            q *= 2
    if U is None:
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        k = min(int(rank), m) if rank is not None else max(1, energy_rank(S, energy))
    root = S[:k].sqrt()
    B = (U[:, :k] * root).contiguous()
    A = (root[:, None] * Vh[:k]).contiguous()
    return B, A, _relative_residual(M, B, A)
