"""Matching adapter module names to the base's tensor names, and checking that they fit.

PEFT names modules by their path in the wrapped model (``model.layers.0.self_attn.q_proj``);
a base saved from another class may carry more or fewer leading components
(``transformer.``, ``unet.``). kohya flattens the path into ``lora_unet_down_blocks_0_…``,
so dots and underscores can only be told apart against the base's real key list.
A module must match exactly one base tensor; zero or several is an error that lists them.
"""

from __future__ import annotations

import difflib

from ..adapter import Adapter
from ..errors import ResolutionError, ValidationError
from ..tensors.header import FLOAT_DTYPES, BaseIndex
from .kohya import KOHYA_PREFIXES, is_flat_stem


def _flat(key: str) -> str:
    return key.removesuffix(".weight").replace(".", "_")


def candidates(name: str, keys: list[str]) -> list[str]:
    if name in keys:
        return [name]
    if is_flat_stem(name):
        rest = name
        for p in KOHYA_PREFIXES:
            if name.startswith(p):
                rest = name[len(p) :]
                break
        else:
            rest = name.removeprefix("lora_")
        out = []
        for k in keys:
            if not k.endswith(".weight"):
                continue
            f = _flat(k)
            if f == rest or f.endswith("_" + rest) or rest.endswith("_" + f):
                out.append(k)
        exact = [k for k in out if _flat(k) == rest]
        return exact or out
    return [k for k in keys if k.endswith("." + name) or name.endswith("." + k)]


def resolve(adapter: Adapter, base: BaseIndex | dict, *, source: object | None = None) -> Adapter:
    """Rename every module and operation target to the base tensor it changes, and check that
    it fits (``Module.fit`` / ``TensorOp.fit``: a linear module whose ΔW fits only transposed
    is taken as fan_in_fan_out, which is what PEFT itself does for GPT-2's Conv1D).
    """
    # ``base`` is a BaseIndex (headers of files) or a mapping name → tensor (a state dict).
    if isinstance(base, BaseIndex):
        shapes = {n: (tuple(t.shape), t.dtype in FLOAT_DTYPES) for n, t in base.tensors.items()}
        where = base.root
    else:
        shapes = {n: (tuple(t.shape), bool(t.is_floating_point())) for n, t in base.items()}
        where = "the model"
    keys = list(shapes)
    mapping: dict[str, str] = {}
    taken: dict[str, str] = {}
    for name in [*adapter.modules, *(t for t in adapter.ops if t not in adapter.modules)]:
        found = candidates(name, keys)
        if not found:
            close = difflib.get_close_matches(name, keys, n=3, cutoff=0.5)
            hint = (
                f"closest base tensors: {', '.join(close)}"
                if close
                else "is this adapter for another model?"
            )
            raise ResolutionError(
                f"matches no tensor of the base {where}", file=source, tensor=name, hint=hint
            )
        if len(found) > 1:
            raise ResolutionError(
                f"matches several base tensors: {', '.join(found[:6])}", file=source, tensor=name
            )
        target = found[0]
        if target in taken:
            raise ResolutionError(
                f"both {taken[target]} and {name} change {target}", file=source, tensor=name
            )
        taken[target] = name
        mapping[name] = target
    out = adapter.renamed(mapping)
    for name, mod in list(out.modules.items()):
        want, is_float = shapes[name]
        if not is_float:
            raise ValidationError("base tensor is not floating point", file=where, tensor=name)
        out.modules[name] = mod.fit(want, source=source, where=where)
    for target, op in list(out.ops.items()):
        want, is_float = shapes[target]
        if not is_float:
            raise ValidationError("base tensor is not floating point", file=where, tensor=target)
        out.ops[target] = op.fit(want, source=source)
    return out
