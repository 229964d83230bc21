"""compressed-tensors FP8 (llm-compressor's FP8 / FP8_DYNAMIC / FP8_BLOCK; ``quant_method:
compressed-tensors``, ``format: float-quantized``).

Stored per weight W (N×K): ``X.weight`` in float8_e4m3fn and ``X.weight_scale`` whose shape
says the strategy: ``[1]`` per tensor, ``[N, 1]`` per output channel, ``[⌈N/bm⌉, ⌈K/bn⌉]`` per
block (``block_structure``). Symmetric only (no ``weight_zero_point``); static activation
scales (``input_scale``) are left as they are.

Decoding (compressed-tensors ``quantization/lifecycle/forward.py`` ``_dequantize``):
``q.to(scale.dtype) · scale``, computed *in the scale's dtype*: with bfloat16 scales the
product is rounded to bfloat16. The float32 product of an e4m3 value (4 significant bits) and a
bf16/f16/f32 scale is exact before that rounding, so float32 multiply then one rounding to the
scale's dtype gives the reference's bits.

Encoding, fresh scales (``calculate_qparams`` for symmetric float args): per channel / tensor /
block, ``s = max(|min(x, 0)|, max(x, 0)) / 448`` in float32 (an all-zero group gets float32's
eps), stored in the base's scale dtype; values ``clamp(x / s_stored, −448, 448)`` cast to e4m3
(``_quantize`` with ``round_to_quantized_type_args``). The reference computes the scale in the
dtype of the weight it observes; ours is the exact float32 merge, so float32 it is.
"""

from __future__ import annotations

from ..errors import FormatError
from .base import (
    Codec,
    LogicalWeight,
    check_decoded,
    check_finite,
    e4m3_to_float32,
    fp8_spacing,
    is_finite,
)

FP8_MAX = 448.0
SUPPORTED_FORMATS = ("float-quantized", "naive-quantized")


def _groups(qc: dict) -> dict:
    groups = qc.get("config_groups") or {}
    return groups if isinstance(groups, dict) else {}


