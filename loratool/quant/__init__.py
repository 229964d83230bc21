"""Quantized bases: one codec per scheme, registered by name, and the detection that picks one.

``detect_base(base)`` reads config.json's ``quantization_config`` (beside the weights) and the
headers, and returns a ``QuantizedBase`` (the codec and every logical weight with its stored
parts), ``None`` for an ordinary base, or refuses in one line: a scheme loratool does not
handle (GPTQ, AWQ, GGUF, bitsandbytes 8-bit, …) by name, an unknown ``quant_method``, tensors
that look quantized with no config saying how, a missing or misshapen scale tensor. All of it
from headers, without torch, before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import FormatError
from ..tensors.header import BaseIndex, TensorInfo
from .base import Codec, LogicalWeight, QuantizedBase, error_report, read_parts

REGISTRY: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    REGISTRY[codec.name] = codec
    return codec


# quant_method values (transformers' QuantizationMethod) that loratool knows and does not merge
UNSUPPORTED = {
    "gptq": "GPTQ (int4 with g_idx, qzeros)",
    "awq": "AWQ (packed int4 with qzeros)",
    "aqlm": "AQLM (additive codebooks)",
    "vptq": "VPTQ (vector codebooks)",
    "quanto": "optimum-quanto",
    "eetq": "EETQ (int8)",
    "higgs": "HIGGS",
    "hqq": "HQQ",
    "fbgemm_fp8": "FBGEMM FP8 (per-row, activation upper bound)",
    "torchao": "torchao (pickled tensor subclasses)",
    "bitnet": "BitNet (ternary)",
    "spqr": "SpQR",
    "fp_quant": "FP-Quant (Hadamard-rotated)",
    "auto-round": "AutoRound",
    "auto_round": "AutoRound",
    "quark": "AMD Quark",
    "gguf": "GGUF",
    "nvfp4": "NVFP4",
    "modelopt": "NVIDIA ModelOpt",
    "sinq": "SINQ",
    "metal": "Metal quantization",
    "mlx": "MLX quantization",
    "exl2": "ExLlamaV2 (EXL2)",
    "marlin": "Marlin-packed int4",
}

# tensor name endings that give a scheme away when config.json does not say
_TELLTALES = (
    (".qweight", "GPTQ/AWQ (qweight/qzeros/scales)"),
    (".qzeros", "GPTQ/AWQ (qweight/qzeros/scales)"),
    (".g_idx", "GPTQ (g_idx)"),
    (".SCB", "bitsandbytes 8-bit (LLM.int8: SCB)"),
    (".weight_format", "bitsandbytes 8-bit (LLM.int8)"),
    ("_scale_inv", "block-scaled FP8 (weight_scale_inv)"),
    (".weight_scale", "compressed-tensors / FP8 (weight_scale)"),
    (".weight_packed", "compressed-tensors packed int4/FP4 (weight_packed)"),
    (".absmax", "bitsandbytes 4-bit (absmax)"),
    ("_blocks", "MXFP4 (_blocks/_scales)"),
)


def _load_codecs() -> None:
    if REGISTRY:
        return
    from . import bnb4, fp8_block, fp8_channel, mxfp4

    for mod in (fp8_block, fp8_channel, mxfp4, bnb4):
        register(mod.CODEC)


def model_config(base: BaseIndex) -> tuple[dict | None, Path | None]:
    """config.json beside the base's weights, if there is one and it is a JSON object."""
    root = base.root if base.root.is_dir() else base.root.parent
    path = root / "config.json"
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FormatError("config.json is not valid JSON", file=path) from exc
    return (data if isinstance(data, dict) else None), path


def _float_dtype(config: dict | None) -> str:
    """The dtype a dequantized weight is written in by default: the model's own."""
    name = (config or {}).get("torch_dtype") or (config or {}).get("dtype")
    return {"float16": "F16", "float32": "F32", "bfloat16": "BF16"}.get(name, "BF16")


def detect_config(qc: dict | None, tensors: dict[str, TensorInfo], where) -> Codec | None:
    """The codec for a quantization_config and the stored tensors, or a one-line refusal."""
    _load_codecs()
    if qc is not None and not isinstance(qc, dict):
        raise FormatError("quantization_config is not a JSON object", file=where)
    if qc:
        method = str(qc.get("quant_method", "")).lower()
        if method == "bitsandbytes" and (qc.get("load_in_8bit") or not qc.get("load_in_4bit")):
            raise FormatError(
                "bitsandbytes 8-bit (LLM.int8) bases are not supported; only 4-bit (NF4/FP4)",
                file=where,
            )
        if method in UNSUPPORTED:
            raise FormatError(
                f"{UNSUPPORTED[method]} bases are not supported (quant_method {method!r})",
                file=where,
                hint="merge into the unquantized model instead",
            )
        for codec in REGISTRY.values():
            if codec.detect(qc, tensors):
                return codec
        raise FormatError(
            f"unknown quantization scheme quant_method={qc.get('quant_method')!r}; loratool will not guess",
            file=where,
        )
    for name, info in tensors.items():
        if (
            name.endswith(".weight")
            and info.dtype in ("F8_E4M3", "F8_E5M2")
            or any(name.endswith(end) for end, _ in _TELLTALES)
        ):
            what = next((w for end, w in _TELLTALES if name.endswith(end)), f"{info.dtype} weights")
            raise FormatError(
                f"tensors look quantized ({what}) but config.json has no quantization_config saying how",
                file=info.file,
                tensor=name,
                hint="put the model's config.json beside its weights",
            )
    return None


def detect_base(base: BaseIndex) -> QuantizedBase | None:
    """The base's quantization scheme and logical weights, None for an ordinary base."""
    config, cpath = model_config(base)
    qc = (config or {}).get("quantization_config")
    where = cpath or base.root
    codec = detect_config(qc, base.tensors, where)
    if codec is None:
        return None
    weights = codec.group(qc, base.tensors, float_dtype=_float_dtype(config), where=where)
    return QuantizedBase(codec, qc, weights)


def logical_shapes(base: BaseIndex, qb: QuantizedBase | None) -> dict:
    """Name → tensor-like (shape, is_floating_point) of the model's parameters: the logical
    weights in place of their stored parts, every other stored tensor as it is."""
    from ..tensors.header import HeaderTensor

    if qb is None:
        return {n: HeaderTensor(t) for n, t in base.tensors.items()}
    owned = qb.owner()
    out: dict = {}
    for n, t in base.tensors.items():
        lw_name = owned.get(n)
        if lw_name is None:
            out[n] = HeaderTensor(t)
        elif lw_name not in out:
            out[lw_name] = qb.weights[lw_name]
    return out


__all__ = [
    "Codec",
    "LogicalWeight",
    "QuantizedBase",
    "REGISTRY",
    "UNSUPPORTED",
    "detect_base",
    "detect_config",
    "error_report",
    "logical_shapes",
    "model_config",
    "read_parts",
    "register",
]
