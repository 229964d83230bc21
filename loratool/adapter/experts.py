"""LoRA on a fused 3-D expert tensor (peft's ``target_parameters`` on MoE experts).

transformers 5 stores a MoE block's experts as one parameter of shape (E, X, Y), and peft's
``ParamWrapper`` adapts it with one pair of factors for all experts, laid out as peft lays
them out (peft/tuners/lora/layer.py, ``ParamWrapper.update_layer`` / ``get_delta_weight``):

- ``lora_A`` is (E·r) × in, **expert-major**: expert e's A is rows e·r … e·r+r-1, i.e.
  ``A.reshape(E, r, in)``;
- ``lora_B`` is out × (r·E), **rank-major**: expert e's B is columns e, E+e, 2E+e, …, i.e.
  ``B.reshape(out, r, E)[:, :, e]``. Pairing B's columns with A's rows the same way is the
  classic mistake; it mixes experts.

Most models apply expert e as ``F.linear(x, W[e])``, W (E, out, in): peft swaps its
in/out features for them and ΔW[e] = B_e·A_e. Models that apply ``x @ W[e]`` (gpt-oss: its
experts carry ``is_transposed = True``; W is (E, in, out)) get ΔW[e] = (B_e·A_e)ᵀ; that is the
``transposed`` fact. scale = alpha/r (alpha/√r with rsLoRA), as for every LoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..errors import ValidationError
from .module import Module, register

if TYPE_CHECKING:
    import torch


class ExpertTerm:
    """weight·ΔW for a block of whole experts: acc (n, X·Y) += scale · lhs_e @ rhs_e."""

    __slots__ = ("lhs", "rhs", "scale")

    def __init__(self, lhs, rhs, scale: float):
        self.lhs, self.rhs, self.scale = lhs, rhs, scale

    def add_block(self, acc, start: int, stop: int) -> None:
        n = stop - start
        x, y = self.lhs.shape[1], self.rhs.shape[2]
        acc.view(n, x, y).baddbmm_(self.lhs[start:stop], self.rhs[start:stop], alpha=self.scale)


@register
@dataclass
class ExpertLoraModule(Module):
    KINDS = ("experts",)
    ROLES = ("lora_A", "lora_B")

    name: str
    kind: str
    A: Any  # (E·r) × in, expert-major
    B: Any  # out × (r·E), rank-major
    alpha: float
    num_experts: int = 1
    rslora: bool = False
    transposed: bool = False  # W is (E, in, out) and applied as x @ W[e] (gpt-oss)
    alternatives: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.alternatives = tuple(self.alternatives)
        self.alpha = float(self.alpha)
        self.num_experts = int(self.num_experts)
        self.rslora = bool(self.rslora)
        self.transposed = bool(self.transposed)
        self.validate()

    def tensors(self) -> dict[str, Any]:
        return {"lora_A": self.A, "lora_B": self.B}

    def facts(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "rslora": self.rslora,
            "num_experts": self.num_experts,
            "transposed": self.transposed,
            **({"alternatives": list(self.alternatives)} if self.alternatives else {}),
        }

    @classmethod
    def from_parts(cls, name, kind, tensors, facts, *, source=None) -> ExpertLoraModule:
        try:
            mod = cls(
                name,
                kind,
                tensors["lora_A"],
                tensors["lora_B"],
                facts["alpha"],
                facts["num_experts"],
                bool(facts.get("rslora")),
                bool(facts.get("transposed")),
                tuple(facts.get("alternatives", ())),
            )
        except ValidationError as exc:
            if exc.file is None and source is not None:
                raise ValidationError(exc.message, file=source, tensor=exc.tensor) from None
            raise
        mod.check_finite(source)
        return mod

    def with_tensors(self, tensors: dict[str, Any]) -> ExpertLoraModule:
        return replace(self, A=tensors.get("lora_A", self.A), B=tensors.get("lora_B", self.B))

    @property
    def rank(self) -> int:
        """Per expert."""
        return int(self.A.shape[0]) // max(1, self.num_experts)

    @property
    def scale(self) -> float:
        r = self.rank
        if r == 0:
            return 0.0
        return self.alpha / math.sqrt(r) if self.rslora else self.alpha / r

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    @property
    def base_shape(self) -> tuple[int, ...]:
        e, i, o = self.num_experts, self.in_features, self.out_features
        return (e, i, o) if self.transposed else (e, o, i)

    @property
    def label(self) -> str:
        return f"experts×{self.num_experts}" + ("ᵀ" if self.transposed else "")

    def validate(self, source: object | None = None) -> None:
        A, B, e = self.A, self.B, self.num_experts
        if A.dim() != 2 or B.dim() != 2:
            raise ValidationError(
                f"expert LoRA needs 2-D lora_A and lora_B, got {list(A.shape)} and {list(B.shape)}",
                file=source,
                tensor=self.name,
            )
        if e < 1 or A.shape[0] % e or A.shape[0] != B.shape[1]:
            raise ValidationError(
                f"lora_A {list(A.shape)} and lora_B {list(B.shape)} do not hold rank·{e} experts",
                file=source,
                tensor=self.name,
            )
        if not math.isfinite(self.alpha):
            raise ValidationError(f"alpha is {self.alpha}", file=source, tensor=self.name)
        super().validate(source)

    def fit(self, shape, *, source=None, where=None, facts=None) -> ExpertLoraModule:
        """The layout is read from the base tensor (E, X, Y): (E, out, in) or, for the models
        whose experts are transposed, (E, in, out); a square one needs the model type."""
        shape = tuple(shape)
        if len(shape) != 3:
            raise ValidationError(
                f"expert LoRA needs a 3-D base tensor (experts, …), got {list(shape)}",
                file=source,
                tensor=self.name,
            )
        if shape[0] != self.num_experts:
            raise ValidationError(
                f"the adapter has {self.num_experts} experts but the base tensor {list(shape)} has {shape[0]}",
                file=source,
                tensor=self.name,
            )
        i, o = self.in_features, self.out_features
        plain, transposed = shape[1:] == (o, i), shape[1:] == (i, o)
        if plain and transposed:
            known = facts.experts_transposed if facts is not None else None
            if known is None:
                raise ValidationError(
                    f"square expert tensor {list(shape)}: (experts, out, in) or (experts, in, out) "
                    "depends on the model, and the base has no config.json with a model_type",
                    file=source,
                    tensor=self.name,
                )
            transposed, plain = known, not known
        mod = self
        if transposed != self.transposed and (plain or transposed):
            mod = replace(self, transposed=transposed)
        return Module.fit(mod, shape, source=source, where=where, facts=facts)

    def factors(self, work=None, device=None):
        """(A_e, B_e): (E, r, in) and (E, out, r), float32 unless ``work`` says otherwise."""
        import torch

        m = self.materialized()
        work = work or torch.float32
        e, r = self.num_experts, self.rank
        A = m.A.to(device=device, dtype=work).reshape(e, r, self.in_features)
        B = m.B.to(device=device, dtype=work).reshape(self.out_features, r, e).permute(2, 0, 1)
        return A, B

    def delta(self, weight: float = 1.0, *, device: Any = None, dtype=None) -> torch.Tensor:
        import torch

        work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        A, B = self.factors(work, device)
        d = torch.bmm(B, A)  # (E, out, in)
        if self.transposed:
            d = d.transpose(1, 2)
        return d * (self.scale * weight)

    def prepare(self, weight: float, device: Any, work) -> ExpertTerm:
        A, B = self.factors(work, device)
        if self.transposed:  # ΔW[e] = (B_e·A_e)ᵀ = A_eᵀ·B_eᵀ
            lhs, rhs = A.transpose(1, 2), B.transpose(1, 2)
        else:
            lhs, rhs = B, A
        return ExpertTerm(lhs.contiguous(), rhs.contiguous(), self.scale * weight)
