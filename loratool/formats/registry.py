"""The formats registry: each format module registers a ``Format`` with its detect / read / write
functions; ``load_adapter``, ``save_adapter``, ``export`` and ``convert`` iterate it.

``detect(path, header)`` looks at the layout and, for a .safetensors file, its header only
(``header`` is None for directories and other files). ``read(path, lazy)`` returns an Adapter.
``write(adapter, tmp, ctx)`` writes into ``tmp`` (a file path, or an existing empty directory
for ``layout == "dir"``) and appends to ``ctx.warnings`` what it could not carry exactly.
``weights`` / ``data_start`` say which file holds the tensors and where they begin, for the
hashes the catalog names an adapter's source by (``tensors.digest``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ValidationError

if TYPE_CHECKING:
    from ..adapter import Adapter
    from ..tensors.header import BaseIndex, SafetensorsHeader


@dataclass
class WriteContext:
    """What a writer may need besides the adapter: the base it was resolved against (headers
    and config.json), the pipeline component chosen with ``--component``, and a list to which
    it appends a warning for everything it approximated."""

    base: BaseIndex | None = None
    base_config: dict[str, Any] | None = None
    component: str | None = None
    warnings: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)


@dataclass(frozen=True)
class Format:
    name: str
    help: str
    layout: str  # "file" or "dir"
    detect: Callable[[Path, SafetensorsHeader | None], bool] | None = None
    read: Callable[[Path, bool], Adapter] | None = None
    write: Callable[[Adapter, Path, WriteContext], None] | None = None
    priority: int = 50  # lower is detected first
    suffix: str = ""  # the file suffix the format writes, for messages
    # The file inside a "dir" layout that holds the tensors (its hashes name the adapter).
    weights: str = ""
    # Where that file's tensor bytes start (the tensor hash covers them to the end); None: a
    # safetensors file, 8 + its header length.
    data_start: Callable[[Path], int] | None = None


_FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    if fmt.name in _FORMATS and _FORMATS[fmt.name] is not fmt:
        raise ValueError(f"format {fmt.name!r} registered twice")
    _FORMATS[fmt.name] = fmt
    return fmt


def get(name: str) -> Format:
    fmt = _FORMATS.get(name)
    if fmt is None:
        raise ValidationError(f"unknown format {name!r}; choose one of {', '.join(writable())}")
    return fmt


def readable() -> list[Format]:
    return sorted((f for f in _FORMATS.values() if f.read), key=lambda f: (f.priority, f.name))


def writable() -> list[str]:
    return [f.name for f in sorted(_FORMATS.values(), key=lambda f: f.priority) if f.write]
