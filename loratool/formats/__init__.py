"""Reading and writing adapters in every supported format, through the formats registry.

Each format is a module that registers a ``registry.Format`` (detect / read / write):
``builtin`` (peft, loratool), ``kohya``, ``lycoris``, ``diffusers``, ``mlx``, ``gguf``. ``detect_format``
asks each in priority order; ``load_adapter`` reads with the one that answers; ``save_adapter``
writes atomically with the named one; ``convert`` does both, resolving names against a base when
given one.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..adapter import Adapter
from ..errors import FormatError, NotFoundError, ValidationError
from ..fsutil import atomic_dir, atomic_file
from ..tensors.digest import WeightsIdentity
from ..tensors.digest import weights_identity as _weights_identity
from ..tensors.header import read_header, refuse_pickle
from . import builtin, diffusers, gguf, kohya, lycoris, mlx  # noqa: F401  (each registers itself)
from .registry import WriteContext, get, readable, writable
from .resolve import resolve

WRITE_FORMATS = tuple(writable())

__all__ = [
    "load_adapter",
    "detect_format",
    "detect_header",
    "save_adapter",
    "resolve",
    "WRITE_FORMATS",
    "WriteContext",
    "weights_identity",
]


def detect_format(path: str | os.PathLike) -> str:
    """The name of the format at ``path``, from the layout and the header only."""
    p = Path(path)
    if not p.exists():
        raise NotFoundError("no such file or directory", file=p)
    refuse_pickle(p)
    header = None
    if p.is_file() and not gguf._detect(p, None):
        header = read_header(p)
    for fmt in readable():
        if fmt.detect and fmt.detect(p, header):
            return fmt.name
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        if len(files) == 1:
            return detect_format(files[0])
        raise FormatError(
            "no adapter_config.json and not exactly one .safetensors file: not an adapter", file=p
        )
    raise FormatError(
        "no LoRA tensors found (lora_A/lora_B, lora_down/lora_up, lora_a/lora_b)", file=p
    )


def _target(p: Path, fmt) -> Path:
    """The path a format's reader is given: a directory of a one-file format means its file."""
    if p.is_dir() and fmt.layout == "file":
        return sorted(p.glob("*.safetensors"))[0]
    return p


def weights_identity(path: str | os.PathLike) -> WeightsIdentity:
    """The file holding the tensors of the adapter at ``path`` (a PEFT directory's
    adapter_model.safetensors, mlx-lm's adapters.safetensors, else the file itself) and its
    hashes: the whole file's sha256 and the sha256 of its tensor bytes, which sd-scripts,
    AUTOMATIC1111 and Civitai name a LoRA by and which editing its metadata leaves unchanged
    (``tensors.digest``)."""
    p = Path(path)
    fmt = get(detect_format(p))
    target = _target(p, fmt)
    if target.is_dir():
        if not fmt.weights:
            raise FormatError(f"{fmt.name}: no tensor file to hash", file=p)
        target = target / fmt.weights
    start = fmt.data_start(target) if fmt.data_start else None
    return _weights_identity(target, start)


def detect_header(name: str, remote) -> str | None:
    """The format of a single .safetensors file known only by its header (huggingface_hub's
    ``SafetensorsFileMetadata``, read by range request), or None when no format recognises it.
    Detection looks at tensor names and metadata only."""
    from ..tensors.header import SafetensorsHeader, TensorInfo

    tensors = {}
    for key, info in (getattr(remote, "tensors", None) or {}).items():
        offsets = list(getattr(info, "data_offsets", None) or (0, 0))
        shape = tuple(d for d in (getattr(info, "shape", None) or ()) if isinstance(d, int))
        tensors[key] = TensorInfo(key, str(info.dtype), shape, Path(name), *offsets[:2])
    metadata = {
        str(k): v
        for k, v in (getattr(remote, "metadata", None) or {}).items()
        if isinstance(v, str)
    }
    header = SafetensorsHeader(Path(name), 0, tensors, metadata)
    for fmt in readable():
        if fmt.layout != "file" or not fmt.detect:
            continue
        try:
            if fmt.detect(Path(name), header):
                return fmt.name
        except Exception:  # a detector that needs the file itself cannot tell from a header
            continue
    return None


def load_adapter(path: str | os.PathLike, *, lazy: bool = False) -> Adapter:
    """Read and validate an adapter in any supported format.

    With ``lazy``, only headers are read where the format allows: the factors are HeaderTensor
    stand-ins (no torch needed) that ``LoraModule.materialized`` reads, and checks for NaN/Inf.
    """
    p = Path(path)
    name = detect_format(p)
    fmt = get(name)
    adapter = fmt.read(_target(p, fmt), lazy)
    adapter.meta.source = adapter.meta.source or str(p)
    adapter.meta.format = adapter.meta.format or name
    adapter.origin.setdefault("format", name)
    return adapter


def save_adapter(
    adapter: Adapter,
    dest: str | os.PathLike,
    fmt: str = "peft",
    *,
    force: bool = False,
    ctx: WriteContext | None = None,
) -> Path:
    """Write ``adapter`` to ``dest`` atomically in the named format; what the format could not
    carry exactly is appended to ``ctx.warnings``. NaN or Inf in a factor is refused before
    anything is written, as ``add`` refuses it."""
    dest = Path(dest)
    adapter.check_finite(dest)
    refuse_unwritable(adapter, fmt, dest)
    f = get(fmt)
    if f.write is None:
        raise FormatError(f"{fmt} is read-only")
    ctx = ctx or WriteContext()
    if f.layout == "dir":
        with atomic_dir(dest, force=force) as tmp:
            f.write(adapter, Path(tmp), ctx)
    else:
        with atomic_file(dest, force=force) as tmp:
            f.write(adapter, Path(tmp), ctx)
    return dest


# What each writable format can hold beyond plain LoRA (everything else is refused by name
# rather than written half: a DoRA magnitude, a classifier head or an expert stack dropped
# silently would change the model the adapter stands for).
_HOLDS = {
    "loratool": {"dora", "experts", "ops", "slices", "lycoris"},
    "peft": {"dora", "experts", "ops"},
    "lycoris": {"lycoris"},
}


def refuse_unwritable(adapter: Adapter, fmt: str, dest: Path) -> None:
    from ..adapter import ExpertLoraModule, LoraModule

    holds = _HOLDS.get(fmt, set())
    for m in adapter.modules.values():
        need = None
        if isinstance(m, ExpertLoraModule):
            need = "experts"
        elif not isinstance(m, LoraModule):
            need = "lycoris"
        elif m.magnitude is not None:
            need = "dora"
        elif m.target_rows is not None:
            need = "slices"
        if need is not None and need not in holds:
            raise ValidationError(
                f"the {fmt} format cannot hold a {m.label} module",
                file=dest,
                tensor=m.name,
                hint="export it as peft or loratool",
            )
    if adapter.ops and "ops" not in holds:
        op = next(iter(adapter.ops.values()))
        verb = {"replace": "replaces", "rows": "replaces rows of", "add": "adds to"}.get(
            op.op, op.op
        )
        raise ValidationError(
            f"the {fmt} format cannot hold a tensor the adapter {verb} ({op.why})",
            file=dest,
            tensor=op.target,
            hint="export it as peft or loratool",
        )
