"""Quantization codecs against the reference implementations, bit for bit, on CPU.

References: transformers' finegrained_fp8 (``_dequantize_fp8_weight``, ``Fp8Quantize``) and
mxfp4 (``convert_moe_packed_tensors``), compressed-tensors (``dequantize``, ``quantize``,
``calculate_qparams``), bitsandbytes (``quantize_4bit``, ``dequantize_4bit``, ``QuantState``
packed the way transformers saves it). MXFP4's encoder lives in triton_kernels, which needs
triton: its ``downcast_to_mxfp_torch`` is written out below from its source.
"""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

from loratool.errors import FormatError, ValidationError
from loratool.quant import (
    bnb4,
    detect_base,
    detect_config,
    error_report,
    fp8_block,
    fp8_channel,
    mxfp4,
    read_parts,
)
from loratool.tensors.header import read_base, read_header
from loratool.tensors.io import save_file

FP8_QC = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def stored(tmp_path, tensors: dict, name="m.safetensors"):
    path = tmp_path / name
    save_file(tensors, path)
    return read_header(path).tensors


# -- block-scaled FP8 -----------------------------------------------------------------------


def hf_fp8_quantize(x: torch.Tensor, block=(128, 128)):
    """transformers' Fp8Quantize on the zero-padded weight, cropped (it skips partial shapes)."""
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.utils.quantization_config import FineGrainedFP8Config

    op = Fp8Quantize(
        SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=block))
    )
    *_, n, k = x.shape
    pn, pk = -(-n // block[0]) * block[0], -(-k // block[1]) * block[1]
    out = op._quantize_one("w.weight", torch.nn.functional.pad(x, (0, pk - k, 0, pn - n)))
    return out["w.weight"][..., :n, :k].contiguous(), out["w.weight_scale_inv"]


@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (130, 129), (3, 130, 260), (64, 32)])
def test_fp8_block_decode_and_encode_match_transformers(tmp_path, shape):
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    torch.manual_seed(sum(shape))
    x = torch.randn(shape) * 0.02
    q, s = hf_fp8_quantize(x)
    lw = fp8_block.CODEC.group(FP8_QC, stored(tmp_path, {"w.weight": q, "w.weight_scale_inv": s}))[
        "w.weight"
    ]
    assert lw.shape == shape
    parts = read_parts(lw)
    ours = fp8_block.CODEC.decode(lw, parts)
    assert same_bits(
        ours, _dequantize_fp8_weight(parts["weight"], parts["scale"], [128, 128], torch.float32)
    )
    # DeepSeek-V3's weight_dequant, written out: float32(q) · s of the element's block
    rows = torch.arange(shape[-2]) // 128
    cols = torch.arange(shape[-1]) // 128
    want = q.float() * s[..., rows[:, None], cols[None, :]]
    assert same_bits(ours, want)
    enc = fp8_block.CODEC.encode(lw, x)
    assert same_bits(enc["weight"], q) and same_bits(enc["scale"], s)


def test_fp8_block_bf16_scales_decode_with_the_scale_that_divided(tmp_path):
    x = torch.randn(200, 140) * 0.05
    q, s = hf_fp8_quantize(x)
    lw = fp8_block.CODEC.group(
        FP8_QC, stored(tmp_path, {"w.weight": q, "w.weight_scale_inv": s.to(torch.bfloat16)})
    )["w.weight"]
    enc = fp8_block.CODEC.encode(lw, x)
    assert enc["scale"].dtype == torch.bfloat16
    inv = enc["scale"].float()
    # the values were divided by exactly the stored (rounded) inverse's reciprocal
    rows, cols = torch.arange(200) // 128, torch.arange(140) // 128
    fwd = (1.0 / inv)[rows[:, None], cols[None, :]]
    assert same_bits(enc["weight"], (x * fwd).clamp(-448, 448).to(torch.float8_e4m3fn))


def test_fp8_block_zero_block_and_all_zero_weight(tmp_path):
    x = torch.zeros(130, 130)
    x[:128, :128] = torch.randn(128, 128)
    q, s = hf_fp8_quantize(x)
    lw = fp8_block.CODEC.group(FP8_QC, stored(tmp_path, {"w.weight": q, "w.weight_scale_inv": s}))[
        "w.weight"
    ]
    enc = fp8_block.CODEC.encode(lw, x)
    assert same_bits(enc["scale"], s) and float(enc["scale"][1, 1]) == 1.0


