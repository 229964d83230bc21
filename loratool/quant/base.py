"""What every quantization codec shares: the logical weight, the codec protocol, the errors.

A quantized checkpoint stores one *logical* weight (what the model's parameter holds once
loaded, and what an adapter's ΔW is added to) as several tensors: the quantized values and
their scales, sometimes more (bitsandbytes' quant map and packed JSON state). A codec knows,
for one scheme, which stored tensors make up each logical weight, how to decode them to the
float32 values the scheme's reference dequantizer computes, and how to encode float32 values
back with fresh scales computed the way the scheme's reference computes them.

Nothing here imports torch at module level: detection and grouping read headers only, so
``savings --base`` and merge planning stay fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import FormatError, ValidationError
from ..tensors.header import TensorInfo

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LogicalWeight:
    """One weight as the model sees it, and the stored tensors it is made of.

    ``name`` and ``shape`` are the parameter's (what adapters target); ``parts`` maps a role
    (``weight``, ``scale``, ``absmax``, …) to the stored tensor; ``dtype`` is the safetensors
    tag a dequantized copy is written in when the caller does not choose one; ``params`` holds
    what the codec read from the config or the tensors (block sizes, the quant type, …).
    """

    name: str
    shape: tuple[int, ...]
    parts: dict[str, TensorInfo]
    dtype: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def stored_names(self) -> list[str]:
        return [t.name for t in self.parts.values()]

    @property
    def stored_bytes(self) -> int:
        return sum(t.nbytes for t in self.parts.values())

    # quacks like a tensor for ``formats.resolve`` (shape and float-ness are all it asks)
    def is_floating_point(self) -> bool:
        return True

    def error(self, message: str, cls=ValidationError, role: str | None = None):
        """An error naming the layer (and the stored tensor when one is at fault)."""
        info = self.parts.get(role) if role else None
        where = info.file if info else next(iter(self.parts.values())).file
        return cls(message, file=where, tensor=info.name if info else self.name)


class Codec:
    """One quantization scheme. Subclasses register themselves with ``quant.register``.

    - ``detect(qc, tensors)``: whether this scheme made the checkpoint, from config.json's
      ``quantization_config`` (``qc``, None when absent) and the stored tensors' headers.
    - ``group(qc, tensors)``: every logical weight, by name, its parts found and checked
      (a missing or misshapen scale tensor is refused here, before anything is written).
    - ``decode(lw, parts)``: the float32 values, bit for bit what the reference computes.
    - ``encode(lw, w)``: stored tensors for float32 ``w``, fresh scales by the reference's rule,
      by role, with the shapes and dtypes of ``lw.parts``; a role left out (bitsandbytes'
      quant map and JSON state) does not change and is copied as stored.
    """

    name: str = ""
    label: str = ""  # for people: "block-scaled FP8 (DeepSeek-V3 / Qwen3-FP8)"
    # 4 bits or fewer per value (QLoRA's bases): a requantized merge keeps little of a small
    # ΔW, and an adapter trained on one is warned about when merged elsewhere
    four_bit: bool = False

    def detect(self, qc: dict | None, tensors: dict[str, TensorInfo]) -> bool:
        raise NotImplementedError

    def group(self, qc: dict, tensors: dict[str, TensorInfo]) -> dict[str, LogicalWeight]:
        raise NotImplementedError

    def decode(self, lw: LogicalWeight, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, lw: LogicalWeight, w: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def cannot_encode(self, lw: LogicalWeight) -> str | None:
        """Why this weight cannot be requantized (checked when planning), or None."""
        return None

    def out_parts(self, lw: LogicalWeight) -> dict[str, tuple[str, tuple[int, ...]]]:
        """role → (dtype, shape) a requantized weight is planned with (the stored ones)."""
        return {role: (info.dtype, tuple(info.shape)) for role, info in lw.parts.items()}

    def fit(self, lw: LogicalWeight, role: str, t: torch.Tensor, shape: tuple[int, ...]):
        """An encoded part as written into its planned ``shape`` (bitsandbytes pads its JSON)."""
        if tuple(t.shape) != tuple(shape):
            raise lw.error(f"encoded {role} is {list(t.shape)}, planned {list(shape)}", role=role)
        return t

    def step(self, lw: LogicalWeight, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The scheme's own unit of error at each element: the distance between neighbouring
        representable values at that element's scale (what ``unmerge --check`` counts in)."""
        raise NotImplementedError

    def describe(self, qc: dict) -> str:
        return self.label


