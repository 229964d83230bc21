"""bitsandbytes 4-bit (NF4 / FP4) as transformers saves it (``quant_method: bitsandbytes``,
``load_in_4bit``; QLoRA's bases).

Stored per weight ``X.weight`` (transformers' ``Params4bit`` via bitsandbytes'
``QuantState.as_dict(packed=True)``):

- ``X.weight``: uint8 ``[⌈n/2⌉, 1]``, two 4-bit codes per byte, the *high* nibble first;
- ``X.weight.absmax``: one scale per ``blocksize`` values (float32; uint8 with double quant);
- ``X.weight.quant_map``: the 16 code values (NF4 or FP4 table);
- with double quant (``bnb_4bit_use_double_quant``): ``X.weight.nested_absmax`` (float32, one
  per ``nested_blocksize`` absmax values) and ``X.weight.nested_quant_map`` (256 values);
- ``X.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``): uint8 bytes of a JSON object
  with ``quant_type, blocksize, dtype, shape`` and, nested, ``nested_blocksize,
  nested_dtype, nested_offset``.

Decoding (bitsandbytes ``functional.dequantize_4bit``; its CUDA kernel and its pure-torch
default kernel ``_dequantize_4bit_compute`` agree; bitsandbytes 0.50's compiled CPU kernel
does not when a row's length is not a multiple of the blocksize — it restarts the blocks at
every row — so the tests pin the default kernel and the CPU kernel only where it is right):
``absmax = nested_quant_map[absmax_u8] · nested_absmax[block] + nested_offset`` in float32
when nested; then ``W = table[code] · absmax[block]`` in float32, reshaped to ``shape``.
bitsandbytes' kernels use their built-in table, not the stored ``quant_map``; a stored map that
differs from it would mean something bitsandbytes does not compute, so it is refused.

Encoding (bitsandbytes ``quantize_4bit``, its default kernel, the one CPUs run):
``absmax = max|x|`` per block; ``code = bucketize(clamp(x · (1 / max(absmax, 1e-38)), −1,
1), midpoints of the sorted table)`` (a tie goes to the lower value), FP4 codes remapped to
their bit patterns.

With double quant (``compress_statistics=True``) the float32 absmax are then stored as
bitsandbytes does on CPU: ``offset = absmax.mean()`` (torch's float32 mean; past 32768 blocks
its summation order, so its last bit, follows torch's thread count, for bitsandbytes as for
loratool), and ``absmax − offset`` quantized by ``quantize_blockwise(…, blocksize=256)`` with
the signed dynamic 8-bit map (``create_dynamic_map()``, re-created in ``dynamic_map``). That
CPU kernel is compiled C (``csrc/cpu_ops.cpp`` ``quantize_cpu_impl``, re-created in
``quantize_blockwise``): per 256 values ``nested_absmax = max(0, max|a|)``; a block of zeros
gets code 0; otherwise ``v = clamp(a · (1 / nested_absmax), −1, 1)`` picks one of 65536 bins,
``bin = (int)fma((v + 1) · 0.5, 65535, 0.5)``, and a table gives, for the bin's value
``(2i)/65535 − 1``, how many midpoints of the map lie strictly below it. That is not always
the nearest map value: bitsandbytes' pure-torch default kernel, used where the compiled
library is missing, rounds to the nearest and differs in about one code in 700 on normal
data. This is the x86-64 build's kernel; the aarch64 build bins with NEON as
``(v + 1) · 32767.5 + 0.5``, which can land in the neighbouring bin at a bin's edge.
The JSON state keeps its keys, ``nested_offset`` = ``offset.item()``, as ``json.dumps`` writes
it, then padded with spaces to a length fixed when the output file is planned (the offset's
digits are not known then; JSON ignores the spaces: bitsandbytes and transformers read the
same object). A base whose ``nested_blocksize`` is not 256 (bitsandbytes never writes one) is
refused when requantizing.
"""

from __future__ import annotations

import json

from ..errors import FormatError
from .base import Codec, LogicalWeight, check_decoded, check_finite

