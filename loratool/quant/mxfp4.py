"""MXFP4 (OCP Microscaling FP4, as gpt-oss stores its experts; ``quant_method: mxfp4``).

Stored per expert-stacked parameter P (transformers' ``GptOssExperts.gate_up_proj`` /
``down_proj``, shape E × K × N, used as ``x @ P[e]``): ``P_blocks``, uint8 E × N × G × 16, and
``P_scales``, uint8 E × N × G. Along K (the input side) every 32 values form a block: 16 bytes
of two E2M1 codes each (the low nibble holds the even element) and one E8M0 scale byte, the
exponent biased by 127. K = 32·G; the stored layout is P transposed to E × N × K.

Decoding (transformers ``integrations/mxfp4.py`` ``convert_moe_packed_tensors``): each code
looks up ``FP4_VALUES`` (0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6), is multiplied by 2^(scale − 127)
with ``ldexp`` (exact: a power of two), and the E × N × K result is transposed to E × K × N.
E8M0's 0xFF is NaN in the OCP MX spec; a product past float32's range is Inf: both refused.

Encoding, fresh scales (triton_kernels ``numerics_details/mxfp.py`` ``downcast_to_mxfp_torch``
with its default ``DequantScaleRoundingMode.ROUND_UP``, which transformers' ``quantize_to_mxfp4``
calls; it needs triton_kernels, so the tests pin this against its definition written out):
per block of 32, ``d = max|x| / 6`` rounded *up* to a power of two (E8M0 byte = d's biased
exponent; 0 for an all-zero block); each ``x / d`` goes to the nearest E2M1 value, ties away
from zero, saturating at ±6. transformers first rounds its input to bfloat16 because its
parameters are bfloat16; here the exact float32 merge is quantized directly.
"""

from __future__ import annotations

from ..errors import FormatError
from .base import Codec, LogicalWeight, check_decoded

FP4_VALUES = (
    0.0,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    6.0,
    -0.0,
    -0.5,
    -1.0,
    -1.5,
    -2.0,
    -3.0,
    -4.0,
    -6.0,
)
BLOCK = 32


class Mxfp4(Codec):
    name = "mxfp4"
    label = "MXFP4 (E2M1 values, E8M0 block scales; gpt-oss)"
    four_bit = True

    def detect(self, qc, tensors) -> bool:
        return bool(qc) and qc.get("quant_method") == "mxfp4"

    def describe(self, qc) -> str:
        return "MXFP4 (E2M1 + E8M0 scales per 32)"

    def group(self, qc, tensors, *, float_dtype: str = "BF16", where=None):
        out: dict[str, LogicalWeight] = {}
        for name, info in tensors.items():
            if name.endswith("_scales"):
                if name.removesuffix("_scales") + "_blocks" not in tensors:
                    raise FormatError(
                        "MXFP4 scales without their _blocks", file=info.file, tensor=name
                    )
                continue
            if not name.endswith("_blocks"):
                continue
            pname = name.removesuffix("_blocks")
            scales = tensors.get(pname + "_scales")
            if scales is None:
                raise FormatError(
                    f"MXFP4 blocks without their scale tensor {pname}_scales",
                    file=info.file,
                    tensor=name,
                )
            if info.dtype != "U8" or scales.dtype != "U8":
                raise FormatError(
                    f"MXFP4 blocks/scales must be uint8, found {info.dtype}/{scales.dtype}",
                    file=info.file,
                    tensor=name,
                )
            if len(info.shape) < 3 or info.shape[-1] != BLOCK // 2:
                raise FormatError(
                    f"MXFP4 blocks of shape {list(info.shape)}: expected [..., N, G, 16]",
                    file=info.file,
                    tensor=name,
                )
            if tuple(scales.shape) != tuple(info.shape[:-1]):
                raise FormatError(
                    f"scale grid {list(scales.shape)} does not fit blocks {list(info.shape)}: "
                    f"one E8M0 scale per 32 values needs {list(info.shape[:-1])}",
                    file=scales.file,
                    tensor=scales.name,
                )
            *lead, n, g, _ = info.shape
            if len(lead) != 1:
                raise FormatError(
                    f"MXFP4 blocks of shape {list(info.shape)}: expected experts × N × G × 16",
                    file=info.file,
                    tensor=name,
                )
            out[pname] = LogicalWeight(
                pname,
                (lead[0], g * BLOCK, n),
                {"blocks": info, "scales": scales},
                float_dtype,
                {},
            )
        return out

    def decode(self, lw, parts):
        import torch

        blocks, scales = parts["blocks"], parts["scales"]
        if bool((scales == 0xFF).any()):
            raise lw.error(
                "an E8M0 scale is 0xFF, which the OCP MX spec defines as NaN", role="scales"
            )
        lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
        e, n, g, _ = blocks.shape
        w = torch.empty(e, n, g, BLOCK, dtype=torch.float32)
        w[..., 0::2] = lut[(blocks & 0x0F).long()]
        w[..., 1::2] = lut[(blocks >> 4).long()]
        torch.ldexp(w, (scales.to(torch.int32) - 127).unsqueeze(-1), out=w)
        w = w.reshape(e, n, g * BLOCK).transpose(1, 2).contiguous()
        return check_decoded(lw, w)

    def encode(self, lw, x):
        import torch

        e, k, n = lw.shape
        g = k // BLOCK
        v = x.transpose(1, 2).contiguous().reshape(e, n, g, BLOCK)
        amax = v.abs().amax(dim=-1)
        # d = amax / 6 rounded up to a power of two: frexp gives amax/6 = m·2^p with m in
        # [0.5, 1); it is already a power of two when m == 0.5, else the next one is 2^p.
        d = amax / 6.0
        m, p = torch.frexp(d)
        exp = torch.where(m == 0.5, p - 1, p)  # d ≤ 2^exp, exactly a power of two
        # a subnormal d rounds up to 2^-126 (E8M0 byte 1), as the reference's bit trick does
        byte = torch.where(d == 0, torch.zeros_like(exp), (exp + 127).clamp(min=1))
        if bool((byte > 254).any()):
            raise lw.error("an MXFP4 block's scale overflows E8M0 (max|x| too large)")
        # x / d is exact (d a power of two); an all-zero block keeps its zeros' signs
        scaled = torch.ldexp(v, (127 - byte).unsqueeze(-1).to(v.dtype))
        mag = scaled.abs()
        grid = torch.tensor(FP4_VALUES[:8], dtype=torch.float32)
        mids = (grid[:-1] + grid[1:]) / 2
        # bucketize(right=True) counts the midpoints ≤ |x|: a tie goes to the larger magnitude
        code = torch.bucketize(mag, mids, right=True).to(torch.uint8)
        code |= torch.signbit(scaled).to(torch.uint8) << 3
        packed = code[..., 0::2] | (code[..., 1::2] << 4)
        return {"blocks": packed.contiguous(), "scales": byte.to(torch.uint8)}

    def step(self, lw, parts):
        import torch

        # E2M1 spacing by code: 0.5 up to 1.5, 1 for 2 and 3, 2 for 4 and 6 — themselves E2M1
        # codes (1, 2, 4), so decoding them applies each block's scale
        spacing = torch.tensor([1, 1, 1, 1, 2, 2, 4, 4] * 2, dtype=torch.uint8)
        b = parts["blocks"]
        coded = spacing[(b & 0x0F).long()] | (spacing[(b >> 4).long()] << 4)
        return self.decode(lw, {**parts, "blocks": coded})


CODEC = Mxfp4()
