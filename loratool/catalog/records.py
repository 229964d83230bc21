"""The catalog's rows as the library builds them: names, homes, and one record per adapter
(its row, module rows, tags, key/values and training facts). No SQL, no torch."""

from __future__ import annotations

import datetime as _dt
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ValidationError
from .search import clean_training

if TYPE_CHECKING:
    from ..adapter import Adapter

_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_MAX_NAME = 200


# -- names and homes --------------------------------------------------------------------
def default_home() -> Path:
    """``$LORATOOL_HOME``, else ``~/.loratool``."""
    env = os.environ.get("LORATOOL_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".loratool"


def validate_name(name: str) -> str:
    """A catalog name: ``[A-Za-z0-9._-]+``, not ``.`` or ``..``, at most 200 characters."""
    if (
        not isinstance(name, str)
        or not _NAME.match(name)
        or name in (".", "..")
        or len(name) > _MAX_NAME
    ):
        raise ValidationError(
            f"bad adapter name {name!r}",
            hint="use letters, digits, '.', '_' and '-' (at most 200), not '.' or '..'",
        )
    return name


def default_name(source: str | os.PathLike) -> str:
    """The name ``add`` uses without ``--name``: the directory or file stem, sanitised."""
    p = Path(source)
    if p.is_file() or p.suffix == ".safetensors":
        stem = p.parent.name if p.name == "adapter_model.safetensors" else p.stem
    else:
        stem = p.resolve().name if str(p) in (".", "") else p.name
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.")
    if not cleaned:
        raise ValidationError(
            "cannot make an adapter name from this path", file=source, hint="pass --name"
        )
    return validate_name(cleaned[:_MAX_NAME])


def _nonempty(what: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(f"{what} must be a non-empty string, got {value!r}")
    return value.strip()


def _num(x: Any) -> Any:
    """16.0 → 16: alpha is a float in the database but usually a whole number."""
    if isinstance(x, float) and x.is_integer():
        return int(x)
    return x


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -- records ----------------------------------------------------------------------------
@dataclass
class ModuleRecord:
    """What the catalog knows about one module without its tensors."""

    name: str
    kind: str
    a_shape: list[int]
    b_shape: list[int]
    base_shape: list[int]
    rank: int
    alpha: float
    scale: float
    params: int
    dense_params: int
    dtype: str


@dataclass
class AdapterRecord:
    """One catalog entry: the row, its modules, tags and key/values. ``sha256`` names its blob."""

    name: str
    task: str
    sha256: str
    modules: list[ModuleRecord]
    bytes: int
    dtype: str
    base_model: str | None = None
    description: str | None = None
    source: str | None = None
    format: str | None = None
    rslora: bool = False
    tags: list[str] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)
    created: str | None = None
    # what the source file said about its training (formats/training.py's vocabulary)
    training: dict[str, str] = field(default_factory=dict)
    # the hashes of the file it was added from (tensors/digest.py); None when it was made here
    file_sha256: str | None = None
    tensor_sha256: str | None = None

    def row(self) -> dict[str, Any]:
        mods = self.modules
        return {
            "name": self.name,
            "task": self.task,
            "base_model": self.base_model,
            "description": self.description,
            "source": self.source,
            "format": self.format,
            "rank": max((m.rank for m in mods), default=0),
            "alpha": max((m.alpha for m in mods), default=0.0),
            "modules": len(mods),
            "params": sum(m.params for m in mods),
            "dense_params": sum(m.dense_params for m in mods),
            "bytes": self.bytes,
            "dtype": self.dtype,
            "rslora": int(bool(self.rslora)),
            "created": self.created or _now(),
            "sha256": self.sha256,
            "file_sha256": self.file_sha256,
            "tensor_sha256": self.tensor_sha256,
        }

    def validate(self) -> None:
        validate_name(self.name)
        self.task = _nonempty("task", self.task)
        self.tags = sorted({_nonempty("tag", t) for t in self.tags})
        for k, v in self.meta.items():
            _nonempty("meta key", k)
            if not isinstance(v, str):
                raise ValidationError(f"meta value for {k!r} must be a string")
        if not re.match(r"^[0-9a-f]{64}$", self.sha256 or ""):
            raise ValidationError(f"not a sha256: {self.sha256!r}")
        for h in (self.file_sha256, self.tensor_sha256):
            if h is not None and not re.match(r"^[0-9a-f]{64}$", h):
                raise ValidationError(f"not a sha256: {h!r}")
        self.training = clean_training(self.training)
        if not self.modules:
            raise ValidationError("an adapter needs at least one module", tensor=self.name)


def record_from_adapter(
    adapter: Adapter, *, name: str, task: str, sha256: str, **fields: Any
) -> AdapterRecord:
    """The catalog's rows for ``adapter``: one module row per module, and one per full-tensor
    operation (kind ``replace`` / ``rows`` / ``add``, a_shape its tensor's shape, rank 0), so
    that ``show`` lists and ``list``/``savings`` count every stored tensor."""
    mods = []
    for m in sorted(adapter.modules.values(), key=lambda m: _natural_key(m.name)):
        a_shape, b_shape = m.shapes()
        mods.append(
            ModuleRecord(
                name=m.name,
                kind=m.label,
                a_shape=a_shape,
                b_shape=b_shape,
                base_shape=list(m.base_shape),
                rank=m.rank,
                alpha=m.alpha,
                scale=m.scale,
                params=m.params,
                dense_params=m.dense_params,
                dtype=m.dtype_name,
            )
        )
    for o in sorted(adapter.ops.values(), key=lambda o: _natural_key(o.target)):
        shapes = [list(t.shape) for t in o.tensors().values()]
        mods.append(
            ModuleRecord(
                # the primary key is (adapter, name): an operation on a tensor a module also
                # changes (token rows of an adapted embedding) gets its own row name
                name=o.target if o.target not in adapter.modules else f"{o.target}#{o.op}",
                kind=o.op,
                a_shape=shapes[0],
                b_shape=shapes[1] if len(shapes) > 1 else [],
                base_shape=shapes[0],
                rank=0,
                alpha=0.0,
                scale=float(getattr(o, "scale", 1.0)),
                params=o.params,
                dense_params=o.dense_params,
                dtype=o.dtype_name,
            )
        )
    return AdapterRecord(
        name=name,
        task=task,
        sha256=sha256,
        modules=mods,
        bytes=adapter.nbytes,
        dtype=adapter.dtype_name,
        rslora=adapter.rslora,
        format=adapter.meta.format,
        **fields,
    )
