"""Combining several LoRA updates of one module into one: pure math on 2-D factors.

Every function takes ``parts``, a list of (B, A, scale, weight) for the module — B d×r, A r×k,
the adapter's own scale (alpha/r or alpha/√r) and the user's weight — and applies each
adapter's scale exactly once. Results are factors for scale 1 (store them with alpha = rank,
use_rslora off), float32 (float64 if any input is float64), on the first part's device.

How this differs from peft's ``LoraModel.add_weighted_adapter`` (checked against peft 0.21.2
in tests/test_combine_math.py):

- peft's ``linear`` (equal ranks) sums √(wᵢsᵢ)·Aᵢ and √(wᵢsᵢ)·Bᵢ separately, so the product
  has cross terms √(wᵢsᵢwⱼsⱼ)·Bᵢ·Aⱼ that no adapter trained (peft#3004). ``combine_linear``
  here is exact: it is concatenation, B·A = Σ wᵢ·sᵢ·Bᵢ·Aᵢ.
- peft's combined adapter inherits ``use_rslora`` from the first source while setting
  alpha = r, so with rsLoRA sources its scale is √r instead of 1 and every method's result is
  √r too large. Here the result's scale is 1 by construction.
"""

from __future__ import annotations

import math

from .errors import ValidationError


def _prepare(parts):
    """Validate shapes; return [(B, A, scale, weight)] in the working dtype on one device."""
    import torch

    if not parts:
        raise ValidationError("nothing to combine: no parts given")
    dt = (
        torch.float64
        if any(p[0].dtype == torch.float64 or p[1].dtype == torch.float64 for p in parts)
        else torch.float32
    )
    dev = parts[0][0].device
    out = []
    d = k = None
    for i, (B, A, scale, weight) in enumerate(parts):
        if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValidationError(
                f"part {i}: B {list(B.shape)} and A {list(A.shape)} are not 2-D factors of one rank"
            )
        if d is None:
            d, k = B.shape[0], A.shape[1]
        elif (B.shape[0], A.shape[1]) != (d, k):
            raise ValidationError(f"part {i}: ΔW is {B.shape[0]}×{A.shape[1]}, part 0's is {d}×{k}")
        out.append((B.to(dev, dt), A.to(dev, dt), float(scale), float(weight)))
    return out


def _check_rank(rank: int) -> int:
    if rank is None or int(rank) < 1:
        raise ValidationError(f"rank must be at least 1, got {rank}")
    return int(rank)


def _check_density(density: float) -> float:
    if not 0 < density <= 1:
        raise ValidationError(f"density must be in (0, 1], got {density}")
    return float(density)


def combine_cat(parts):
    """(B, A) = ([w₁s₁B₁ | w₂s₂B₂ | …], [A₁; A₂; …]): exact, rank Σ rᵢ, scale 1.

    B·A = Σ wᵢ·sᵢ·Bᵢ·Aᵢ, term for term. The weight and scale go into B only (one multiply
    per part), so A keeps the sources' rows unchanged.
    """
    import torch

    ps = _prepare(parts)
    B = torch.cat([B * (w * s) for B, _, s, w in ps], dim=1)
    A = torch.cat([A for _, A, _, _ in ps], dim=0)
    return B.contiguous(), A.contiguous()


def combine_linear(parts):
    """The weighted sum Σ wᵢ·sᵢ·Bᵢ·Aᵢ as factors: exact, implemented as concatenation.

    Not peft's ``linear``: peft sums the Bs and the As of equal-rank adapters separately,
    keeping rank r but adding cross terms Bᵢ·Aⱼ (peft#3004). An exact weighted sum of rank-r
    updates needs rank up to Σ rᵢ; use ``combine_svd`` to bring it back to r with the least
    error, measured.
    """
    return combine_cat(parts)


def combine_svd(parts, rank: int):
    """(B, A, rel_error): the exact weighted sum truncated by SVD to ``rank``.

    Goes through the concatenated factors and rank.truncate's QR core, never the d×k product,
    so the cost is O((d+k)·(Σrᵢ)²). rel_error = ‖ΔW − B·A‖_F/‖ΔW‖_F of the best rank-``rank``
    approximation, √(Σ_{i≥rank} σᵢ²/Σσᵢ²) (0 when the rank holds everything or ΔW = 0).
    """
    from .rank import truncate

    rank = _check_rank(rank)
    Bc, Ac = combine_cat(parts)
    B, A, kept = truncate(Bc, Ac, 1.0, rank=rank)
    # kept is a float64 share, so 1 − kept is exact to ~1e-16 and the root to ~1e-8.
    return B, A, math.sqrt(max(0.0, 1.0 - kept))


# Dense d×k float buffers each method holds at its peak for one module, per part and fixed
# (its task vectors, trimmed copies, masks and sums, then the SVD's input and factors).
_DENSE_BUFFERS = {"ties": (2, 8), "dare": (1, 7)}


def memory_limit(option: int | None = None) -> int:
    """Bytes the dense methods may use for one module: ``option``, else
    ``$LORATOOL_MAX_MEMORY`` (512M, 8G, …), else half of this machine's memory."""
    import os

    from .units import parse_size

    if option is not None:
        return int(option)
    env = os.environ.get("LORATOOL_MAX_MEMORY")
    if env:
        try:
            return parse_size(env)
        except ValueError as exc:
            raise ValidationError(f"LORATOOL_MAX_MEMORY: {exc}") from None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):  # pragma: no cover - no sysconf
        return 8 << 30