@dataclass(frozen=True)
class QuantizedBase:
    """A base's scheme and its logical weights; stored tensors outside every logical weight
    (norms, embeddings left unquantized, biases, activation scales) are ordinary tensors."""

    codec: Codec
    config: dict  # the quantization_config as read
    weights: dict[str, LogicalWeight]

    @property
    def scheme(self) -> str:
        return self.codec.name

    def describe(self) -> str:
        return self.codec.describe(self.config)

    def owner(self) -> dict[str, str]:
        """Stored tensor name → the logical weight it belongs to."""
        return {s: lw.name for lw in self.weights.values() for s in lw.stored_names}


def read_parts(lw: LogicalWeight) -> dict[str, torch.Tensor]:
    """Read every stored part of a logical weight (torch needed)."""
    from ..tensors.io import read_tensor

    return {role: read_tensor(info) for role, info in lw.parts.items()}


def check_finite(lw: LogicalWeight, t: torch.Tensor, role: str, what: str) -> None:
    """Refuse NaN/Inf in a stored float part (a scale, FP8 values)."""
    import torch

    v = t if t.dtype in (torch.float32, torch.float64) else t.float()
    if not bool(torch.isfinite(v).all()):
        bad = "NaN" if bool(torch.isnan(v).any()) else "Inf"
        raise lw.error(f"{what} holds {bad}", role=role)


_E4M3_LUT = None


def e4m3_to_float32(q: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn → float32 through a 256-entry table made by torch's own conversion (so
    the same bits, NaN codes included), about twice as fast as ``.to(float32)`` on a CPU."""
    import torch

    global _E4M3_LUT
    if _E4M3_LUT is None:
        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
        _E4M3_LUT = codes.view(torch.float8_e4m3fn).to(torch.float32)
    idx = q.contiguous().view(torch.uint8).reshape(-1).to(torch.int32)
    return torch.index_select(_E4M3_LUT, 0, idx).view(q.shape)


def is_finite(w: torch.Tensor) -> bool:
    """Whether every value is finite, in one pass (NaN propagates into aminmax)."""
    import torch

    if w.numel() == 0:
        return True
    lo, hi = torch.aminmax(w)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def fp8_spacing(q: torch.Tensor) -> torch.Tensor:
    """The distance from each e4m3 value to its neighbours (towards larger magnitude): 2^(e−3)
    for normal values, 2^−9 below 2^−6 (subnormals). Powers of two, so e4m3 holds them."""
    import torch

    a = q.to(torch.float32).abs().clamp(min=2.0**-6)
    return torch.exp2(torch.floor(torch.log2(a)) - 3).to(torch.float8_e4m3fn)


def check_decoded(lw: LogicalWeight, w: torch.Tensor) -> torch.Tensor:
    """Refuse a dequantized weight that overflowed (a scale so large the product is Inf)."""
    import torch

    if not is_finite(w):
        bad = "NaN" if bool(torch.isnan(w).any()) else "Inf"
        raise lw.error(
            f"dequantizes to {bad}: a scale is so large that the weight overflows float32"
        )
    return w


def error_report(
    exact: torch.Tensor, written: torch.Tensor, base: torch.Tensor | None = None
) -> dict[str, float]:
    """How far what is written lies from the exact float32 result, relative to its size.

    ``max_rel_error`` = max|y − x| / max|x| and ``rms_rel_error`` = ‖y − x‖₂ / ‖x‖₂: an
    element-wise relative error would be dominated by weights near zero, which every
    quantizer maps to zero. With ``base`` (W before the merge), also ``delta_kept`` =
    ⟨y − W, x − W⟩ / ‖x − W‖²: the share of ΔW the output holds (1 when rounding lost none).
    A chunk of elements at a time in float32, the chunks' sums added in float64 (a report,
    not a result: a relative error of 1e-7 in it does not matter).
    """
    import torch

    x, y = exact.reshape(-1), written.reshape(-1)
    b = base.reshape(-1) if base is not None else None
    step = 1 << 20
    max_err = max_abs = 0.0
    sq_err = sq = dd = kd = 0.0
    for i in range(0, x.numel(), step):
        xb, yb = x[i : i + step], y[i : i + step]
        d = yb - xb
        max_err = max(max_err, float(d.abs().max()))
        max_abs = max(max_abs, float(xb.abs().max()))
        sq_err += float(torch.dot(d, d))
        sq += float(torch.dot(xb, xb))
        if b is not None:
            delta = xb - b[i : i + step]
            kept = yb - b[i : i + step]
            dd += float(torch.dot(delta, delta))
            kd += float(torch.dot(kept, delta))
    out = {
        "max_rel_error": max_err / max_abs if max_abs > 0 else (0.0 if max_err == 0 else math.inf),
        "rms_rel_error": math.sqrt(sq_err / sq) if sq > 0 else (0.0 if sq_err == 0 else math.inf),
    }
    if b is not None:
        out["delta_kept"] = kd / dd if dd > 0 else 1.0
    return out


def refuse(message: str, where, hint: str | None = None) -> FormatError:
    return FormatError(message, file=where, hint=hint)
