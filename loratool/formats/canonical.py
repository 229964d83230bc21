"""loratool's own single-file form: the catalog's blobs and ``export --format loratool``.

Keys are ``<module name>.lora_A`` / ``<module name>.lora_B`` (module names are base tensor
names), tensors in their stored dtype; the safetensors metadata holds, as JSON, each module's
kind, alpha and rsLoRA flag (``loratool.modules``) and the format facts needed to write the
adapter back as it came (``loratool.origin``). Catalog blobs leave out the descriptive metadata
(name, task, …: those live in the catalog's rows) so that identical adapters share one blob.
"""

from __future__ import annotations

import dataclasses
import json

from ..adapter import Adapter, AdapterMeta, build_module
from ..errors import FormatError, ValidationError

FORMAT_KEY = "loratool"
FORMAT_VERSION = "1"
EXTRA = "__extra__."


def is_canonical(metadata: dict) -> bool:
    return metadata.get(FORMAT_KEY) is not None


def canonical_parts(adapter: Adapter, *, with_meta: bool = False) -> tuple[dict, dict[str, str]]:
    tensors = {}
    modules = {}
    for name in sorted(adapter.modules):
        m = adapter.modules[name]
        tensors[name + ".lora_A"] = m.A.contiguous()
        tensors[name + ".lora_B"] = m.B.contiguous()
        modules[name] = {"kind": m.kind, "alpha": m.alpha, "rslora": m.rslora}
    for key in sorted(adapter.extra_tensors):
        tensors[EXTRA + key] = adapter.extra_tensors[key].contiguous()
    metadata = {
        FORMAT_KEY: FORMAT_VERSION,
        "loratool.modules": json.dumps(modules, sort_keys=True, separators=(",", ":")),
        "loratool.origin": json.dumps(adapter.origin, sort_keys=True, separators=(",", ":")),
    }
    if with_meta:
        metadata["loratool.meta"] = json.dumps(dataclasses.asdict(adapter.meta), sort_keys=True)
    return tensors, metadata


def canonical_bytes(adapter: Adapter, *, with_meta: bool = False) -> bytes:
    """Deterministic bytes: the same adapter always serialises to the same sha256."""
    from ..tensors.io import serialize

    tensors, metadata = canonical_parts(adapter, with_meta=with_meta)
    return serialize(tensors, metadata)


def canonical_from_tensors(tensors: dict, metadata: dict, *, source: object) -> Adapter:
    if metadata.get(FORMAT_KEY) != FORMAT_VERSION:
        raise FormatError(
            f"loratool format {metadata.get(FORMAT_KEY)!r} is not supported by this version",
            file=source,
        )
    try:
        modules_meta = json.loads(metadata["loratool.modules"])
        origin = json.loads(metadata.get("loratool.origin", "{}"))
        meta_d = json.loads(metadata["loratool.meta"]) if "loratool.meta" in metadata else {}
    except (KeyError, ValueError) as exc:
        raise FormatError("loratool metadata is missing or not JSON", file=source) from exc
    extra = {k[len(EXTRA) :]: tensors.pop(k) for k in [k for k in tensors if k.startswith(EXTRA)]}
    modules = {}
    for name, info in modules_meta.items():
        try:
            A = tensors.pop(name + ".lora_A")
            B = tensors.pop(name + ".lora_B")
        except KeyError as exc:
            raise ValidationError(
                "metadata names a module whose tensors are missing", file=source, tensor=name
            ) from exc
        mod = build_module(
            name, info["kind"], A, B, info["alpha"], bool(info.get("rslora")), source=source
        )
        modules[name] = mod
    if tensors:
        raise ValidationError(
            "tensor not described in the metadata", file=source, tensor=sorted(tensors)[0]
        )
    fields = {f.name for f in dataclasses.fields(AdapterMeta)}
    meta = AdapterMeta(**{k: v for k, v in meta_d.items() if k in fields})
    meta.format = meta.format or origin.get("format") or "loratool"
    return Adapter(modules, meta, origin, extra)
