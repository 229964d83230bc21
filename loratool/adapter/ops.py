"""Full-tensor operations an adapter carries besides its low-rank modules.

Real PEFT adapters also hold whole tensors: ``modules_to_save`` heads and ``bias="all"`` /
``"lora_only"`` biases saved in full, embeddings saved by ``save_embedding_layers`` (possibly
resized for new tokens), the rows of ``trainable_token_indices``, and ``lora_bias`` (a bias on
lora_B, added to the layer's bias with the module's scale). Each is one operation on one base
tensor, its ``target``:

- ``replace``: the tensor becomes ``value`` (with ``resize``, ``value`` may have another first
  dimension: an embedding or lm_head resized for new tokens);
- ``rows``: rows ``indices`` of the tensor become ``values`` (trainable tokens);
- ``add``: the tensor gets ``scale`` · weight · ``value`` added (lora_bias).

Like modules, operations serialize generically: stored tensors by role and JSON-able facts,
registered by op name. ``why`` says where the tensor came from (``modules_to_save``, ``bias``,
``embedding``, ``trainable_tokens``, ``lora_bias``); formats use it to write the tensor back
under the key it came from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from ..errors import ValidationError
from .module import Stored

OP_CLASSES: dict[str, type[TensorOp]] = {}


def register_op(cls: type[TensorOp]) -> type[TensorOp]:
    OP_CLASSES[cls.OP] = cls
    return cls


def op_class(op: str, *, source: object | None = None, tensor: str | None = None):
    try:
        return OP_CLASSES[op]
    except KeyError:
        raise ValidationError(
            f"unknown tensor operation {op!r} (known: {', '.join(sorted(OP_CLASSES))})",
            file=source,
            tensor=tensor,
        ) from None


class TensorOp(Stored):
    """One operation on one base tensor (``target``)."""

    OP: ClassVar[str] = ""
    ROLES: ClassVar[tuple[str, ...]] = ()

    target: str
    why: str

    @property
    def name(self) -> str:  # for messages and Stored
        return self.target

    @property
    def op(self) -> str:
        return self.OP

    def facts(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_parts(cls, target: str, tensors: dict, facts: dict, *, source=None) -> TensorOp:
        raise NotImplementedError

    @property
    def dense_params(self) -> int:
        """Elements of the base tensor this operation sets."""
        return self.params

    @property
    def dtype_name(self) -> str:
        t = next(iter(self.tensors().values()))
        return str(t.dtype).removeprefix("torch.")

    def out_shape(self, base_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of the tensor written (only a resizing replace changes it)."""
        return tuple(base_shape)

    def fit(self, shape: tuple[int, ...], *, source=None) -> TensorOp:
        raise NotImplementedError

    def retarget(self, target: str) -> TensorOp:
        return replace(self, target=target)

    def validate(self, source=None) -> None:
        for role, t in self.tensors().items():
            if not t.is_floating_point():
                raise ValidationError(
                    f"{role} must be floating point, got {t.dtype}", file=source, tensor=self.target
                )


def _built(cls, source, *args, **kw):
    """Construct, naming ``source`` in errors, and check finiteness."""
    try:
        obj = cls(*args, **kw)
    except ValidationError as exc:
        if exc.file is None and source is not None:
            raise ValidationError(exc.message, file=source, tensor=exc.tensor) from None
        raise
    obj.check_finite(source)
    return obj


@register_op
@dataclass
class ReplaceTensor(TensorOp):
    """The base tensor becomes ``value`` (modules_to_save, saved biases and embeddings)."""

    OP = "replace"
    ROLES = ("value",)

    target: str
    value: Any
    why: str = "modules_to_save"
    resize: bool = False  # the first dimension may differ from the base's (new tokens)
    key: str | None = None  # where the source format stored it (to write it back there)

    def __post_init__(self) -> None:
        self.validate()

    def tensors(self) -> dict[str, Any]:
        return {"value": self.value}

    def with_tensors(self, tensors):
        return replace(self, value=tensors.get("value", self.value))

    def facts(self) -> dict[str, Any]:
        out: dict[str, Any] = {"why": self.why}
        if self.resize:
            out["resize"] = True
        if self.key is not None:
            out["key"] = self.key
        return out

    @classmethod
    def from_parts(cls, target, tensors, facts, *, source=None) -> ReplaceTensor:
        return _built(
            cls,
            source,
            target,
            tensors["value"],
            facts.get("why", "modules_to_save"),
            bool(facts.get("resize")),
            facts.get("key"),
        )

    def out_shape(self, base_shape):
        return tuple(self.value.shape)

    def fit(self, shape, *, source=None) -> ReplaceTensor:
        have, want = tuple(self.value.shape), tuple(shape)
        if have == want:
            return self
        if self.resize and len(have) == len(want) and have[1:] == want[1:]:
            return self
        raise ValidationError(
            f"{self.why} tensor has shape {list(have)} but the base tensor is {list(want)}",
            file=source,
            tensor=self.target,
        )


