"""The adapter model: LoRA modules keyed by the base tensor they change, and their ΔW.

For every kind, ΔW = scale · B·A with the layout the base weight is stored in:

- ``linear``: W is d×k (out × in), A is r×k, B is d×r, ΔW = B·A.
- ``linear_fifo``: fan_in_fan_out, GPT-2's Conv1D stores W as k×d (in × out); A and B keep
  the Linear layout, so ΔW = (B·A)ᵀ.
- ``conv2d``: W is out×in×kh×kw, A is r×in×kh×kw (a conv), B is out×r×1×1 (a 1×1 conv).
  Composing the two convolutions gives ΔW[o,i,h,w] = Σ_r B[o,r]·A[r,i,h,w], i.e. the matrix
  product of the flattened factors reshaped back; for 1×1 kernels that is the plain product.
- ``embedding``: W is num_embeddings × dim; PEFT keeps lora_embedding_A as r×num_embeddings and
  lora_embedding_B as dim×r, so ΔW = (B·A)ᵀ.

scale = alpha / r, or alpha / √r for rsLoRA, times the caller's weight. All products are taken in
float32 (float64 inputs stay float64) and rounded once, by the caller, to the stored dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .errors import ValidationError
from .tensors.header import HeaderTensor

if TYPE_CHECKING:
    import torch

KINDS = ("linear", "linear_fifo", "conv2d", "embedding")


@dataclass
class LoraModule:
    """One adapted weight. ``name`` is the base tensor it changes (``….q_proj.weight``)."""

    name: str
    kind: str
    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    rslora: bool = False

    def __post_init__(self) -> None:
        self.alpha = float(self.alpha)
        self.validate()

    # -- shape facts -------------------------------------------------------------------
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
    def params(self) -> int:
        return self.A.numel() + self.B.numel()

    @property
    def dense_params(self) -> int:
        return math.prod(self.base_shape)

    def validate(self, source: object | None = None) -> None:
        A, B, name = self.A, self.B, self.name
        if self.kind not in KINDS:
            raise ValidationError(f"unknown module kind {self.kind!r}", file=source, tensor=name)
        want = 4 if self.kind == "conv2d" else 2
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
        if self.kind == "conv2d" and tuple(B.shape[2:]) != (1, 1):
            raise ValidationError(
                f"conv2d B must be out×r×1×1, got {tuple(B.shape)}", file=source, tensor=name
            )
        if not (A.is_floating_point() and B.is_floating_point()):
            raise ValidationError("A and B must be floating point", file=source, tensor=name)
        if not math.isfinite(self.alpha):
            raise ValidationError(f"alpha is {self.alpha}", file=source, tensor=name)

    @property
    def lazy(self) -> bool:
        """Whether A and B are HeaderTensor stand-ins, not yet read (see ``materialized``)."""
        return isinstance(self.A, HeaderTensor) or isinstance(self.B, HeaderTensor)

    def materialized(self, source: object | None = None) -> LoraModule:
        """This module with A and B read into torch tensors and checked finite."""
        if not self.lazy:
            return self
        from .tensors.io import materialize

        mod = replace(self, A=materialize(self.A), B=materialize(self.B))
        mod.check_finite(
            source if source is not None else getattr(self.A, "info", None) and self.A.info.file
        )
        return mod

    def check_finite(self, source: object | None = None) -> None:
        """NaN/Inf in A or B is an error (lazy factors are checked when materialized)."""
        if self.lazy:
            return
        import torch

        for label, t in (("lora_A", self.A), ("lora_B", self.B)):
            if not bool(torch.isfinite(t).all()):
                bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
                raise ValidationError(f"{label} contains {bad}", file=source, tensor=self.name)

    # -- math --------------------------------------------------------------------------
    def delta(
        self, weight: float = 1.0, *, device: Any = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """ΔW · weight in float32 (or ``dtype``, at least float32), shaped like the base weight."""
        m = self.materialized()
        return delta_from_factors(
            self.kind, m.A, m.B, self.scale * weight, device=device, dtype=dtype
        )

    def with_name(self, name: str) -> LoraModule:
        return replace(self, name=name)


def build_module(
    name: str, kind: str, A, B, alpha: float, rslora: bool = False, *, source: object | None = None
) -> LoraModule:
    """A validated, finite module; errors name ``source`` (the file it came from)."""
    try:
        mod = LoraModule(name, kind, A, B, alpha, rslora)
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
    elif kind == "conv2d":
        d = (B.flatten(1) @ A.flatten(1)).reshape(B.shape[0], *A.shape[1:])
    else:
        raise ValidationError(f"unknown module kind {kind!r}")
    # Scale after the product, as PEFT does, so results agree to the last bit where possible.
    return d * scale


@dataclass
class AdapterMeta:
    """What the catalog records about an adapter besides its tensors."""

    name: str | None = None
    task: str | None = None
    base_model: str | None = None
    tags: list[str] = field(default_factory=list)
    description: str | None = None
    source: str | None = None
    format: str | None = None  # peft | kohya | loratool
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class Adapter:
    """A set of modules plus metadata.

    ``origin`` keeps format-specific facts needed to write the adapter back the way it came
    (PEFT's adapter_config.json, kohya's key style, prefix and safetensors metadata).
    """

    modules: dict[str, LoraModule]
    meta: AdapterMeta = field(default_factory=AdapterMeta)
    origin: dict[str, Any] = field(default_factory=dict)
    # Tensors a format stores beside the factors that are not LoRA (peft's saved embedding
    # layers); carried so the format round-trips, never merged.
    extra_tensors: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, mod in self.modules.items():
            if key != mod.name:
                raise ValidationError(f"module keyed {key!r} is named {mod.name!r}")

    @property
    def params(self) -> int:
        return sum(m.params for m in self.modules.values())

    @property
    def dense_params(self) -> int:
        return sum(m.dense_params for m in self.modules.values())

    @property
    def nbytes(self) -> int:
        return sum(
            m.A.numel() * m.A.element_size() + m.B.numel() * m.B.element_size()
            for m in self.modules.values()
        )

    @property
    def ranks(self) -> list[int]:
        return [m.rank for m in self.modules.values()]

    @property
    def max_rank(self) -> int:
        return max(self.ranks, default=0)

    @property
    def max_alpha(self) -> float:
        return max((m.alpha for m in self.modules.values()), default=0.0)

    @property
    def rslora(self) -> bool:
        return any(m.rslora for m in self.modules.values())

    @property
    def dtype_name(self) -> str:
        names = sorted({str(m.A.dtype).removeprefix("torch.") for m in self.modules.values()})
        return ",".join(names) or "none"

    def check_finite(self, source: object | None = None) -> None:
        for m in self.modules.values():
            m.check_finite(source)

    def deltas(self, weight: float = 1.0, *, device: Any = None) -> dict[str, torch.Tensor]:
        return {name: m.delta(weight, device=device) for name, m in self.modules.items()}

    def renamed(self, mapping: dict[str, str]) -> Adapter:
        mods = {mapping.get(n, n): m.with_name(mapping.get(n, n)) for n, m in self.modules.items()}
        return Adapter(mods, replace(self.meta), dict(self.origin), dict(self.extra_tensors))
