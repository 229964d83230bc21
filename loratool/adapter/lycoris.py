"""LyCORIS modules: LoHa, LoKr and LoCon's Tucker form, with ΔW as lycoris-lora computes it.

Read from lycoris-lora 4.1 (``lycoris/modules/loha.py``, ``lokr.py``, ``locon.py`` and
``lycoris/functional/``); tests pin each against the package itself. Stored tensors keep
lycoris' own names and layouts (its ``custom_state_dict``), so a file round-trips tensor for
tensor. Throughout, the base weight W is out×in (linear) or out×in×k… (conv), viewed 2-D as
out×(in·k…), which is how every product below lays it out.

**LoHa** (``hada_*``): ΔW = scale · (w1a·w1b) ⊙ (w2a·w2b), w1a/w2a out×r, w1b/w2b r×(in·k…)
(a conv's kernel is flattened into w1b: the factors alone do not say its shape, the base
does). With Tucker factors (``hada_t1``/``hada_t2`` r×r×k…, w1a/w2a then r×out, w1b/w2b
r×in) each half is ``einsum("i j k, j c, i o -> o c k", t, wb, wa)``. scale = alpha / r with
r = w1b.shape[0] (lycoris' ``lora_dim``).

**LoKr** (``lokr_*``): ΔW = scale · w1 ⊗ w2 (Kronecker product, w1 first), w1 a×c given whole
(``lokr_w1``) or as w1a·w1b; w2 b×d(×k…) whole (``lokr_w2``), or w2a·w2b (w2b r×(d·k…)), or
Tucker ``einsum("i j k, i p, j r -> p r k", t2, w2a, w2b)`` with w2a r×b, w2b r×d. ΔW is
(a·b)×(c·d)(×k…). scale = alpha / r with r the rank of the factored side (w1a.shape[1], else
w2a.shape[1], for Tucker t2.shape[0]); when both halves are whole lycoris forces alpha = r:
scale is 1 whatever the stored alpha.

**LoCon Tucker** (``lora_down`` r×in×1×1, ``lora_mid`` r×r×k…, ``lora_up`` out×r×1×1):
ΔW = scale · ``einsum("i j k, o i, j c -> o c k", mid, up, down)``, scale = alpha / r,
r = lora_down.shape[0]. (LoCon without ``lora_mid`` is a plain kohya conv LoRA: ``LoraModule``.)

lycoris stores ``alpha`` already multiplied by r/√r for rsLoRA (``alpha * lora_dim / r_factor``)
and folds ``use_scalar``'s scalar into w1a/w1/lora_up before saving, so a file's meaning is
always scale = alpha / r. ``rank_dropout`` and ``module_dropout`` act only in training.

Two places where lycoris 4.1.3 disagrees with itself, and what is followed here:

- ``get_diff_weight`` / ``merge_to`` of LoHa and LoKr multiply ``get_weight`` (which already
  holds the scale) by the scale again, so lycoris' own merge adds scale²·ΔW. The module's
  forward, which training optimised (and ComfyUI applies), adds scale·ΔW: that is followed.
- For a Tucker LoKr its loader and ``functional.lokr.diff_weight`` read r as w2a.shape[1],
  which is b there, not r (and the loader then cannot load the file); the module that trained
  it used r = t2.shape[0]: that is followed.

Each kind gives the merge engine blocks of rows of ΔW without forming the whole of it, and
``svdvals`` / ``truncated`` give its spectrum and best rank-k LoRA approximation from the
factors: a LoHa is exactly a rank-r² product (the face-splitting identity
(A₁B₁) ⊙ (A₂B₂) = (A₁ • A₂)(B₁ᵀ • B₂ᵀ)ᵀ), a Tucker LoCon a rank-r one, and the singular values
of a Kronecker product are the products of its halves'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..errors import ValidationError
from .module import Module, register

if TYPE_CHECKING:
    import torch


def _work(dtype):
    import torch

    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _prod(xs) -> int:
    return math.prod(int(x) for x in xs)


class _Lycoris(Module):
    """What the three kinds share: alpha, the base shape learnt from the base, row slices, fit."""

    shape: tuple[int, ...] | None
    target_rows: tuple[int, int] | None

    # -- subclasses give these -------------------------------------------------------------
    def _flat_shape(self) -> tuple[int, int]:
        """(out, in·k…) from the factors alone."""
        raise NotImplementedError

    def _exact_shape(self) -> tuple[int, ...] | None:
        """The full base shape when the factors say it (Tucker, 4-D w2), else None."""
        return None

    def _halves(self, work, device) -> tuple:
        """The factors in ``work`` precision on ``device``, in the form the math uses."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------
    def _post_init(self) -> None:
        self.alpha = float(self.alpha)
        if self.shape is not None:
            self.shape = tuple(int(s) for s in self.shape)
        if self.target_rows is not None:
            self.target_rows = (int(self.target_rows[0]), int(self.target_rows[1]))
        self.validate()

    def _err(self, message: str, source=None) -> ValidationError:
        return ValidationError(message, file=source, tensor=self.name)

    def _common_checks(self, source=None) -> None:
        if not math.isfinite(self.alpha):
            raise self._err(f"alpha is {self.alpha}", source)
        exact = self._exact_shape()
        if self.shape is not None:
            flat = (self.shape[0], _prod(self.shape[1:]))
            if flat != self._flat_shape() or (exact is not None and self.shape != exact):
                raise self._err(
                    f"recorded base shape {list(self.shape)} does not match the factors", source
                )
        Module.validate(self, source)

    def base_facts(self) -> dict[str, Any]:
        out: dict[str, Any] = {"alpha": self.alpha}
        if self.shape is not None:
            out["shape"] = list(self.shape)
        if self.target_rows is not None:
            out["target_rows"] = list(self.target_rows)
        return out

    @staticmethod
    def base_kwargs(facts: dict) -> dict:
        shape, rows = facts.get("shape"), facts.get("target_rows")
        return {
            "shape": tuple(shape) if shape is not None else None,
            "target_rows": tuple(rows) if rows is not None else None,
        }

    @classmethod
    def _built(cls, source, *args, **kw):
        try:
            mod = cls(*args, **kw)
        except ValidationError as exc:
            if exc.file is None and source is not None:
                raise ValidationError(exc.message, file=source, tensor=exc.tensor) from None
            raise
        mod.check_finite(source)
        return mod

    @property
    def base_shape(self) -> tuple[int, ...]:
        """The base tensor's shape; a conv's kernel is known only once fitted (or from Tucker
        factors): until then the flattened out×(in·k…)."""
        return self.shape or self._exact_shape() or self._flat_shape()

    @property
    def shape_known(self) -> bool:
        """Whether ``base_shape`` is the real one (not a possibly flattened conv)."""
        return self.shape is not None or self._exact_shape() is not None

    def shapes(self) -> tuple[list[int], list[int]]:
        return list(self._flat_shape()), list(self.base_shape)

    def fit(self, shape, *, source=None, where=None, facts=None) -> Module:
        """Fits a base tensor whose 2-D view (out, in·k…) is ΔW's; records its real shape."""
        shape = tuple(int(s) for s in shape)
        want = shape
        if self.target_rows is not None:
            lo, hi = self.target_rows
            if not (0 <= lo < hi <= shape[0]):
                raise self._err(
                    f"rows {lo}:{hi} lie outside the base tensor's {shape[0]} rows", source
                )
            want = (hi - lo, *shape[1:])
        exact = self._exact_shape()
        flat_ok = len(want) >= 2 and (want[0], _prod(want[1:])) == self._flat_shape()
        if flat_ok and (exact is None or exact == want):
            return self if self.shape == want else replace(self, shape=want)
        raise self._err(
            f"ΔW is {list(self.base_shape)} ({self.label}, r={self.rank}) but the base tensor "
            f"is {list(want)}",
            source,
        )

    # -- math -----------------------------------------------------------------------------
    def delta(self, weight: float = 1.0, *, device: Any = None, dtype=None) -> torch.Tensor:
        """weight·ΔW, dense, in float32 (float64 if asked), shaped like the base tensor."""
        import torch

        work = _work(dtype or torch.float32)
        out, cols = self._flat_shape()
        acc = torch.zeros(out, cols, dtype=work, device=device)
        self.prepare(weight, device, work).add_block(acc, 0, out)
        return acc.reshape(self.base_shape)

    def lowrank(self, work=None, device=None):
        """(left, right) with ΔW viewed 2-D = scale · left @ right, or None when that form is no
        cheaper than the dense ΔW."""
        return None

    def svdvals(self, work=None, device=None) -> torch.Tensor:
        """The singular values of scale·ΔW (2-D view), descending, from the factors."""
        from ..rank import factored_svdvals

        lr = self.materialized().lowrank(work, device)
        if lr is None:
            import torch

            return torch.linalg.svdvals(
                self.delta(device=device).reshape(self._flat_shape()[0], -1)
            )
        return factored_svdvals(lr[0], lr[1], self.scale)

    def truncated(self, k: int, work=None, device=None):
        """(U_k·√S_k, √S_k·Vh_k, S): the best rank-k approximation of scale·ΔW (2-D view) as
        LoRA factors for scale 1, and the whole spectrum S."""
        from ..rank import factored_svd

        mod = self.materialized()
        lr = mod.lowrank(work, device)
        if lr is None:
            import torch

            U, S, Vh = torch.linalg.svd(
                mod.delta(device=device).reshape(self._flat_shape()[0], -1), full_matrices=False
            )
        else:
            U, S, Vh = factored_svd(lr[0], lr[1], self.scale)
        k = max(1, min(int(k), S.numel()))
        root = S[:k].sqrt()
        return (U[:, :k] * root).contiguous(), (root[:, None] * Vh[:k]).contiguous(), S


