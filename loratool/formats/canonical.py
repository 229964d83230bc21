"""loratool's own single-file form: the catalog's blobs and ``export --format loratool``.

Version 1 (plain LoRA only, still written for adapters it can express so that their blobs and
sha256 do not change): keys ``<module name>.lora_A`` / ``.lora_B``; the safetensors metadata
holds, as JSON, each module's kind, alpha and rsLoRA flag (``loratool.modules``).

Version 2 (everything else: DoRA, expert-stacked LoRA, row slices, full-tensor operations, and
any kind registered later): every module is ``<module name>.<role>`` for each of its stored
tensors, and ``loratool.modules`` maps the module name to ``{"kind", "tensors": [roles],
…facts}``; every operation is ``__op__.<target>.<role>`` with ``loratool.ops`` mapping the
target to ``{"op", "tensors": [roles], …facts}``. Both versions keep the format facts needed to
write the adapter back as it came (``loratool.origin``) and carry ``__extra__.<key>`` tensors.

Catalog blobs leave out the descriptive metadata (name, task, …: those live in the catalog's
rows) so that identical adapters share one blob. Tensors are in their stored dtype; the bytes
are deterministic (``tensors.io.serialize``), so the same adapter always has the same sha256.
"""

from __future__ import annotations

import dataclasses
import json

from ..adapter import Adapter, AdapterMeta, build_module, module_class, op_class
from ..errors import FormatError, ValidationError

FORMAT_KEY = "loratool"
FORMAT_VERSION = "2"
VERSIONS = ("1", "2")
EXTRA = "__extra__."
OP = "__op__."


def is_canonical(metadata: dict) -> bool:
    return metadata.get(FORMAT_KEY) is not None


def _json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def canonical_parts(adapter: Adapter, *, with_meta: bool = False) -> tuple[dict, dict[str, str]]:
    tensors = {}
    modules = {}
    v1 = adapter.plain_lora
    for name in sorted(adapter.modules):
        m = adapter.modules[name]
        if v1:
            tensors[name + ".lora_A"] = m.A.contiguous()
            tensors[name + ".lora_B"] = m.B.contiguous()
            modules[name] = {"kind": m.kind, "alpha": m.alpha, "rslora": m.rslora}
            continue
        stored = m.tensors()
        for role, t in stored.items():
            tensors[f"{name}.{role}"] = t.contiguous()
        modules[name] = {**m.facts(), "kind": m.kind, "tensors": list(stored)}
    ops = {}
    for target in sorted(adapter.ops):
        o = adapter.ops[target]
        stored = o.tensors()
        for role, t in stored.items():
            tensors[f"{OP}{target}.{role}"] = t.contiguous()
        ops[target] = {**o.facts(), "op": o.op, "tensors": list(stored)}
    for key in sorted(adapter.extra_tensors):
        tensors[EXTRA + key] = adapter.extra_tensors[key].contiguous()
    metadata = {
        FORMAT_KEY: "1" if v1 else FORMAT_VERSION,
        "loratool.modules": _json(modules),
        "loratool.origin": _json(adapter.origin),
    }
    if ops:
        metadata["loratool.ops"] = _json(ops)
    if with_meta:
        metadata["loratool.meta"] = json.dumps(dataclasses.asdict(adapter.meta), sort_keys=True)
    return tensors, metadata


def canonical_bytes(adapter: Adapter, *, with_meta: bool = False) -> bytes:
    """Deterministic bytes: the same adapter always serialises to the same sha256."""
    from ..tensors.io import serialize

    tensors, metadata = canonical_parts(adapter, with_meta=with_meta)
    return serialize(tensors, metadata)


def _take(tensors: dict, key: str, source, what: str):
    try:
        return tensors.pop(key)
    except KeyError:
        raise ValidationError(
            f"metadata names {what} whose tensor is missing", file=source, tensor=key
        ) from None


def canonical_from_tensors(tensors: dict, metadata: dict, *, source: object) -> Adapter:
    version = metadata.get(FORMAT_KEY)
    if version not in VERSIONS:
        raise FormatError(
            f"loratool format {version!r} is not supported by this version", file=source
        )
    tensors = dict(tensors)
    try:
        modules_meta = json.loads(metadata["loratool.modules"])
        ops_meta = json.loads(metadata.get("loratool.ops", "{}"))
        origin = json.loads(metadata.get("loratool.origin", "{}"))
        meta_d = json.loads(metadata["loratool.meta"]) if "loratool.meta" in metadata else {}
        if not all(isinstance(x, dict) for x in (modules_meta, ops_meta, origin, meta_d)):
            raise ValueError
    except (KeyError, ValueError, RecursionError) as exc:
        raise FormatError("loratool metadata is missing or not JSON", file=source) from exc
    extra = {k[len(EXTRA) :]: tensors.pop(k) for k in [k for k in tensors if k.startswith(EXTRA)]}
    modules = {}
    try:
        for name, info in modules_meta.items():
            kind = info["kind"]
            if version == "1":
                A = _take(tensors, name + ".lora_A", source, "a module")
                B = _take(tensors, name + ".lora_B", source, "a module")
                mod = build_module(
                    name, kind, A, B, info["alpha"], bool(info.get("rslora")), source=source
                )
            else:
                cls = module_class(kind, source=source, tensor=name)
                stored = {
                    role: _take(tensors, f"{name}.{role}", source, "a module")
                    for role in info["tensors"]
                }
                facts = {k: v for k, v in info.items() if k not in ("kind", "tensors")}
                mod = cls.from_parts(name, kind, stored, facts, source=source)
            modules[name] = mod
        ops = {}
        for target, info in ops_meta.items():
            cls = op_class(info["op"], source=source, tensor=target)
            stored = {
                role: _take(tensors, f"{OP}{target}.{role}", source, "an operation")
                for role in info["tensors"]
            }
            facts = {k: v for k, v in info.items() if k not in ("op", "tensors")}
            ops[target] = cls.from_parts(target, stored, facts, source=source)
    except (KeyError, TypeError) as exc:
        raise FormatError(f"loratool metadata lacks a field: {exc}", file=source) from exc
    if tensors:
        raise ValidationError(
            "tensor not described in the metadata", file=source, tensor=sorted(tensors)[0]
        )
    fields = {f.name for f in dataclasses.fields(AdapterMeta)}
    meta = AdapterMeta(**{k: v for k, v in meta_d.items() if k in fields})
    meta.format = meta.format or origin.get("format") or "loratool"
    return Adapter(modules, meta, origin, extra, ops)
