"""The two hashes image-model tools name an adapter file by, in one pass over its bytes.

- ``file_sha256``: sha256 of the whole file. AUTOMATIC1111 names a checkpoint by its first 10
  hex digits, and Civitai lists them as "AutoV2".
- ``tensor_sha256``: sha256 of the bytes after the header, i.e. from ``8 + N`` (N = the
  little-endian u64 a safetensors file starts with) to the end. This is sd-scripts'
  ``addnet_hash_safetensors`` (library/train_util.py), which ``train_network.py`` stores as
  ``sshs_model_hash`` when it saves a LoRA, and the hash AUTOMATIC1111 gives a LoRA (the first
  12 digits appear as its "Lora hashes" in generation info; Civitai lists them as "AutoV3").
  The header holds the ``__metadata__``, so editing only the metadata (trigger words, a title)
  leaves it unchanged: the same weights keep the same tensor hash.

For a GGUF file the tensor hash covers its tensor data section (from ``data_offset``, after the
key/values and tensor infos, to the end): again what an edit of the key/values leaves alone.

No torch, no safetensors: plain file reads, 1 MiB at a time.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import FormatError
from .header import MAX_HEADER

CHUNK = 1 << 20


@dataclass(frozen=True)
class WeightsIdentity:
    """The file whose tensors an adapter holds, and its two hashes (lowercase hex)."""

    path: Path
    file_sha256: str
    tensor_sha256: str

    @property
    def autov2(self) -> str:
        """AUTOMATIC1111's short checkpoint hash / Civitai's AutoV2: 10 hex digits."""
        return autov2(self.file_sha256)

    @property
    def autov3(self) -> str:
        """AUTOMATIC1111's LoRA short hash / Civitai's AutoV3: 12 hex digits."""
        return autov3(self.tensor_sha256)


def autov2(file_sha256: str | None) -> str | None:
    return file_sha256[:10].upper() if file_sha256 else None


def autov3(tensor_sha256: str | None) -> str | None:
    return tensor_sha256[:12].upper() if tensor_sha256 else None


def safetensors_data_start(path: str | os.PathLike) -> int:
    """Where the tensor bytes of a safetensors file begin: 8 + the header length."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8:
        raise FormatError(f"truncated: {size} bytes, not even a header length", file=path)
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or n > size - 8:
        raise FormatError(
            f"header length {n} is larger than the file ({size} bytes): truncated or not safetensors",
            file=path,
        )
    return 8 + n


def weights_identity(path: str | os.PathLike, data_start: int | None = None) -> WeightsIdentity:
    """Hash ``path`` once: the whole file, and the bytes from ``data_start`` on (default: a
    safetensors file's, after its header)."""
    path = Path(path)
    start = safetensors_data_start(path) if data_start is None else int(data_start)
    whole, tensors = hashlib.sha256(), hashlib.sha256()
    pos = 0
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                whole.update(chunk)
                end = pos + len(chunk)
                if end > start:
                    tensors.update(chunk[max(0, start - pos) :])
                pos = end
    except OSError as exc:
        raise FormatError(f"cannot be read: {exc.strerror or exc}", file=path) from exc
    if pos < start:
        raise FormatError(f"truncated: {pos} bytes, its tensor data starts at {start}", file=path)
    return WeightsIdentity(path, whole.hexdigest(), tensors.hexdigest())