# -- LoHa -------------------------------------------------------------------------------------


class HadamardTerm:
    """scale · (l1·r1) ⊙ (l2·r2), a block of rows at a time (two small products per block)."""

    __slots__ = ("l1", "r1", "l2", "r2", "scale")

    def __init__(self, l1, r1, l2, r2, scale: float):
        self.l1, self.r1, self.l2, self.r2, self.scale = l1, r1, l2, r2, scale

    def add_block(self, acc, start: int, stop: int) -> None:
        h = self.l1[start:stop] @ self.r1
        h.mul_(self.l2[start:stop] @ self.r2)
        acc.add_(h, alpha=self.scale)


@register
@dataclass
class LohaModule(_Lycoris):
    KINDS = ("loha",)
    ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    OPTIONAL_ROLES = ("hada_t1", "hada_t2")

    name: str
    kind: str
    w1a: Any
    w1b: Any
    w2a: Any
    w2b: Any
    alpha: float
    t1: Any = None
    t2: Any = None
    shape: tuple[int, ...] | None = None
    target_rows: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self._post_init()

    @property
    def tucker(self) -> bool:
        return self.t1 is not None

    def tensors(self) -> dict[str, Any]:
        out = {
            "hada_w1_a": self.w1a,
            "hada_w1_b": self.w1b,
            "hada_w2_a": self.w2a,
            "hada_w2_b": self.w2b,
        }
        if self.tucker:
            out["hada_t1"], out["hada_t2"] = self.t1, self.t2
        return out

    def with_tensors(self, tensors: dict[str, Any]) -> LohaModule:
        return replace(
            self,
            w1a=tensors.get("hada_w1_a", self.w1a),
            w1b=tensors.get("hada_w1_b", self.w1b),
            w2a=tensors.get("hada_w2_a", self.w2a),
            w2b=tensors.get("hada_w2_b", self.w2b),
            t1=tensors.get("hada_t1", self.t1),
            t2=tensors.get("hada_t2", self.t2),
        )

    def facts(self) -> dict[str, Any]:
        return self.base_facts()

    @classmethod
    def from_parts(cls, name, kind, tensors, facts, *, source=None) -> LohaModule:
        return cls._built(
            source,
            name,
            kind,
            tensors["hada_w1_a"],
            tensors["hada_w1_b"],
            tensors["hada_w2_a"],
            tensors["hada_w2_b"],
            facts["alpha"],
            tensors.get("hada_t1"),
            tensors.get("hada_t2"),
            **cls.base_kwargs(facts),
        )

    @property
    def rank(self) -> int:
        return int(self.w1b.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    @property
    def label(self) -> str:
        return "loha+tucker" if self.tucker else "loha"

    def _flat_shape(self) -> tuple[int, int]:
        if self.tucker:
            return int(self.w1a.shape[1]), int(self.w1b.shape[1]) * _prod(self.t1.shape[2:])
        return int(self.w1a.shape[0]), int(self.w1b.shape[1])

    def _exact_shape(self):
        if self.tucker:
            return (int(self.w1a.shape[1]), int(self.w1b.shape[1]), *map(int, self.t1.shape[2:]))
        return None

    def validate(self, source=None) -> None:
        ts = [self.w1a, self.w1b, self.w2a, self.w2b]
        if (self.t1 is None) != (self.t2 is None):
            raise self._err(
                "hada_t1 and hada_t2 come together (a Tucker LoHa) or not at all", source
            )
        if any(t.dim() != 2 for t in ts):
            raise self._err(
                "LoHa needs 2-D hada_w1_a/b and hada_w2_a/b, got "
                + ", ".join(str(list(t.shape)) for t in ts),
                source,
            )
        r = self.rank
        if self.tucker:
            if self.t1.dim() < 3 or tuple(self.t1.shape) != tuple(self.t2.shape):
                raise self._err(
                    f"hada_t1 {list(self.t1.shape)} and hada_t2 {list(self.t2.shape)} must be "
                    "the same r×r×k… core",
                    source,
                )
            want = {"hada_w1_a": self.w1a, "hada_w2_a": self.w2a}
            shapes_ok = (
                tuple(self.t1.shape[:2]) == (r, r)
                and all(t.shape[0] == r for t in ts)
                and self.w1a.shape == self.w2a.shape
                and self.w1b.shape == self.w2b.shape
            )
            if not shapes_ok:
                raise self._err(
                    "Tucker LoHa factors disagree: t "
                    f"{list(self.t1.shape)}, a {[list(t.shape) for t in want.values()]}, b "
                    f"{list(self.w1b.shape)}/{list(self.w2b.shape)} (r×out, r×in, r×r×k…)",
                    source,
                )
        else:
            if (
                self.w1a.shape[1] != r
                or self.w2a.shape[1] != self.w2b.shape[0]
                or self.w1a.shape[0] != self.w2a.shape[0]
                or self.w1b.shape[1] != self.w2b.shape[1]
            ):
                raise self._err(
                    "LoHa factors disagree: hada_w1_a "
                    f"{list(self.w1a.shape)}, hada_w1_b {list(self.w1b.shape)}, hada_w2_a "
                    f"{list(self.w2a.shape)}, hada_w2_b {list(self.w2b.shape)}",
                    source,
                )
            if self.w2b.shape[0] != r:
                # lycoris builds both halves with one lora_dim and cannot load anything else;
                # which r its scale would use is not defined.
                raise self._err(
                    f"hada_w1 has rank {r} but hada_w2 has rank {self.w2b.shape[0]}", source
                )
        self._common_checks(source)

    def _halves(self, work, device):
        """(l1, r1, l2, r2), each half = l·r in the 2-D view out×(in·k…)."""
        import torch

        m = self.materialized()

        def f(t):
            return t.to(device=device, dtype=work)

        if not m.tucker:
            return f(m.w1a), f(m.w1b), f(m.w2a), f(m.w2b)
        halves = []
        for t, wa, wb in ((m.t1, m.w1a, m.w1b), (m.t2, m.w2a, m.w2b)):
            # einsum("i j k, j c, i o -> o c k", t, wb, wa) = waᵀ · M, M = Σ_j t[i, j, k] wb[j, c]
            core = torch.einsum("ij...,jc->ic...", f(t), f(wb)).reshape(t.shape[0], -1)
            halves += [f(wa).T, core]
        return tuple(halves)

    def prepare(self, weight: float, device: Any, work) -> HadamardTerm:
        l1, r1, l2, r2 = self._halves(work, device)
        return HadamardTerm(l1, r1, l2, r2, self.scale * weight)

    def lowrank(self, work=None, device=None):
        """The face-splitting form: (l1·r1) ⊙ (l2·r2) = L·R with L = l1 • l2 (row-wise
        Kronecker, out×r²) and R = (r1ᵀ • r2ᵀ)ᵀ (r²×in·k…): ΔW has rank at most r²."""
        import torch

        l1, r1, l2, r2 = self._halves(_work(work or torch.float32), device)
        out, r = l1.shape
        L = (l1[:, :, None] * l2[:, None, :]).reshape(out, r * r)
        R = (r1[:, None, :] * r2[None, :, :]).reshape(r * r, -1)
        return L, R


# -- LoKr -------------------------------------------------------------------------------------


class KronTerm:
    """scale · w1 ⊗ w2 (w2 viewed b×(d·k…)): row a·b+j of ΔW is w1[a] ⊗ w2[j]."""

    __slots__ = ("w1", "w2", "scale")

    def __init__(self, w1, w2, scale: float):
        self.w1, self.w2, self.scale = w1, w2, scale

    def add_block(self, acc, start: int, stop: int) -> None:
        import torch

        b = self.w2.shape[0]
        rows = torch.arange(start, stop, device=self.w1.device)
        block = self.w1[rows // b][:, :, None] * self.w2[rows % b][:, None, :]
        acc.add_(block.reshape(stop - start, -1), alpha=self.scale)


@register
@dataclass
class LokrModule(_Lycoris):
    KINDS = ("lokr",)
    ROLES = ()
    OPTIONAL_ROLES = (
        "lokr_w1",
        "lokr_w1_a",
        "lokr_w1_b",
        "lokr_w2",
        "lokr_w2_a",
        "lokr_w2_b",
        "lokr_t2",
    )

    name: str
    kind: str
    alpha: float
    w1: Any = None
    w1a: Any = None
    w1b: Any = None
    w2: Any = None
    w2a: Any = None
    w2b: Any = None
    t2: Any = None
    shape: tuple[int, ...] | None = None
    target_rows: tuple[int, int] | None = None

    _FIELDS = {
        "lokr_w1": "w1",
        "lokr_w1_a": "w1a",
        "lokr_w1_b": "w1b",
        "lokr_w2": "w2",
        "lokr_w2_a": "w2a",
        "lokr_w2_b": "w2b",
        "lokr_t2": "t2",
    }

    def __post_init__(self) -> None:
        self._post_init()

    def tensors(self) -> dict[str, Any]:
        out = {}
        for role, field in self._FIELDS.items():
            t = getattr(self, field)
            if t is not None:
                out[role] = t
        return out

    def with_tensors(self, tensors: dict[str, Any]) -> LokrModule:
        return replace(
            self,
            **{f: tensors[r] for r, f in self._FIELDS.items() if r in tensors},
        )

    def facts(self) -> dict[str, Any]:
        return self.base_facts()

    @classmethod
    def from_parts(cls, name, kind, tensors, facts, *, source=None) -> LokrModule:
        unknown = set(tensors) - set(cls._FIELDS)
        if unknown:
            raise ValidationError(
                f"unknown LoKr tensor role {sorted(unknown)[0]!r}", file=source, tensor=name
            )
        return cls._built(
            source,
            name,
            kind,
            facts["alpha"],
            **{f: tensors.get(r) for r, f in cls._FIELDS.items()},
            **cls.base_kwargs(facts),
        )

    @property
    def tucker(self) -> bool:
        return self.t2 is not None

    @property
    def dim(self) -> int | None:
        """lycoris' lora_dim: the rank of the factored half; None when both halves are whole."""
        if self.w1a is not None:
            return int(self.w1a.shape[1])
        if self.t2 is not None:
            return int(self.t2.shape[0])
        if self.w2a is not None:
            return int(self.w2a.shape[1])
        return None

    @property
    def rank(self) -> int:
        """lycoris' dim; with both halves whole, the rank bound of w1 ⊗ w2."""
        if self.dim is not None:
            return self.dim
        (a, c), (b, dk) = self._w1_shape(), self._w2_flat()
        return min(a, c) * min(b, dk)

    @property
    def scale(self) -> float:
        # Both halves whole: lycoris sets alpha = lora_dim, scale 1, whatever was stored.
        if self.dim is None:
            return 1.0
        return self.alpha / self.dim

    @property
    def label(self) -> str:
        parts = [
            "w1" if self.w1 is not None else "w1ab",
            "w2" if self.w2 is not None else ("t2" if self.tucker else "w2ab"),
        ]
        return "lokr(" + ",".join(parts) + ")"

    def _w1_shape(self) -> tuple[int, int]:
        if self.w1 is not None:
            return int(self.w1.shape[0]), int(self.w1.shape[1])
        return int(self.w1a.shape[0]), int(self.w1b.shape[1])

    def _w2_shape(self) -> tuple[int, ...]:
        if self.w2 is not None:
            return tuple(int(s) for s in self.w2.shape)
        if self.tucker:
            return int(self.w2a.shape[1]), int(self.w2b.shape[1]), *map(int, self.t2.shape[2:])
        return int(self.w2a.shape[0]), int(self.w2b.shape[1])

    def _w2_flat(self) -> tuple[int, int]:
        s = self._w2_shape()
        return s[0], _prod(s[1:])

    def _flat_shape(self) -> tuple[int, int]:
        (a, c), (b, dk) = self._w1_shape(), self._w2_flat()
        return a * b, c * dk

    def _exact_shape(self):
        s = self._w2_shape()
        if len(s) > 2:
            a, c = self._w1_shape()
            return (a * s[0], c * s[1], *s[2:])
        return None

    def validate(self, source=None) -> None:
        def shp(t):
            return list(t.shape)

        if (self.w1 is None) == (self.w1a is None and self.w1b is None):
            raise self._err(
                "a LoKr needs lokr_w1, or lokr_w1_a and lokr_w1_b (and not both)", source
            )
        if (self.w2 is None) == (self.w2a is None and self.w2b is None):
            raise self._err(
                "a LoKr needs lokr_w2, or lokr_w2_a and lokr_w2_b (and not both)", source
            )
        if self.w1 is None and (self.w1a is None or self.w1b is None):
            raise self._err("lokr_w1_a and lokr_w1_b come together", source)
        if self.w2 is None and (self.w2a is None or self.w2b is None):
            raise self._err("lokr_w2_a and lokr_w2_b come together", source)
        if self.t2 is not None and self.w2 is not None:
            raise self._err("lokr_t2 is a Tucker core for lokr_w2_a/b, not lokr_w2", source)
        if self.w1 is not None and self.w1.dim() != 2:
            raise self._err(f"lokr_w1 must be 2-D, got {shp(self.w1)}", source)
        if self.w1 is None:
            if self.w1a.dim() != 2 or self.w1b.dim() != 2 or self.w1a.shape[1] != self.w1b.shape[0]:
                raise self._err(
                    f"lokr_w1_a {shp(self.w1a)} and lokr_w1_b {shp(self.w1b)} do not multiply",
                    source,
                )
        if self.w2 is not None and self.w2.dim() < 2:
            raise self._err(f"lokr_w2 must be 2-D or more, got {shp(self.w2)}", source)
        if self.w2 is None:
            if self.w2a.dim() != 2 or self.w2b.dim() != 2:
                raise self._err(
                    f"lokr_w2_a {shp(self.w2a)} and lokr_w2_b {shp(self.w2b)} must be 2-D", source
                )
            if self.tucker:
                r = self.t2.shape[0]
                if (
                    self.t2.dim() < 3
                    or self.t2.shape[1] != r
                    or self.w2a.shape[0] != r
                    or self.w2b.shape[0] != r
                ):
                    raise self._err(
                        f"Tucker LoKr needs lokr_t2 r×r×k…, lokr_w2_a r×b, lokr_w2_b r×d; got "
                        f"{shp(self.t2)}, {shp(self.w2a)}, {shp(self.w2b)}",
                        source,
                    )
            elif self.w2a.shape[1] != self.w2b.shape[0]:
                raise self._err(
                    f"lokr_w2_a {shp(self.w2a)} and lokr_w2_b {shp(self.w2b)} do not multiply",
                    source,
                )
        if self.w1a is not None and (self.w2a is not None):
            r2 = self.t2.shape[0] if self.tucker else self.w2a.shape[1]
            if r2 != self.w1a.shape[1]:
                # lycoris gives both factored halves one lora_dim; its scale would be ambiguous.
                raise self._err(
                    f"the factored lokr_w1 has rank {self.w1a.shape[1]} but lokr_w2 has rank {r2}",
                    source,
                )
        self._common_checks(source)

    def _halves(self, work, device):
        """(w1 a×c, w2 b×(d·k…)) in ``work`` on ``device``."""
        import torch

        m = self.materialized()

        def f(t):
            return t.to(device=device, dtype=work)

        w1 = f(m.w1) if m.w1 is not None else f(m.w1a) @ f(m.w1b)
        if m.w2 is not None:
            w2 = f(m.w2).reshape(m.w2.shape[0], -1)
        elif m.tucker:
            w2 = torch.einsum("ij...,ip,jr->pr...", f(m.t2), f(m.w2a), f(m.w2b))
            w2 = w2.reshape(w2.shape[0], -1)
        else:
            w2 = f(m.w2a) @ f(m.w2b)
        return w1, w2

    def prepare(self, weight: float, device: Any, work) -> KronTerm:
        w1, w2 = self._halves(work, device)
        return KronTerm(w1, w2, self.scale * weight)

    def svdvals(self, work=None, device=None) -> torch.Tensor:
        """σ(w1 ⊗ w2) = σ(w1) ⊗ σ(w2): products of the halves' singular values, no ΔW."""
        import torch

        w1, w2 = self._halves(_work(work or torch.float32), device)
        s = torch.outer(torch.linalg.svdvals(w1), torch.linalg.svdvals(w2)).flatten()
        return (s * abs(self.scale)).sort(descending=True).values

    def truncated(self, k: int, work=None, device=None):
        """Best rank-k approximation from the halves' SVDs: (U₁⊗U₂)(S₁⊗S₂)(V₁⊗V₂)ᵀ, keeping the
        k largest products σ₁ᵢ·σ₂ⱼ; only those k columns are formed."""
        import torch

        w1, w2 = self._halves(_work(work or torch.float32), device)
        U1, S1, Vh1 = torch.linalg.svd(w1, full_matrices=False)
        U2, S2, Vh2 = torch.linalg.svd(w2, full_matrices=False)
        prods = torch.outer(S1, S2).flatten() * abs(self.scale)
        S, order = prods.sort(descending=True)
        k = max(1, min(int(k), S.numel()))
        i, j = order[:k] // S2.numel(), order[:k] % S2.numel()
        sign = -1.0 if self.scale < 0 else 1.0
        # column t of U: U1[:, i_t] ⊗ U2[:, j_t]; row t of Vh: Vh1[i_t] ⊗ Vh2[j_t]
        U = (U1[:, i][:, None, :] * U2[:, j][None, :, :]).reshape(-1, k) * sign
        Vh = (Vh1[i][:, :, None] * Vh2[j][:, None, :]).reshape(k, -1)
        root = S[:k].sqrt()
        return (U * root).contiguous(), (root[:, None] * Vh).contiguous(), S


# -- LoCon with a Tucker core ---------------------------------------------------------------------


class _LowRankRows:
    __slots__ = ("left", "right", "scale")

    def __init__(self, left, right, scale: float):
        self.left, self.right, self.scale = left, right, scale

    def add_block(self, acc, start: int, stop: int) -> None:
        acc.addmm_(self.left[start:stop], self.right, alpha=self.scale)


@register
@dataclass
class LoconTuckerModule(_Lycoris):
    KINDS = ("locon_tucker",)
    ROLES = ("lora_down", "lora_mid", "lora_up")

    name: str
    kind: str
    down: Any  # r×in×1×1
    mid: Any  # r×r×k…
    up: Any  # out×r×1×1
    alpha: float
    shape: tuple[int, ...] | None = None
    target_rows: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self._post_init()

    def tensors(self) -> dict[str, Any]:
        return {"lora_down": self.down, "lora_mid": self.mid, "lora_up": self.up}

    def with_tensors(self, tensors: dict[str, Any]) -> LoconTuckerModule:
        return replace(
            self,
            down=tensors.get("lora_down", self.down),
            mid=tensors.get("lora_mid", self.mid),
            up=tensors.get("lora_up", self.up),
        )

    def facts(self) -> dict[str, Any]:
        return self.base_facts()

    @classmethod
    def from_parts(cls, name, kind, tensors, facts, *, source=None) -> LoconTuckerModule:
        return cls._built(
            source,
            name,
            kind,
            tensors["lora_down"],
            tensors["lora_mid"],
            tensors["lora_up"],
            facts["alpha"],
            **cls.base_kwargs(facts),
        )

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    def _flat_shape(self):
        return int(self.up.shape[0]), int(self.down.shape[1]) * _prod(self.mid.shape[2:])

    def _exact_shape(self):
        return (int(self.up.shape[0]), int(self.down.shape[1]), *map(int, self.mid.shape[2:]))

    def validate(self, source=None) -> None:
        d, m, u = self.down, self.mid, self.up
        r = d.shape[0] if d.dim() else 0
        ok = (
            d.dim() == m.dim() == u.dim()
            and d.dim() >= 3
            and all(s == 1 for s in d.shape[2:])
            and all(s == 1 for s in u.shape[2:])
            and tuple(m.shape[:2]) == (r, r)
            and u.shape[1] == r
        )
        if not ok:
            raise self._err(
                "LoCon Tucker needs lora_down r×in×1×1, lora_mid r×r×k…, lora_up out×r×1×1; got "
                f"{list(d.shape)}, {list(m.shape)}, {list(u.shape)}",
                source,
            )
        self._common_checks(source)

    def _halves(self, work, device):
        """(up out×r, M r×(in·k…)) with ΔW (2-D view) = scale · up·M."""
        import torch

        m = self.materialized()

        def f(t):
            return t.to(device=device, dtype=work)

        down = f(m.down).reshape(m.down.shape[0], -1)
        core = torch.einsum("ij...,jc->ic...", f(m.mid), down).reshape(m.mid.shape[0], -1)
        return f(m.up).reshape(m.up.shape[0], -1), core

    def prepare(self, weight: float, device: Any, work) -> _LowRankRows:
        up, core = self._halves(work, device)
        return _LowRankRows(up, core, self.scale * weight)

    def lowrank(self, work=None, device=None):
        import torch

        return self._halves(_work(work or torch.float32), device)


LYCORIS_CLASSES = (LohaModule, LokrModule, LoconTuckerModule)
