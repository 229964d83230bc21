"""The catalog: one row per adapter in ``<home>/catalog.db`` beside the blob store.

Storage is a ``sqlite_utils.Database`` migrated on open by numbered migrations
(:data:`MIGRATIONS`, recorded in ``_sqlite_migrations``); ``PRAGMA user_version`` mirrors the
newest one so that an up-to-date catalog opens with one read. An older catalog is upgraded in
place, in one transaction; a catalog written by a newer loratool is refused.

Concurrency, and crashes at any moment:

- WAL mode, so readers never wait for writers, and a busy timeout, so writers queue.
- Every change is one ``BEGIN IMMEDIATE`` transaction: it takes SQLite's write lock *before*
  reading, so two writers never both read and then fail to upgrade their lock (the case a busy
  timeout cannot help with, which surfaces as "database is locked").
- ``add`` writes its blob (temp file, fsync, rename) *inside* that transaction, before the row:
  a committed row always has its blob. A crash between the rename and the commit leaves a blob
  without a row; garbage collection removes those, and it also runs under the write lock, so it
  never sees another process's add half-done.
- Blobs are deleted only in a transaction of their own *after* the rows that referenced them are
  committed gone, so a rollback can never resurrect a row whose blob was already deleted.
- Each write operation holds a locked marker file in ``tmp/``; a marker left by a dead process
  makes the next command that opens the catalog run :meth:`Catalog.recover`.

Nothing here imports torch at import time: ``list``, ``show`` and ``verify`` never need it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CatalogError, NotFoundError, ValidationError
from .blobs import BlobStore, hang_for_tests
from .migrations import (  # noqa: F401  (re-exported: catalog.db was their home)
    KNOWN_MIGRATIONS,
    MIGRATIONS,
    SCHEMA_VERSION,
    USER_TABLES,
    sqlite_utils,
)
from .records import (  # noqa: F401  (re-exported: catalog.db was their home)
    AdapterRecord,
    ModuleRecord,
    _natural_key,
    _nonempty,
    _now,
    _num,
    default_home,
    default_name,
    record_from_adapter,
    validate_name,
)
from .search import conditions
from .sqlerrors import (
    cannot_write,
    catalog_error,
    cause,
    error_name,
    oserror_cause,
)
from .verify import (
    BAD_ADAPTER_ROW_SHAPE,
    Problem,
    VerifyReport,
    adapter_row_problems,
    bad_hash_text,
    module_row_problems,
)

if TYPE_CHECKING:
    from ..adapter import Adapter
    from ..tensors.digest import WeightsIdentity


DB_NAME = "catalog.db"
BUSY_TIMEOUT = 60.0  # seconds a writer waits for another one before giving up


# -- the catalog ------------------------------------------------------------------------
def _translated(doing: str):
    """Turn SQLite's errors in a public method into one CatalogError naming the database and
    the cause (a damaged page, a full disk, a busy lock): never a traceback."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(self, *args, **kwargs):
            try:
                return fn(self, *args, **kwargs)
            except sqlite3.Error as exc:
                raise catalog_error(exc, self.db_path, doing) from exc

        return inner

    return wrap