def dense_bytes(method: str, n_parts: int, shape: tuple[int, int], itemsize: int = 4) -> int:
    """An upper estimate of the memory ``method`` needs for one module of ΔW ``shape``."""
    per_part, fixed = _DENSE_BUFFERS[method]
    return (per_part * n_parts + fixed) * shape[0] * shape[1] * itemsize


def check_memory(method: str, parts, limit: int, *, name: str | None = None) -> None:
    """Refuse, in one line, a dense combination of one module that would need more than
    ``limit`` bytes (ties and dare form every d×k update: an A of 1×200000 with a B of
    200000×1 stands for a 160 GB ΔW)."""
    from .units import human_size

    if method not in _DENSE_BUFFERS or not parts:
        return
    B, A = parts[0][0], parts[0][1]
    shape = (int(B.shape[0]), int(A.shape[1]))
    itemsize = 8 if any(p[0].element_size() == 8 or p[1].element_size() == 8 for p in parts) else 4
    need = dense_bytes(method, len(parts), shape, itemsize)
    if need > limit:
        raise ValidationError(
            f"--method {method} works on the dense {shape[0]}×{shape[1]} update: about "
            f"{human_size(need)} for {len(parts)} adapter(s), above the limit of "
            f"{human_size(limit)}",
            tensor=name,
            hint="raise it with --max-memory or LORATOOL_MAX_MEMORY, or use --method svd, "
            "which never forms the dense update",
        )


def _dense_parts(parts):
    """Each part's own ΔWᵢ = sᵢ·Bᵢ·Aᵢ (the task vector, weight not applied) and its weight."""
    return [((B * s) @ A, w) for B, A, s, w in _prepare(parts)]


def _trim(t, density: float):
    """Keep the int(density·n) largest-magnitude entries of t (at least one), zero the rest."""
    import torch

    if density >= 1:
        return t
    n = t.numel()
    k = max(1, int(density * n))
    flat = t.reshape(-1)
    keep = torch.zeros(n, dtype=torch.bool, device=t.device)
    keep[torch.topk(flat.abs(), k, sorted=False).indices] = True
    return torch.where(keep, flat, flat.new_zeros(())).reshape(t.shape)


def combine_ties(parts, rank: int, density: float):
    """(B, A, rel_error): TIES-merging (Yadav et al. 2023) of the dense updates, re-factored.

    As mergekit's ``ties`` (sign consensus by sum, normalize on):

    1. trim: each task vector τᵢ = sᵢ·Bᵢ·Aᵢ keeps its int(density·d·k) largest-magnitude
       entries (at least one);
    2. elect: per entry, the sign of Σᵢ wᵢ·trim(τᵢ) (+ where that sum is 0);
    3. disjoint mean: Σᵢ wᵢ·trim(τᵢ) over the parts whose weighted entry has the elected sign,
       divided by the sum of those parts' weights (entries where that sum is 0 are left
       undivided). With all weights 1 this is the paper's mean over agreeing task vectors.

    Because of step 3 the weights are relative: one part with weight 0.5 gives τ back, not
    τ/2 (mergekit's normalized default); scale the result afterwards to change its strength.
    The merged ΔW is then re-factored to ``rank`` by rank.lowrank_from_dense; rel_error is
    that re-factoring's ‖ΔW_ties − B·A‖_F/‖ΔW_ties‖_F (TIES itself is not meant to be exact).
    """
    import torch

    from .rank import lowrank_from_dense

    rank, density = _check_rank(rank), _check_density(density)
    dense = _dense_parts(parts)
    weighted = [_trim(t, density) * w for t, w in dense]
    elected = torch.where(sum(weighted) >= 0, 1.0, -1.0).to(weighted[0].dtype)
    mixed = torch.zeros_like(weighted[0])
    divisor = torch.zeros_like(weighted[0])
    for wt, (_, w) in zip(weighted, dense, strict=True):
        # A trimmed entry has sign 0 and so never agrees: it counts neither value nor weight.
        agree = torch.sign(wt) == elected
        mixed += torch.where(agree, wt, 0.0)
        divisor += agree.to(wt.dtype) * w
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return lowrank_from_dense(mixed / divisor, rank=rank)


def combine_dare(parts, rank: int, density: float, seed: int = 0):
    """(B, A, rel_error): DARE (Yu et al. 2024) of the dense updates, re-factored to ``rank``.

    Each τᵢ = sᵢ·Bᵢ·Aᵢ drops every entry with probability 1 − density and scales the survivors
    by 1/density, so E[result] = Σ wᵢ·τᵢ; the weighted sum is then re-factored by
    rank.lowrank_from_dense (rel_error is that step's). The masks come from a private
    torch.Generator seeded with ``seed`` on the parts' device, drawn part by part in order:
    the same seed, parts and device give the same result, and the global RNG is untouched.
    """
    import torch

    from .rank import lowrank_from_dense

    rank, density = _check_rank(rank), _check_density(density)
    dense = _dense_parts(parts)
    gen = torch.Generator(device=dense[0][0].device)
    gen.manual_seed(int(seed))
    total = torch.zeros_like(dense[0][0])
    for t, w in dense:
        if density < 1:
            keep = (
                torch.rand(t.shape, generator=gen, device=t.device, dtype=torch.float32) < density
            )
            t = torch.where(keep, t / density, 0.0)
        total += w * t
    return lowrank_from_dense(total, rank=rank)
