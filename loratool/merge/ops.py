"""Per-tensor operations: the steps a merge plan lists for each output tensor.

A touched tensor is made by a sequence of steps applied, in order, to a float32 (float64 for
float64 bases) working copy of W, which is rounded once to the output dtype at the end:

- ``delta`` — W += weight·ΔW of one module (LoRA, expert-stacked LoRA, any registered kind);
  ``slice`` is the same into rows start:stop of a fused tensor (``Module.target_rows``);
- ``dora`` — W ← m / ‖W + ΔW‖ · (W + ΔW) (per output row or column, see ``adapter.lora``);
  ``undora`` is its inverse given the norms recorded at merge time;
- ``replace`` — W ← a stored tensor (possibly of another shape); ``restore`` puts back an
  original tensor read from a file (unmerge of a replace);
- ``rows`` — rows of W ← stored rows (trainable tokens);
- ``add`` — W += weight·scale·v (lora_bias).

Each step is immutable and describes itself (``describe()``, reported by ``merge --json``);
``prepare(device, work)`` returns what the engine runs: ``apply_block(acc, start, stop)`` on a
block of rows of W viewed as 2-D (its first dimension by the rest), and ``apply_full(acc)`` on
the whole tensor. Steps with ``blockwise = False`` need the whole tensor at once (DoRA whose
norms run along columns); a tensor whose steps are all blockwise is merged a block of rows at a
time, in cache, without forming ΔW. A step that does not read W (``reads_input = False``)
lets the engine skip reading the base tensor.

New operations (a quantization codec's decode/encode, a diffusers component…) are new Step
classes; the engine never needs to know what they do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..adapter import AddToTensor, Module, ReplaceRows, ReplaceTensor
from .records import SHA_PLACEHOLDER, b64, b64_placeholder, float32_bytes


class Step:
    OP: ClassVar[str] = ""
    blockwise: ClassVar[bool] = True
    reads_input: ClassVar[bool] = True

    label: str  # the adapter it comes from

    @property
    def op(self) -> str:
        return self.OP

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape)

    def prepare(self, device: Any, work) -> Prepared:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"op": self.op, "adapter": self.label}

    def record_template(self) -> dict | None:
        """What an unmerge will need, planned with placeholders of the exact length of the
        values the engine fills in (``records.py``); None when subtraction is enough."""
        return None


class Prepared:
    """A step made ready on a device. ``acc`` is 2-D, rows of the tensor being made."""

    def apply_block(self, acc, start: int, stop: int) -> None:
        raise NotImplementedError

    def apply_full(self, acc) -> None:
        self.apply_block(acc, 0, acc.shape[0])

    def record(self) -> dict | None:
        """After execution: the values of the step's record_template, or None."""
        return None


# -- low-rank updates ------------------------------------------------------------------------


class _PreparedDelta(Prepared):
    def __init__(self, term, rows: tuple[int, int] | None):
        self.term, self.rows = term, rows

    def apply_block(self, acc, start: int, stop: int) -> None:
        if self.rows is None:
            self.term.add_block(acc, start, stop)
            return
        lo, hi = self.rows  # ΔW covers rows lo:hi of the tensor
        a, b = max(start, lo), min(stop, hi)
        if a < b:
            self.term.add_block(acc[a - start : b - start], a - lo, b - lo)


@dataclass(frozen=True)
class DeltaStep(Step):
    OP = "delta"

    module: Module
    weight: float
    label: str

    @property
    def op(self) -> str:
        return "slice" if self.module.target_rows is not None else "delta"

    def prepare(self, device, work) -> Prepared:
        return _PreparedDelta(
            self.module.prepare(self.weight, device, work), self.module.target_rows
        )

    def describe(self) -> dict:
        d = {"op": self.op, "adapter": self.label, "kind": self.module.label}
        if self.weight != 1.0:
            d["weight"] = self.weight
        if self.module.target_rows is not None:
            d["rows"] = list(self.module.target_rows)
        return d


class _PreparedDora(Prepared):
    def __init__(self, term, magnitude, axis: int, rows: int, device, work):
        import torch

        self.term, self.mag, self.axis = term, magnitude, axis
        self.norms = torch.empty(magnitude.numel(), dtype=work, device=device)

    def apply_block(self, acc, start: int, stop: int) -> None:
        import torch

        self.term.add_block(acc, start, stop)  # acc = W + ΔW
        if self.axis == 0:
            n = torch.linalg.vector_norm(acc, dim=1)
            self.norms[start:stop] = n
            acc.mul_((self.mag[start:stop] / n).unsqueeze(1))
        else:  # only on the whole tensor (blockwise is False)
            n = torch.linalg.vector_norm(acc, dim=0)
            self.norms.copy_(n)
            acc.mul_(self.mag / n)

    def record(self) -> dict:
        return {"norms": b64(float32_bytes(self.norms))}


@dataclass(frozen=True)
class DoraStep(Step):
    """W ← m / ‖W + ΔW‖ · (W + ΔW), as peft's DoRA ``merge`` computes it (norm of the weight it
    merges into, per output)."""

    OP = "dora"

    module: Module
    label: str
    sha: str = ""

    def record_template(self) -> dict:
        n = self.module.magnitude.numel()
        return {"op": "dora", "adapter": self.sha, "norms": b64_placeholder(4 * n)}

    @property
    def blockwise(self) -> bool:  # type: ignore[override]
        return self.module.dora_axis == 0

    def prepare(self, device, work) -> Prepared:
        m = self.module.materialized()
        rows = m.base_shape[0]
        return _PreparedDora(
            m.prepare(1.0, device, work),
            m.magnitude_vector(device, work),
            m.dora_axis,
            rows,
            device,
            work,
        )

    def describe(self) -> dict:
        return {"op": "dora", "adapter": self.label, "kind": self.module.label}