class Catalog:
    """The adapters in one home: rows in ``catalog.db``, tensors in the blob store.

    ::

        cat = Catalog()                                   # $LORATOOL_HOME or ~/.loratool
        cat.add("runs/summarize-lora", task="summarize", tags=["v1"])
        for row in cat.list(task="summarize"): ...
        adapter = cat.load("summarize-lora")              # blob re-hashed before use
        cat.export("summarize-lora", "out/peft-dir", "peft")
        report = cat.verify()
    """

    def __init__(
        self,
        home: str | os.PathLike | None = None,
        *,
        timeout: float = BUSY_TIMEOUT,
        recover: bool = True,
        read_only_ok: bool = False,
    ) -> None:
        """Open (creating it on first use) the catalog in ``home``.

        ``recover``: first undo what processes that died mid-write left (best effort: on a
        home where nothing can be written it is left for later and said in
        :attr:`recovery_error`). ``read_only_ok``: the caller only reads, so when the home
        cannot be written (read-only file system, full disk, no permission) the database is
        opened read-only instead of failing; :attr:`read_only` then says why, and every write
        is refused with that reason.
        """
        self.home = Path(home).expanduser() if home else default_home()
        self.timeout = float(timeout)
        self.db_path = self.home / DB_NAME
        self.blobs = BlobStore(self.home / "blobs", self.home / "tmp")
        self.read_only: str | None = None  # why this catalog was opened read-only
        self.recovery_error: str | None = None  # why pending recovery could not run
        self.notes: list[str] = []  # things a reader should be told (the CLI warns)
        try:
            self.home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CatalogError(
                f"cannot create the catalog home: {oserror_cause(exc)}", file=self.home
            ) from exc
        try:
            self._connect()
        except sqlite3.Error as exc:
            if not (read_only_ok and cannot_write(exc) and self.db_path.is_file()):
                raise catalog_error(exc, self.db_path, "cannot open the catalog") from exc
            self._connect_read_only(cause(exc, self.db_path))
        if recover:
            self._recover_if_needed()

    def _connect(self) -> None:
        conn = sqlite3.connect(str(self.db_path), timeout=self.timeout)
        # No plugins: they would import entry points on every start.
        self.db = sqlite_utils.Database(conn, execute_plugins=False)
        try:
            self._open()
        except BaseException:
            conn.close()
            raise

    def _connect_read_only(self, why: str) -> None:
        """Open catalog.db without writing anything: ``mode=ro`` reads a WAL database whose
        -wal/-shm files exist; ``immutable`` reads the main file alone when even they cannot be
        made (read-only directory, full disk), which misses changes still in a -wal file."""
        from urllib.parse import quote

        uri = "file:" + quote(str(self.db_path.absolute()))
        last: sqlite3.Error | None = None
        for params in ("mode=ro", "mode=ro&immutable=1"):
            try:
                conn = sqlite3.connect(f"{uri}?{params}", uri=True, timeout=self.timeout)
            except sqlite3.Error as exc:
                last = exc
                continue
            try:
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                conn.execute("select count(*) from sqlite_master").fetchone()
            except sqlite3.Error as exc:
                conn.close()
                last = exc
                continue
            break
        else:
            assert last is not None
            raise catalog_error(last, self.db_path, "cannot open the catalog even read-only")
        self.db = sqlite_utils.Database(conn, execute_plugins=False)
        self.read_only = why
        if version > SCHEMA_VERSION:
            self.close()
            self._refuse_newer(version, [])
        if version < SCHEMA_VERSION:
            self.close()
            raise CatalogError(
                f"has schema {version} and needs an upgrade to {SCHEMA_VERSION}, which cannot be "
                f"written: {why}",
                file=self.db_path,
                hint="run any loratool command once where the home is writable",
            )
        wal = self.db_path.with_name(DB_NAME + "-wal")
        if "immutable" in params and wal.is_file() and wal.stat().st_size > 0:
            self.notes.append(
                f"{self.db_path}: read without its write-ahead log ({why}): changes still in "
                f"{wal.name} are not shown"
            )

    # -- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _user_version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def _open(self) -> None:
        # Nothing is written when there is nothing to do: a catalog already in WAL mode and
        # at the current schema is only read, so readers work where writing is impossible.
        if self.db.journal_mode != "wal":
            self.db.enable_wal()
        version = self._user_version()
        if version > SCHEMA_VERSION:
            self._refuse_newer(version, [])
        if version < SCHEMA_VERSION:
            with self._write():
                self._migrate_locked()

    def _refuse_newer(self, version: int, unknown: Sequence[str]) -> None:
        what = f"migrations {', '.join(unknown)}" if unknown else f"schema version {version}"
        raise CatalogError(
            f"was written by a newer loratool ({what}); this one knows schema {SCHEMA_VERSION} "
            f"({KNOWN_MIGRATIONS[-1]}) and will not touch it",
            file=self.db_path,
            hint="upgrade loratool",
        )

    def _migrate_locked(self) -> None:
        # Re-read under the write lock: another process may have migrated meanwhile.
        version = self._user_version()
        applied = [m.name for m in MIGRATIONS.applied(self.db)]
        unknown = [n for n in applied if n not in KNOWN_MIGRATIONS]
        if unknown or version > SCHEMA_VERSION:
            self._refuse_newer(version, unknown)
        if version == SCHEMA_VERSION and len(applied) == SCHEMA_VERSION:
            return
        # Each migration runs in a savepoint with its record; the whole upgrade is one
        # transaction, so an interrupted upgrade leaves the catalog as it was.
        MIGRATIONS.apply(self.db)
        self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite_utils.Database]:
        """One write transaction holding the write lock from its first statement.

        SQLite's failures (busy, full disk, read-only, damaged file) come out as one
        CatalogError naming the database and the cause; the transaction is rolled back."""
        if self.read_only:
            raise CatalogError(
                f"cannot be changed: opened read-only because {self.read_only}",
                file=self.db_path,
                hint="free space or make the catalog home writable (--home / LORATOOL_HOME)",
            )
        conn = self.db.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if error_name(exc).startswith("SQLITE_BUSY"):
                raise CatalogError(
                    f"is busy: another process held its write lock for more than {self.timeout:.0f} s ({exc})",
                    file=self.db_path,
                ) from exc
            raise catalog_error(exc, self.db_path, "cannot write to the catalog") from exc
        try:
            yield self.db
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise catalog_error(exc, self.db_path, "cannot write to the catalog") from exc
            raise

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """SQLite's write lock without a change to commit (garbage collection deletes files,
        never rows): rolled back, so it works even where a COMMIT cannot be written."""
        if self.read_only:
            raise CatalogError(
                f"cannot be changed: opened read-only because {self.read_only}",
                file=self.db_path,
            )
        conn = self.db.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise catalog_error(exc, self.db_path, "cannot lock the catalog") from exc
        try:
            yield
        finally:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[None]:
        """A consistent view for verify, rolled back after (it writes nothing): under the write
        lock, so that no add or remove is half-way (an add holds it from writing its blob until
        its row is committed); where the lock cannot be had (read-only), a read transaction."""
        conn = self.db.conn
        try:
            conn.execute("BEGIN" if self.read_only else "BEGIN IMMEDIATE")
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("BEGIN")
        try:
            yield
        finally:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")

    @contextlib.contextmanager
    def _operation(self) -> Iterator[None]:
        """A write operation (add, remove): marked by a locked file in tmp/ for its duration.

        If it fails or is interrupted (Ctrl-C, a full disk at COMMIT), this process undoes its
        own half-done work before leaving: a blob written but never committed, a blob whose
        rows were deleted but not yet collected. Only when that undo fails too (or the process
        dies: SIGKILL, power loss) does the marker stay, and the next command to open the
        catalog runs :meth:`recover`."""
        with self.blobs.operation() as op:
            try:
                yield
            except BaseException:
                try:
                    with self._locked():
                        self._gc_locked()
                except BaseException:
                    pass  # the marker stays: the next command recovers
                else:
                    op.undone = True
                raise

    # -- recovery and garbage collection ------------------------------------------------
    def _recover_if_needed(self) -> None:
        try:
            stale = self.blobs.stale_temp_files()
        except OSError:
            stale = []
        if not stale:
            return
        try:
            self.recover()
        except (OSError, CatalogError, sqlite3.Error) as exc:
            # Best effort where nothing can be written: say so, and let the next writer recover.
            why = self.read_only or (
                oserror_cause(exc)
                if isinstance(exc, OSError)
                else getattr(exc, "message", None) or str(exc)
            )
            self.recovery_error = (
                f"a process died in the middle of a change ({len(stale)} file(s) left in "
                f"{self.blobs.tmp}) and recovery could not run: {why}"
            )
            self.notes.append(self.recovery_error)

    @_translated("cannot recover the catalog")
    def recover(self) -> dict[str, list[str]]:
        """Undo what dead processes left: stale temp files and blobs no row refers to.

        Runs under the write lock, so no live add is half-way (it holds the lock from writing
        its blob until its row is committed). Returns what was removed."""
        stale = self.blobs.stale_temp_files()
        with self._locked():
            removed = self._gc_locked()
        # Markers go last: if this process dies first, the next one recovers again.
        for p in stale:
            self.blobs.remove_temp(p)
        return {"blobs": removed, "temp_files": [str(p) for p in stale]}

    def _referenced(self) -> set[str]:
        return {r[0] for r in self.db.execute("select distinct sha256 from adapters")}

    def _gc_locked(self) -> list[str]:
        referenced = self._referenced()
        removed = []
        for sha, _path in list(self.blobs.iter_files()):
            if sha is not None and sha not in referenced:
                self.blobs.delete(sha)
                removed.append(sha)
        return removed

    # -- reading ------------------------------------------------------------------------
    @_translated("cannot read the catalog")
    def exists(self, name: str) -> bool:
        return (
            self.db.execute("select 1 from adapters where name = ?", [name]).fetchone() is not None
        )

    @_translated("cannot read the catalog")
    def count(self) -> int:
        return int(self.db.execute("select count(*) from adapters").fetchone()[0])

    def _row(self, name: str) -> dict[str, Any]:
        row = next(self.db.query("select * from adapters where name = ?", [name]), None)
        if row is None:
            raise NotFoundError(
                f"no adapter named {name!r} in the catalog at {self.home}",
                hint="`loratool list` shows them",
            )
        return row

    def _clean_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """A row as the library returns it, after checking that it is sound (a tampered or
        damaged row is one CatalogError naming the adapter and the column)."""
        problems = adapter_row_problems(row)
        if problems:
            self._damaged(row.get("name"), problems)
        row["alpha"] = _num(row["alpha"])
        row["rslora"] = bool(row.get("rslora"))
        return row

    def _damaged(self, name: object, problems: list[str]) -> None:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CatalogError(
            f"the catalog row of adapter {name!r} is damaged: {problems[0]}{more}",
            file=self.db_path,
            hint="`loratool verify` lists every problem; remove the adapter and add it again",
        )

    @_translated("cannot read the catalog")
    def get(self, name: str) -> dict[str, Any]:
        """The adapter's row, with ``tags`` (a sorted list), ``meta`` and ``training`` (dicts)."""
        row = self._clean_row(self._row(name))
        row["tags"] = [
            r[0]
            for r in self.db.execute("select tag from tags where adapter = ? order by tag", [name])
        ]
        for table in ("meta", "training"):
            pairs = self.db.execute(
                f"select key, value from {table} where adapter = ? order by key", [name]
            ).fetchall()
            bad = [f"{table} {k!r} = {v!r} is not text" for k, v in pairs if not isinstance(v, str)]
            if bad:
                self._damaged(name, bad)
            row[table] = dict(pairs)
        return row

    @_translated("cannot read the catalog")
    def list(
        self,
        *,
        task: str | None = None,
        base_model: str | None = None,
        tag: str | Iterable[str] | None = None,
        trained: Iterable[tuple[str, str | None]] = (),
        meta: Iterable[tuple[str, str | None]] = (),
        trigger: str | None = None,
        hash_prefix: str | None = None,
    ) -> list[dict[str, Any]]:
        """Rows sorted by task then name, each with its ``tags``. ``task``, ``base_model`` and
        ``tag`` are exact matches (several tags: all of them); ``trained`` / ``meta``: (key,
        value) pairs a training fact / key-value must match (value None: the key is there; a
        glob with ``*``/``?``; any case); ``trigger``: a word in the trigger words;
        ``hash_prefix``: the start of the blob's, the source file's or its tensor bytes'
        sha256 (see ``catalog.search``). Every filter given must hold."""
        where, params = conditions(
            trained=trained, meta=meta, trigger=trigger, hash_prefix=hash_prefix
        )
        if task is not None:
            where.append("a.task = ?")
            params.append(task)
        if base_model is not None:
            where.append("a.base_model = ?")
            params.append(base_model)
        tags = [tag] if isinstance(tag, str) else list(tag or ())
        for t in tags:
            where.append("exists (select 1 from tags t where t.adapter = a.name and t.tag = ?)")
            params.append(t)
        # Every row listed is checked, by SQLite (BAD_ADAPTER_ROW_SHAPE) and for the hex text
        # of its hashes by Python (bad_hash_text): see catalog/verify.py. Rows a filter leaves
        # out are not read, so not checked (verify checks them all).
        sql = (
            f"select a.*, ({BAD_ADAPTER_ROW_SHAPE}) as bad_row, (select group_concat(tag, char(31)) "
            "from (select tag from tags t where t.adapter = a.name order by tag)) as tag_list "
            "from adapters a"
        )
        if where:
            sql += " where " + " and ".join(where)
        sql += " order by a.task, a.name"
        out = []
        for row in self.db.query(sql, params):
            if row.pop("bad_row") or bad_hash_text(row):
                row.pop("tag_list")
                problems = adapter_row_problems(row) or ["a column is malformed"]
                self._damaged(row.get("name"), problems)
            tl = row.pop("tag_list")
            row["tags"] = tl.split("\x1f") if tl else []
            row["alpha"] = _num(row["alpha"])
            row["rslora"] = bool(row["rslora"])
            out.append(row)
        return out

    @_translated("cannot read the catalog")
    def modules(self, name: str) -> list[dict[str, Any]]:
        self._row(name)
        out = []
        for m in self.db.query("select * from modules where adapter = ? order by position", [name]):
            problems = module_row_problems(m)
            if problems:
                self._damaged(name, problems)
            for k in ("a_shape", "b_shape", "base_shape"):
                m[k] = json.loads(m[k])
            m["alpha"] = _num(m["alpha"])
            m.pop("adapter")
            m.pop("position")
            out.append(m)
        return out

    @_translated("cannot read the catalog")
    def remotes(self, name: str) -> list[dict[str, Any]]:
        return [
            {k: v for k, v in r.items() if k != "adapter"}
            for r in self.db.query(
                "select * from remotes where adapter = ? order by pushed_at, repo", [name]
            )
        ]

    def _twins(
        self, tensor_sha256: str | None, scales: list[tuple], file_sha256: str | None = None
    ) -> tuple[list[str], list[str]]:
        """The adapters added from a file with these tensor bytes: (the same weights: their
        modules have the same ranks and scales too; the same tensors whose config gives other
        scales, e.g. a PEFT directory whose lora_alpha was edited). Those added from the very
        file ``file_sha256`` come first, then the oldest."""
        if not tensor_sha256:
            return [], []
        names = [
            r[0]
            for r in self.db.execute(
                "select name from adapters where tensor_sha256 = ? "
                "order by file_sha256 is not ?, created, name",
                [tensor_sha256, file_sha256],
            )
        ]
        same, other = [], []
        for n in names:
            (same if self._scales(n) == scales else other).append(n)
        return same, other

    def _scales(self, name: str) -> list[tuple]:
        return sorted(
            (str(n), str(k), int(r), float(a), float(s))
            for n, k, r, a, s in self.db.execute(
                "select name, kind, rank, alpha, scale from modules where adapter = ?", [name]
            )
        )

    @_translated("cannot read the catalog")
    def same_weights(self, name: str) -> dict[str, list[str]]:
        """The other adapters added from files with the same tensor bytes as ``name``'s
        (``tensor_sha256``, which a metadata edit leaves as it is): ``same_weights`` (the same
        adapter, whatever its metadata says) and ``same_tensors`` (the same tensors, other
        scales: its config says another alpha)."""
        row = self._row(name)
        same, other = self._twins(row.get("tensor_sha256"), self._scales(name))
        return {"same_weights": [n for n in same if n != name], "same_tensors": other}

    @_translated("cannot read the catalog")
    def info(self, name: str) -> dict[str, Any]:
        """Everything about one adapter: the row, tags, meta, training facts, modules, remotes
        and the other adapters with the same weights."""
        row = self.get(name)
        row.update(self.same_weights(name))
        row["modules_detail"] = self.modules(name)
        row["remotes"] = self.remotes(name)
        return row

    @_translated("cannot read the catalog")
    def blob_path(self, name: str) -> Path:
        return self.blobs.path(self._row(name)["sha256"])

    @_translated("cannot read the catalog")
    def load(self, name: str, *, lazy: bool = False) -> Adapter:
        """The adapter, from its blob, which is re-hashed first: a corrupt blob is refused.

        ``lazy``: HeaderTensor factors over the (immutable) blob file, as ``load_adapter``.
        """
        row = self.get(name)
        data = self.blobs.read_verified(row["sha256"], label=name)
        path = self.blobs.path(row["sha256"])
        if lazy:
            from ..formats.canonical import canonical_from_tensors
            from ..tensors.io import load_file

            tensors, metadata = load_file(path, lazy=True)
            adapter = canonical_from_tensors(tensors, metadata, source=path)
        else:
            adapter = adapter_from_blob(data, source=path)
        m = adapter.meta
        m.name, m.task, m.base_model = name, row["task"], row["base_model"]
        m.tags, m.description, m.source = list(row["tags"]), row["description"], row["source"]
        m.format, m.extra = row["format"], dict(row["meta"])
        return adapter

    # -- writing ------------------------------------------------------------------------
    @_translated("cannot add to the catalog")
    def add(
        self,
        source: str | os.PathLike,
        *,
        task: str,
        name: str | None = None,
        base_model: str | None = None,
        tags: Iterable[str] = (),
        meta: dict[str, str] | None = None,
        description: str | None = None,
        replace: bool = False,
        keep_both: bool = False,
    ) -> dict[str, Any]:
        """Validate and import the adapter at ``source`` (PEFT dir, .safetensors file, any
        readable format), with the training facts the file carries and its hashes.

        The base model defaults to the one the adapter's config names. The same weights as an
        adapter already here (the same tensor bytes and scales; only the metadata may differ)
        are refused, naming it: ``replace`` then updates that adapter (under its name, unless
        ``name`` is given), ``keep_both`` adds this one beside it. Returns the new row, with
        ``same_weights`` / ``same_tensors`` (see :meth:`same_weights`)."""
        src = Path(source)
        named = name is not None
        name = validate_name(name) if named else default_name(src)
        _nonempty("task", task)
        if named and not replace and self.exists(name):
            self._taken(name)  # fail before the slow load; checked again under the lock
        from ..formats import load_adapter, weights_identity

        adapter = load_adapter(src)
        return self.add_adapter(
            adapter,
            name=name,
            task=task,
            base_model=base_model or adapter.meta.base_model,
            tags=tags,
            meta=meta,
            description=description,
            source=str(src.resolve()),
            replace=replace,
            identity=weights_identity(src),
            keep_both=keep_both,
            name_given=named,
        )

    @_translated("cannot add to the catalog")
    def add_adapter(
        self,
        adapter: Adapter,
        *,
        name: str,
        task: str,
        base_model: str | None = None,
        tags: Iterable[str] = (),
        meta: dict[str, str] | None = None,
        description: str | None = None,
        source: str | None = None,
        replace: bool = False,
        identity: WeightsIdentity | None = None,
        training: dict[str, str] | None = None,
        keep_both: bool = False,
        name_given: bool = True,
    ) -> dict[str, Any]:
        """Import an in-memory adapter (resize/extract/combine ``--as``, pull).

        ``identity``: the file it was read from and its hashes (``formats.weights_identity``),
        for the same-weights check of :meth:`add` (``name_given`` False: ``name`` is only a
        default, and the same weights keep the name they have). ``training``: its training
        facts, by default what ``formats.training.training_of`` reads from its origin."""
        from ..formats.canonical import canonical_bytes
        from ..formats.training import training_of

        validate_name(name)
        adapter.check_finite(source)
        data = canonical_bytes(adapter)
        record = record_from_adapter(
            adapter,
            name=name,
            task=task,
            sha256=hashlib.sha256(data).hexdigest(),
            base_model=base_model,
            tags=list(tags),
            meta=dict(meta or {}),
            description=description,
            source=source,
            training=training_of(adapter) if training is None else dict(training),
            file_sha256=identity.file_sha256 if identity else None,
            tensor_sha256=identity.tensor_sha256 if identity else None,
        )
        record.validate()
        label = source or (identity.path if identity else None)
        with self._operation():
            with self._write():
                self._check_twins(record, label, replace, keep_both, name_given)
                self._check_free(record.name, replace)
                self.blobs.put(data)
                hang_for_tests("blob-stored")
                self._insert_locked([record], replace=replace)
            hang_for_tests("row-committed")
            self._collect_garbage()
        row = self.get(record.name)
        row.update(self.same_weights(record.name))
        return row

    def _check_twins(
        self, record: AdapterRecord, label: object, replace: bool, keep_both: bool, named: bool
    ) -> None:
        """Refuse to add the same weights twice (under the write lock, so two adds of one file
        at once cannot both pass). A default name gives way to the name the weights have."""
        scales = sorted(
            (m.name, m.kind, int(m.rank), float(m.alpha), float(m.scale)) for m in record.modules
        )
        same, _other = self._twins(record.tensor_sha256, scales, record.file_sha256)
        if not same or keep_both:
            return
        if record.name in same:
            if replace:
                return  # an update of the adapter these weights already are
            twin, hint = self._row(record.name), "pass --replace to update it from this file"
            lead = f"the name {record.name!r} is taken, by the same weights"
        elif not named and replace:
            record.name = same[0]  # a default name gives way: update it from this file
            return
        else:
            twin = self._row(same[0])
            hint = (
                f"pass --replace to update {twin['name']} from this file, or --name NEW "
                "--keep-both to keep both"
                if not named
                else f"pass --name {twin['name']} --replace to update it from this file, or "
                f"--keep-both to add {record.name} as well"
            )
            lead = f"same weights as {twin['name']}"
        others = [n for n in same if n != twin["name"]]
        more = f" (and {len(others)} more)" if others else ""
        what = (
            "the same file"
            if twin.get("file_sha256") == record.file_sha256
            else "only the metadata differs"
        )
        raise CatalogError(
            f"{lead}{more} (tensor sha256 {record.tensor_sha256[:12]}…, "
            f"added {twin['created']}): {what}",
            file=label,
            hint=hint,
        )

    @_translated("cannot add to the catalog")
    def insert_records(self, records: Iterable[AdapterRecord], *, replace: bool = False) -> int:
        """Insert ready-made records whose blobs are already stored, in one transaction
        (importers, benchmarks). Returns how many."""
        recs = list(records)
        for r in recs:
            r.validate()
        names = [r.name for r in recs]
        if len(set(names)) != len(names):
            raise ValidationError("the same name twice in one insert")
        with self._operation():
            with self._write():
                for sha in {r.sha256 for r in recs}:
                    if not self.blobs.exists(sha):
                        raise CatalogError(f"no blob {sha} in the store", file=self.blobs.root)
                for r in recs:
                    self._check_free(r.name, replace)
                self._insert_locked(recs, replace=replace)
            if replace:
                self._collect_garbage()
        return len(recs)

    @_translated("cannot remove from the catalog")
    def remove(self, name: str) -> dict[str, Any]:
        """Forget an adapter; its blob goes when no other row refers to it. Returns the row."""
        with self._operation():
            with self._write():
                row = self.get(name)
                self._delete_locked(name)
            hang_for_tests("row-deleted")
            self._collect_garbage()
        return row

    @_translated("cannot write to the catalog")
    def add_remote(
        self,
        name: str,
        *,
        repo: str,
        revision: str = "main",
        commit: str | None = None,
        pushed_at: str | None = None,
    ) -> None:
        """Record that ``name`` was pushed to ``repo@revision`` (one row per repo and revision)."""
        with self._write():
            self._row(name)
            self.db["remotes"].insert(
                {
                    "adapter": name,
                    "repo": repo,
                    "revision": revision,
                    "commit": commit,
                    "pushed_at": pushed_at or _now(),
                },
                replace=True,
            )

    @_translated("cannot read the catalog")
    def export(
        self,
        name: str,
        dest: str | os.PathLike,
        fmt: str = "peft",
        *,
        force: bool = False,
        base: str | os.PathLike | None = None,
        component: str | None = None,
        rule=None,
    ):
        """Write the adapter out in any writable format (``formats.registry``); returns the
        conversion report (its ``warnings`` name whatever the format approximated).

        ``dest`` may not be, contain or lie inside the home or ``base`` (``force`` or not)."""
        from ..formats import WRITE_FORMATS
        from ..formats.convert import convert
        from ..fsutil import check_destination

        check_destination(dest, inputs=[base], home=self.home, force=force)

        if fmt not in WRITE_FORMATS:
            raise ValidationError(
                f"unknown format {fmt!r}; choose one of {', '.join(WRITE_FORMATS)}"
            )
        adapter = self.load(name)
        return convert(adapter, dest, fmt, base=base, component=component, force=force, rule=rule)

    def _taken(self, name: str) -> None:
        row = self._row(name)
        raise CatalogError(
            f"the name {name!r} is taken (task {row['task']}, added {row['created']})",
            hint="pass --replace to overwrite it, or --name to choose another",
        )

    def _check_free(self, name: str, replace: bool) -> None:
        if not replace and self.exists(name):
            self._taken(name)

    def _delete_locked(self, name: str) -> None:
        for table in ("modules", "tags", "meta", "remotes", "training"):
            self.db.execute(f"delete from {table} where adapter = ?", [name])
        self.db.execute("delete from adapters where name = ?", [name])

    def _insert_locked(self, records: Sequence[AdapterRecord], *, replace: bool) -> None:
        if replace:
            for r in records:
                self._delete_locked(r.name)
        db = self.db
        db["adapters"].insert_all((r.row() for r in records), batch_size=500)
        db["modules"].insert_all(
            (
                {
                    "adapter": r.name,
                    "name": m.name,
                    "position": i,
                    "kind": m.kind,
                    "a_shape": json.dumps(list(m.a_shape)),
                    "b_shape": json.dumps(list(m.b_shape)),
                    "base_shape": json.dumps(list(m.base_shape)),
                    "rank": m.rank,
                    "alpha": m.alpha,
                    "scale": m.scale,
                    "params": m.params,
                    "dense_params": m.dense_params,
                    "dtype": m.dtype,
                }
                for r in records
                for i, m in enumerate(r.modules)
            ),
            batch_size=500,
        )
        db["tags"].insert_all(
            ({"adapter": r.name, "tag": t} for r in records for t in r.tags), batch_size=500
        )
        for table in ("meta", "training"):
            db[table].insert_all(
                (
                    {"adapter": r.name, "key": k, "value": v}
                    for r in records
                    for k, v in sorted(getattr(r, table).items())
                ),
                batch_size=500,
            )

    def _collect_garbage(self) -> None:
        """Remove unreferenced blobs and stale temp files, in a transaction of its own."""
        stale = self.blobs.stale_temp_files()
        with self._locked():
            self._gc_locked()
        for p in stale:
            self.blobs.remove_temp(p)

    # -- verification -------------------------------------------------------------------
    @_translated("cannot read the catalog")
    def schema_problems(self) -> list[Problem]:
        """Differences between this database's schema and the one the migrations build."""
        from .verify import schema_problems

        return schema_problems(self)

    def verify(self) -> VerifyReport:
        """Every problem: damaged pages, schema drift, bad rows, corrupt/missing/orphan blobs,
        temp files of dead processes. Repairs nothing (opening the catalog recovers)."""
        from .verify import verify

        return verify(self)


def adapter_from_blob(data: bytes, *, source: object) -> Adapter:
    """Parse a canonical blob held in memory (already hash-checked)."""
    import struct

    from safetensors.torch import load

    from ..errors import FormatError
    from ..formats.canonical import canonical_from_tensors

    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        metadata = header.get("__metadata__") or {}
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise FormatError(f"blob is not valid safetensors: {exc}", file=source) from exc
    return canonical_from_tensors(dict(tensors), metadata, source=source)
