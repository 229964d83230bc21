"""Modules that are not one B·A (LyCORIS LoHa, LoKr, LoCon-Tucker) as LoRA, by truncated SVD.

A PEFT or kohya LoRA file can hold only B·A, so ``convert --to peft|kohya|diffusers`` and
anything else that needs plain LoRA takes each such module's best rank-k approximation
(Eckart–Young) from its own factors (``truncated`` in ``adapter/lycoris.py``: a LoHa's
face-splitting form, a LoKr's Kronecker SVD, a Tucker LoCon's core; no ΔW is formed) and
reports the energy it kept, Σ_{i<k} σᵢ² / Σ σᵢ². Without a rule, k keeps every singular value
the arithmetic can resolve (``rank.numerical_rank``): the conversion is exact to rounding.

A conv LoHa / LoKr without a Tucker core stores its kernel flattened into its factors; unless
the module was resolved against its base (which records the real shape) it is written as a
Linear of in·k… inputs, and the report says so (``shape_assumed``).
"""

from __future__ import annotations

import math

from .adapter import Adapter, LoraModule
from .rank import RankRule, energy_rank, numerical_rank


def needs_conversion(adapter: Adapter) -> bool:
    return any(_lycoris(m) for m in adapter.modules.values())


def _lycoris(m) -> bool:
    """A module that is not one B·A but has a LoRA form (LoHa, LoKr, Tucker LoCon); other
    kinds (expert-stacked LoRA) are left to the writer, which holds them or refuses them."""
    return not isinstance(m, LoraModule) and hasattr(m, "truncated")


def to_lora(adapter: Adapter, rule: RankRule | None = None) -> tuple[Adapter, dict[str, dict]]:
    """``adapter`` with every LyCORIS module replaced by a LoRA module of the same ΔW (rank k
    by ``rule``, or exact). Returns the adapter and, per converted module, ``kind``,
    ``rank_before`` (lycoris' dim), ``rank_after``, ``energy_kept`` and ``shape_assumed``."""
    import torch

    mods, report = {}, {}
    for name, lazy in adapter.modules.items():
        if not _lycoris(lazy):
            mods[name] = lazy
            continue
        mod = lazy.materialized()
        shape = tuple(mod.base_shape)
        flat = (shape[0], math.prod(shape[1:]))
        S = mod.svdvals(torch.float64)
        if rule is not None:
            k = rule.pick(S)
        else:
            k = max(1, numerical_rank(S, flat))
        # in float64, rounded once to the stored dtype: exact conversions stay exact to rounding
        B, A, S = mod.truncated(k, torch.float64)
        squares = [float(x) ** 2 for x in S.tolist()]
        total = math.fsum(squares)
        kept = 1.0 if total == 0.0 else math.fsum(squares[:k]) / total
        dtype = next(iter(mod.tensors().values())).dtype
        k = B.shape[1]
        if len(shape) > 2:
            kind = "conv2d"
            A = A.reshape(k, *shape[1:])
            B = B.reshape(shape[0], k, *([1] * (len(shape) - 2)))
        else:
            kind = "linear"
        new = LoraModule(
            name,
            kind,
            A.to(dtype).contiguous(),
            B.to(dtype).contiguous(),
            float(k),  # the factors hold the scale: alpha = k, scale 1
            target_rows=mod.target_rows,
        )
        mods[name] = new
        report[name] = {
            "kind": lazy.label,
            "rank_before": lazy.rank,
            "rank_after": k,
            "energy_kept": kept,
            "energy_rank_99": energy_rank(S, 0.99),
            "shape_assumed": not getattr(lazy, "shape_known", True),
        }
    if not report:
        return adapter.replaced(modules=mods), report
    # the header's dim / alpha (a LyCORIS trainer's) describe the new LoRA factors
    from .formats.training import refreshed_origin

    return adapter.replaced(
        modules=mods, origin=refreshed_origin(adapter.origin, mods.values())
    ), report