@register_op
@dataclass
class ReplaceRows(TensorOp):
    """Rows ``indices`` of the base tensor become ``values`` (peft's trainable tokens)."""

    OP = "rows"
    ROLES = ("values",)

    target: str
    indices: list[int]
    values: Any
    why: str = "trainable_tokens"
    key: str | None = None

    def __post_init__(self) -> None:
        self.indices = [int(i) for i in self.indices]
        self.validate()

    def tensors(self) -> dict[str, Any]:
        return {"values": self.values}

    def with_tensors(self, tensors):
        return replace(self, values=tensors.get("values", self.values))

    def facts(self) -> dict[str, Any]:
        out = {"why": self.why, "indices": list(self.indices)}
        if self.key is not None:
            out["key"] = self.key
        return out

    @classmethod
    def from_parts(cls, target, tensors, facts, *, source=None) -> ReplaceRows:
        return _built(
            cls,
            source,
            target,
            list(facts["indices"]),
            tensors["values"],
            facts.get("why", "trainable_tokens"),
            facts.get("key"),
        )

    def validate(self, source=None) -> None:
        super().validate(source)
        v = self.values
        if v.dim() != 2 or v.shape[0] != len(self.indices):
            raise ValidationError(
                f"{len(self.indices)} token indices but values of shape {list(v.shape)}",
                file=source,
                tensor=self.target,
            )
        if len(set(self.indices)) != len(self.indices) or any(i < 0 for i in self.indices):
            raise ValidationError(
                "token indices must be distinct and not negative", file=source, tensor=self.target
            )

    def fit(self, shape, *, source=None) -> ReplaceRows:
        shape = tuple(shape)
        if len(shape) != 2 or shape[1] != self.values.shape[1]:
            raise ValidationError(
                f"token rows of width {self.values.shape[1]} do not fit the base tensor {list(shape)}",
                file=source,
                tensor=self.target,
            )
        if self.indices and max(self.indices) >= shape[0]:
            raise ValidationError(
                f"token index {max(self.indices)} is past the base tensor's {shape[0]} rows",
                file=source,
                tensor=self.target,
            )
        return self


@register_op
@dataclass
class AddToTensor(TensorOp):
    """The base tensor gets scale·weight·``value`` added (lora_bias on a layer's bias)."""

    OP = "add"
    ROLES = ("value",)

    target: str
    value: Any
    scale: float = 1.0
    why: str = "lora_bias"
    key: str | None = None

    def __post_init__(self) -> None:
        self.scale = float(self.scale)
        if not math.isfinite(self.scale):
            raise ValidationError(f"scale is {self.scale}", tensor=self.target)
        self.validate()

    def tensors(self) -> dict[str, Any]:
        return {"value": self.value}

    def with_tensors(self, tensors):
        return replace(self, value=tensors.get("value", self.value))

    def facts(self) -> dict[str, Any]:
        out = {"why": self.why, "scale": self.scale}
        if self.key is not None:
            out["key"] = self.key
        return out

    @classmethod
    def from_parts(cls, target, tensors, facts, *, source=None) -> AddToTensor:
        return _built(
            cls,
            source,
            target,
            tensors["value"],
            facts.get("scale", 1.0),
            facts.get("why", "lora_bias"),
            facts.get("key"),
        )

    def fit(self, shape, *, source=None) -> AddToTensor:
        if tuple(self.value.shape) != tuple(shape):
            raise ValidationError(
                f"{self.why} has shape {list(self.value.shape)} but the base tensor is {list(shape)}",
                file=source,
                tensor=self.target,
            )
        return self
