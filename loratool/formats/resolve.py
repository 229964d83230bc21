"""Matching adapter module names to the base's tensor names, and checking that they fit.

PEFT names modules by their path in the wrapped model (``model.layers.0.self_attn.q_proj``);
a base saved from another class may carry more or fewer leading components
(``transformer.``, ``unet.``). kohya flattens the path into ``lora_unet_down_blocks_0_…``,
so dots and underscores can only be told apart against the base's real key list.
A module must match exactly one base tensor; zero or several is an error that lists them.
"""

from __future__ import annotations

import difflib
from dataclasses import replace

from ..adapter import Adapter, ExpertLoraModule, build_module
from ..bases import BaseFacts, read_facts
from ..errors import ResolutionError, ValidationError
from ..tensors.header import FLOAT_DTYPES, BaseIndex
from .kohya import KOHYA_PREFIXES, is_flat_stem
from .renames import KeyIndex, unfused_expert_keys


def _flat(key: str) -> str:
    return key.removesuffix(".weight").replace(".", "_")


def candidates(name: str, keys: list[str], index: KeyIndex | None = None) -> list[str]:
    """The base tensors ``name`` may be: itself, a kohya flat stem's, a longer or shorter
    path; failing those, the same name in the model's namespace (``renames.py``)."""
    found = _direct(name, keys)
    if found:
        return found
    return (index or KeyIndex(keys)).find(name)


def _direct(name: str, keys: list[str]) -> list[str]:
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


def _split_experts(mod, name: str, keys, shapes, index, source) -> dict | None:
    """An expert module for a fused parameter the checkpoint keeps per expert, as one plain
    LoRA module per expert and part: expert e's factors are A_e = A[e·r:(e+1)·r] and
    B_e = B[:, e::E] (peft's layouts, see adapter/experts.py), and each part takes its rows of
    B_e (the parts are concatenated along ΔW's rows). The scale is unchanged: same alpha, r."""
    if not isinstance(mod, ExpertLoraModule) or mod.transposed:
        return None
    parts = unfused_expert_keys(name, keys, index)
    if parts is None:
        return None
    if len(parts) != mod.num_experts:
        raise ValidationError(
            f"the adapter has {mod.num_experts} experts but the base holds {len(parts)} "
            f"({parts[0][0].replace('.0.', '.{e}.')}…)",
            file=source,
            tensor=name,
        )
    m = mod.materialized()
    e_count, r = m.num_experts, m.rank
    out: dict = {}
    for e, row in enumerate(parts):
        A_e = m.A[e * r : (e + 1) * r]
        B_e = m.B[:, e::e_count]
        start = 0
        for key in row:
            rows = shapes[key][0][0]
            if len(shapes[key][0]) != 2 or shapes[key][0][1] != m.in_features:
                return None
            out[key] = build_module(
                key,
                "linear",
                A_e.contiguous(),
                B_e[start : start + rows].contiguous(),
                m.alpha,
                m.rslora,
                source=source,
            )
            start += rows
        if start != m.out_features:
            return None
    return out


def _fit_alternatives(adapter: Adapter, keys, shapes, facts, source, index) -> Adapter:
    """Name the modules that could adapt several base tensors (peft's nested ParamWrappers
    on one module: ``experts.lora_A`` and ``experts.base_layer.lora_A`` do not say which
    parameter each adapts) by the one assignment under which every one of them fits."""
    import itertools

    groups: dict[tuple[str, ...], list[str]] = {}
    for name, mod in adapter.modules.items():
        if mod.alternatives:
            groups.setdefault(tuple(sorted({name, *mod.alternatives})), []).append(name)
    if not groups:
        return adapter
    mapping: dict[str, str] = {}
    for names, members in groups.items():
        found = {n: candidates(n, keys, index) for n in names}
        fitting = []
        first_error: ValidationError | None = None
        for perm in itertools.permutations(names, len(members)):
            ok = True
            for member, cand in zip(members, perm, strict=True):
                hits = found[cand]
                mod = adapter.modules[member]
                try:
                    if len(hits) == 1:
                        mod.fit(shapes[hits[0]][0], source=source, facts=facts)
                    elif not hits and _split_experts(mod, cand, keys, shapes, index, source):
                        pass
                    else:
                        ok = False
                except ValidationError as exc:
                    first_error = first_error or exc
                    ok = False
                if not ok:
                    break
            if ok:
                fitting.append(perm)
        if not fitting and first_error is not None:
            raise first_error  # what is wrong with the factors under every pairing
        if len(fitting) != 1:
            what = "none" if not fitting else "several"
            raise ResolutionError(
                f"{what} of the ways to pair these LoRA factors with {', '.join(names)} fit the base",
                file=source,
                tensor=members[0],
            )
        mapping.update(zip(members, fitting[0], strict=True))
    out = adapter.renamed(mapping)
    for name in mapping.values():
        out.modules[name] = replace(out.modules[name], alternatives=())
    return out


def resolve(
    adapter: Adapter,
    base: BaseIndex | dict,
    *,
    source: object | None = None,
    facts: BaseFacts | None = None,
    virtual: dict[str, tuple[int, ...]] | None = None,
) -> Adapter:
    """Rename every module and operation target to the base tensor it changes, and check that
    it fits (``Module.fit`` / ``TensorOp.fit``: fan_in_fan_out decided from the layer type,
    the layout of expert tensors, DoRA magnitudes, replaced shapes).

    ``facts`` are the base's (``bases.read_facts``; read from beside a BaseIndex when not
    given); ``virtual`` names tensors the base does not store but a merge may write (the
    lm_head of a model whose lm_head is tied to its embedding), with their shapes.
    """
    # ``base`` is a BaseIndex (headers of files) or a mapping name → tensor (a state dict).
    if isinstance(base, BaseIndex):
        shapes = {n: (tuple(t.shape), t.dtype in FLOAT_DTYPES) for n, t in base.tensors.items()}
        where = base.root
        if facts is None:
            facts = read_facts(base.root)
    else:
        shapes = {n: (tuple(t.shape), bool(t.is_floating_point())) for n, t in base.items()}
        where = "the model"
    for name, shape in (virtual or {}).items():
        shapes.setdefault(name, (tuple(shape), True))
    keys = list(shapes)
    index = KeyIndex(keys)
    adapter = _fit_alternatives(adapter, keys, shapes, facts, source, index)
    for name, mod in list(adapter.modules.items()):
        if isinstance(mod, ExpertLoraModule) and not candidates(name, keys, index):
            split = _split_experts(mod, name, keys, shapes, index, source)
            if split:
                adapter = adapter.replaced(
                    modules={
                        **{n: m for n, m in adapter.modules.items() if n != name},
                        **split,
                    }
                )
    mapping: dict[str, str] = {}
    taken: dict[str, str] = {}
    for name in [*adapter.modules, *(t for t in adapter.ops if t not in adapter.modules)]:
        found = candidates(name, keys, index)
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
        out.modules[name] = mod.fit(want, source=source, where=where, facts=facts)
    for target, op in list(out.ops.items()):
        want, is_float = shapes[target]
        if not is_float:
            raise ValidationError("base tensor is not floating point", file=where, tensor=target)
        out.ops[target] = op.fit(want, source=source)
    return out