def test_fp8_transformers_load_time_dequant_is_wrong_for_partial_blocks(tmp_path):
    """Why the tests pin ``_dequantize_fp8_weight``: transformers' Fp8Dequantize (what loading
    an FP8 checkpoint on CPU runs) derives the block from the grid, 300/3 = 100 ≠ 128."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    x = torch.randn(300, 200) * 0.02
    q, s = hf_fp8_quantize(x)
    lw = fp8_block.CODEC.group(FP8_QC, stored(tmp_path, {"w.weight": q, "w.weight_scale_inv": s}))[
        "w.weight"
    ]
    ours = fp8_block.CODEC.decode(lw, read_parts(lw))
    theirs = Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=torch.float32)
    assert not torch.equal(ours, theirs)
    assert float((ours - x).abs().max()) < float((theirs - x).abs().max())


@pytest.mark.parametrize(
    "scale, message",
    [
        (None, "without its scale tensor"),
        (torch.ones(2, 1), "scale grid [2, 1] does not fit weight [200, 140]"),
        (torch.ones(1, 2), "need [2, 2]"),
    ],
)
def test_fp8_block_refuses_missing_or_misshapen_scales(tmp_path, scale, message):
    t = {"model.layers.0.mlp.up_proj.weight": torch.zeros(200, 140, dtype=torch.float8_e4m3fn)}
    if scale is not None:
        t["model.layers.0.mlp.up_proj.weight_scale_inv"] = scale
    with pytest.raises(FormatError, match=re.escape(message)) as err:
        fp8_block.CODEC.group(FP8_QC, stored(tmp_path, t))
    assert "model.layers.0.mlp.up_proj.weight" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "poison, message",
    [
        ("nan_scale", "weight_scale_inv holds NaN"),
        ("inf_scale", "weight_scale_inv holds Inf"),
        ("nan_weight", "the FP8 weight holds NaN"),
        ("overflow", "dequantizes to Inf"),
    ],
)
def test_fp8_block_refuses_nan_inf_and_overflow(tmp_path, poison, message):
    q = torch.full((130, 130), 448.0).to(torch.float8_e4m3fn)
    s = torch.ones(2, 2)
    if poison == "nan_scale":
        s[1, 0] = math.nan
    elif poison == "inf_scale":
        s[0, 1] = math.inf
    elif poison == "nan_weight":
        q.view(torch.uint8)[5, 7] = 0x7F  # e4m3fn's NaN
    else:
        s[1, 1] = 3e38  # 448 · 3e38 overflows float32
    lw = fp8_block.CODEC.group(FP8_QC, stored(tmp_path, {"l.weight": q, "l.weight_scale_inv": s}))[
        "l.weight"
    ]
    with pytest.raises(ValidationError, match=message) as err:
        fp8_block.CODEC.decode(lw, read_parts(lw))
    assert "l.weight" in str(err.value)


def test_fp8_block_refuses_unsupported_config(tmp_path):
    t = stored(
        tmp_path,
        {
            "w.weight": torch.zeros(4, 4, dtype=torch.float8_e4m3fn),
            "w.weight_scale_inv": torch.ones(1, 1),
        },
    )
    with pytest.raises(FormatError, match="scale_fmt='ue8m0' is not supported"):
        fp8_block.CODEC.group({**FP8_QC, "scale_fmt": "ue8m0"}, t)
    with pytest.raises(FormatError, match="weight_block_size"):
        fp8_block.CODEC.group({**FP8_QC, "weight_block_size": [128]}, t)


# -- compressed-tensors FP8 -----------------------------------------------------------------


def ct_args(strategy):
    from compressed_tensors.quantization import QuantizationArgs

    kw = dict(num_bits=8, type="float", strategy=strategy, symmetric=True, dynamic=False)
    if strategy == "block":
        kw["block_structure"] = [128, 128]
    return kw, QuantizationArgs(**kw)


def ct_quantize(x, strategy, scale_dtype):
    """compressed-tensors' own scale rule (calculate_qparams) and quantize."""
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    _, args = ct_args(strategy)
    if strategy == "tensor":
        lo, hi = x.amin().reshape(1), x.amax().reshape(1)
    elif strategy == "channel":
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    else:
        n, k = x.shape
        pn, pk = -(-n // 128) * 128, -(-k // 128) * 128
        xp = torch.nn.functional.pad(x, (0, pk - k, 0, pn - n)).reshape(
            pn // 128, 128, pk // 128, 128
        )
        lo, hi = xp.amin(dim=(1, 3)), xp.amax(dim=(1, 3))
    s, _ = calculate_qparams(lo, hi, args)
    s = s.to(scale_dtype)
    return quantize(x, s, None, args, dtype=torch.float8_e4m3fn), s


def ct_qc(strategy, fmt="float-quantized"):
    kw, _ = ct_args(strategy)
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": kw}},
        "ignore": ["lm_head"],
    }


