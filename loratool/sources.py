"""Turning an ADAPTER argument (a catalog name or a path) into a validated Adapter."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .adapter import Adapter
from .errors import NotFoundError


@dataclass
class OpenedAdapter:
    adapter: Adapter
    label: str  # the catalog name or the path as given
    known_sha256: str | None = None

    @property
    def sha256(self) -> str:
        """Of the canonical form, so a path and its catalog copy agree; computed when first
        asked (a lazily opened adapter is read for it), so commands that never ask read only
        what they use."""
        if self.known_sha256 is None:
            self.known_sha256 = canonical_sha256(self.adapter)
        return self.known_sha256


def canonical_sha256(adapter: Adapter) -> str:
    """sha256 of the canonical bytes, hashed tensor by tensor (never all of them at once)."""
    from .formats.canonical import canonical_parts
    from .tensors.io import serialize_chunks

    h = hashlib.sha256()
    for chunk in serialize_chunks(*canonical_parts(adapter)):
        h.update(chunk)
    return h.hexdigest()


def open_adapter(
    spec: str, home: str | os.PathLike | None = None, *, lazy: bool = False
) -> OpenedAdapter:
    """A path that exists is read as an adapter file or directory; anything else is looked up
    in the catalog (whose blob is re-hashed before use). ``lazy``: see ``load_adapter``."""
    p = Path(spec)
    if p.exists():
        from .formats import load_adapter

        adapter = load_adapter(p, lazy=lazy)
        return OpenedAdapter(adapter, spec)
    from .catalog import Catalog

    catalog = Catalog(home, read_only_ok=True)
    if not catalog.exists(spec):
        raise NotFoundError(
            "no such file, directory or catalog adapter",
            file=spec,
            hint="`loratool list` shows the catalog",
        )
    adapter = catalog.load(spec, lazy=lazy)
    return OpenedAdapter(adapter, spec, catalog.get(spec)["sha256"])
