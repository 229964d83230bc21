"""Reading and validating safetensors headers without torch.

A safetensors file is ``<u64 little-endian N><N bytes of JSON header><data>``. The header maps
each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to the start of
the data section, plus an optional ``__metadata__`` of string pairs. Everything here reads only
the header, so a 100 GB model is described in microseconds, and every lie a header can tell
(offsets past the end, overlaps, holes, sizes that do not match shape × dtype) is caught before
a tensor is touched.

The parser is loratool's own rather than ``safetensors.safe_open`` because the merge engine
needs what safe_open does not expose: each tensor's absolute byte offsets in its file (untouched
tensors are copied by position with ``copy_file_range``, touched ones read with one ``pread``),
checks that refuse a lying header before anything is read or written, and answers without
torch or mapping the file (``list``, ``savings --base`` on a 100 GB model).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import FormatError, ValidationError
from ..jsonutil import loads

# Bytes per element, by safetensors dtype tag.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
FLOAT_DTYPES = {"F8_E5M2", "F8_E4M3", "F16", "BF16", "F32", "F64"}
# safetensors itself refuses headers above 100 MB; a larger length is a corrupt file.
MAX_HEADER = 100_000_000
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in one file. ``start``/``end`` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    header_len: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    file_size: int = 0

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


def refuse_pickle(path: Path) -> None:
    """Refuse pickle checkpoints by name and by their first bytes, without unpickling."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise FormatError(
            "pickle checkpoints are never opened (they can run code)",
            file=path,
            hint="convert it to safetensors with a trusted tool first",
        )


def _looks_like_pickle(head: bytes) -> bool:
    # torch.save writes a zip (PK\x03\x04); raw pickles start with the PROTO opcode 0x80.
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and head[1] <= 5)


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Read and validate the header of one safetensors file."""
    path = Path(path)
    refuse_pickle(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            first = fh.read(9)
            head = first[:8]
            # A real header's JSON starts right after the length; a pickle's bytes do not.
            if first[8:9] != b"{" and _looks_like_pickle(first):
                raise FormatError(
                    "this is a pickle/torch.save file, not safetensors; it is never opened",
                    file=path,
                )
            if len(head) < 8:
                raise FormatError(f"truncated: {size} bytes, not even a header length", file=path)
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or n > size - 8:
                raise FormatError(
                    f"header length {n} is larger than the file ({size} bytes): truncated or not safetensors",
                    file=path,
                )
            fh.seek(8)
            raw = fh.read(n)
    except FileNotFoundError as exc:
        raise FormatError("no such file", file=path) from exc
    except IsADirectoryError as exc:
        raise FormatError("is a directory, expected a .safetensors file", file=path) from exc
    except PermissionError as exc:
        raise FormatError("permission denied", file=path) from exc
    # A tensor named twice is refused: json keeps the last, other readers the first.
    obj = loads(raw, file=path, what="header (corrupt or not safetensors?)", unique_keys=True)
    if not isinstance(obj, dict):
        raise FormatError("header is not a JSON object", file=path)
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise FormatError("__metadata__ must map strings to strings", file=path)
    data_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in obj.items():
        tensors[name] = _tensor_info(path, name, entry, 8 + n, data_len)
        spans.append((entry["data_offsets"][0], entry["data_offsets"][1], name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin < pos:
            raise FormatError(
                "data overlaps the previous tensor: the header lies", file=path, tensor=name
            )
        if begin > pos:
            raise FormatError(
                f"a hole of {begin - pos} bytes before it: the header lies", file=path, tensor=name
            )
        pos = end
    if pos != data_len:
        raise FormatError(
            f"header accounts for {pos} data bytes but the file holds {data_len}: truncated or padded",
            file=path,
        )
    return SafetensorsHeader(path, n, tensors, dict(metadata), size)


MAX_DIMS = 16
_MAX_SIZE = 2**63 - 1


def _is_size(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _MAX_SIZE


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _tensor_info(path: Path, name: str, entry: object, base: int, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise FormatError("header entry is not an object", file=path, tensor=name)
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise FormatError(f"unknown dtype {_short(dtype)}", file=path, tensor=name)
    # Sizes are JSON integers (not booleans: True is an int to Python) that fit the 64-bit
    # counts every reader uses; a 2**70 dimension with a zero beside it holds 0 bytes, and
    # would still break every tensor library.
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_size(s) for s in shape):
        raise FormatError(f"bad shape {_short(shape)}", file=path, tensor=name)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_size, offsets)):
        raise FormatError(f"bad data_offsets {_short(offsets)}", file=path, tensor=name)
    begin, end = offsets
    if end < begin:
        raise FormatError(f"data_offsets {offsets} run backwards", file=path, tensor=name)
    if end > data_len:
        raise FormatError(
            f"data_offsets end at {end} past the end of the data ({data_len} bytes): truncated or the header lies",
            file=path,
            tensor=name,
        )
    numel = 1
    for s in shape:
        numel *= s
    if numel * DTYPE_SIZES[dtype] != end - begin:
        raise FormatError(
            f"{end - begin} bytes do not hold shape {shape} of {dtype}: the header lies",
            file=path,
            tensor=name,
        )
    return TensorInfo(name, dtype, tuple(shape), path, base + begin, base + end)


@dataclass(frozen=True)
class BaseIndex:
    """A base model's tensors, read from headers only: one file, a directory, or shards."""

    root: Path
    files: tuple[Path, ...]
    tensors: dict[str, TensorInfo]
    index_path: Path | None = None
    index_metadata: dict = field(default_factory=dict)
    file_metadata: dict[Path, dict[str, str]] = field(default_factory=dict)

    @property
    def is_sharded(self) -> bool:
        return self.index_path is not None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def total_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    def keys(self) -> list[str]:
        return list(self.tensors)