@pytest.mark.parametrize(
    "strategy, scale_dtype",
    [
        ("tensor", torch.float32),
        ("tensor", torch.float16),
        ("channel", torch.bfloat16),
        ("channel", torch.float32),
        ("block", torch.bfloat16),
        ("block", torch.float32),
    ],
)
def test_compressed_tensors_fp8_matches_the_library(tmp_path, strategy, scale_dtype):
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    torch.manual_seed(7)
    x = torch.randn(300, 200) * 0.05
    x[3] = 0  # an all-zero channel: its scale is eps, its values stay 0
    q, s = ct_quantize(x, strategy, scale_dtype)
    lw = fp8_channel.CODEC.group(
        ct_qc(strategy), stored(tmp_path, {"l.weight": q, "l.weight_scale": s})
    )["l.weight"]
    assert lw.params["strategy"] == strategy
    parts = read_parts(lw)
    ours = fp8_channel.CODEC.decode(lw, parts)
    _, args = ct_args(strategy)
    ref = dequantize(parts["weight"], parts["scale"], None, args)
    assert ref.dtype == scale_dtype  # the reference rounds the product to the scale's dtype
    assert same_bits(ours, ref.float())
    enc = fp8_channel.CODEC.encode(lw, x)
    assert same_bits(enc["weight"], q) and same_bits(enc["scale"], s)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format": "pack-quantized"}, "format 'pack-quantized'"),
        ({"format": "nvfp4-pack-quantized"}, "not supported"),
        ({"transform_config": {"x": 1}}, "transform_config"),
        ({"quantization_status": "frozen"}, "only compressed checkpoints"),
    ],
)
def test_compressed_tensors_refusals(tmp_path, change, message):
    t = stored(
        tmp_path,
        {
            "l.weight": torch.zeros(4, 4, dtype=torch.float8_e4m3fn),
            "l.weight_scale": torch.ones(4, 1),
        },
    )
    with pytest.raises(FormatError, match=message):
        fp8_channel.CODEC.group({**ct_qc("channel"), **change}, t)
    int4 = ct_qc("channel")
    int4["config_groups"]["group_0"]["weights"].update(type="int", num_bits=4)
    with pytest.raises(FormatError, match="int 4-bit weights"):
        fp8_channel.CODEC.group(int4, t)


def test_compressed_tensors_scale_shape_must_fit(tmp_path):
    t = stored(
        tmp_path,
        {
            "l.weight": torch.zeros(4, 6, dtype=torch.float8_e4m3fn),
            "l.weight_scale": torch.ones(6, 1),
        },
    )
    with pytest.raises(FormatError, match=r"scale shape \[6, 1\] fits none"):
        fp8_channel.CODEC.group(ct_qc("channel"), t)


# -- MXFP4 ----------------------------------------------------------------------------------


