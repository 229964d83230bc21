"""The catalog's schema, as numbered migrations (``sqlite_utils.Migrations``).

Each migration and its record run in one transaction; ``Catalog`` applies the pending ones under
the write lock when it opens an older catalog, and ``verify`` compares a catalog's schema with
the one these build. A migration is never edited once released: a change is a new number
(claim it in /work/NOTES.md while several people work on the catalog).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any


def _import_sqlite_utils():
    """Import sqlite-utils without letting it import numpy and pandas.

    sqlite-utils imports both, when installed, only to map their scalar types to column types;
    the catalog never inserts them, and numpy alone costs ~60 ms — a fifth of the 0.3 s that
    ``list`` and ``show`` have in all. They are hidden only while sqlite-utils loads, and only
    when nothing has imported them yet; a later ``import numpy`` works as usual."""
    import sys

    hidden = [m for m in ("numpy", "pandas") if m not in sys.modules]
    for m in hidden:
        sys.modules[m] = None  # type: ignore[assignment]  # makes `import m` raise ImportError
    try:
        import sqlite_utils
    finally:
        for m in hidden:
            if sys.modules.get(m, 0) is None:
                del sys.modules[m]
    return sqlite_utils


sqlite_utils = _import_sqlite_utils()
Migrations = sqlite_utils.Migrations


# -- migrations -------------------------------------------------------------------------
MIGRATIONS = Migrations("loratool")


@MIGRATIONS(name="0001_initial")
def _m0001_initial(db: sqlite_utils.Database) -> None:
    db["adapters"].create(
        {
            "name": str,
            "task": str,
            "base_model": str,
            "description": str,
            "source": str,
            "format": str,
            "rank": int,
            "alpha": float,
            "modules": int,
            "params": int,
            "dense_params": int,
            "bytes": int,
            "dtype": str,
            "rslora": int,
            "created": str,
            "sha256": str,
        },
        pk="name",
        not_null={"task", "sha256", "created"},
    )
    # name is the primary key (SQLite indexes it); (task, name) serves both the --task filter
    # and list's "by task then name" order without a sort.
    db["adapters"].create_index(["task", "name"], index_name="idx_adapters_task_name")
    db["adapters"].create_index(["base_model"], index_name="idx_adapters_base_model")
    db["adapters"].create_index(["sha256"], index_name="idx_adapters_sha256")
    db["modules"].create(
        {
            "adapter": str,
            "name": str,
            "position": int,
            "kind": str,
            "a_shape": str,  # JSON lists
            "b_shape": str,
            "base_shape": str,
            "rank": int,
            "alpha": float,
            "scale": float,
            "params": int,
            "dense_params": int,
            "dtype": str,
        },
        pk=("adapter", "name"),
    )
    db["tags"].create({"adapter": str, "tag": str}, pk=("adapter", "tag"))
    db["tags"].create_index(["tag"], index_name="idx_tags_tag")
    db["meta"].create({"adapter": str, "key": str, "value": str}, pk=("adapter", "key"))


@MIGRATIONS(name="0002_remotes")
def _m0002_remotes(db: sqlite_utils.Database) -> None:
    # Where an adapter was pushed on the Hub (written by `push`, shown by `show`).
    db["remotes"].create(
        {"adapter": str, "repo": str, "revision": str, "commit": str, "pushed_at": str},
        pk=("adapter", "repo", "revision"),
    )


@MIGRATIONS(name="0003_training")
def _m0003_training(db: sqlite_utils.Database) -> None:
    # What the source file says about its training (ss_* / modelspec.* keys, PEFT and mlx-lm
    # configs, GGUF general.* keys; formats/training.py's vocabulary: base_model,
    # trigger_words, steps…), one row per fact, for `show` and `list --trained`. And the two
    # hashes of the file the adapter was added from (tensors/digest.py): the whole file's, and
    # the tensor bytes' that sd tools name a LoRA by (unchanged by a metadata edit).
    adapters = db["adapters"]
    adapters.add_column("file_sha256", str)
    adapters.add_column("tensor_sha256", str)
    adapters.create_index(["tensor_sha256"], index_name="idx_adapters_tensor_sha256")
    db["training"].create({"adapter": str, "key": str, "value": str}, pk=("adapter", "key"))
    _backfill_training(db)


def _backfill_training(db: sqlite_utils.Database) -> None:
    """The training facts of the adapters already in the catalog, from their blobs' headers
    (a blob keeps its source's format facts in ``loratool.origin``). The source files are not
    kept, so their hashes stay unknown (NULL). A blob that cannot be read gives no facts:
    ``verify`` reports it; the upgrade does not stop for it."""
    rows = db.execute("select name, sha256 from adapters order by name").fetchall()
    path = _database_file(db)
    if not rows or path is None:
        return
    from ..formats.training import training_of_origin
    from .blobs import BlobStore

    store = BlobStore(path.parent / "blobs", path.parent / "tmp")
    by_sha: dict[str, dict[str, str]] = {}
    out = []
    for name, sha in rows:
        if sha not in by_sha:
            by_sha[sha] = training_of_origin(_blob_origin(store, sha))
        out += [{"adapter": name, "key": k, "value": v} for k, v in by_sha[sha].items()]
    db["training"].insert_all(out, batch_size=500)


def _database_file(db: sqlite_utils.Database) -> Path | None:
    for _seq, name, file in db.execute("PRAGMA database_list").fetchall():
        if name == "main" and file:
            return Path(file)
    return None


def _blob_origin(store: Any, sha: Any) -> dict:
    from ..errors import LoratoolError
    from ..tensors.header import read_header

    try:
        origin = json.loads(read_header(store.path(sha)).metadata.get("loratool.origin", "{}"))
    except (LoratoolError, OSError, ValueError, sqlite3.Error):
        return {}
    return origin if isinstance(origin, dict) else {}


KNOWN_MIGRATIONS = tuple(m.name for m in MIGRATIONS._migrations)
SCHEMA_VERSION = len(KNOWN_MIGRATIONS)
USER_TABLES = ("adapters", "modules", "tags", "meta", "remotes", "training")