class CompressedTensorsFp8(Codec):
    name = "compressed_tensors_fp8"
    label = "compressed-tensors FP8 (e4m3 + weight_scale)"

    def detect(self, qc, tensors) -> bool:
        return bool(qc) and qc.get("quant_method") == "compressed-tensors"

    def describe(self, qc) -> str:
        strategies = sorted(
            {(g.get("weights") or {}).get("strategy", "?") for g in _groups(qc).values()}
        )
        return f"compressed-tensors FP8 e4m3, per-{'/'.join(strategies)} scales"

    def check_config(self, qc: dict, where) -> dict:
        """The weight args every group shares, or a one-line refusal naming what differs."""
        fmt = qc.get("format")
        if qc.get("quantization_status", "compressed") != "compressed":
            raise FormatError(
                f"compressed-tensors quantization_status {qc.get('quantization_status')!r}: only compressed checkpoints are read",
                file=where,
            )
        if qc.get("sparsity_config") and (
            qc["sparsity_config"].get("format") not in (None, "dense")
        ):
            raise FormatError(
                f"compressed-tensors sparsity format {qc['sparsity_config'].get('format')!r} is not supported",
                file=where,
            )
        if qc.get("transform_config"):
            raise FormatError(
                "compressed-tensors transform_config (rotated weights) is not supported: its weights are not W",
                file=where,
            )
        strategies: set[str] = set()
        blocks: set[tuple] = set()
        if not _groups(qc):
            raise FormatError("compressed-tensors config has no config_groups", file=where)
        for gname, g in _groups(qc).items():
            gfmt = g.get("format") or fmt
            if gfmt not in SUPPORTED_FORMATS:
                raise FormatError(
                    f"compressed-tensors format {gfmt!r} (group {gname}) is not supported; loratool merges float-quantized FP8",
                    file=where,
                )
            wa = g.get("weights")
            if not wa:
                continue
            desc = f"{wa.get('type')} {wa.get('num_bits')}-bit"
            if wa.get("type") != "float" or wa.get("num_bits") != 8:
                raise FormatError(
                    f"compressed-tensors {desc} weights (group {gname}) are not supported; only FP8 (float, 8 bits)",
                    file=where,
                )
            if not wa.get("symmetric", True):
                raise FormatError(
                    f"asymmetric FP8 weights (group {gname}) are not supported", file=where
                )
            if wa.get("dynamic") not in (False, None, "false"):
                raise FormatError(
                    f"dynamic weight quantization (group {gname}) is not supported", file=where
                )
            if (
                wa.get("scale_dtype") not in (None,)
                or wa.get("global_scale")
                or wa.get("observer") == "mx"
            ):
                raise FormatError(
                    f"FP8 weights with scale_dtype/global scales (group {gname}) are not supported",
                    file=where,
                )
            strategy = wa.get("strategy", "tensor")
            if strategy not in ("tensor", "channel", "block"):
                raise FormatError(
                    f"FP8 weight strategy {strategy!r} (group {gname}) is not supported", file=where
                )
            strategies.add(strategy)
            if strategy == "block":
                bs = wa.get("block_structure")
                if not (
                    isinstance(bs, list)
                    and len(bs) == 2
                    and all(isinstance(v, int) and v > 0 for v in bs)
                ):
                    raise FormatError(
                        f"block_structure {bs!r} (group {gname}) is not two positive integers",
                        file=where,
                    )
                blocks.add(tuple(bs))
        if len(blocks) > 1:
            raise FormatError(
                "several block_structures in one checkpoint are not supported", file=where
            )
        return {"strategies": strategies, "block": next(iter(blocks), None)}

    def group(self, qc, tensors, *, float_dtype: str = "BF16", where=None):
        args = self.check_config(qc, where)
        out: dict[str, LogicalWeight] = {}
        for name, info in tensors.items():
            if name.endswith(".weight_zero_point"):
                raise FormatError(
                    "asymmetric FP8 (a weight_zero_point) is not supported",
                    file=info.file,
                    tensor=name,
                )
            if name.endswith((".weight_global_scale", ".weight_packed")):
                raise FormatError(
                    "packed / globally scaled weights are not FP8: not supported",
                    file=info.file,
                    tensor=name,
                )
            if name.endswith(".weight_scale"):
                w = tensors.get(name.removesuffix("_scale"))
                if w is None or w.dtype != "F8_E4M3":
                    raise FormatError(
                        "a weight_scale whose weight is missing or not float8_e4m3fn",
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
            sname = (
                name.removesuffix("weight") + "weight_scale"
                if name.endswith(".weight")
                else name + "_scale"
            )
            scale = tensors.get(sname)
            if scale is None:
                raise FormatError(
                    f"FP8 weight without its scale tensor {sname}", file=info.file, tensor=name
                )
            if len(info.shape) != 2:
                raise FormatError(
                    f"FP8 weight of shape {list(info.shape)}: expected a matrix",
                    file=info.file,
                    tensor=name,
                )
            n, k = info.shape
            strategy = None
            if scale.shape in ((1,), ()) and "tensor" in args["strategies"]:
                strategy = "tensor"
            elif scale.shape == (n, 1) and "channel" in args["strategies"]:
                strategy = "channel"
            elif args["block"] is not None:
                bm, bn = args["block"]
                if scale.shape == (-(-n // bm), -(-k // bn)):
                    strategy = "block"
            if strategy is None:
                raise FormatError(
                    f"scale shape {list(scale.shape)} fits none of the config's strategies "
                    f"({', '.join(sorted(args['strategies']))}) for weight {list(info.shape)}",
                    file=scale.file,
                    tensor=scale.name,
                )
            if scale.dtype not in ("F32", "BF16", "F16"):
                raise FormatError(
                    f"scale dtype {scale.dtype} is not float32/bfloat16/float16",
                    file=scale.file,
                    tensor=scale.name,
                )
            out[name] = LogicalWeight(
                name,
                (n, k),
                {"weight": info, "scale": scale},
                scale.dtype if float_dtype is None else float_dtype,
                {"strategy": strategy, "block": args["block"] if strategy == "block" else None},
            )
        return out

    # -- numerics -------------------------------------------------------------------------

    def _expand(self, lw, s):
        """The scale broadcast to the weight's shape (block grids repeated and cropped)."""
        n, k = lw.shape
        st = lw.params["strategy"]
        if st == "tensor":
            return s.reshape(1, 1)
        if st == "channel":
            return s.reshape(n, 1)
        bm, bn = lw.params["block"]
        return s.repeat_interleave(bm, 0)[:n].repeat_interleave(bn, 1)[:, :k]

    def decode(self, lw, parts):
        import torch

        q, s = parts["weight"], parts["scale"]
        w = e4m3_to_float32(q)
        # exact float32 product, then the reference's one rounding to the scale's dtype
        w.mul_(self._expand(lw, s.to(torch.float32)))
        if s.dtype != torch.float32:
            w = w.to(s.dtype).to(torch.float32)
        if not is_finite(w):
            check_finite(lw, s, "scale", "weight_scale")
            check_finite(lw, e4m3_to_float32(q), "weight", "the FP8 weight")
        return check_decoded(lw, w)

    def amax(self, lw, x):
        import torch

        st = lw.params["strategy"]
        lo = torch.clamp(x, max=0.0)  # min(x, 0) and max(x, 0): zero is always representable
        hi = torch.clamp(x, min=0.0)
        if st == "tensor":
            return torch.maximum(lo.amin().abs(), hi.amax()).reshape(1)
        if st == "channel":
            return torch.maximum(lo.amin(dim=1, keepdim=True).abs(), hi.amax(dim=1, keepdim=True))
        n, k = lw.shape
        bm, bn = lw.params["block"]
        pn, pk = -(-n // bm) * bm, -(-k // bn) * bn
        padded = torch.nn.functional.pad(x.abs(), (0, pk - k, 0, pn - n))
        return padded.reshape(pn // bm, bm, pk // bn, bn).amax(dim=(1, 3))

    def encode(self, lw, x):
        import torch

        from ..tensors.io import torch_dtype

        s = self.amax(lw, x) / FP8_MAX
        s = torch.where(s == 0, torch.tensor(torch.finfo(torch.float32).eps), s)
        s = s.to(torch_dtype(lw.parts["scale"].dtype))
        if not bool(torch.isfinite(s).all()) or bool((s == 0).any()):
            raise lw.error("a fresh FP8 scale does not fit the scale dtype")
        scaled = x / self._expand(lw, s.to(torch.float32))
        q = scaled.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return {"weight": q, "scale": s.reshape(lw.parts["scale"].shape)}

    def step(self, lw, parts):
        return self.decode(lw, {**parts, "weight": fp8_spacing(parts["weight"])})


CODEC = CompressedTensorsFp8()
