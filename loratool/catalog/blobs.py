"""The content-addressed blob store: one canonical safetensors file per distinct adapter.

Layout under the home::

    blobs/<sha[:2]>/<sha256>.safetensors   immutable, named by the sha256 of their bytes
    tmp/blob-<pid>-<token>.tmp              a blob being written
    tmp/op-<pid>-<token>.lock               a write operation in progress (add, remove, …)

A blob is written to ``tmp/``, fsynced and renamed into place, so a blob path only ever holds
complete bytes. Every file in ``tmp/`` is held under an exclusive ``flock`` by the process that
created it for as long as it keeps it open; the kernel drops the lock when that process closes
it or dies, SIGKILL included. A file gets its final name only once it is locked (it is created
as ``.new-<pid>-<token>``, locked, then renamed: a lock belongs to the file, not its name), so
a ``blob-``/``op-`` file that nobody holds is *stale* — safe to delete, and a sign that recovery
is due — at once, whether its process died or gave it up alive (an operation that failed and
could not undo its work). Anything else in ``tmp/`` is stale only when unlocked **and** older
than :data:`STALE_AGE`. Without ``fcntl`` (Windows) a file is stale when its pid is gone and
it is older than :data:`STALE_AGE`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import CatalogError
from ..fsutil import fsync_dir, hang_for_tests, pid_alive

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

BLOB_SUFFIX = ".safetensors"
STALE_AGE = 60.0  # seconds; a temp file nobody holds and this old belongs to a dead writer
_SHA = re.compile(r"^[0-9a-f]{64}$")
_TMP_NAME = re.compile(r"^(?:blob|op)-(?P<pid>\d+)-[0-9a-f]+\.(?:tmp|lock)$")
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process: a zombie (dead, not yet reaped by its parent) is
    not, it holds no lock and will write nothing more."""
    if not pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return True  # no /proc (macOS) or not ours to read: trust kill(0)
    # "pid (comm) S ...": the state follows the last ')' (comm may hold anything)
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] != b"Z"