NF4 = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bits, bias 2), by bit pattern, divided by
# its largest magnitude (12) as get_4bit_type does; its "-0" is Python's integer 0, so code 8
# is +0.0, not −0.0
_FP4_RAW = (
    0.0,
    0.0625,
    8.0,
    12.0,
    4.0,
    6.0,
    2.0,
    3.0,
    0.0,
    -0.0625,
    -8.0,
    -12.0,
    -4.0,
    -6.0,
    -2.0,
    -3.0,
)
TORCH_DTYPE_TAGS = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
STATE_PREFIX = ".quant_state.bitsandbytes__"
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def table(quant_type: str):
    """The 16 code values bitsandbytes' kernels use, as float32 (get_4bit_type's rounding)."""
    import torch

    data = torch.tensor(NF4 if quant_type == "nf4" else _FP4_RAW, dtype=torch.float32)
    return data.div_(data.abs().max())


NESTED_BLOCKSIZE = 256  # quantize_4bit(compress_statistics=True) always uses it
# the longest json.dumps of a finite double ("-1.2345678901234567e-305"): the planned room for
# nested_offset in a requantized JSON state
_OFFSET_ROOM = 24
_LUT_SIZE = 65536


def dynamic_map():
    """bitsandbytes' ``create_dynamic_map()`` (signed, 7 exponent bits, 8 bits): the 256
    sorted float32 values double quant stores the absmax with, computed as it does."""
    import torch

    data: list[float] = []
    for i in range(7):  # max_exponent_bits; one fraction bit more per decade
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    # additional_items = 2 ** (7 - 7) - 1 = 0: none
    data += [0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def _bin_table(code):
    """quantize_cpu_impl's lookup table: for each of 65536 bins, the number of midpoints of
    the (sorted) map strictly below the bin's value ``(i + i) / 65535 − 1`` (float32)."""
    import torch

    mids = (code[:-1] + code[1:]) * 0.5
    i = torch.arange(_LUT_SIZE, dtype=torch.float32)
    val = (i + i) / torch.full_like(i, _LUT_SIZE - 1) - 1.0
    return torch.searchsorted(mids, val, side="left")


def quantize_blockwise(a, code, blocksize: int = NESTED_BLOCKSIZE):
    """bitsandbytes' CPU ``quantize_blockwise`` kernel on float32 ``a`` (the compiled
    ``quantize_cpu_impl``, bit for bit): (uint8 codes shaped as ``a``, float32 absmax per block)."""
    import torch

    flat = a.reshape(-1).to(torch.float32)
    n = flat.numel()
    nb = -(-n // blocksize)
    x = torch.nn.functional.pad(flat, (0, nb * blocksize - n)).view(nb, blocksize)
    absmax = x.abs().amax(dim=1)  # padding zeros change no max; max(0, …) as the kernel
    zero = absmax == 0
    inv = torch.ones_like(absmax) / torch.where(zero, torch.ones_like(absmax), absmax)
    v = (x * inv.view(-1, 1)).clamp(-1.0, 1.0)
    # norm_to_lut_index: (uint16)((v + 1) * 0.5 * 65535 + 0.5), compiled as one fused
    # multiply-add: t·65535 + 0.5 is exact in float64 (t is a multiple of 2^-25 in [0, 1]),
    # rounded once to float32 as the FMA does, then truncated
    t = (v + 1.0) * 0.5
    idx = (t.to(torch.float64) * float(_LUT_SIZE - 1) + 0.5).to(torch.float32).to(torch.int64)
    q = _bin_table(code)[idx].to(torch.uint8)
    q[zero] = 0  # a block of zeros is written as code 0
    return q.reshape(-1)[:n].reshape(a.shape), absmax


def state_bytes(state: dict):
    """QuantState.as_dict(packed=True)'s JSON tensor (bitsandbytes' pack_dict_to_tensor)."""
    import torch

    return torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)


def _state_room(state: dict) -> int:
    """The planned length of a requantized double-quant JSON state (any offset fits)."""
    return len(json.dumps({**state, "nested_offset": 0.0})) - len("0.0") + _OFFSET_ROOM


class Bnb4(Codec):
    name = "bnb4"
    label = "bitsandbytes 4-bit (NF4/FP4)"
    four_bit = True

    def detect(self, qc, tensors) -> bool:
        return (
            bool(qc) and qc.get("quant_method") == "bitsandbytes" and bool(qc.get("load_in_4bit"))
        )

    def describe(self, qc) -> str:
        qt = qc.get("bnb_4bit_quant_type", "fp4")
        dq = ", double quant" if qc.get("bnb_4bit_use_double_quant") else ""
        return f"bitsandbytes 4-bit {qt.upper()}{dq}"

    def group(self, qc, tensors, *, float_dtype: str = "BF16", where=None):
        from ..tensors.header import HeaderTensor  # reads the JSON state without torch

        out: dict[str, LogicalWeight] = {}
        owned: set[str] = set()
        for name, info in tensors.items():
            if STATE_PREFIX not in name:
                continue
            wname, _, qt = name.partition(STATE_PREFIX)
            if qt not in ("nf4", "fp4"):
                raise FormatError(
                    f"unknown bitsandbytes quant type {qt!r}", file=info.file, tensor=name
                )
            if info.dtype != "U8" or len(info.shape) != 1:
                raise FormatError(
                    "quant_state must be a 1-D uint8 tensor of JSON", file=info.file, tensor=name
                )
            try:
                state = json.loads(HeaderTensor(info).raw().decode("utf-8"))
                if not isinstance(state, dict):
                    raise ValueError
            except (UnicodeDecodeError, ValueError) as exc:
                raise FormatError(
                    "quant_state is not a JSON object", file=info.file, tensor=name
                ) from exc
            w = tensors.get(wname)
            if w is None:
                raise FormatError(
                    f"quant_state for a weight {wname} that is not stored",
                    file=info.file,
                    tensor=name,
                )
            if state.get("quant_type") != qt:
                raise FormatError(
                    f"quant_state says {state.get('quant_type')!r} but is named {qt}",
                    file=info.file,
                    tensor=name,
                )
            bs = state.get("blocksize")
            if bs not in BLOCKSIZES:
                raise FormatError(
                    f"blocksize {bs!r} is not one bitsandbytes uses", file=info.file, tensor=name
                )
            shape = state.get("shape")
            if not (
                isinstance(shape, list)
                and shape
                and all(isinstance(s, int) and s > 0 for s in shape)
            ):
                raise FormatError(
                    f"quant_state shape {shape!r} is not a list of sizes",
                    file=info.file,
                    tensor=name,
                )
            dt = TORCH_DTYPE_TAGS.get(state.get("dtype"))
            if dt is None:
                raise FormatError(
                    f"quant_state dtype {state.get('dtype')!r} is not a float dtype",
                    file=info.file,
                    tensor=name,
                )
            numel = 1
            for s in shape:
                numel *= s
            if w.dtype != "U8" or w.numel != (numel + 1) // 2:
                raise FormatError(
                    f"packed weight {w.dtype} {list(w.shape)} does not hold {numel} 4-bit values of shape {shape}",
                    file=w.file,
                    tensor=wname,
                )
            parts = {"weight": w, "state": info}
            nested = "nested_offset" in state or (wname + ".nested_absmax") in tensors
            need = ["absmax", "quant_map"] + (
                ["nested_absmax", "nested_quant_map"] if nested else []
            )
            for role in need:
                t = tensors.get(f"{wname}.{role}")
                if t is None:
                    raise FormatError(
                        f"bitsandbytes weight without its {role} tensor", file=w.file, tensor=wname
                    )
                parts[role] = t
            nblocks = -(-numel // bs)
            ab = parts["absmax"]
            if ab.shape != (nblocks,) or ab.dtype != ("U8" if nested else "F32"):
                raise FormatError(
                    f"absmax is {ab.dtype} {list(ab.shape)}; {nblocks} blocks of {bs} need "
                    f"{'U8' if nested else 'F32'} [{nblocks}]",
                    file=ab.file,
                    tensor=ab.name,
                )
            if parts["quant_map"].shape != (16,) or parts["quant_map"].dtype != "F32":
                qm = parts["quant_map"]
                raise FormatError(
                    f"quant_map is {qm.dtype} {list(qm.shape)}, not F32 [16]",
                    file=qm.file,
                    tensor=qm.name,
                )
            params = {"quant_type": qt, "blocksize": bs, "nested": nested, "state": state}
            if nested:
                nbs = state.get("nested_blocksize")
                if not isinstance(nbs, int) or nbs <= 0:
                    raise FormatError(
                        f"nested_blocksize {nbs!r} is not a size", file=info.file, tensor=name
                    )
                if not isinstance(state.get("nested_offset"), (int, float)):
                    raise FormatError(
                        "nested_offset is missing or not a number", file=info.file, tensor=name
                    )
                if state.get("nested_dtype") != "float32":
                    raise FormatError(
                        f"nested_dtype {state.get('nested_dtype')!r} is not float32",
                        file=info.file,
                        tensor=name,
                    )
                na, nq = parts["nested_absmax"], parts["nested_quant_map"]
                if na.shape != (-(-nblocks // nbs),) or na.dtype != "F32":
                    raise FormatError(
                        f"nested_absmax is {na.dtype} {list(na.shape)}; needs F32 [{-(-nblocks // nbs)}]",
                        file=na.file,
                        tensor=na.name,
                    )
                if nq.shape != (256,) or nq.dtype != "F32":
                    raise FormatError(
                        f"nested_quant_map is {nq.dtype} {list(nq.shape)}, not F32 [256]",
                        file=nq.file,
                        tensor=nq.name,
                    )
                params["nested_blocksize"] = nbs
            out[wname] = LogicalWeight(
                wname, tuple(shape), parts, dt if float_dtype is None else float_dtype, params
            )
            owned.update(t.name for t in parts.values())
        for name, info in tensors.items():
            if name not in owned and name.rsplit(".", 1)[-1] in (
                "absmax",
                "quant_map",
                "nested_absmax",
                "nested_quant_map",
            ):
                raise FormatError(
                    "a bitsandbytes state tensor without its quant_state",
                    file=info.file,
                    tensor=name,
                )
            if name not in owned and info.dtype == "U8" and name.endswith(".weight"):
                raise FormatError(
                    "a packed uint8 weight without its quant_state tensor",
                    file=info.file,
                    tensor=name,
                )
        return out

    def cannot_encode(self, lw):
        nbs = lw.params.get("nested_blocksize")
        if lw.params["nested"] and nbs != NESTED_BLOCKSIZE:
            return (
                f"requantizing double-quant 4-bit with nested_blocksize {nbs} is not supported "
                f"(bitsandbytes' quantize_4bit nests blocks of {NESTED_BLOCKSIZE})"
            )
        return None

    def out_parts(self, lw):
        """A requantized JSON state is planned with room for any nested_offset (``fit`` pads)."""
        out = super().out_parts(lw)
        if lw.params["nested"]:
            out["state"] = ("U8", (_state_room(lw.params["state"]),))
        return out

    def fit(self, lw, role, t, shape):
        if role == "state" and t.dim() == 1 and t.numel() <= shape[0]:
            import torch

            pad = torch.full((shape[0] - t.numel(),), ord(" "), dtype=torch.uint8)
            return torch.cat([t, pad])
        return super().fit(lw, role, t, shape)

    def offset(self, lw, parts) -> float:
        """nested_offset from the JSON state in ``parts`` (a requantized one differs from the
        base's), else as grouped."""
        raw = parts.get("state")
        if raw is None:
            return float(lw.params["state"]["nested_offset"])
        try:
            value = json.loads(bytes(raw.reshape(-1).tolist()).decode("utf-8"))["nested_offset"]
        except (UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
            raise lw.error("quant_state has no readable nested_offset", role="state") from exc
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise lw.error(f"nested_offset {value!r} is not a number", role="state")
        return float(value)

    def absmax(self, lw, parts):
        """The float32 block scales (double quant undone as dequantize_blockwise does)."""
        import torch

        p = lw.params
        if not p["nested"]:
            a = parts["absmax"]
            check_finite(lw, a, "absmax", "absmax")
            return a
        code = parts["nested_quant_map"]
        check_finite(lw, code, "nested_quant_map", "nested_quant_map")
        na = parts["nested_absmax"]
        check_finite(lw, na, "nested_absmax", "nested_absmax")
        q = parts["absmax"].to(torch.int64)
        vals = code[q]
        nbs = p["nested_blocksize"]
        n = vals.numel()
        full = n - n % nbs
        out = torch.empty(n, dtype=torch.float32)
        out[:full] = (vals[:full].view(-1, nbs) * na[: full // nbs].view(-1, 1)).reshape(-1)
        if full < n:
            out[full:] = vals[full:] * na[full // nbs]
        # offset = torch.tensor(float(nested_offset)): a float32 scalar, added in float32
        out += torch.tensor(self.offset(lw, parts), dtype=torch.float32)
        return out

    def check_map(self, lw, parts) -> None:
        import torch

        want = table(lw.params["quant_type"])
        if not torch.equal(parts["quant_map"].view(torch.int32), want.view(torch.int32)):
            raise lw.error(
                f"quant_map differs from bitsandbytes' {lw.params['quant_type']} table, which its kernels use instead",
                role="quant_map",
            )

    def decode(self, lw, parts):

        self.check_map(lw, parts)
        return check_decoded(lw, self._lookup(lw, parts, table(lw.params["quant_type"])))

    def step(self, lw, parts):
        import torch

        # the larger gap from each code value to its neighbours, times the block's absmax
        code = table(lw.params["quant_type"])
        order = torch.argsort(code)
        gaps = torch.diff(code[order])
        around = torch.maximum(torch.cat([gaps[:1], gaps]), torch.cat([gaps, gaps[-1:]]))
        spacing = torch.empty_like(code)
        spacing[order] = around
        return self._lookup(lw, parts, spacing)

    def _lookup(self, lw, parts, code):
        """values[code index] · absmax of the element's block, in float32."""
        import torch

        absmax = self.absmax(lw, parts)
        packed = parts["weight"].reshape(-1)
        n = lw.numel
        idx = torch.empty(packed.numel() * 2, dtype=torch.int64)
        idx[0::2] = (packed >> 4).to(torch.int64)
        idx[1::2] = (packed & 0x0F).to(torch.int64)
        vals = code[idx[:n]]
        bs = lw.params["blocksize"]
        full = n - n % bs
        w = torch.empty(n, dtype=torch.float32)
        w[:full] = (vals[:full].view(-1, bs) * absmax[: full // bs].view(-1, 1)).reshape(-1)
        if full < n:
            w[full:] = vals[full:] * absmax[full // bs]
        return w.reshape(lw.shape)

    def encode(self, lw, x):
        import torch

        why = self.cannot_encode(lw)
        if why:
            raise lw.error(why)
        code = table(lw.params["quant_type"])
        order = torch.argsort(code)
        mids = (code[order[:-1]] + code[order[1:]]) / 2
        flat = x.reshape(-1).to(torch.float32)
        n = flat.numel()
        bs = lw.params["blocksize"]
        full = n - n % bs
        com = flat[:full].reshape(-1, bs)
        absmax = com.abs().max(dim=-1)[0]
        scaled = torch.clamp(com * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
        if full < n:
            am = flat[full:].abs().max().clamp(min=1e-38)
            absmax = torch.cat([absmax, am.unsqueeze(0)])
            scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        q = torch.bucketize(scaled, mids, out_int32=True)
        if lw.params["quant_type"] != "nf4":
            q = order[q]
        q8 = q.to(torch.uint8)
        packed = ((q8[::2] << 4) | q8[1::2]).reshape(lw.parts["weight"].shape)
        if not lw.params["nested"]:
            # the quant_map and the JSON state do not change: they are copied as stored
            return {"weight": packed, "absmax": absmax}
        # quantize_4bit(compress_statistics=True): offset = absmax.mean(), then
        # quantize_blockwise(absmax - offset, blocksize=256) with the dynamic map
        offset = absmax.mean()
        if not bool(torch.isfinite(offset)):
            raise lw.error("the mean of the block scales overflows float32")
        code8 = dynamic_map()
        qabs, nested = quantize_blockwise(absmax - offset, code8, NESTED_BLOCKSIZE)
        state = dict(lw.params["state"])  # bitsandbytes' keys, in their order
        state["nested_offset"] = offset.item()
        return {
            "weight": packed,
            "absmax": qabs,
            "nested_absmax": nested,
            "nested_quant_map": code8,
            "state": state_bytes(state),
        }


CODEC = Bnb4()