def downcast_to_mxfp4_reference(src: torch.Tensor):
    """triton_kernels numerics_details/mxfp.py downcast_to_mxfp_torch(src, torch.uint8,
    axis=-1), ROUND_UP, written out (its module needs triton): the scale by integer rounding
    of the float32 bits, the E2M1 codes by bit manipulation."""

    def shr(x, s):
        return (x >> s) & ((1 << (32 - s)) - 1)

    src = src.to(torch.float32)
    groups = src.reshape(*src.shape[:-1], src.shape[-1] // 32, 32)
    max_val = groups.abs().amax(dim=-1, keepdim=True)
    ds = max_val / 6.0
    ds_int = ds.view(torch.int32)
    rounded = (ds_int + 0x007FFFFF) & 0x7F800000
    dsr = rounded.view(torch.float32)
    qs = torch.where(dsr == 0, torch.tensor(0.0), 1.0 / dsr)
    q = (groups * qs).reshape(src.shape)
    q_int = q.contiguous().view(torch.int32)
    signs = q_int & 0x80000000
    exps = shr(q_int, 23) & 0xFF
    mants = q_int & 0x7FFFFF
    mants = torch.where(exps < 127, (0x400000 | shr(mants, 1)) >> (127 - exps - 1), mants)
    exps = torch.maximum(exps, torch.tensor(126)) - 126
    tmp = shr(((exps << 2) | shr(mants, 21)) + 1, 1)
    tmp = torch.minimum(tmp, torch.tensor(7))
    e2m1 = (shr(signs, 28) | tmp).to(torch.uint8)
    e2m1 = e2m1.view(*e2m1.shape[:-1], -1, 2)
    packed = e2m1[..., 0] | (e2m1[..., 1] << 4)
    scale = (rounded >> 23).to(torch.uint8).squeeze(-1)
    return packed.reshape(*src.shape[:-1], -1, 16), scale


def test_mxfp4_decode_matches_transformers_and_encode_the_reference(tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    torch.manual_seed(3)
    blocks = torch.randint(0, 256, (2, 6, 3, 16), dtype=torch.uint8)
    scales = torch.randint(110, 135, (2, 6, 3), dtype=torch.uint8)
    t = stored(
        tmp_path, {"m.experts.down_proj_blocks": blocks, "m.experts.down_proj_scales": scales}
    )
    lw = mxfp4.CODEC.group({"quant_method": "mxfp4"}, t)["m.experts.down_proj"]
    assert lw.shape == (2, 96, 6)  # E × K × N, as GptOssExperts holds it
    ours = mxfp4.CODEC.decode(lw, read_parts(lw))
    assert same_bits(ours, convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    # fresh scales: random values, exact ties, zeros of both signs, tiny and huge blocks
    x = torch.randn(2, 96, 6) * 0.1
    x[0, :32, 0] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25] * 4) * 2.0**-3
    x[1, :32, 1] = torch.tensor([0.0, -0.0] * 16)
    x[1, 32:64, 2] = torch.randn(32) * 1e-30
    x[0, 64:, 3] = torch.randn(32) * 1e30
    x[1, 64:, 4] = -6.0
    enc = mxfp4.CODEC.encode(lw, x)
    ref_blocks, ref_scales = downcast_to_mxfp4_reference(x.transpose(1, 2))
    assert same_bits(enc["blocks"], ref_blocks) and same_bits(enc["scales"], ref_scales)
    # decoding lands within half a grid step: at most d = 2^⌈log2(max/6)⌉ < max/3 per block
    back = mxfp4.CODEC.decode(lw, enc).reshape(2, 3, 32, 6)
    blk = x.reshape(2, 3, 32, 6)
    amax = blk.abs().amax(dim=2, keepdim=True)
    assert bool(((back - blk).abs() <= amax / 3).all())


def test_mxfp4_refuses_nan_scale_and_bad_grid(tmp_path):
    blocks = torch.zeros(1, 2, 1, 16, dtype=torch.uint8)
    scales = torch.full((1, 2, 1), 0xFF, dtype=torch.uint8)
    t = stored(tmp_path, {"e.gate_up_proj_blocks": blocks, "e.gate_up_proj_scales": scales})
    lw = mxfp4.CODEC.group({"quant_method": "mxfp4"}, t)["e.gate_up_proj"]
    with pytest.raises(ValidationError, match="0xFF"):
        mxfp4.CODEC.decode(lw, read_parts(lw))
    t = stored(
        tmp_path,
        {"e.gate_up_proj_blocks": blocks, "e.gate_up_proj_scales": scales[:, :1]},
        "b.safetensors",
    )
    with pytest.raises(FormatError, match=r"scale grid \[1, 1, 1\] does not fit"):
        mxfp4.CODEC.group({"quant_method": "mxfp4"}, t)


# -- bitsandbytes 4-bit ---------------------------------------------------------------------


def bnb_stored(tmp_path, x, quant_type, nested, blocksize=64):
    """A weight quantized by bitsandbytes and saved as transformers saves Params4bit."""
    import bitsandbytes.functional as F

    q, st = F.quantize_4bit(
        x, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type
    )
    t = {"l.weight": q}
    for k, v in st.as_dict(packed=True).items():
        t["l.weight." + k] = v
    lw = bnb4.CODEC.group(
        {"quant_method": "bitsandbytes", "load_in_4bit": True}, stored(tmp_path, t)
    )["l.weight"]
    return lw, q, st, t


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape", [(64, 128), (33, 7), (48, 96)])
def test_bnb4_decode_matches_bitsandbytes(tmp_path, quant_type, nested, shape):
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.functional import QuantState

    torch.manual_seed(shape[0] + nested)
    x = torch.randn(shape, dtype=torch.bfloat16) * 0.03
    lw, q, st, t = bnb_stored(tmp_path, x, quant_type, nested)
    assert lw.shape == shape and lw.dtype == "BF16"
    ours = bnb4.CODEC.decode(lw, read_parts(lw))
    state = QuantState.from_dict({k: v for k, v in t.items() if k != "l.weight"}, device="cpu")
    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    want = (
        _dequantize_4bit_compute.__wrapped__
        if hasattr(_dequantize_4bit_compute, "__wrapped__")
        else _dequantize_4bit_compute
    )
    ref = want(q.reshape(-1), absmax, bnb4.table(quant_type), 64, shape, torch.float32)
    assert same_bits(ours, ref)
    if shape[1] % 64 == 0 or shape[0] * shape[1] % 64 == shape[0] * shape[1]:
        state.dtype = torch.float32  # the public API; its CPU kernel is right on these shapes
        assert same_bits(ours, F.dequantize_4bit(q, state))


def native_bnb() -> bool:
    """Whether bitsandbytes' compiled x86-64 CPU library loaded: the quantize_blockwise kernel
    double quant is pinned to (its aarch64 build bins with NEON, (v + 1)·32767.5 + 0.5)."""
    import platform

    from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return x86 and not isinstance(lib, ErrorHandlerMockBNBNativeLibrary)


NO_NATIVE = "needs bitsandbytes' compiled x86-64 CPU library"
needs_native_bnb = pytest.mark.skipif(not native_bnb(), reason=NO_NATIVE)


def test_bnb4_dynamic_map_is_bitsandbytes():
    import bitsandbytes.functional as F

    assert same_bits(bnb4.dynamic_map(), F.create_dynamic_map())


@needs_native_bnb
def test_bnb4_nested_quantize_blockwise_is_the_cpu_kernel():
    """bitsandbytes' compiled CPU quantize_blockwise (a 65536-bin lookup table, not the
    nearest map value) on lengths that are not multiples of 256, zero blocks, values at the
    table's bin edges and at ±absmax."""
    import bitsandbytes.functional as F

    code = bnb4.dynamic_map()
    k = torch.arange(1, 65536, dtype=torch.float64)
    edges = (2 * (k - 0.5) / 65535 - 1).float()  # the values where the bin index changes
    near = torch.cat(
        [
            edges,
            torch.nextafter(edges, torch.tensor(2.0)),
            torch.nextafter(edges, torch.tensor(-2.0)),
        ]
    ).clamp(-1, 1)
    rows = near.numel() // 255 + 1
    at_edges = torch.zeros(rows, 256)
    at_edges[:, 0] = 1.0  # each block's absmax is 1: the values reach the kernel unscaled
    at_edges[:, 1:].reshape(-1)[: near.numel()] = near
    cases = [at_edges.reshape(-1), -at_edges.reshape(-1)]
    for seed, n in enumerate((1, 255, 257, 1000, 50000)):
        torch.manual_seed(seed)
        a = torch.randn(n) * 10.0 ** (seed - 4)
        a[: n // 3] = 0 if seed % 2 else a[: n // 3]  # whole blocks of zeros
        cases.append(a)
    cases.append(torch.randn(40, 70) * 0.01)  # any shape: codes come back shaped as the input
    nearest_differs = 0
    for a in cases:
        q, st = F.quantize_blockwise(a, blocksize=256)
        ours, absmax = bnb4.quantize_blockwise(a, code, 256)
        assert same_bits(ours, q) and same_bits(absmax, st.absmax)
        # the nearest map value (the CUDA and pure-torch kernels' rule) is a different answer
        scaled = a.reshape(-1) / torch.repeat_interleave(absmax.clamp(min=1e-38), 256)[: a.numel()]
        nearest = torch.bucketize(scaled.clamp(-1, 1), (code[:-1] + code[1:]) / 2)
        nearest_differs += int((nearest.to(torch.uint8) != q.reshape(-1)).sum())
    assert nearest_differs > 0


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize(
    "shape, blocksize, nested",
    [
        ((40, 70), 64, False),
        ((40, 70), 64, True),  # rows of 70: blocks straddle rows, 44 blocks, 1 nested block
        ((7, 9), 64, True),  # 63 values: one partial block, an odd count of nibbles
        ((129, 200), 32, True),  # 807 blocks: 3 full nested blocks of 256 and one of 39
        ((300, 301), 64, True),
    ],
)
def test_bnb4_encode_matches_bitsandbytes(tmp_path, quant_type, shape, blocksize, nested):
    """Every tensor quantize_4bit(compress_statistics=...) and QuantState.as_dict(packed=True)
    write, byte for byte (the JSON state before its padding to the planned length)."""
    if nested and not native_bnb():
        pytest.skip(NO_NATIVE)
    torch.manual_seed(shape[0] + blocksize)
    x = torch.randn(shape) * 0.02
    lw, q, st, t = bnb_stored(tmp_path, x, quant_type, nested, blocksize)
    enc = bnb4.CODEC.encode(lw, x)
    packed = {**st.as_dict(packed=True), "weight": q}
    for role, tensor in enc.items():
        key = f"quant_state.bitsandbytes__{quant_type}" if role == "state" else role
        assert same_bits(tensor, packed[key]), role
    assert set(enc) == (
        {"weight", "absmax", "nested_absmax", "nested_quant_map", "state"}
        if nested
        else {"weight", "absmax"}
    )
    # decoded again from what is written (the new offset read from the padded JSON): what
    # bitsandbytes' own dequantization of its quantize_4bit gives
    planned = bnb4.CODEC.out_parts(lw)
    parts = {r: bnb4.CODEC.fit(lw, r, v, planned[r][1]) for r, v in enc.items()}
    parts["quant_map"] = t["l.weight.quant_map"]
    back = bnb4.CODEC.decode(lw, parts)
    absmax = st.absmax
    if nested:
        import bitsandbytes.functional as F

        absmax = F.dequantize_blockwise(st.absmax, st.state2) + st.offset
        assert bytes(parts["state"].tolist()).rstrip(b" ") == bytes(
            packed[f"quant_state.bitsandbytes__{quant_type}"].tolist()
        )
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    want = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    ref = want(q.reshape(-1), absmax, bnb4.table(quant_type), blocksize, shape, torch.float32)
    assert same_bits(back, ref)


def test_bnb4_nested_blocksize_other_than_256_is_refused(tmp_path):
    x = torch.randn(40, 70) * 0.02
    lw, q, st, t = bnb_stored(tmp_path, x, "nf4", True)
    key = "l.weight.quant_state.bitsandbytes__nf4"
    state = json.loads(bytes(t[key].tolist()))
    state["nested_blocksize"] = 128  # still one nested block for 44 absmax
    t[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    lw = bnb4.CODEC.group(
        {"quant_method": "bitsandbytes", "load_in_4bit": True}, stored(tmp_path, t, "n.safetensors")
    )["l.weight"]
    assert "nested_blocksize 128" in bnb4.CODEC.cannot_encode(lw)
    with pytest.raises(ValidationError, match="nested_blocksize 128"):
        bnb4.CODEC.encode(lw, x)


def test_bnb4_refuses_a_foreign_quant_map_and_missing_state(tmp_path):
    x = torch.randn(8, 64) * 0.02
    lw, q, st, t = bnb_stored(tmp_path, x, "nf4", False)
    t["l.weight.quant_map"] = t["l.weight.quant_map"] * 1.01
    lw = bnb4.CODEC.group(
        {"quant_method": "bitsandbytes", "load_in_4bit": True}, stored(tmp_path, t, "c.safetensors")
    )["l.weight"]
    with pytest.raises(ValidationError, match="quant_map differs"):
        bnb4.CODEC.decode(lw, read_parts(lw))
    del t["l.weight.absmax"]
    with pytest.raises(FormatError, match="without its absmax"):
        bnb4.CODEC.group(
            {"quant_method": "bitsandbytes", "load_in_4bit": True},
            stored(tmp_path, t, "d.safetensors"),
        )
    state = json.loads(bytes(t["l.weight.quant_state.bitsandbytes__nf4"].tolist()))
    state["shape"] = [9, 64]
    t["l.weight.quant_state.bitsandbytes__nf4"] = torch.tensor(
        list(json.dumps(state).encode()), dtype=torch.uint8
    )
    t["l.weight.absmax"] = st.absmax
    with pytest.raises(FormatError, match="does not hold 576 4-bit values"):
        bnb4.CODEC.group(
            {"quant_method": "bitsandbytes", "load_in_4bit": True},
            stored(tmp_path, t, "e.safetensors"),
        )


# -- detection ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "qc, message",
    [
        ({"quant_method": "gptq", "bits": 4}, "GPTQ"),
        ({"quant_method": "awq", "bits": 4}, "AWQ"),
        ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "8-bit"),
        ({"quant_method": "hqq"}, "HQQ"),
        ({"quant_method": "something-new"}, "unknown quantization scheme"),
    ],
)
def test_unsupported_schemes_are_refused_by_name(qc, message):
    with pytest.raises(FormatError, match=message) as err:
        detect_config(qc, {}, "config.json")
    assert "\n" not in str(err.value)


def test_quantized_tensors_without_a_config_are_refused(tmp_path):
    base = tmp_path / "b"
    base.mkdir()
    save_file(
        {
            "l.qweight": torch.zeros(4, 4, dtype=torch.int32),
            "l.qzeros": torch.zeros(1, 4, dtype=torch.int32),
        },
        base / "model.safetensors",
    )
    with pytest.raises(FormatError, match="GPTQ/AWQ"):
        detect_base(read_base(base))
    save_file(
        {"l.weight": torch.zeros(4, 4, dtype=torch.float8_e4m3fn)}, base / "model.safetensors"
    )
    with pytest.raises(FormatError, match="no quantization_config"):
        detect_base(read_base(base))


def test_detect_base_reads_config_and_groups(tmp_path):
    base = tmp_path / "b"
    base.mkdir()
    x = torch.randn(256, 128) * 0.02
    q, s = hf_fp8_quantize(x)
    save_file(
        {
            "a.weight": q,
            "a.weight_scale_inv": s,
            "norm.weight": torch.ones(128, dtype=torch.bfloat16),
        },
        base / "model.safetensors",
    )
    (base / "config.json").write_text(
        json.dumps({"torch_dtype": "bfloat16", "quantization_config": FP8_QC})
    )
    qb = detect_base(read_base(base))
    assert qb.scheme == "fp8_block" and list(qb.weights) == ["a.weight"]
    assert qb.owner() == {"a.weight": "a.weight", "a.weight_scale_inv": "a.weight"}
    (base / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    with pytest.raises(FormatError, match="no quantization_config"):
        detect_base(read_base(base))


def test_error_report_is_relative_to_the_tensor():
    x = torch.tensor([[1.0, -2.0], [0.0, 4.0]])
    y = x.clone()
    y[0, 0] = 1.5
    r = error_report(x, y)
    assert r["max_rel_error"] == pytest.approx(0.5 / 4.0)
    assert r["rms_rel_error"] == pytest.approx(0.5 / math.sqrt(21.0))
    assert error_report(x, x) == {"max_rel_error": 0.0, "rms_rel_error": 0.0}


def test_gguf_bases_are_refused_by_name(tmp_path):
    gguf = tmp_path / "model-Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    for path in (gguf, tmp_path):
        with pytest.raises(FormatError, match="GGUF-quantized bases are not supported"):
            read_base(path)
