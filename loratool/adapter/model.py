"""An adapter: modules (low-rank updates, keyed by the base tensor each changes), full-tensor
operations (keyed by their target tensor) and metadata."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..errors import ValidationError
from .module import Module
from .ops import TensorOp

if TYPE_CHECKING:
    import torch


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
    """Modules and tensor operations plus metadata.

    Every stored tensor of the source is accounted for exactly once: as a module's tensor, as an
    operation's tensor, or (for formats that carry something loratool never merges) in
    ``extra_tensors``. ``origin`` keeps format-specific facts needed to write the adapter back
    the way it came (PEFT's adapter_config.json, kohya's key style, prefix and metadata).
    """

    modules: dict[str, Module]
    meta: AdapterMeta = field(default_factory=AdapterMeta)
    origin: dict[str, Any] = field(default_factory=dict)
    # Tensors a format stores that loratool carries so the format round-trips, never merged.
    extra_tensors: dict[str, Any] = field(default_factory=dict)
    ops: dict[str, TensorOp] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, mod in self.modules.items():
            if key != mod.name:
                raise ValidationError(f"module keyed {key!r} is named {mod.name!r}")
        for key, op in self.ops.items():
            if key != op.target:
                raise ValidationError(f"operation keyed {key!r} targets {op.target!r}")

    @property
    def parts(self) -> list:
        """Modules and operations: everything that holds stored tensors."""
        return [*self.modules.values(), *self.ops.values()]

    @property
    def params(self) -> int:
        return sum(p.params for p in self.parts)

    @property
    def dense_params(self) -> int:
        return sum(p.dense_params for p in self.parts)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

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
        names = sorted({p.dtype_name for p in self.parts})
        return ",".join(names) or "none"

    @property
    def kinds(self) -> set[str]:
        """Every module label and operation name in the adapter (``linear+dora``, ``replace``…)."""
        return {m.label for m in self.modules.values()} | {o.op for o in self.ops.values()}

    @property
    def plain_lora(self) -> bool:
        """Only plain LoRA modules, no DoRA, no slices, no operations (what v1 blobs hold)."""
        from .lora import LoraModule

        return not self.ops and all(
            type(m) is LoraModule and m.magnitude is None and m.target_rows is None
            for m in self.modules.values()
        )

    def check_finite(self, source: object | None = None) -> None:
        for p in self.parts:
            p.check_finite(source)

    def deltas(self, weight: float = 1.0, *, device: Any = None) -> dict[str, torch.Tensor]:
        return {name: m.delta(weight, device=device) for name, m in self.modules.items()}

    def renamed(self, mapping: dict[str, str]) -> Adapter:
        """Modules and operation targets renamed by ``mapping`` (absent names unchanged)."""
        mods = {mapping.get(n, n): m.with_name(mapping.get(n, n)) for n, m in self.modules.items()}
        ops = {mapping.get(t, t): o.retarget(mapping.get(t, t)) for t, o in self.ops.items()}
        return Adapter(mods, replace(self.meta), dict(self.origin), dict(self.extra_tensors), ops)

    def replaced(self, **changes) -> Adapter:
        """A copy with some fields changed (modules, ops, meta, origin, extra_tensors)."""
        fields = {
            "modules": dict(self.modules),
            "meta": replace(self.meta),
            "origin": dict(self.origin),
            "extra_tensors": dict(self.extra_tensors),
            "ops": dict(self.ops),
        }
        fields.update(changes)
        return Adapter(**fields)
