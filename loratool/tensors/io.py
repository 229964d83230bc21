"""Loading and saving tensors through validated safetensors headers (torch needed here).

The writer is loratool's own, on purpose: the catalog names a blob by the sha256 of its bytes,
so the same adapter must serialize to the same bytes every time, and safetensors 0.8's
``save`` does not give that — its header comes out of a Rust HashMap, in another order on
every call (20 saves of one dict with metadata gave 20 different byte strings). Here tensors
are written in name order, metadata keys sorted, the header padded as safetensors pads it; the
files are ordinary safetensors that ``safe_open`` reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import FormatError, ValidationError
from ..fsutil import atomic_file
from .header import FLOAT_DTYPES, HeaderTensor, TensorInfo, read_header

if TYPE_CHECKING:
    import torch

_TORCH_DTYPES: dict | None = None


def torch_dtype(tag: str) -> torch.dtype:
    global _TORCH_DTYPES
    if _TORCH_DTYPES is None:
        import torch

        _TORCH_DTYPES = {
            "BOOL": torch.bool,
            "U8": torch.uint8,
            "I8": torch.int8,
            "I16": torch.int16,
            "I32": torch.int32,
            "I64": torch.int64,
            "F16": torch.float16,
            "BF16": torch.bfloat16,
            "F32": torch.float32,
            "F64": torch.float64,
            "F8_E5M2": torch.float8_e5m2,
            "F8_E4M3": torch.float8_e4m3fn,
            "U16": torch.uint16,
            "U32": torch.uint32,
            "U64": torch.uint64,
        }
    return _TORCH_DTYPES[tag]


def dtype_tag(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):  # a HeaderTensor's dtype is already the tag
        return dtype
    torch_dtype("F32")
    for tag, dt in _TORCH_DTYPES.items():  # type: ignore[union-attr]
        if dt == dtype:
            return tag
    raise ValidationError(f"dtype {dtype} cannot be stored in safetensors")


def tensor_from_bytes(info: TensorInfo, raw: bytes | bytearray | memoryview) -> torch.Tensor:
    import torch

    if len(raw) != info.nbytes:
        raise FormatError(
            f"read {len(raw)} of {info.nbytes} bytes: truncated", file=info.file, tensor=info.name
        )
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
    t = torch.frombuffer(
        bytearray(raw) if isinstance(raw, bytes) else raw, dtype=torch_dtype(info.dtype)
    )
    return t.reshape(info.shape)


def read_tensor(info: TensorInfo, fh=None) -> torch.Tensor:
    """Read one tensor's bytes from its file (``fh`` an open binary handle to reuse)."""
    own = fh is None
    if own:
        fh = open(info.file, "rb")
    try:
        fh.seek(info.start)
        buf = bytearray(info.nbytes)
        n = fh.readinto(buf)
        if n != info.nbytes:
            raise FormatError(
                f"read {n} of {info.nbytes} bytes: truncated", file=info.file, tensor=info.name
            )
        return tensor_from_bytes(info, buf)
    finally:
        if own:
            fh.close()


def load_file(
    path: str | os.PathLike, *, lazy: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a validated safetensors file, in header order, and its metadata.

    With ``lazy``, HeaderTensor stand-ins that read nothing (and need no torch) until used.
    """
    header = read_header(path)
    if lazy:
        return {
            n: HeaderTensor(i)
            for n, i in sorted(header.tensors.items(), key=lambda kv: kv[1].start)
        }, header.metadata
    out = {}
    with open(header.path, "rb") as fh:
        for name, info in sorted(header.tensors.items(), key=lambda kv: kv[1].start):
            out[name] = read_tensor(info, fh)
    return out, header.metadata


def materialize(t):
    """A torch tensor for ``t``: read from its file if it is a HeaderTensor."""
    return read_tensor(t.info) if isinstance(t, HeaderTensor) else t


def check_finite(tensors: dict[str, torch.Tensor], path: Path | str) -> None:
    import torch

    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            raise ValidationError(f"contains {bad}", file=path, tensor=name)


def header_bytes(
    entries: list[tuple[str, str, tuple[int, ...], int, int]], metadata: dict[str, str] | None
) -> bytes:
    """The 8-byte length and JSON header for (name, dtype tag, shape, begin, end) entries.

    Written by hand rather than by the safetensors package because its header order (a Rust
    HashMap) changes from call to call (safetensors 0.8), and content addressing needs the same
    bytes for the same adapter every time. Keys of the metadata are sorted; the header is space-padded to a
    multiple of 8 bytes, as safetensors does.
    """
    obj: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    for name, dtype, shape, begin, end in entries:
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _tensor_bytes(t) -> bytes:
    if isinstance(t, HeaderTensor):
        return t.raw()
    import torch

    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def serialize_chunks(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Iterator[bytes]:
    """``serialize``'s bytes as the header, then one chunk per tensor, read one at a time
    (sizes come from shape × dtype, so the header needs no tensor's data)."""
    entries, pos = [], 0
    for name in sorted(tensors):
        t = tensors[name]
        n = t.numel() * t.element_size()
        entries.append((name, dtype_tag(t.dtype), tuple(t.shape), pos, pos + n))
        pos += n
    yield header_bytes(entries, metadata)
    for name in sorted(tensors):
        yield _tensor_bytes(tensors[name])


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Deterministic safetensors bytes: tensors in name order, metadata sorted."""
    return b"".join(serialize_chunks(tensors, metadata))


def save_file(
    tensors: dict[str, torch.Tensor],
    dest: str | os.PathLike,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file atomically (temp beside it, fsync, rename)."""
    data = serialize(tensors, metadata)
    with atomic_file(dest) as tmp:
        tmp.write_bytes(data)


def is_float_tag(tag: str) -> bool:
    return tag in FLOAT_DTYPES
