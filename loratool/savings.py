"""Storage arithmetic: what adapters save against full fine-tuned copies of their base.

Never imports torch: figures come from catalog rows and safetensors headers only, so a 100 GB
sharded base is described without reading a byte of tensor data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

from .tensors.header import BaseIndex, read_base


def adapter_figures(row: dict) -> dict:
    params = int(row["params"])
    dense = int(row["dense_params"])
    return {
        "name": row["name"],
        "task": row.get("task"),
        "base_model": row.get("base_model"),
        "params": params,
        "dense_params": dense,
        "bytes": int(row["bytes"]),
        "compression": dense / params if params else 0.0,
    }


def _index(base) -> BaseIndex:
    """A base given as a path, or as a BaseIndex already read (a Hub base's headers)."""
    return base if isinstance(base, BaseIndex) else read_base(base)


def _label(base) -> str:
    if isinstance(base, BaseIndex):
        from .bases import hub_snapshot

        snap = hub_snapshot(base.root)
        return f"{snap[0]}@{snap[1][:12]}" if snap else str(base.root)
    return str(base)


def base_figures(path: str | os.PathLike | BaseIndex) -> dict:
    """Parameters and tensor bytes of a base, from its headers alone.

    A quantized base (``loratool.quant``) counts its parameters as the model holds them (a
    packed 4-bit weight of n bytes is 2n parameters; scales are not parameters) and its bytes
    as stored.
    """
    import math

    from .quant import detect_base, logical_shapes

    base = _index(path)
    qb = detect_base(base)
    doc = {
        "path": _label(path),
        "params": base.total_params,
        "bytes": base.total_bytes,
        "files": len(base.files),
    }
    if qb is not None:
        doc["params"] = sum(math.prod(t.shape) for t in logical_shapes(base, qb).values())
        doc["quantization"] = qb.describe()
        doc["quantized_weights"] = len(qb.weights)
    return doc


def catalog_figures(adapters: list[dict], base: dict) -> dict:
    """n task-specific copies of the base vs one base plus n adapters."""
    n = len(adapters)
    full = n * base["bytes"]
    lora = base["bytes"] + sum(a["bytes"] for a in adapters)
    return {
        "n_adapters": n,
        "full_copies_bytes": full,
        "lora_bytes": lora,
        "saved_bytes": full - lora,
        "ratio": full / lora if lora else 0.0,
    }


def fits_base(module_rows: list[dict], base) -> bool:
    """Whether every module of a catalog adapter names one tensor of ``base`` with its shape.

    Works on catalog rows and headers alone (no torch), so the catalog view of a base can pick
    out the adapters made for it even when they do not record their base model.
    """
    from .formats.resolve import candidates
    from .quant import detect_base, logical_shapes

    # a quantized base's weights as the model holds them (what an adapter was made for)
    shapes = {n: tuple(t.shape) for n, t in logical_shapes(base, detect_base(base)).items()}
    keys = list(shapes)
    for m in module_rows:
        found = candidates(m["name"], keys)
        if len(found) != 1:
            return False
        have = shapes[found[0]]
        want = tuple(m["base_shape"])
        if have != want and not (len(want) == 2 and have == want[::-1]):
            return False
    return bool(module_rows)


def report(rows: Iterable[dict], base_path: str | os.PathLike | None = None) -> dict:
    adapters = [adapter_figures(r) for r in rows]
    doc: dict = {"adapters": adapters}
    if base_path is not None:
        base = base_figures(base_path)
        doc["base"] = base
        doc["catalog"] = catalog_figures(adapters, base)
        for a in adapters:
            a["share_of_base"] = a["bytes"] / base["bytes"] if base["bytes"] else 0.0
    else:
        groups: dict[str, list[str]] = {}
        for a in adapters:
            groups.setdefault(a["base_model"] or "(unknown)", []).append(a["name"])
        doc["by_base_model"] = {
            k: {
                "adapters": v,
                "bytes": sum(a["bytes"] for a in adapters if a["name"] in v),
                "params": sum(a["params"] for a in adapters if a["name"] in v),
                "dense_params": sum(a["dense_params"] for a in adapters if a["name"] in v),
            }
            for k, v in sorted(groups.items())
        }
    return doc


def hypothetical_from_base(
    base_path: str | os.PathLike, rank: int, targets: list[str], dtype: str
) -> dict:
    """A hypothetical adapter's figures with exact shapes taken from a base's headers.

    Every 2-D floating tensor whose module name matches a target (PEFT's suffix rule) counts as
    a Linear d×k: r·(d+k) parameters stand for d·k.
    """
    from .errors import ValidationError
    from .quant import detect_base, logical_shapes
    from .savings_config import DTYPE_BYTES, match_targets

    base = _index(base_path)
    # a quantized base's weights as the model holds them, not their packed storage
    logical = logical_shapes(base, detect_base(base))
    mats = {
        n.removesuffix(".weight"): t
        for n, t in logical.items()
        if n.endswith(".weight") and len(t.shape) == 2
    }
    hits = match_targets(list(mats), targets)
    if not hits:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in mats})
        raise ValidationError(
            f"--targets {','.join(targets)} match no 2-D weight; modules here: {', '.join(leaves)}",
            file=_label(base_path),
        )
    size = DTYPE_BYTES[dtype]
    params = sum(rank * (mats[n].shape[0] + mats[n].shape[1]) for n in hits)
    dense = sum(mats[n].shape[0] * mats[n].shape[1] for n in hits)
    return {
        "params": params,
        "dense_params": dense,
        "bytes": params * size,
        "modules": len(hits),
        "compression": dense / params,
        "base_params": (n_base := sum(math.prod(t.shape) for t in logical.values())),
        "base_bytes": n_base * size,
        "rank": rank,
        "targets": targets,
        "dtype": dtype,
    }
