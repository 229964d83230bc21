"""SQLite's errors, said the way a user can act on them: the path and the cause.

SQLite's own words hide the cause: a full disk under a WAL database reads "disk I/O error"
(the shared-memory file cannot grow), a read-only directory reads "unable to open database
file". Both are really about the directory, so the message looks at it (read-only mount, no
free space, no write permission) and names what it found.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

from ..errors import CatalogError

# Error names (Python 3.11's ``sqlite_errorname``) that mean "this process cannot write here",
# as opposed to a damaged or busy database: a reader may still open the file read-only.
_CANNOT_WRITE = ("SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_IOERR", "SQLITE_FULL", "SQLITE_PERM")
_DAMAGED = ("SQLITE_CORRUPT", "SQLITE_NOTADB")
_BUSY = ("SQLITE_BUSY", "SQLITE_LOCKED")


def error_name(exc: BaseException) -> str:
    return getattr(exc, "sqlite_errorname", "") or ""


def cannot_write(exc: BaseException) -> bool:
    """Whether ``exc`` says that writing (or creating the WAL files) is impossible here."""
    return isinstance(exc, sqlite3.Error) and error_name(exc).startswith(_CANNOT_WRITE)


def is_damaged(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.DatabaseError) and (
        error_name(exc).startswith(_DAMAGED)
        or "malformed" in str(exc)
        or "not a database" in str(exc)
    )


def directory_problem(path: Path) -> str | None:
    """Why nothing can be written in ``path`` (a directory), or None when nothing is visibly
    wrong: a read-only file system, no free space, or no write permission."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return "the file system is read-only"
    if st.f_bavail == 0 or (st.f_favail == 0 and st.f_files > 0):
        return "no space left on the device"
    if not os.access(path, os.W_OK):
        return "no permission to write in the directory"
    return None


def file_size_limit() -> str | None:
    """The process's file size limit (``ulimit -f``), when there is one: SQLite reports
    hitting it as a full disk."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    except (ImportError, OSError, ValueError):
        return None
    if soft == resource.RLIM_INFINITY:
        return None
    return f"the file size limit (`ulimit -f`) of {soft} bytes was reached"


def oserror_cause(exc: OSError) -> str:
    """The cause of an OSError in words, with the ones that surprise people spelled out."""
    if exc.errno == errno.EFBIG:
        return "file too large (the file size limit, `ulimit -f`, was reached)"
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if exc.errno == errno.EROFS:
        return "the file system is read-only"
    return (exc.strerror or str(exc)).lower()


def cause(exc: sqlite3.Error, db_path: Path) -> str:
    """SQLite's message with the directory's problem, when there is one, in front of it."""
    said = str(exc) or error_name(exc) or type(exc).__name__
    if cannot_write(exc):
        found = directory_problem(db_path.parent) or file_size_limit()
        if found:
            return f"{found} ({said})"
    if is_damaged(exc):
        return f"the database file is damaged ({said})"
    return said


def catalog_error(exc: sqlite3.Error, db_path: Path, doing: str) -> CatalogError:
    """One CatalogError naming ``db_path``, what was being done and why it failed."""
    name = error_name(exc)
    if is_damaged(exc):
        hint = (
            "run `loratool verify` for the full list; restore catalog.db from a backup, "
            "or move it away and add the adapters again (their blobs are intact)"
        )
    elif name.startswith(_BUSY):
        hint = "another loratool process holds the catalog; retry when it is done"
    elif cannot_write(exc):
        hint = "free space or make the catalog home writable (--home / LORATOOL_HOME)"
    else:
        hint = None
    return CatalogError(f"{doing}: {cause(exc, db_path)}", file=db_path, hint=hint)
