"""The module protocol: one adapted base tensor, whatever the method that adapts it.

Every kind of module (LoRA on a linear, conv or embedding layer, DoRA, LoRA on stacked
experts, LyCORIS products…) is a subclass of :class:`Module` registered under the kind names it
handles. The rest of loratool only uses the protocol:

- ``name`` is the base tensor it changes (``model.layers.0.self_attn.q_proj.weight``), ``kind``
  says how its stored tensors lay out that change;
- ``tensors()`` are its stored tensors by role (``lora_A``, ``lora_B``, ``magnitude``…) and
  ``facts()`` its JSON-able facts (alpha, rsLoRA…): together they serialize it
  (``formats/canonical.py``) and ``from_parts`` builds it back;
- ``base_shape``, ``params``, ``dense_params``, ``rank``, ``scale`` describe it;
- ``delta()`` is weight·ΔW as a dense float32 tensor shaped like the base tensor (tests, small
  work); ``prepare()`` gives the merge engine what it needs to add weight·ΔW into a block of rows
  of W in float32 without forming ΔW (``DeltaTerm.add_block``);
- ``magnitude`` (DoRA) is a vector the merged rows or columns are re-normalised to, along
  ``dora_axis`` of the stored tensor (0: rows, 1: columns).

A module may also cover only rows ``target_rows = (start, stop)`` of its base tensor (a q, k or
v update inside one fused qkv tensor): ``base_shape`` is then the shape of that slice.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ..errors import ValidationError
from ..tensors.header import HeaderTensor

if TYPE_CHECKING:
    import torch

# kind name → the Module subclass that handles it
KIND_CLASSES: dict[str, type[Module]] = {}


def register(cls: type[Module]) -> type[Module]:
    """Class decorator: make ``cls`` the handler of each kind in ``cls.KINDS``."""
    for kind in cls.KINDS:
        KIND_CLASSES[kind] = cls
    return cls


def module_class(kind: str, *, source: object | None = None, tensor: str | None = None):
    try:
        return KIND_CLASSES[kind]
    except KeyError:
        raise ValidationError(
            f"unknown module kind {kind!r} (known: {', '.join(sorted(KIND_CLASSES))})",
            file=source,
            tensor=tensor,
        ) from None


class DeltaTerm(Protocol):
    """weight·ΔW of one module, prepared on a device for the merge engine.

    ``acc`` is a float32 (float64 for float64 bases) block of rows ``start:stop`` of the base
    tensor viewed as 2-D (its first dimension by the product of the others); ``add_block``
    adds the same rows of weight·ΔW into it in place.
    """

    def add_block(self, acc: torch.Tensor, start: int, stop: int) -> None: ...


class DenseTerm:
    """A DeltaTerm from a dense ΔW (kinds with no cheaper block form)."""

    def __init__(self, delta2d: torch.Tensor):
        self.delta2d = delta2d

    def add_block(self, acc, start: int, stop: int) -> None:
        acc.add_(self.delta2d[start:stop])


class Stored:
    """What every holder of stored tensors shares (modules and tensor operations): lazy
    HeaderTensor stand-ins read on demand, finiteness, sizes. Subclasses give ``name``,
    ``tensors()`` and ``with_tensors()``."""

    name: str

    def tensors(self) -> dict[str, Any]:
        """Stored tensors by role (present ones only)."""
        raise NotImplementedError

    def with_tensors(self, tensors: dict[str, Any]):
        """The same object with some stored tensors replaced (by role)."""
        raise NotImplementedError

    @property
    def params(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    # -- lazy tensors -------------------------------------------------------------------------
    @property
    def lazy(self) -> bool:
        """Whether some stored tensors are HeaderTensor stand-ins, not yet read."""
        return any(isinstance(t, HeaderTensor) for t in self.tensors().values())

    def materialized(self, source: object | None = None) -> Stored:
        """This module with its tensors read into torch tensors and checked finite."""
        if not self.lazy:
            return self
        from ..tensors.io import materialize

        tensors = self.tensors()
        mod = self.with_tensors({role: materialize(t) for role, t in tensors.items()})
        if source is None:
            lazy = [t for t in tensors.values() if isinstance(t, HeaderTensor)]
            source = lazy[0].info.file if lazy else None
        mod.check_finite(source)
        return mod

    def check_finite(self, source: object | None = None) -> None:
        """NaN/Inf in a stored tensor is an error (lazy tensors are checked when read)."""
        if self.lazy:
            return
        import torch

        for role, t in self.tensors().items():
            if not bool(torch.isfinite(t).all()):
                bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
                raise ValidationError(f"{role} contains {bad}", file=source, tensor=self.name)


class Module(Stored):
    """Base class of every module kind; see the module docstring for the protocol."""

    KINDS: ClassVar[tuple[str, ...]] = ()
    # roles whose tensors must be present / may be present, in serialization order
    ROLES: ClassVar[tuple[str, ...]] = ()
    OPTIONAL_ROLES: ClassVar[tuple[str, ...]] = ()

    name: str
    kind: str
    # plain class attributes (not properties) so that dataclass subclasses may make them fields
    alpha: float = 0.0
    rslora: bool = False
    magnitude: Any = None
    target_rows: tuple[int, int] | None = None
    # other base tensors this module may be for, told apart by shape when resolved (peft's
    # nested ParamWrappers do not name the parameter each one adapts)
    alternatives: tuple[str, ...] = ()

    # -- serialization -------------------------------------------------------------------
    def facts(self) -> dict[str, Any]:
        """JSON-able facts besides the kind (alpha, rslora, …)."""
        raise NotImplementedError

    @classmethod
    def from_parts(
        cls, name: str, kind: str, tensors: dict[str, Any], facts: dict[str, Any], *, source=None
    ) -> Module:
        raise NotImplementedError

    # -- description ---------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return 0

    @property
    def scale(self) -> float:
        return 1.0

    @property
    def base_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def dense_params(self) -> int:
        return math.prod(self.base_shape)

    @property
    def dtype_name(self) -> str:
        t = next(iter(self.tensors().values()))
        return str(t.dtype).removeprefix("torch.")

    @property
    def dora_axis(self) -> int:
        """Along which axis of the stored tensor DoRA's magnitude runs (0 rows, 1 columns)."""
        return 0

    @property
    def label(self) -> str:
        """The kind as shown to users: ``linear``, ``linear+dora``, ``experts``…"""
        return self.kind + ("+dora" if self.magnitude is not None else "")

    def shapes(self) -> tuple[list[int], list[int]]:
        """Two shapes for the catalog's a_shape / b_shape columns."""
        ts = list(self.tensors().values())
        return list(ts[0].shape), list(ts[1].shape) if len(ts) > 1 else []

    def validate(self, source: object | None = None) -> None:
        for role, t in self.tensors().items():
            if not t.is_floating_point():
                raise ValidationError(
                    f"{role} must be floating point, got {t.dtype}", file=source, tensor=self.name
                )
            if t.element_size() == 1:  # float8: no finiteness check, no matmul in torch
                raise ValidationError(
                    f"{role} is stored as 8-bit float ({t.dtype}), which adapter factors may not "
                    "be; store them as float16, bfloat16 or float32",
                    file=source,
                    tensor=self.name,
                )
        if self.magnitude is not None:
            m = self.magnitude
            want = self.base_shape[self.dora_axis]
            if m.numel() != want or sum(1 for s in m.shape if s != 1) > 1:
                raise ValidationError(
                    f"DoRA magnitude has shape {list(m.shape)} but this {self.kind} layer needs "
                    f"{want} values (one per output)",
                    file=source,
                    tensor=self.name,
                )

    def fit(self, shape: tuple[int, ...], *, source=None, where=None, facts=None) -> Module:
        """This module checked against its base tensor's ``shape``: itself, or an equivalent
        module that fits (a linear taken as fan_in_fan_out); raises if none does. ``facts``
        (``bases.BaseFacts``) says what shapes cannot: layer types, transposed experts."""
        want = shape
        if self.target_rows is not None:
            lo, hi = self.target_rows
            if not (0 <= lo < hi <= shape[0]):
                raise ValidationError(
                    f"rows {lo}:{hi} lie outside the base tensor's {shape[0]} rows",
                    file=source,
                    tensor=self.name,
                )
            want = (hi - lo, *shape[1:])
        if tuple(self.base_shape) == tuple(want):
            return self
        raise ValidationError(
            f"ΔW is {list(self.base_shape)} ({self.label}, r={self.rank}) but the base tensor is {list(want)}",
            file=source,
            tensor=self.name,
        )

    # -- math ----------------------------------------------------------------------------
    def delta(
        self, weight: float = 1.0, *, device: Any = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """weight·ΔW, dense, in float32 (or ``dtype``, at least float32), shaped like the base
        tensor (like its ``target_rows`` slice). For DoRA this is the low-rank part only: the
        merged weight also depends on W (see ``merge.ops``)."""
        raise NotImplementedError

    def prepare(self, weight: float, device: Any, work: torch.dtype) -> DeltaTerm:
        """weight·ΔW in the form the merge engine adds block by block (default: dense)."""
        d = self.materialized().delta(weight, device=device, dtype=work)
        rows = d.shape[0] if d.dim() else 1
        return DenseTerm(d.reshape(rows, -1))

    def magnitude_vector(self, device: Any, work: torch.dtype) -> torch.Tensor:
        """DoRA's magnitude as a flat vector along ``dora_axis``."""
        from ..tensors.io import materialize

        return materialize(self.magnitude).reshape(-1).to(device=device, dtype=work)

    def with_name(self, name: str) -> Module:
        return replace(self, name=name)
