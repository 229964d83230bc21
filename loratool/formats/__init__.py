"""Reading and writing adapters in every supported format, with auto-detection."""

from __future__ import annotations

import os
from pathlib import Path

from ..adapter import Adapter
from ..errors import FormatError, NotFoundError, ValidationError
from ..fsutil import atomic_dir, atomic_file
from ..tensors.header import read_header, refuse_pickle
from ..tensors.io import load_file
from .canonical import canonical_bytes, canonical_from_tensors, is_canonical
from .kohya import kohya_from_tensors, looks_like_kohya, write_kohya_file
from .peft import CONFIG, WEIGHTS, is_peft_dir, read_peft, write_peft_files
from .resolve import resolve

WRITE_FORMATS = ("peft", "kohya", "loratool")

__all__ = ["load_adapter", "detect_format", "save_adapter", "resolve", "WRITE_FORMATS"]


def detect_format(path: str | os.PathLike) -> str:
    """'peft', 'kohya' or 'loratool', from the layout and the header only."""
    p = Path(path)
    if not p.exists():
        raise NotFoundError("no such file or directory", file=p)
    refuse_pickle(p)
    if p.is_dir():
        if is_peft_dir(p):
            return "peft"
        files = sorted(p.glob("*.safetensors"))
        if len(files) == 1:
            return detect_format(files[0])
        raise FormatError(
            f"no {CONFIG} and not exactly one .safetensors file: not an adapter", file=p
        )
    if p.name == WEIGHTS and (p.parent / CONFIG).exists():
        return "peft"
    header = read_header(p)
    if is_canonical(header.metadata):
        return "loratool"
    if looks_like_kohya(list(header.tensors)):
        return "kohya"
    raise FormatError("no LoRA tensors found (lora_A/lora_B or lora_down/lora_up)", file=p)


def load_adapter(path: str | os.PathLike, *, lazy: bool = False) -> Adapter:
    """Read and validate an adapter in any supported format.

    With ``lazy``, only headers are read: the factors are HeaderTensor stand-ins (no torch
    needed) that ``LoraModule.materialized`` reads, and checks for NaN/Inf, when needed.
    """
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "peft":
        folder = p if p.is_dir() else p.parent
        adapter = read_peft(folder, lazy=lazy)
    else:
        file = p if p.is_file() else sorted(p.glob("*.safetensors"))[0]
        tensors, metadata = load_file(file, lazy=lazy)
        if fmt == "loratool":
            adapter = canonical_from_tensors(tensors, metadata, source=file)
        else:
            adapter = kohya_from_tensors(tensors, metadata, source=file)
    adapter.meta.source = adapter.meta.source or str(p)
    adapter.meta.format = adapter.meta.format or fmt
    adapter.origin.setdefault("format", fmt)
    return adapter


def save_adapter(
    adapter: Adapter, dest: str | os.PathLike, fmt: str = "peft", *, force: bool = False
) -> Path:
    """Write ``adapter`` to ``dest`` atomically: a PEFT directory, or one .safetensors file.

    NaN or Inf in a factor is refused before anything is written, as ``add`` refuses it."""
    dest = Path(dest)
    adapter.check_finite(dest)
    if fmt == "peft":
        with atomic_dir(dest, force=force) as tmp:
            write_peft_files(adapter, tmp)
    elif fmt == "kohya":
        with atomic_file(dest, force=force) as tmp:
            write_kohya_file(adapter, tmp)
    elif fmt == "loratool":
        data = canonical_bytes(adapter, with_meta=True)
        with atomic_file(dest, force=force) as tmp:
            tmp.write_bytes(data)
    else:
        raise ValidationError(f"unknown format {fmt!r}; choose one of {', '.join(WRITE_FORMATS)}")
    return dest