_INDEX_NAMES = ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json")
_SINGLE_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")


def read_base(path: str | os.PathLike) -> BaseIndex:
    """Describe a base model from its safetensors headers; no tensor data is read."""
    root = Path(path)
    if not root.exists():
        raise FormatError("no such file or directory", file=root)
    ggufs = (
        [root] if root.suffix == ".gguf" else sorted(root.glob("*.gguf")) if root.is_dir() else []
    )
    if ggufs and not (root.is_dir() and any(root.glob("*.safetensors"))):
        raise FormatError(
            "GGUF-quantized bases are not supported: loratool reads safetensors bases",
            file=ggufs[0],
            hint="merge into the safetensors model the GGUF was converted from",
        )
    if root.is_file():
        header = read_header(root)
        return BaseIndex(root, (root,), dict(header.tensors), None, {}, {root: header.metadata})
    from .pipeline import is_pipeline, read_pipeline

    if is_pipeline(root):  # a diffusers pipeline: one base over its component folders
        return read_pipeline(root)
    for name in _INDEX_NAMES:
        index_path = root / name
        if index_path.exists():
            return _read_sharded(root, index_path)
    for name in _SINGLE_NAMES:
        if (root / name).exists():
            return _single(root, root / name)
    candidates = sorted(root.glob("*.safetensors"))
    if len(candidates) == 1:
        return _single(root, candidates[0])
    pickles = [p.name for p in root.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise FormatError(
            f"holds only pickle checkpoints ({', '.join(sorted(pickles))}); they are never opened",
            file=root,
            hint="convert to safetensors first",
        )
    raise FormatError(
        "no model.safetensors, no model.safetensors.index.json and no single *.safetensors here",
        file=root,
    )


def _single(root: Path, file: Path) -> BaseIndex:
    header = read_header(file)
    return BaseIndex(root, (file,), dict(header.tensors), None, {}, {file: header.metadata})


def _read_sharded(root: Path, index_path: Path) -> BaseIndex:
    try:
        index = loads(index_path.read_bytes(), file=index_path, what="index")
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except FormatError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FormatError(
            "not a valid index: needs a JSON object with weight_map", file=index_path
        ) from exc
    files: list[Path] = []
    for fname in weight_map.values():
        if not isinstance(fname, str) or "/" in fname or "\\" in fname or fname.startswith("."):
            raise FormatError(f"weight_map names a bad shard {fname!r}", file=index_path)
        p = root / fname
        if p not in files:
            files.append(p)
    tensors: dict[str, TensorInfo] = {}
    metas: dict[Path, dict[str, str]] = {}
    for f in files:
        header = read_header(f)
        metas[f] = header.metadata
        for name, info in header.tensors.items():
            if name in tensors:
                raise FormatError(f"also stored in {tensors[name].file.name}", file=f, tensor=name)
            tensors[name] = info
    for name, fname in weight_map.items():
        info = tensors.get(name)
        if info is None or info.file.name != fname:
            raise FormatError(
                f"index says {fname} holds it, but it does not", file=index_path, tensor=name
            )
    extra = sorted(set(tensors) - set(weight_map))
    if extra:
        raise FormatError(
            "tensor in a shard but not in the index", file=index_path, tensor=extra[0]
        )
    # Keep the index's order (save_pretrained writes it sorted by name); shard order is the
    # order of first appearance, which is what the output will reproduce.
    ordered = {name: tensors[name] for f in files for name in _names_in_file(tensors, f)}
    return BaseIndex(root, tuple(files), ordered, index_path, index.get("metadata") or {}, metas)


def _names_in_file(tensors: dict[str, TensorInfo], f: Path) -> list[str]:
    return sorted((n for n, t in tensors.items() if t.file == f), key=lambda n: tensors[n].start)


_SCALAR_FORMATS = {
    "F64": "<d",
    "F32": "<f",
    "F16": "<e",
    "I64": "<q",
    "I32": "<i",
    "I16": "<h",
    "I8": "<b",
    "U8": "<B",
}


class HeaderTensor:
    """A tensor known from its file's header: shape, dtype and where its bytes lie.

    It stands in for a torch tensor while an adapter is read for planning (a merge), so that
    the names, shapes, checks and content hash are all had without importing torch; the
    values are read when the math needs them (``loratool.tensors.io.materialize``). It has
    just the few tensor methods the format readers and checks use.
    """

    __slots__ = ("info",)

    def __init__(self, info: TensorInfo):
        self.info = info

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    @property
    def dtype(self) -> str:
        return self.info.dtype

    def dim(self) -> int:
        return len(self.info.shape)

    def numel(self) -> int:
        return self.info.numel

    def element_size(self) -> int:
        return DTYPE_SIZES[self.info.dtype]

    def is_floating_point(self) -> bool:
        return self.info.dtype in FLOAT_DTYPES

    def contiguous(self) -> HeaderTensor:
        return self

    def reshape(self, *shape) -> HeaderTensor:
        """The same bytes seen with another shape of as many elements (row-major, no copy)."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = tuple(int(s) for s in shape)
        n = 1
        for s in shape:
            n *= s
        if n != self.info.numel:
            raise ValidationError(
                f"cannot view shape {list(self.info.shape)} as {list(shape)}",
                file=self.info.file,
                tensor=self.info.name,
            )
        return HeaderTensor(replace(self.info, shape=shape))

    def raw(self) -> bytes:
        """The tensor's bytes as stored (row-major, little-endian)."""
        with open(self.info.file, "rb") as fh:
            fh.seek(self.info.start)
            data = fh.read(self.info.nbytes)
        if len(data) != self.info.nbytes:
            raise FormatError(
                f"read {len(data)} of {self.info.nbytes} bytes: truncated",
                file=self.info.file,
                tensor=self.info.name,
            )
        return data

    def scalar(self) -> float:
        """The value of a one-element tensor (a kohya alpha)."""
        if self.info.numel != 1:
            raise ValidationError(
                f"not a scalar: shape {list(self.info.shape)}",
                file=self.info.file,
                tensor=self.info.name,
            )
        if self.info.dtype == "BF16":
            return struct.unpack("<f", b"\0\0" + self.raw())[0]
        fmt = _SCALAR_FORMATS.get(self.info.dtype)
        if fmt is None:
            raise ValidationError(
                f"cannot read a {self.info.dtype} scalar",
                file=self.info.file,
                tensor=self.info.name,
            )
        return float(struct.unpack(fmt, self.raw())[0])

    def __repr__(self) -> str:
        return f"HeaderTensor({self.info.name!r}, {self.info.dtype}, {list(self.info.shape)})"