class _PreparedUndora(Prepared):
    def __init__(self, term, factor, axis: int):
        self.term, self.factor, self.axis = term, factor, axis

    def apply_block(self, acc, start: int, stop: int) -> None:
        if self.axis == 0:
            acc.mul_(self.factor[start:stop].unsqueeze(1))
        else:
            acc.mul_(self.factor)
        self.term.add_block(acc, start, stop)  # the term carries weight −1


@dataclass(frozen=True)
class UndoraStep(Step):
    """The inverse of a DoRA merge: W = W' · ‖W + ΔW‖ / m − ΔW, with the norms recorded when
    the merge was made (the merged tensor alone cannot give them back)."""

    OP = "undora"

    module: Module
    norms: Any  # float32 vector, as recorded
    label: str

    def prepare(self, device, work) -> Prepared:
        m = self.module.materialized()
        factor = self.norms.to(device=device, dtype=work) / m.magnitude_vector(device, work)
        return _PreparedUndora(m.prepare(-1.0, device, work), factor, m.dora_axis)

    def describe(self) -> dict:
        return {"op": "undora", "adapter": self.label, "kind": self.module.label}


# -- whole tensors -----------------------------------------------------------------------------


class _PreparedCopy(Prepared):
    def __init__(self, value2d):
        self.value = value2d

    def apply_block(self, acc, start: int, stop: int) -> None:
        acc.copy_(self.value[start:stop])


def _as_rows(t, device, work):
    from ..tensors.io import materialize

    t = materialize(t).to(device=device, dtype=work)
    rows = t.shape[0] if t.dim() else 1
    return t.reshape(rows, -1)


@dataclass(frozen=True)
class ReplaceStep(Step):
    OP = "replace"
    reads_input = False

    op_: ReplaceTensor
    label: str
    sha: str = ""
    record: bool = False  # a merge records the original's sha256 (an unmerge restores it)

    def record_template(self) -> dict | None:
        if not self.record:
            return None
        return {
            "op": "replace",
            "adapter": self.sha,
            "why": self.op_.why,
            "sha256": SHA_PLACEHOLDER,
        }

    def out_shape(self, shape):
        return self.op_.out_shape(shape)

    def prepare(self, device, work) -> Prepared:
        return _PreparedCopy(_as_rows(self.op_.value, device, work))

    def describe(self) -> dict:
        return {"op": "replace", "adapter": self.label, "why": self.op_.why}


@dataclass(frozen=True)
class RestoreStep(Step):
    """W ← an original tensor read from a file (unmerging a replace)."""

    OP = "restore"
    reads_input = False

    source: Any  # a TensorInfo
    label: str

    def out_shape(self, shape):
        return tuple(self.source.shape)

    def prepare(self, device, work) -> Prepared:
        from ..tensors.io import read_tensor

        return _PreparedCopy(_as_rows(read_tensor(self.source), device, work))

    def describe(self) -> dict:
        return {"op": "restore", "adapter": self.label, "from": str(self.source.file)}


class _PreparedRows(Prepared):
    def __init__(self, idx, values):
        import torch

        self.idx, self.values = idx, values
        self.original = torch.zeros_like(values)  # the rows replaced, for the record

    def apply_block(self, acc, start: int, stop: int) -> None:
        sel = (self.idx >= start) & (self.idx < stop)
        if bool(sel.any()):
            self.original[sel] = acc[self.idx[sel] - start]
            acc[self.idx[sel] - start] = self.values[sel]

    def record(self) -> dict:
        return {"rows": b64(float32_bytes(self.original))}


@dataclass(frozen=True)
class RowsStep(Step):
    OP = "rows"

    op_: ReplaceRows
    label: str
    sha: str = ""
    record: bool = False  # a merge records the rows it replaces (an unmerge puts them back)

    def record_template(self) -> dict | None:
        if not self.record:
            return None
        n = self.op_.values.numel()
        return {"op": "rows", "adapter": self.sha, "rows": b64_placeholder(4 * n)}

    def prepare(self, device, work) -> Prepared:
        import torch

        idx = torch.tensor(self.op_.indices, dtype=torch.long, device=device)
        return _PreparedRows(idx, _as_rows(self.op_.values, device, work))

    def describe(self) -> dict:
        return {"op": "rows", "adapter": self.label, "rows": len(self.op_.indices)}


class _PreparedAdd(Prepared):
    def __init__(self, value2d, alpha: float):
        self.value, self.alpha = value2d, alpha

    def apply_block(self, acc, start: int, stop: int) -> None:
        acc.add_(self.value[start:stop], alpha=self.alpha)


@dataclass(frozen=True)
class AddStep(Step):
    OP = "add"

    op_: AddToTensor
    weight: float
    label: str

    def prepare(self, device, work) -> Prepared:
        return _PreparedAdd(_as_rows(self.op_.value, device, work), self.op_.scale * self.weight)

    def describe(self) -> dict:
        d = {"op": "add", "adapter": self.label, "why": self.op_.why}
        if self.weight != 1.0:
            d["weight"] = self.weight
        return d
