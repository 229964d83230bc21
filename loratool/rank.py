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
from dataclasses import dataclass

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
    return spectrum_report(values, [int(B.shape[0]), int(A.shape[1])], int(B.shape[1]), threshold)


def spectrum_report(values, shape, rank: int, threshold: float = 0.99) -> dict:
    """``rank_report``'s keys from a spectrum already computed (modules that are not one B·A:
    LoHa, LoKr… give theirs from their own factors)."""
    s = _spectrum(values)
    cum = _cumulative(s)
    shape = [int(shape[0]), int(shape[1])]
    return {
        "shape": shape,
        "rank": int(rank),
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


# -- rank rules: how many singular values a module keeps -----------------------------------------
# One rule per run, applied module by module. "rank" and "energy" are loratool's; sv_ratio,
# sv_fro and sv_cumulative are kohya-ss/sd-scripts' dynamic resize methods (networks/
# resize_lora.py, ``--dynamic_method``/``--dynamic_param``), reproduced to the letter below;
# sv_epsilon is mergekit's ``--sv-epsilon`` (mergekit/scripts/extract_lora.py). ``max_rank``
# caps every rule (sd-scripts' ``--new_rank`` with a dynamic method, mergekit's ``--max-rank``).

RULES = ("rank", "energy", "sv_ratio", "sv_fro", "sv_cumulative", "sv_epsilon")

# sd-scripts: a module whose σ₁ is at most this is a zero matrix and keeps rank 1.
SD_MIN_SV = 1e-6


def _searchsorted_left(values: list[float], target: float) -> int:
    """torch.searchsorted(values, target) (side='left'): the first i with values[i] >= target."""
    return next((i for i, v in enumerate(values) if v >= target), len(values))


# sd-scripts' three index functions, op for op (torch.sum, torch.cumsum, torch.searchsorted on
# the spectrum as a tensor), so that even ties at a threshold resolve as they do there; the
# one difference is the dtype: float64 here, where sd-scripts has float32 σ.


def _as_tensor(S):
    import torch

    return torch.as_tensor(S, dtype=torch.float64)


def sd_index_sv_ratio(S, target: float) -> int:
    """sd-scripts' index_sv_ratio: (count of σ > σ₁/target) − 1, clamped to [0, len − 1]."""
    import torch

    S = _as_tensor(S)
    max_sv = S[0]
    min_sv = max_sv / target
    index = int(torch.sum(S > min_sv).item()) - 1
    return max(0, min(index, len(S) - 1))


def sd_index_sv_cumulative(S, target: float) -> int:
    """sd-scripts' index_sv_cumulative: searchsorted(cumsum(σ)/Σσ, target), clamped."""
    import torch

    S = _as_tensor(S)
    original_sum = float(torch.sum(S))
    cumulative_sums = torch.cumsum(S, dim=0) / original_sum
    index = int(torch.searchsorted(cumulative_sums, target))
    return max(0, min(index, len(S) - 1))


def sd_index_sv_fro(S, target: float, total_sq: float | None = None) -> int:
    """sd-scripts' index_sv_fro: searchsorted(cumsum(σ²)/Σσ², target²), clamped.

    ``total_sq`` replaces Σσ² when S holds only the leading values of a spectrum whose
    ‖·‖_F² is known (a randomized SVD's): the same share, over the whole matrix.
    """
    import torch

    S = _as_tensor(S)
    S_squared = S.pow(2)
    S_fro_sq = float(torch.sum(S_squared)) if total_sq is None else float(total_sq)
    sum_S_squared = torch.cumsum(S_squared, dim=0) / S_fro_sq
    index = int(torch.searchsorted(sum_S_squared, target**2))
    return max(0, min(index, len(S) - 1))


@dataclass(frozen=True)
class RankRule:
    """How many singular values each module keeps: ``method`` with ``value``, at most
    ``max_rank`` (None: no cap) and never more than the module has, never fewer than 1.

    - ``rank``: k = value.
    - ``energy``: the fewest σ holding ``value`` of Σσ² (= ‖ΔW‖_F²).
    - ``sv_ratio`` (sd-scripts): keep every σ > σ₁/value.
    - ``sv_fro`` (sd-scripts): the fewest σ whose √(Σσ²) reaches ``value`` of ‖ΔW‖_F, i.e.
      ``energy`` at value².
    - ``sv_cumulative`` (sd-scripts): the fewest σ whose Σσ reaches ``value`` of the nuclear
      norm Σσ. Needs every σ (Σσ is not known from the leading ones), so an extraction that
      uses it runs the exact SVD.
    - ``sv_epsilon`` (mergekit): keep every σ > value (an absolute threshold; 0 keeps all,
      up to max_rank).

    The three sd-scripts rules also follow its zero test: σ₁ ≤ 1e-6 keeps rank 1. Where
    sd-scripts' or mergekit's own result would be 0 (a rank-0 LoRA cannot be stored) the rule
    keeps 1.
    """

    method: str
    value: float
    max_rank: int | None = None

    def __post_init__(self) -> None:
        m, v = self.method, self.value
        if m not in RULES:
            raise ValidationError(f"unknown rank rule {m!r}; choose one of {', '.join(RULES)}")
        flag = "--" + m.replace("_", "-")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValidationError(f"{flag} needs a number, got {v!r}")
        if m == "rank" and (v < 1 or int(v) != v):
            raise ValidationError(f"--rank must be a whole number ≥ 1, got {v}")
        if m in ("energy", "sv_fro", "sv_cumulative") and not 0 < v <= 1:
            raise ValidationError(f"{flag} must be in (0, 1], got {v}")
        if m == "sv_ratio" and v < 1:
            raise ValidationError(f"--sv-ratio is σ₁/σ_min and must be ≥ 1, got {v}")
        if m == "sv_epsilon" and v < 0:
            raise ValidationError(f"--sv-epsilon must be ≥ 0, got {v}")
        if self.max_rank is not None and (int(self.max_rank) != self.max_rank or self.max_rank < 1):
            raise ValidationError(f"--max-rank must be a whole number ≥ 1, got {self.max_rank}")

    @property
    def needs_full_spectrum(self) -> bool:
        return self.method == "sv_cumulative"

    @property
    def cap(self) -> int | None:
        """The most this rule can ever keep (None: as many as the module has)."""
        if self.method == "rank":
            return int(self.value) if self.max_rank is None else min(int(self.value), self.max_rank)
        return self.max_rank

    def describe(self) -> str:
        text = f"{self.method} {self.value:g}"
        return text + (f" (max rank {self.max_rank})" if self.max_rank is not None else "")

    def pick(self, S, n: int | None = None, total_sq: float | None = None) -> int:
        """k for the spectrum S (descending; any order is sorted).

        ``n``: how many singular values the matrix has (default len(S)). With ``total_sq``
        (‖ΔW‖_F²), S may be just the leading values of a longer spectrum, as a randomized SVD
        gives them. Every rule then answers len(S) (or its cap) when the leading values do
        not settle it, so a caller that keeps some values to spare asks for more when k comes
        too close to len(S).
        """
        s = _spectrum(S)
        n = len(s) if n is None else int(n)
        limit = min(n, len(s))
        if self.cap is not None:
            limit = min(limit, self.cap)
        if not s:
            return 1
        m, v = self.method, float(self.value)
        if m == "rank":
            k = int(v)
        elif m == "energy":
            squares = [x * x for x in s]
            total = math.fsum(squares) if total_sq is None else total_sq
            if total == 0.0:
                return 1
            cum = [x / total for x in itertools.accumulate(squares)]
            k = _searchsorted_left(cum, v) + 1  # len(s) + 1 when S is too short to tell
        elif m == "sv_epsilon":
            k = sum(1 for x in s if x > v) if v > 0 else len(s)
        else:
            if s[0] <= SD_MIN_SV:
                return 1
            if m == "sv_ratio":
                k = sd_index_sv_ratio(s, v) + 1
            elif m == "sv_fro":
                k = sd_index_sv_fro(s, v, total_sq) + 1
            else:
                k = sd_index_sv_cumulative(s, v) + 1
        return max(1, min(k, limit))


# -- factoring a dense ΔW: randomized by default, exact on request ---------------------------------


def randomized_svd(M, q: int, *, niter: int = 2, seed: int = 0):
    """(U, S, Vh): the q leading singular triplets of M, estimated (Halko, Martinsson & Tropp
    2011, algorithms 4.4 and 5.1: randomized range finder with subspace iteration).

    A Gaussian test matrix Ω (k×q) is drawn on the CPU from a private generator seeded with
    ``seed``, so the result is the same on every run and every device and the global RNG is
    untouched. Q = orth(M·Ω), then ``niter`` power iterations Q = orth(M·orth(Mᵀ·Q)), each
    product re-orthonormalised by QR so that small σ are not lost to rounding; then the exact
    SVD of the small q×k matrix Qᵀ·M, in float64, gives S and Vh, and U = Q·U_small. Each
    pass costs one d×k×q product; the error shrinks as (σ_{q+1}/σ_j)^(2·niter+1) for the j-th
    value, so a few columns to spare (q = k + oversample) and two iterations (torch.svd_lowrank's
    and sd-scripts' default) come within half a percent of the optimal truncation even on
    slowly decaying spectra (σᵢ ∝ 1/√i measured +0.45%), and four within 0.05%.

    M stays in its dtype (float32 or float64) and on its device; U, S, Vh come back in it.
    """
    import torch

    d, k = M.shape
    q = int(q)
    if not 1 <= q <= min(d, k):
        raise ValidationError(f"randomized SVD of a {d}×{k} matrix needs 1 ≤ q ≤ {min(d, k)}")
    gen = torch.Generator().manual_seed(int(seed))
    omega = torch.randn(k, q, generator=gen, dtype=M.dtype).to(M.device)
    Q = torch.linalg.qr(M @ omega).Q
    for _ in range(int(niter)):
        Q = torch.linalg.qr(M.T @ Q).Q
        Q = torch.linalg.qr(M @ Q).Q
    small = (Q.T @ M).to(torch.float64)
    Us, S, Vh = torch.linalg.svd(small, full_matrices=False)
    return Q @ Us.to(M.dtype), S.to(M.dtype), Vh.to(M.dtype).contiguous()


@dataclass
class DenseFactors:
    """A dense ΔW factored: B (d×k) · A (k×k_in) ≈ ΔW, for scale 1.

    ``error`` is ‖ΔW − B·A‖_F / ‖ΔW‖_F measured on the factors as returned (in their dtype),
    not inferred from σ. ``method`` is "randomized" or "exact"; ``q`` the columns the
    randomized SVD used (0 for exact).
    """

    B: object
    A: object
    error: float
    method: str
    q: int = 0

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


def relative_residual(M, B, A, chunk_rows: int = 1024) -> float:
    """‖M − B·A‖_F / ‖M‖_F (0 when M is 0), in float64 sums, a row block at a time so that
    memory holds one block of the product, never the d×k one; B and A in any float dtype."""
    import torch

    num = den = 0.0
    dt = M.dtype
    for i in range(0, M.shape[0], chunk_rows):
        block = M[i : i + chunk_rows]
        approx = B[i : i + chunk_rows].to(dt) @ A.to(dt)
        num += float((block - approx).square().sum(dtype=torch.float64))
        den += float(block.square().sum(dtype=torch.float64))
    return 0.0 if den == 0.0 else math.sqrt(num / den)


def frobenius_sq(M) -> float:
    """‖M‖_F² in one pass without a temporary (inf or nan when M holds Inf or NaN).

    torch's vector_norm accumulates in M's dtype (float32: relative error ~1e-7, plenty for a
    denominator and for the identity in ``measured_error``, which falls back to a float64
    residual where it would matter).
    """
    import torch

    n = float(torch.linalg.vector_norm(M))
    if not math.isfinite(n) and bool(torch.isfinite(M).all()):
        n = float(torch.linalg.vector_norm(M, dtype=torch.float64))  # finite but huge values
    return n * n


def measured_error(M, B, A, total_sq: float | None = None) -> float:
    """‖M − B·A‖_F / ‖M‖_F of these very factors, in one pass over M and no d×k temporary.

    ‖M − B·A‖² = ‖M‖² − 2·⟨BᵀM, A⟩ + ⟨BᵀB, A·Aᵀ⟩: one r×k product BᵀM (float32, d·k·r
    flops) and r×r Grams in float64. It is exact algebra on the factors as stored, but the
    float32 ‖M‖² and BᵀM carry ~1e-6 of ‖M‖², so the result is good to ~1e-5 of itself only
    where the error is not small: below 0.22 (a share of 0.05 of ‖M‖²) the residual is formed
    block by block instead (``relative_residual``, float64 sums).
    """
    total = frobenius_sq(M) if total_sq is None else total_sq
    if total == 0.0:
        return 0.0
    dt = M.dtype
    Bw, Aw = B.to(dt), A.to(dt)
    cross = float(((Bw.T @ M).double() * Aw.double()).sum())
    gram = float(((Bw.double().T @ Bw.double()) * (Aw.double() @ Aw.double().T)).sum())
    rel_sq = (total - 2.0 * cross + gram) / total
    if rel_sq < 0.05:
        return relative_residual(M, B, A)
    return math.sqrt(rel_sq)


def factor_dense(
    M,
    rule: RankRule,
    *,
    exact: bool = False,
    oversample: int = 10,
    niter: int = 2,
    seed: int = 0,
    out_dtype=None,
    total_sq: float | None = None,
) -> DenseFactors:
    """Factor a dense matrix to the rank ``rule`` picks; B = U_k·√S_k, A = √S_k·Vh_k.

    Randomized (``randomized_svd``) unless ``exact``: with a fixed rank, q = rank +
    ``oversample`` columns; with a dynamic rule, q starts at cap + oversample (64 without a
    cap) and doubles until the rule's k leaves ``oversample`` columns to spare, judged on the
    leading σ and the exact ‖M‖_F². Estimated σ never exceed the true ones, so ``energy`` /
    ``sv_fro`` keep at least the share asked for (k may be a little above the exact rule's),
    and ``sv_ratio`` / ``sv_epsilon`` may keep a value or two fewer at their threshold.
    Where q would reach half of min(d, k) a randomized SVD saves nothing and the exact SVD
    (torch.linalg.svd) runs instead; ``sv_cumulative`` always needs it (see RankRule).

    M is float32 or float64 (any device); the factors come back in ``out_dtype`` (default
    M's), on M's device, and the error is measured on them after that rounding. ``total_sq``
    is ‖M‖_F² when the caller has it already (``frobenius_sq``).
    """
    import torch

    if M.dim() != 2:
        raise ValidationError(f"a dense ΔW must be 2-D, got shape {list(M.shape)}")
    if oversample < 0 or niter < 0:
        raise ValidationError("--oversample and --niter must be ≥ 0")
    out_dtype = out_dtype or M.dtype
    m = min(M.shape)
    total_sq = frobenius_sq(M) if total_sq is None else float(total_sq)
    if not math.isfinite(total_sq):
        raise ValidationError("ΔW holds NaN or Inf")
    if total_sq == 0.0:
        k = max(1, min(rule.cap or 1, m)) if rule.method == "rank" else 1
        zeros = M.new_zeros
        return DenseFactors(
            zeros(M.shape[0], k, dtype=out_dtype),
            zeros(k, M.shape[1], dtype=out_dtype),
            0.0,
            "exact",
        )
    U = S = Vh = None
    method, q = "exact", 0
    if not (exact or rule.needs_full_spectrum):
        cap = rule.cap
        q = min(m, (cap + oversample) if cap is not None else 64)
        while 2 * q <= m:
            U, S, Vh = randomized_svd(M, q, niter=niter, seed=seed)
            k = rule.pick(S, m, total_sq)
            if k + oversample <= q:
                method = "randomized"
                break
            U = S = Vh = None
            q *= 2
    if U is None:
        q = 0
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        k = rule.pick(S, m)
    root = S[:k].sqrt()
    B = (U[:, :k] * root).to(out_dtype).contiguous()
    A = (root[:, None] * Vh[:k]).to(out_dtype).contiguous()
    return DenseFactors(B, A, measured_error(M, B, A, total_sq), method, q)
