"""Writing outputs so that a crash never leaves a half-written file under the final name.

Everything is written beside its destination under a hidden temporary name (same filesystem,
so the final rename is atomic), fsynced, and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputExistsError

TMP_MARK = ".loratool-tmp-"


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_prefix(dest: Path) -> str:
    return f"{TMP_MARK}{dest.name}."


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (another user's live process counts)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def clean_stale(dest: Path) -> list[Path]:
    """Remove temporaries left beside ``dest`` by processes that died (SIGKILL, power loss).

    Temporary names carry the writer's pid; a live writer's files are never touched.
    """
    removed = []
    prefix = _tmp_prefix(dest)
    try:
        entries = list(dest.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        if not p.name.startswith(prefix):
            continue
        try:
            pid = int(p.name[len(prefix) :].split(".")[0])
        except ValueError:
            continue
        if not pid_alive(pid):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
            removed.append(p)
    return removed


def check_output(dest: Path, force: bool) -> None:
    if dest.exists() and not force:
        raise OutputExistsError("already exists", file=dest, hint="pass --force to replace it")


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike, *, force: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` if the block succeeds."""
    dest = Path(dest)
    check_output(dest, force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dest)
    fd, tmp = tempfile.mkstemp(prefix=f"{_tmp_prefix(dest)}{os.getpid()}.", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, dest)
        fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``dest``; it becomes ``dest`` if the block succeeds.

    With ``force`` an existing ``dest`` is moved aside first and removed only after the new one
    is in place, so a crash leaves either the old or the new output, never a mix.
    """
    dest = Path(dest)
    check_output(dest, force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(dest)}{os.getpid()}.", dir=dest.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if dest.exists() or dest.is_symlink():
            old = dest.parent / f"{_tmp_prefix(dest)}{os.getpid()}.old"
            os.replace(dest, old)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
