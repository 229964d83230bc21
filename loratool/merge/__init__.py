"""Merging adapters into base models, and taking them out again.

- ``plan.py``: ``plan_merge`` — every adapter resolved, every output tensor's steps, shapes,
  dtypes and offsets fixed before a byte is written (a frozen ``MergePlan``);
- ``ops.py``: the per-tensor steps (add ΔW, DoRA, replace, rows, add to a bias, …);
- ``engine.py``: ``execute`` — the streaming engine (copier, reader, merger, writer threads);
- ``check.py``: ``compare_bases`` / ``ulp_distance`` for ``unmerge --check``;
- ``memory.py``: ``merge_into`` / ``unmerge_from`` on an nn.Module or a state dict.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .check import compare_bases, ulp_distance
from .engine import MergeResult, execute
from .memory import merge_into, unmerge_from
from .plan import (
    DTYPE_CHOICES,
    PROVENANCE_KEY,
    AdapterInput,
    FilePlan,
    MergePlan,
    TensorPlan,
    base_identity,
    base_name,
    merge_history,
    pick_device,
    plan_merge,
)

__all__ = [
    "DTYPE_CHOICES",
    "PROVENANCE_KEY",
    "AdapterInput",
    "FilePlan",
    "MergePlan",
    "MergeResult",
    "TensorPlan",
    "base_identity",
    "base_name",
    "compare_bases",
    "execute",
    "merge",
    "merge_history",
    "merge_into",
    "pick_device",
    "plan_merge",
    "ulp_distance",
    "unmerge_from",
]


def merge(
    base_path: str | os.PathLike,
    inputs: list[AdapterInput],
    out: str | os.PathLike,
    *,
    dtype: str = "same",
    device: str = "auto",
    force: bool = False,
    strict: bool = False,
    onto_dequantized: str | os.PathLike | None = None,
    progress: Callable[[int, str | None], None] | None = None,
) -> MergeResult:
    """Plan and run a merge (negative weights unmerge). See ``plan_merge``."""
    plan = plan_merge(
        base_path,
        inputs,
        out,
        dtype=dtype,
        device=device,
        force=force,
        strict=strict,
        onto_dequantized=onto_dequantized,
    )
    return execute(plan, progress)
