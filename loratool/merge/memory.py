"""The in-memory API: merge an adapter into an nn.Module or a state dict, in place, with the
file engine's steps and blockwise sums (bit-identical to a file merge)."""

from __future__ import annotations

from ..adapter import Adapter
from ..errors import ValidationError
from ..formats.resolve import resolve
from .engine import _Scratch, run_steps
from .plan import AdapterInput, adapter_steps, check_steps


def _state(target) -> dict:
    if hasattr(target, "state_dict") and hasattr(target, "named_parameters"):
        return target.state_dict(keep_vars=True)
    return target


def merge_into(target, adapter: Adapter, weight: float = 1.0) -> list[str]:
    """Add ``weight``·ΔW of ``adapter`` into an nn.Module or a state dict, in place.

    Each weight stays on its device and dtype; the sum is taken in float32 there and rounded
    once. Full-tensor operations (replaced heads, token rows, biases) apply too, as long as
    they keep the tensor's shape. Returns the names of the tensors changed. Nothing changes if
    any module fails to resolve or fit, or if a result would hold NaN/Inf.
    """
    import torch

    state = _state(target)
    resolved = resolve(adapter, state, source="adapter")
    inp = AdapterInput(resolved, weight, "adapter", "")
    by_tensor = adapter_steps(resolved, inp)
    updates = {}
    with torch.no_grad():
        for name, steps in by_tensor.items():
            check_steps(name, steps)
            t = state[name]
            data = (t.data if isinstance(t, torch.nn.Parameter) else t).contiguous()
            shape = tuple(data.shape)
            for s in steps:
                shape = s.out_shape(shape)
            if shape != tuple(data.shape):
                raise ValidationError(
                    f"would change the tensor's shape from {list(data.shape)} to {list(shape)}; "
                    "merge into files instead",
                    tensor=name,
                )
            work = torch.float64 if data.dtype == torch.float64 else torch.float32
            rows = data.shape[0] if data.dim() else 1
            new = torch.empty_like(data)
            prepared = [s.prepare(data.device, work) for s in steps]
            whole = not all(s.blockwise for s in steps)
            reads = steps[0].reads_input
            # the file engine's blockwise sum: no dense ΔW, no float32 copy of the weight
            if not run_steps(
                data.view(rows, -1) if reads else None,
                new.view(rows, -1),
                prepared,
                work,
                _Scratch(data.device),
                whole=whole,
            ):
                raise ValidationError("the merged weight contains NaN or Inf", tensor=name)
            updates[name] = new
        for name, new in updates.items():
            t = state[name]
            (t.data if isinstance(t, torch.nn.Parameter) else t).copy_(new)
    return list(updates)


def unmerge_from(target, adapter: Adapter, weight: float = 1.0) -> list[str]:
    """Subtract what ``merge_into(target, adapter, weight)`` added."""
    return merge_into(target, adapter, -weight)