@contextlib.contextmanager
def _locked_new_file(path: Path) -> Iterator[int]:
    """Create ``path`` holding an exclusive flock on it while the block runs.

    The file is created under a name no reader treats as ours, locked, and only then renamed
    to ``path``: a file under its final name is never seen unlocked while its writer lives."""
    hidden = path.with_name(f".new-{os.getpid()}-{secrets.token_hex(8)}")
    fd = os.open(hidden, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            os.rename(hidden, path)  # the random token keeps names unique
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(hidden)
            raise
        yield fd
    finally:
        os.close(fd)  # closing drops the lock


@dataclass
class Operation:
    """A write operation in progress (see :meth:`BlobStore.operation`)."""

    marker: Path
    undone: bool = False


class BlobStore:
    """Blobs under ``root``, temporary files under ``tmp``. Writers must hold the catalog's
    write lock (see ``Catalog``) around :meth:`put` and :meth:`delete` so that the check "is
    this blob referenced?" and the deletion cannot interleave with another process's add."""

    def __init__(self, root: Path, tmp: Path) -> None:
        self.root = Path(root)
        self.tmp = Path(tmp)

    # -- paths --------------------------------------------------------------------------
    def path(self, sha: str) -> Path:
        if not _SHA.match(sha or ""):
            raise CatalogError(f"not a sha256: {sha!r}")
        return self.root / sha[:2] / (sha + BLOB_SUFFIX)

    def exists(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def iter_files(self) -> Iterator[tuple[str | None, Path]]:
        """Every file under the blob root: (sha, path), sha None for a name that is not a blob."""
        if not self.root.is_dir():
            return
        for sub in sorted(self.root.iterdir()):
            if not sub.is_dir():
                yield None, sub
                continue
            for f in sorted(sub.iterdir()):
                stem = f.name.removesuffix(BLOB_SUFFIX)
                ok = f.name.endswith(BLOB_SUFFIX) and _SHA.match(stem) and stem[:2] == sub.name
                yield (stem if ok and f.is_file() else None), f

    def shas(self) -> set[str]:
        return {sha for sha, _ in self.iter_files() if sha}

    # -- writing ------------------------------------------------------------------------
    def put(self, data: bytes) -> tuple[str, bool]:
        """Store ``data``; returns (sha256, whether a file was written). An existing blob whose
        bytes no longer match its name (a corrupt copy) is replaced by the good bytes."""
        sha = hashlib.sha256(data).hexdigest()
        final = self.path(sha)
        if final.is_file():
            try:
                if final.stat().st_size == len(data) and sha256_file(final) == sha:
                    return sha, False
            except OSError:
                pass
        final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"blob-{os.getpid()}-{secrets.token_hex(8)}.tmp"
        try:
            with _locked_new_file(tmp) as fd:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
                hang_for_tests("blob-temp-written")
                os.replace(tmp, final)
            fsync_dir(final.parent)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if isinstance(exc, OSError) and not exc.filename:
                exc.filename = str(final)  # os.write names no file: "File too large" of what?
            raise
        return sha, True

    def delete(self, sha: str) -> bool:
        p = self.path(sha)
        try:
            p.unlink()
        except FileNotFoundError:
            return False
        with contextlib.suppress(OSError):
            p.parent.rmdir()  # only when empty
        return True

    # -- reading ------------------------------------------------------------------------
    def read_verified(self, sha: str, *, label: str | None = None) -> bytes:
        """The blob's bytes, after checking they still hash to ``sha``."""
        p = self.path(sha)
        try:
            data = p.read_bytes()
        except FileNotFoundError as exc:
            raise CatalogError(
                f"blob of adapter {label!r} is missing", file=p, hint="run `loratool verify`"
            ) from exc
        got = hashlib.sha256(data).hexdigest()
        if got != sha:
            raise CatalogError(
                f"blob of adapter {label!r} is corrupt: its sha256 is {got[:12]}…, expected {sha[:12]}…",
                file=p,
                hint="run `loratool verify`; re-add the adapter to repair it",
            )
        return data

    # -- temporary files ----------------------------------------------------------------
    @contextlib.contextmanager
    def operation(self) -> Iterator[Operation]:
        """Mark a write operation in progress: a locked file in tmp/ that tells the next
        process to run recovery if this one does not finish.

        The marker is removed when the block completes, and when it fails only if the caller
        says it has undone its own work (``op.undone = True``): an interrupted or failed
        operation (Ctrl-C, a full disk at COMMIT) leaves it for recovery, exactly as a death
        (SIGKILL, power loss) does."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        marker = self.tmp / f"op-{os.getpid()}-{secrets.token_hex(8)}.lock"
        op = Operation(marker)
        with _locked_new_file(marker):
            try:
                yield op
            except BaseException:
                if op.undone:
                    with contextlib.suppress(OSError):
                        marker.unlink()
                raise
            with contextlib.suppress(OSError):
                marker.unlink()

    def temp_files(self) -> list[Path]:
        if not self.tmp.is_dir():
            return []
        return sorted(p for p in self.tmp.iterdir())

    def is_stale(self, path: Path, *, now: float | None = None) -> bool:
        """True when no live process holds ``path`` (see the module docstring)."""
        now = time.time() if now is None else now
        m = _TMP_NAME.match(path.name)
        try:
            age = now - path.lstat().st_mtime
        except FileNotFoundError:
            return False
        if fcntl is None:
            return m is not None and not _running(int(m.group("pid"))) and age > STALE_AGE
        if m is None and age <= STALE_AGE:
            return False  # not ours by name, or one being created this instant
        if not path.is_file() or path.is_symlink():
            return True
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a live process holds it
        finally:
            os.close(fd)
        return True

    def stale_temp_files(self) -> list[Path]:
        now = time.time()
        return [p for p in self.temp_files() if self.is_stale(p, now=now)]

    def remove_temp(self, path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            import shutil

            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
