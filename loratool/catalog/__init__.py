"""The local catalog: adapters' metadata in SQLite, their tensors in a content-addressed store.

Never imports torch at import time; ``add``, ``load`` and ``export`` import it when called.
"""

from __future__ import annotations

from .blobs import BlobStore
from .db import (
    KNOWN_MIGRATIONS,
    MIGRATIONS,
    SCHEMA_VERSION,
    AdapterRecord,
    Catalog,
    ModuleRecord,
    Problem,
    VerifyReport,
    default_home,
    default_name,
    record_from_adapter,
    validate_name,
)

__all__ = [
    "AdapterRecord",
    "BlobStore",
    "Catalog",
    "KNOWN_MIGRATIONS",
    "MIGRATIONS",
    "ModuleRecord",
    "Problem",
    "SCHEMA_VERSION",
    "VerifyReport",
    "default_home",
    "default_name",
    "record_from_adapter",
    "validate_name",
]
