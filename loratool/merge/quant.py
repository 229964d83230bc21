"""Merging into a quantized base: one group per logical weight, executed through its codec.

A quantized weight is stored as several tensors (values and scales, see ``loratool.quant``).
The plan turns every logical weight a merge must rewrite into a ``QuantGroup``: its stored
parts are read together, decoded to the exact float32 values the scheme's reference computes,
the merge steps run on them in float32 (the same steps an ordinary tensor gets), and then

- ``requantize`` (``--dtype same``, the default: the output keeps the base's scheme and loads
  wherever the base loaded): encoded again with fresh scales by the scheme's own rule, every
  part written with its name, dtype and shape (parts the rule does not change — bitsandbytes'
  quant map, and its JSON state without double quant — copied as stored; a part whose size
  depends on the values, bitsandbytes' double-quant JSON state, planned by ``codec.out_parts``
  and padded by ``codec.fit``);
- ``dequantize`` (``--dtype bfloat16|float16|float32``): written as one ordinary tensor under
  the parameter's name, its scale tensors dropped. Every quantized weight is then written
  dequantized, touched or not, and ``quantization_config`` leaves config.json, so that the
  output loads as an ordinary model. loratool never writes a half-dequantized model: whether
  one loads depends on each scheme's skip list (``modules_to_not_convert``,
  ``llm_int8_skip_modules``, ``ignore``) as each transformers version reads it.

Each group reports what it wrote against the exact float32 merge (``max_rel_error``,
``rms_rel_error``, see ``quant.error_report``) and how much of the change survived
(``delta_kept`` = ⟨written − W, ΔW⟩ / ‖ΔW‖², 1 when nothing was lost to rounding).
Untouched weights of a requantized merge are not groups: their parts are copied byte for byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ValidationError
from ..quant import REGISTRY, LogicalWeight, QuantizedBase, error_report
from ..tensors.header import DTYPE_SIZES, TensorInfo


@dataclass(frozen=True)
class QuantOutput:
    """One output tensor of a group: a rewritten part (``role``), or the dequantized weight
    (``role`` None)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    out_start: int
    role: str | None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class QuantGroup:
    lw: LogicalWeight
    scheme: str  # the codec's registry name
    mode: str  # "requantize" or "dequantize"
    steps: tuple  # merge steps (ops.Step), applied to the decoded float32 weight
    outputs: tuple[QuantOutput, ...]

    @property
    def name(self) -> str:
        return self.lw.name

    @property
    def out_nbytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)

    @property
    def op(self) -> str:
        ops = [s.op for s in self.steps]
        return "+".join(dict.fromkeys([*ops, self.mode]))

    def audit(self) -> dict:
        d = {
            "name": self.name,
            "op": self.op,
            "scheme": self.scheme,
            "stored": self.lw.stored_names,
            "written": [o.name for o in self.outputs],
        }
        if self.steps:
            d["steps"] = [s.describe() for s in self.steps]
        return d


def plan_groups(
    qb: QuantizedBase, by_tensor: dict[str, list], forced: str | None
) -> dict[str, tuple[str, list]]:
    """Which logical weights become groups: name → (mode, steps).

    Requantize: only the weights an adapter touches. Dequantize (``forced`` dtype): all.
    """
    mode = "dequantize" if forced else "requantize"
    out: dict[str, tuple[str, list]] = {}
    for name, lw in qb.weights.items():
        steps = by_tensor.get(name, [])
        for s in steps:
            if tuple(s.out_shape(lw.shape)) != lw.shape:
                raise ValidationError(
                    f"{s.label} would change the shape of a quantized weight ({s.op})",
                    file=next(iter(lw.parts.values())).file,
                    tensor=name,
                )
        if steps and mode == "requantize":
            why = qb.codec.cannot_encode(lw)
            if why:
                raise ValidationError(
                    why,
                    file=next(iter(lw.parts.values())).file,
                    tensor=name,
                    hint="write the merge dequantized with --dtype bfloat16",
                )
        if steps or mode == "dequantize":
            out[name] = (mode, steps)
    return out


def group_outputs(lw: LogicalWeight, mode: str, dtype: str | None, pos: int, codec=None):
    """The output entries (name, dtype, shape) a group writes, laid out from ``pos``
    (a requantized part as ``codec.out_parts`` plans it)."""
    outs: list[QuantOutput] = []
    if mode == "dequantize":
        outs.append(QuantOutput(lw.name, dtype or lw.dtype, lw.shape, pos, None))
        return outs
    planned = codec.out_parts(lw) if codec is not None else {}
    for role, info in sorted(lw.parts.items(), key=lambda kv: kv[1].name):
        odtype, oshape = planned.get(role, (info.dtype, tuple(info.shape)))
        o = QuantOutput(info.name, odtype, tuple(oshape), pos, role)
        outs.append(o)
        pos += o.nbytes
    return outs


def anchor(lw: LogicalWeight, files: list) -> TensorInfo:
    """The part whose place in the base decides where the group's outputs go."""
    return min(lw.parts.values(), key=lambda t: (files.index(t.file), t.start))


# -- execution -------------------------------------------------------------------------------


def run_group(group: QuantGroup, device: str = "cpu") -> tuple[dict, dict]:
    """Decode, merge, encode (or cast) one logical weight.

    Returns ({output name: bytes-like tensor}, report).
    """
    import torch

    from ..quant import read_parts
    from ..tensors.io import torch_dtype
    from .engine import _Scratch, run_steps

    codec = REGISTRY[group.scheme]
    lw = group.lw
    parts = read_parts(lw)
    w = codec.decode(lw, parts)  # float32, checked finite
    rows = lw.shape[0] if lw.shape else 1
    report: dict = {"name": lw.name}
    if group.steps:
        exact = torch.empty_like(w)
        prepared = [s.prepare("cpu", torch.float32) for s in group.steps]
        whole = not all(s.blockwise for s in group.steps)
        if not run_steps(
            w.view(rows, -1),
            exact.view(rows, -1),
            prepared,
            torch.float32,
            _Scratch("cpu"),
            whole=whole,
        ):
            raise lw.error("the merged weight contains NaN or Inf")
    else:
        exact = w
    out: dict = {}
    if group.mode == "dequantize":
        o = group.outputs[0]
        written = exact.to(torch_dtype(o.dtype))
        if not bool(torch.isfinite(written).all()):
            raise lw.error(f"the merged weight overflows {o.dtype}")
        out[o.name] = written
        written32 = written.to(torch.float32)
    else:
        enc = codec.encode(lw, exact)
        full = dict(parts)
        for o in group.outputs:
            if o.role in enc:
                full[o.role] = codec.fit(lw, o.role, enc[o.role], o.shape)
            out[o.name] = full[o.role]
        # what is written, decoded again: the report's error is the stored model's
        written32 = codec.decode(lw, full)
    report.update(error_report(exact, written32, w if group.steps else None))
    return out, report


def summarize(reports: list[dict]) -> dict | None:
    if not reports:
        return None
    worst = max(reports, key=lambda r: r["max_rel_error"])
    kept = [r["delta_kept"] for r in reports if "delta_kept" in r]
    return {
        "worst_tensor": worst["name"],
        "max_rel_error": worst["max_rel_error"],
        "rms_rel_error": max(r["rms_rel_error"] for r in reports),
        "min_delta_kept": min(kept) if kept else None,
    }
