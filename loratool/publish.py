"""The folder `push` uploads: PEFT files and a model card."""

from __future__ import annotations

from pathlib import Path

from .adapter import Adapter
from .card import model_card, write_card
from .formats.peft import write_peft_files


def build_hub_folder(adapter: Adapter, row: dict, repo_id: str, folder: Path) -> Path:
    """Write adapter_config.json, adapter_model.safetensors and README.md into ``folder``."""
    if row.get("base_model"):
        adapter.meta.base_model = row["base_model"]
    base_bytes = _local_base_bytes(row.get("base_model"))
    write_peft_files(adapter, folder)
    write_card(folder, model_card(adapter, row, repo_id, base_bytes=base_bytes))
    return folder


def _local_base_bytes(base_model: str | None) -> int | None:
    """The base's size when base_model names a local model (headers only), else None."""
    if not base_model:
        return None
    p = Path(base_model)
    if not p.exists():
        return None
    from .errors import LoratoolError
    from .tensors.header import read_base

    try:
        return read_base(p).total_bytes
    except LoratoolError:
        return None
