"""LoRA (and DoRA) on one linear, Conv1D, conv2d or embedding weight.

For every kind, ΔW = scale · B·A with the layout the base weight is stored in:

- ``linear``: W is d×k (out × in), A is r×k, B is d×r, ΔW = B·A.
- ``linear_fifo``: fan_in_fan_out, GPT-2's Conv1D stores W as k×d (in × out); A and B keep
  the Linear layout, so ΔW = (B·A)ᵀ.
- ``conv2d``: W is out×in×kh×kw, A is r×in×kh×kw (a conv), B is out×r×1×1 (a 1×1 conv).
  Composing the two convolutions gives ΔW[o,i,h,w] = Σ_r B[o,r]·A[r,i,h,w], i.e. the matrix
  product of the flattened factors reshaped back; for 1×1 kernels that is the plain product.
  ``conv1d`` and ``conv3d`` (peft's Conv1d/Conv3d layers) are the same with one kernel
  dimension fewer or more.
- ``embedding``: W is num_embeddings × dim; PEFT keeps lora_embedding_A as r×num_embeddings and
  lora_embedding_B as dim×r, so ΔW = (B·A)ᵀ.

scale = alpha / r, or alpha / √r for rsLoRA, times the caller's weight. All products are taken in
float32 (float64 inputs stay float64) and rounded once, by the caller, to the stored dtype.

DoRA (peft's ``use_dora``) adds a magnitude vector m: the merged weight is
W' = m / ‖W + ΔW‖ · (W + ΔW), the norm taken per output, i.e. per row of a linear or conv2d
weight as stored (over in·kh·kw) and per column of a Conv1D or embedding weight as stored
(peft's DoraLinearLayer with fan_in_fan_out, and DoraEmbeddingLayer which transposes W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..errors import ValidationError
from .module import Module, register

if TYPE_CHECKING:
    import torch

KINDS = ("linear", "linear_fifo", "conv1d", "conv2d", "conv3d", "embedding")
CONV_DIMS = {"conv1d": 3, "conv2d": 4, "conv3d": 5}


class LowRankTerm:
    """weight·ΔW (stored layout, flattened to 2-D) = scale · left @ right."""

    __slots__ = ("left", "right", "scale")

    def __init__(self, left, right, scale: float):
        self.left, self.right, self.scale = left, right, scale

    def add_block(self, acc, start: int, stop: int) -> None:
        # addmm computes the same float32 values as forming (B·A)·scale and adding it,
        # without materialising it (tests compare with peft bit for bit).
        acc.addmm_(self.left[start:stop], self.right, alpha=self.scale)


@register
@dataclass
class LoraModule(Module):
    """One adapted weight. ``name`` is the base tensor it changes (``….q_proj.weight``)."""

    KINDS = KINDS
    ROLES = ("lora_A", "lora_B")
    OPTIONAL_ROLES = ("magnitude",)

    name: str
    kind: str
    A: Any
    B: Any
    alpha: float
    rslora: bool = False
    magnitude: Any = None  # DoRA
    target_rows: tuple[int, int] | None = None
    alternatives: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            # a config's "abc", null or [1] is an error here, not a float() traceback
            raise ValidationError(f"alpha must be a number, got {self.alpha!r}", tensor=self.name)
        self.alpha = float(self.alpha)
        self.alternatives = tuple(self.alternatives)
        self.rslora = bool(self.rslora)
        if self.target_rows is not None:
            self.target_rows = (int(self.target_rows[0]), int(self.target_rows[1]))
        self.validate()

    # -- serialization -------------------------------------------------------------------
    def tensors(self) -> dict[str, Any]:
        out = {"lora_A": self.A, "lora_B": self.B}
        if self.magnitude is not None:
            out["magnitude"] = self.magnitude
        return out

    def facts(self) -> dict[str, Any]:
        out: dict[str, Any] = {"alpha": self.alpha, "rslora": self.rslora}
        if self.target_rows is not None:
            out["target_rows"] = list(self.target_rows)
        if self.alternatives:
            out["alternatives"] = list(self.alternatives)
        return out

    @classmethod
    def from_parts(cls, name, kind, tensors, facts, *, source=None) -> LoraModule:
        rows = facts.get("target_rows")
        return build_module(
            name,
            kind,
            tensors["lora_A"],
            tensors["lora_B"],
            facts["alpha"],
            bool(facts.get("rslora")),
            magnitude=tensors.get("magnitude"),
            target_rows=tuple(rows) if rows is not None else None,
            alternatives=tuple(facts.get("alternatives", ())),
            source=source,
        )

    def with_tensors(self, tensors: dict[str, Any]) -> LoraModule:
        return replace(
            self,
            A=tensors.get("lora_A", self.A),
            B=tensors.get("lora_B", self.B),
            magnitude=tensors.get("magnitude", self.magnitude),
        )

    # -- shape facts ---------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def scale(self) -> float:
        r = self.rank
        if r == 0:
            return 0.0
        return self.alpha / math.sqrt(r) if self.rslora else self.alpha / r

    @property
    def base_shape(self) -> tuple[int, ...]:
        """The shape of the base weight this module's ΔW must fit."""
        A, B = self.A, self.B
        if self.kind == "linear":
            return (B.shape[0], A.shape[1])
        if self.kind in ("linear_fifo", "embedding"):
            return (A.shape[1], B.shape[0])
        return (B.shape[0], *A.shape[1:])

    @property
    def dora_axis(self) -> int:
        return 1 if self.kind in ("linear_fifo", "embedding") else 0

    def shapes(self) -> tuple[list[int], list[int]]:
        return list(self.A.shape), list(self.B.shape)

    @property
    def dtype_name(self) -> str:
        return str(self.A.dtype).removeprefix("torch.")

    def validate(self, source: object | None = None) -> None:
        A, B, name = self.A, self.B, self.name
        if self.kind not in KINDS:
            raise ValidationError(f"unknown module kind {self.kind!r}", file=source, tensor=name)
        want = CONV_DIMS.get(self.kind, 2)
        if A.dim() != want or B.dim() != want:
            raise ValidationError(
                f"{self.kind} needs {want}-D A and B, got A {tuple(A.shape)} and B {tuple(B.shape)}",
                file=source,
                tensor=name,
            )
        if A.shape[0] != B.shape[1]:
            raise ValidationError(
                f"A has rank {A.shape[0]} but B has rank {B.shape[1]} (A {tuple(A.shape)}, B {tuple(B.shape)})",
                file=source,
                tensor=name,
            )
        if A.shape[0] == 0:
            raise ValidationError("rank 0: A and B hold no update", file=source, tensor=name)
        if 0 in tuple(A.shape) or 0 in tuple(B.shape):
            raise ValidationError(
                f"a zero-width module (A {tuple(A.shape)}, B {tuple(B.shape)}): it changes nothing "
                "and fits no weight",
                file=source,
                tensor=name,
            )
        if self.kind in CONV_DIMS and any(s != 1 for s in B.shape[2:]):
            raise ValidationError(
                f"{self.kind} B must be out×r×1…, got {tuple(B.shape)}", file=source, tensor=name
            )
        if not (A.is_floating_point() and B.is_floating_point()):
            raise ValidationError("A and B must be floating point", file=source, tensor=name)
        if not math.isfinite(self.alpha):
            raise ValidationError(f"alpha is {self.alpha}", file=source, tensor=name)
        super().validate(source)

    def fit(self, shape, *, source=None, where=None, facts=None) -> LoraModule:
        """fan_in_fan_out is decided per module from the layer type, as peft does (it sets the
        flag for Conv1D targets and clears it for Linear ones, whatever the config says): from
        the base's model type where it is known (a square Conv1D looks like a Linear), else
        from the shape (a linear module whose ΔW fits only transposed is a Conv1D)."""
        mod = self._one_by_one(tuple(shape))
        if mod is not self:
            return Module.fit(mod, shape, source=source, where=where, facts=facts)
        if self.kind in ("linear", "linear_fifo") and self.target_rows is None:
            conv1d = facts.is_conv1d(self.name) if facts is not None else None
            if conv1d is not None:
                kind = "linear_fifo" if conv1d else "linear"
            elif tuple(self.base_shape) != tuple(shape) and tuple(
                reversed(self.base_shape)
            ) == tuple(shape):
                kind = "linear_fifo" if self.kind == "linear" else "linear"
            else:
                kind = self.kind
            if kind != self.kind:
                mod = replace(self, kind=kind)
        return Module.fit(mod, shape, source=source, where=where, facts=facts)

    def _one_by_one(self, shape: tuple[int, ...]) -> LoraModule:
        """A 1×1-conv update on a Linear weight, or a Linear update on a 1×1 conv: the same ΔW
        in the other layout. sd-scripts' merge squeezes 4-D factors on a Linear weight (SD
        1.x's proj_in is a 1×1 conv, SD 2.x's and SDXL's a Linear); a 2-D update on a 1×1 conv
        gets the two unit dimensions back. Anything else is left to ``Module.fit``."""
        if self.target_rows is not None or self.magnitude is not None:
            return self
        A, B = self.A, self.B
        if (
            self.kind == "conv2d"
            and len(shape) == 2
            and tuple(A.shape[2:]) == (1, 1)
            and (B.shape[0], A.shape[1]) == shape
        ):
            return replace(
                self,
                kind="linear",
                A=A.reshape(A.shape[0], A.shape[1]),
                B=B.reshape(B.shape[0], B.shape[1]),
            )
        if (
            self.kind == "linear"
            and len(shape) == 4
            and shape[2:] == (1, 1)
            and (B.shape[0], A.shape[1]) == shape[:2]
        ):
            return replace(
                self,
                kind="conv2d",
                A=A.reshape(A.shape[0], A.shape[1], 1, 1),
                B=B.reshape(B.shape[0], B.shape[1], 1, 1),
            )
        return self

    # -- math ----------------------------------------------------------------------------
    def delta(
        self, weight: float = 1.0, *, device: Any = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """ΔW · weight in float32 (or ``dtype``, at least float32), shaped like the base weight."""
        m = self.materialized()
        return delta_from_factors(
            self.kind, m.A, m.B, self.scale * weight, device=device, dtype=dtype
        )

    def prepare(self, weight: float, device: Any, work) -> LowRankTerm:
        mod = self.materialized()  # lazy factors are read (and checked finite) here
        A = mod.A.to(device=device, dtype=work)
        B = mod.B.to(device=device, dtype=work)
        if mod.kind == "linear":
            left, right = B, A
        elif mod.kind in ("linear_fifo", "embedding"):
            left, right = A.T, B.T  # ΔW = (B·A)ᵀ = Aᵀ·Bᵀ
        else:  # conv: ΔW[o, i·kh·kw] = B[o, r]·A[r, i·kh·kw]
            left, right = B.flatten(1), A.flatten(1)
        return LowRankTerm(left, right, mod.scale * weight)


def build_module(
    name: str,
    kind: str,
    A,
    B,
    alpha: float,
    rslora: bool = False,
    *,
    magnitude=None,
    target_rows: tuple[int, int] | None = None,
    alternatives: tuple[str, ...] = (),
    source: object | None = None,
) -> LoraModule:
    """A validated, finite module; errors name ``source`` (the file it came from)."""
    try:
        mod = LoraModule(name, kind, A, B, alpha, rslora, magnitude, target_rows, alternatives)
    except ValidationError as exc:
        if exc.file is None and source is not None:
            raise ValidationError(
                exc.message, file=source, tensor=exc.tensor, hint=exc.hint
            ) from None
        raise
    mod.check_finite(source)
    return mod


def delta_from_factors(
    kind: str,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    *,
    device: Any = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    import torch

    work = dtype or (
        torch.float64 if A.dtype == torch.float64 or B.dtype == torch.float64 else torch.float32
    )
    if work not in (torch.float32, torch.float64):
        work = torch.float32  # never do the product in a narrower type
    A = A.to(device=device, dtype=work)
    B = B.to(device=device, dtype=work)
    if kind == "linear":
        d = B @ A
    elif kind in ("linear_fifo", "embedding"):
        d = (B @ A).T
    elif kind in CONV_DIMS:
        d = (B.flatten(1) @ A.flatten(1)).reshape(B.shape[0], *A.shape[1:])
    else:
        raise ValidationError(f"unknown module kind {kind!r}")
    # Scale after the product, as PEFT does, so results agree to the last bit where possible.
    return d * scale
