"""A base's identity and history: the names it is known by and the merges it records.

A merge writes its provenance into every output file's safetensors metadata: the adapters
merged, with their sha256 and weight (``loratool.merges``), and the base's name
(``loratool.base_model``). A later merge or unmerge reads it back to warn about an adapter
merged twice or subtracted without having been merged.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..tensors.header import BaseIndex

PROVENANCE_KEY = "loratool.merges"


def hub_snapshot(path: str | Path) -> tuple[str, str] | None:
    """(OWNER/NAME, commit) when ``path`` lies in a Hugging Face cache snapshot
    (…/models--OWNER--NAME/snapshots/COMMIT/…), else None."""
    parts = Path(path).absolute().parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots" and "--" in part[8:]:
            owner, _, name = part[8:].partition("--")
            return f"{owner}/{name}", parts[i + 2]
    return None


def base_name(base: BaseIndex) -> str:
    """The base's name: its Hub id when it lies in the Hugging Face cache, else its folder's
    (or file's) name."""
    root = base.root
    snap = hub_snapshot(root)
    if snap is not None:
        return snap[0]
    if root.is_file():
        return root.parent.name if root.name in ("model.safetensors",) else root.stem
    return root.name


def base_identity(base: BaseIndex) -> set[str]:
    """Names the base is known by: its directory (its Hub id for a cached snapshot), config's
    _name_or_path, merge provenance."""
    names = {base_name(base)}
    cfg = (base.root if base.root.is_dir() else base.root.parent) / "config.json"
    try:
        data = json.loads(cfg.read_text())
        if isinstance(data.get("_name_or_path"), str):
            names.add(data["_name_or_path"])
    except (OSError, ValueError, AttributeError):
        pass
    for meta in base.file_metadata.values():
        if "loratool.base_model" in meta:
            names.add(meta["loratool.base_model"])
    return {n.rstrip("/").rsplit("/", 1)[-1].lower() for n in names if n}


def merge_history(base: BaseIndex) -> list[dict]:
    """The merges the base's files record (oldest first); [] for a base never merged into."""
    for meta in base.file_metadata.values():
        if PROVENANCE_KEY in meta:
            try:
                hist = json.loads(meta[PROVENANCE_KEY])
                return hist if isinstance(hist, list) else []
            except ValueError:
                return []
    return []
