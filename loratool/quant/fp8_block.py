"""Block-scaled FP8: DeepSeek-V3, Qwen3-FP8 and transformers' FineGrainedFP8 (``quant_method: fp8``).

Stored per weight W (``…, N, K``): ``X.weight`` in float8_e4m3fn and ``X.weight_scale_inv``
(float32, sometimes bfloat16) holding one scale per ``weight_block_size`` block (128×128 by
default) of the last two dimensions; the last block of a side that is not a multiple of the
block is partial. The scale grid is ``ceil(N/bm) × ceil(K/bn)`` (leading dimensions of stacked
experts kept). ``weight_block_size: null`` means one scale per matrix.

Decoding (DeepSeek-V3 ``inference/kernel.py`` ``weight_dequant``, transformers'
``_dequantize_fp8_weight``): ``W = float32(q) · float32(s)``, one float32 product per element.

Encoding, fresh scales (transformers' ``Fp8Quantize._quantize_one``, which is what
``save_pretrained`` writes for this quant_method): per block ``a = max|x|``; the forward scale
is ``448 / a`` (1 for an all-zero block), the stored ``weight_scale_inv`` is ``1 / (448 / a)``
in float32, and the values are ``clamp(x · (448 / a), −448, 448)`` cast to e4m3 (round to
nearest even). transformers leaves a weight whose sides are not multiples of the block
unquantized; here a partial block takes the same rule over the elements it has (what
quantizing the zero-padded weight gives, since zeros change no block maximum). When the base
stores its scales in bfloat16/float16, the stored inverse is rounded first and the forward
scale derived from it (as transformers does for ``scale_fmt: ue8m0``), so decode(encode(x))
multiplies by exactly the scale that divided.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..errors import FormatError
from ..tensors.header import TensorInfo
from .base import (
    Codec,
    LogicalWeight,
    check_decoded,
    check_finite,
    e4m3_to_float32,
    fp8_spacing,
    is_finite,
)

if TYPE_CHECKING:
    import torch

FP8_MAX = 448.0
SCALE_SUFFIX = "_scale_inv"
SCALE_DTYPES = ("F32", "BF16", "F16")


def _grid(shape: tuple[int, ...], block: tuple[int, int] | None) -> tuple[int, ...]:
    *lead, n, k = shape
    if block is None:
        return (*lead, 1, 1)
    return (*lead, -(-n // block[0]), -(-k // block[1]))


class Fp8Block(Codec):
    name = "fp8_block"
    label = "block-scaled FP8 (e4m3 + weight_scale_inv)"

    def detect(self, qc, tensors) -> bool:
        return bool(qc) and qc.get("quant_method") == "fp8"

    def describe(self, qc) -> str:
        b = qc.get("weight_block_size")
        return f"block-scaled FP8 e4m3, {'×'.join(map(str, b)) if b else 'per-matrix'} blocks"

    def _block(self, qc, where) -> tuple[int, int] | None:
        b = qc.get("weight_block_size", [128, 128])
        if b is None:
            return None
        if (
            not isinstance(b, (list, tuple))
            or len(b) != 2
            or not all(isinstance(v, int) and v > 0 for v in b)
        ):
            raise FormatError(
                f"quantization_config.weight_block_size {b!r} is not two positive integers",
                file=where,
            )
        return (b[0], b[1])

    def check_config(self, qc: dict, where) -> None:
        for key, ok in (
            ("fmt", ("e4m3", None)),
            ("scale_fmt", ("float", None)),
            ("expert_dtype", ("fp8", None)),
        ):
            if qc.get(key) not in ok:
                raise FormatError(
                    f"quantization_config {key}={qc.get(key)!r} is not supported (only {ok[0]!r})",
                    file=where,
                    hint="loratool merges e4m3 weights with float scales",
                )

    def group(self, qc, tensors, *, float_dtype: str = "BF16", where=None):
        self.check_config(qc, where)
        block = self._block(qc, where)
        out: dict[str, LogicalWeight] = {}
        for name, info in tensors.items():
            if name.endswith(SCALE_SUFFIX):
                w = tensors.get(name[: -len(SCALE_SUFFIX)])
                if w is None or w.dtype != "F8_E4M3":
                    raise FormatError(
                        "a weight_scale_inv whose weight is missing or not float8_e4m3fn",
                        file=info.file,
                        tensor=name,
                    )
                continue
            if info.dtype == "F8_E5M2":
                raise FormatError(
                    "float8_e5m2 weights are not supported", file=info.file, tensor=name
                )
            if info.dtype != "F8_E4M3":
                continue
            scale = tensors.get(name + SCALE_SUFFIX)
            if scale is None:
                raise FormatError(
                    f"FP8 weight without its scale tensor {name + SCALE_SUFFIX}",
                    file=info.file,
                    tensor=name,
                    hint="a scale-less FP8 weight cannot be dequantized",
                )
            if len(info.shape) < 2:
                raise FormatError(
                    f"FP8 weight of shape {list(info.shape)}: expected a matrix",
                    file=info.file,
                    tensor=name,
                )
            want = _grid(info.shape, block)
            have = scale.shape
            ok = have == want or (block is None and len(info.shape) == 2 and math.prod(have) == 1)
            if not ok:
                grid = f"{block[0]}×{block[1]} blocks" if block else "one scale per matrix"
                raise FormatError(
                    f"scale grid {list(have)} does not fit weight {list(info.shape)}: "
                    f"{grid} need {list(want)}",
                    file=scale.file,
                    tensor=scale.name,
                )
            if scale.dtype not in SCALE_DTYPES:
                raise FormatError(
                    f"scale dtype {scale.dtype} is not float32/bfloat16/float16",
                    file=scale.file,
                    tensor=scale.name,
                )
            out[name] = LogicalWeight(
                name,
                tuple(info.shape),
                {"weight": info, "scale": scale},
                float_dtype,
                {"block": block},
            )
        return out

    # -- numerics -------------------------------------------------------------------------

    def _blocks(self, lw: LogicalWeight):
        *_, n, k = lw.shape
        bm, bn = lw.params["block"] or (n, k)
        return n, k, bm, bn

    def decode(self, lw, parts):
        import torch

        q, s = parts["weight"], parts["scale"]
        w = e4m3_to_float32(q)  # exact
        s = s.to(torch.float32).reshape(_grid(lw.shape, lw.params["block"]))
        n, k, bm, bn = self._blocks(lw)
        full, rem = divmod(k, bn)
        # One float32 product per element, the scale broadcast over its block in place: no
        # weight-sized copy of the scales (DeepSeek's kernel and transformers do the same math).
        for i, r0 in enumerate(range(0, n, bm)):
            rows = w[..., r0 : r0 + bm, :]
            si = s[..., i, :]
            if full:
                rows[..., : full * bn].unflatten(-1, (full, bn)).mul_(si[..., None, :full, None])
            if rem:
                rows[..., full * bn :].mul_(si[..., None, full:])
        # one pass over the result: NaN/Inf in a scale or a NaN code propagate into it
        if not is_finite(w):
            check_finite(lw, s, "scale", "weight_scale_inv")
            check_finite(lw, e4m3_to_float32(q), "weight", "the FP8 weight")
        return check_decoded(lw, w)

    def block_amax(self, lw, x: torch.Tensor) -> torch.Tensor:
        """max|x| over each block, shaped like the scale grid."""
        import torch

        n, k, bm, bn = self._blocks(lw)
        full, rem = divmod(k, bn)
        rows = []
        for r0 in range(0, n, bm):
            xb = x[..., r0 : r0 + bm, :]
            cols = []
            if full:
                cols.append(xb[..., : full * bn].unflatten(-1, (full, bn)).abs().amax(dim=(-3, -1)))
            if rem:
                cols.append(xb[..., full * bn :].abs().amax(dim=(-2, -1)).unsqueeze(-1))
            rows.append(torch.cat(cols, dim=-1))
        return torch.stack(rows, dim=-2)

    def encode(self, lw, x):
        import torch

        from ..tensors.io import torch_dtype

        amax = self.block_amax(lw, x)
        safe = torch.where(amax > 0, amax, torch.ones_like(amax))
        scales = torch.where(amax > 0, FP8_MAX / safe, torch.ones_like(amax))
        if not bool(torch.isfinite(scales).all()):
            raise lw.error(
                "a block's largest value is too small for an FP8 scale (float32 underflow)"
            )
        inv = 1.0 / scales
        sdt = torch_dtype(lw.parts["scale"].dtype)
        if sdt != torch.float32:
            inv = inv.to(sdt)
            scales = 1.0 / inv.to(torch.float32)
        n, k, bm, bn = self._blocks(lw)
        full, rem = divmod(k, bn)
        q = torch.empty(x.shape, dtype=torch.float8_e4m3fn)
        for i, r0 in enumerate(range(0, n, bm)):
            xb = x[..., r0 : r0 + bm, :]
            si = scales[..., i, :]
            qb = q[..., r0 : r0 + bm, :]
            if full:
                part = xb[..., : full * bn].unflatten(-1, (full, bn)) * si[..., None, :full, None]
                qb[..., : full * bn].copy_(part.clamp_(-FP8_MAX, FP8_MAX).flatten(-2))
            if rem:
                part = xb[..., full * bn :] * si[..., None, full:]
                qb[..., full * bn :].copy_(part.clamp_(-FP8_MAX, FP8_MAX))
        return {"weight": q, "scale": inv.reshape(lw.parts["scale"].shape)}

    def step(self, lw, parts):
        return self.decode(lw, {**parts, "weight": fp8_spacing(parts["weight"])})


CODEC = Fp8Block()


def scale_name(weight: TensorInfo) -> str:
    return weight.name + SCALE_SUFFIX
