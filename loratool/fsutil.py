"""Writing outputs so that a crash never leaves a half-written file under the final name, and
an output never takes the place of something it was not meant to replace.

Everything is written beside its destination under a hidden temporary name (same filesystem,
so the final rename is atomic), fsynced, and renamed into place only when complete.

"Exists" is decided at that final rename, not when the command starts: without ``force`` the
rename refuses to replace anything (``renameat2(RENAME_NOREPLACE)`` on Linux; a hard link for a
file, a claimed empty directory for a directory elsewhere), so a file or directory that appears
at the destination while the output is being written — another process's output included — is
never replaced. With ``force`` the new output is swapped in atomically
(``renameat2(RENAME_EXCHANGE)``) and the old one removed afterwards, so the destination always
holds either the old or the new output.

Temporaries carry their writer's pid in their name and are held under an exclusive ``flock``
while it lives; every write into a directory first removes the temporaries that dead writers
left there (see :func:`clean_stale`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import OutputExistsError, ValidationError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

TMP_MARK = ".loratool-tmp-"
# A temporary nobody holds locked and this old belongs to a dead writer even when its pid has
# been reused meanwhile (the lock is taken an instant after the temporary is created).
STALE_AGE = 60.0

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # opening a FIFO must not wait for a writer
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
# Errors that mean "this filesystem or kernel cannot do it", not "the destination exists".
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM}


def hang_for_tests(point: str) -> None:
    """Stop here forever when ``LORATOOL_TEST_HANG`` names this point: the interruption tests
    signal the process at a known moment instead of a random one."""
    if os.environ.get("LORATOOL_TEST_HANG") == point:
        sys.stderr.write(f"loratool-test-hang {point}\n")
        sys.stderr.flush()
        time.sleep(3600)


_umask_lock = threading.Lock()


def umask() -> int:
    """The process's umask, read without changing it where the system shows it (Linux ≥ 4.7,
    /proc/self/status); elsewhere set and restored at once, under a lock."""
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        value = os.umask(0o022)
        os.umask(value)
    return value


def give_umask_mode(path: str | os.PathLike, *, directory: bool) -> None:
    """Give a temporary the mode an ordinary ``open``/``mkdir`` would have given it.

    ``mkstemp``/``mkdtemp`` create 0600/0700 (private to the writer), and the temporary is
    renamed into place as the output: a merged model would stay unreadable to a serving
    container running as another user. Outputs get what the user's umask gives (0644/0755
    under the usual 022), like every file written with ``open``."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


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


# -- rename without replace -----------------------------------------------------------------

_renameat2 = None
if sys.platform.startswith("linux"):  # glibc ≥ 2.28 exports it; older ones fall back below
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _renameat2 = _libc.renameat2
        _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
        _renameat2.argtypes += [ctypes.c_uint]
        _renameat2.restype = ctypes.c_int
    except (OSError, AttributeError):
        _renameat2 = None


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2; False when this system or filesystem does not support it."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``src`` to ``dst``, atomically, unless something (even a dangling symlink or an
    empty directory) is at ``dst``: then FileExistsError and ``src`` stays where it was.

    ``renameat2(RENAME_NOREPLACE)`` where the kernel and filesystem have it. Elsewhere a file
    is hard-linked (``link`` never replaces) and its old name unlinked; a directory claims
    ``dst`` with ``mkdir`` (which fails if anything is there) and is renamed onto that empty
    directory, which fails if someone filled it meanwhile.
    """
    src, dst = Path(src), Path(dst)
    if _rename2(src, dst, _RENAME_NOREPLACE):
        return
    _rename_noreplace_portable(src, dst)


def _rename_noreplace_portable(src: Path, dst: Path) -> None:
    if src.is_dir() and not src.is_symlink():
        os.mkdir(dst)  # FileExistsError when anything is there
        try:
            os.rename(src, dst)  # onto an empty directory: atomic
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise FileExistsError(errno.EEXIST, "appeared meanwhile", str(dst)) from exc
            with contextlib.suppress(OSError):
                os.rmdir(dst)
            raise
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED and exc.errno not in (errno.EXDEV, errno.EMLINK):
            raise
        # No hard links here (FAT, some network filesystems): the check and the rename are
        # two steps, the best this filesystem allows.
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from exc
        os.rename(src, dst)
        return
    os.unlink(src)


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths atomically; False when this system cannot."""
    return _rename2(Path(a), Path(b), _RENAME_EXCHANGE)


# -- stale temporaries ----------------------------------------------------------------------


def _tmp_pid(name: str) -> int | None:
    """The writer's pid in ``.loratool-tmp-<dest name>.<pid>.<token>`` (the dest name may hold
    dots; the pid and the token never do)."""
    if not name.startswith(TMP_MARK):
        return None
    parts = name[len(TMP_MARK) :].rsplit(".", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return int(parts[1])


@contextlib.contextmanager
def _hold(path: Path) -> Iterator[bool]:
    """Try to take ``path``'s flock without waiting: yields whether nobody else holds it."""
    if fcntl is None:  # pragma: no cover - Windows
        yield True
        return
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False  # a live writer holds it
            return
        yield True
    finally:
        os.close(fd)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def clean_stale(directory: str | os.PathLike, *, now: float | None = None) -> list[Path]:
    """Remove the temporaries (``.loratool-tmp-*``) that dead writers left in ``directory``,
    whatever destination they were for.

    A temporary is left alone while its writer holds its lock, and while its pid is alive and
    it is younger than :data:`STALE_AGE` (the instant before the lock is taken). A pid that is
    alive but belongs to another process now (reused) does not keep an unlocked, old one.
    This process's own temporaries are never touched.
    """
    directory = Path(directory)
    now = time.time() if now is None else now
    removed: list[Path] = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for p in entries:
        pid = _tmp_pid(p.name)
        if pid is None or pid == os.getpid():
            continue
        try:
            st = p.lstat()
        except OSError:
            continue
        if pid_alive(pid) and now - st.st_mtime <= STALE_AGE:
            continue
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            # A link, a FIFO (opening it would block), …: never followed or opened, and no
            # writer of ours makes or locks one.
            with contextlib.suppress(OSError):
                p.unlink()
            removed.append(p)
            continue
        with _hold(p) as free:
            if free:
                _remove(p)
                removed.append(p)
    return removed


# -- destinations ---------------------------------------------------------------------------


def check_output(dest: Path, force: bool) -> None:
    """Refuse an existing ``dest`` (a dangling symlink counts) unless ``force``."""
    if os.path.lexists(dest) and not force:
        raise OutputExistsError("already exists", file=dest, hint="pass --force to replace it")


def real_path(path: str | os.PathLike) -> Path:
    """The path with every symlink and ``..`` resolved: the realpath of its nearest existing
    ancestor, then the rest (a missing component cannot be a link)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _inside(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b`` or lies under it (both real paths)."""
    return a == b or b in a.parents


def _identities(path: Path) -> set[tuple[int, int]]:
    """(device, inode) of ``path`` and of every existing ancestor: a bind mount or a second
    name for a directory has another path but the same identity."""
    ids = set()
    for p in (path, *path.parents):
        try:
            st = p.stat()
        except OSError:
            continue
        ids.add((st.st_dev, st.st_ino))
    return ids


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def check_destination(
    dest: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    home: str | os.PathLike | None = None,
    force: bool = False,
    exists_check: bool = True,
) -> Path:
    """Refuse, before anything is written, a destination that would destroy what it must not.

    After resolving symlinks and ``..``, ``dest`` may not be, contain or lie inside any of
    ``inputs`` (what the command reads: a base directory or file, its shards and index, adapter
    paths) nor the catalog ``home``: writing there, or replacing it with ``force``, would
    destroy them. ``force`` replaces only an earlier output, never an input. Without ``force``
    an existing ``dest`` (a dangling symlink included) is refused too (unless
    ``exists_check`` is False). Returns ``dest`` as given.
    """
    dest = Path(dest)
    real = real_path(dest)
    dest_ids = _identities(real)
    own = _identity(real)
    named = [(Path(p), "an input of this command") for p in inputs if p is not None]
    if home is not None:
        named.append((Path(home), "the catalog home"))
    for path, what in named:
        target = real_path(path)
        tid = _identity(target)
        same = real == target or (own is not None and own == tid)
        inside = _inside(real, target) or (tid is not None and tid in dest_ids)
        contains = _inside(target, real) or (own is not None and own in _identities(target))
        if same or inside or contains:
            how = "is" if same else "lies inside" if inside else "contains"
            raise ValidationError(
                f"the output {how} {what} ({path})",
                file=dest,
                hint="write the output somewhere else; --force never replaces an input",
            )
    if exists_check:
        check_output(dest, force)
    return dest


def _put_in_place(tmp: Path, dest: Path, force: bool) -> list[Path]:
    """Rename the finished ``tmp`` to ``dest``. Returns where the outputs it replaced now lie,
    for the caller to remove once the new one is in place (empty without ``force``)."""
    if not force:
        try:
            rename_noreplace(tmp, dest)
        except FileExistsError as exc:
            raise OutputExistsError(
                "appeared while the output was being written; nothing was replaced",
                file=dest,
                hint="pass --force to replace it",
            ) from exc
        return []
    aside: list[Path] = []
    for _ in range(100):
        try:
            rename_noreplace(tmp, dest)
            return aside
        except FileExistsError:
            pass
        # Swap the new output in: ``tmp``'s name then holds the old one.
        if exchange(tmp, dest):
            return [*aside, tmp]
        # No exchange here: move the old output aside first (a crash now leaves neither under
        # the final name; the next write into this directory removes the stale one).
        old = dest.parent / f"{_tmp_prefix(dest)}{os.getpid()}.{secrets.token_hex(6)}"
        with contextlib.suppress(FileNotFoundError):
            rename_noreplace(dest, old)
            aside.append(old)
    for old in aside:
        _remove(old)
    raise OutputExistsError("keeps being recreated while it is replaced", file=dest)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold ``path``'s flock while the block runs (tells :func:`clean_stale` we are alive)."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _name_the_file(exc: OSError, dest: Path, tmp: Path) -> None:
    """A write that fails names no file (os.write, file.write: "File too large", "No space
    left on device"), or names a temporary that is gone by the time the user reads it: name
    the output as the user asked for it."""
    name = str(exc.filename) if exc.filename else ""
    if not name:
        exc.filename = str(dest)
    elif name == str(tmp) or name.startswith(str(tmp) + os.sep):
        exc.filename = str(dest) + name[len(str(tmp)) :]


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike, *, force: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` if the block succeeds.

    Without ``force`` the rename fails (OutputExistsError, nothing replaced) if ``dest``
    exists by then, even if it appeared while the block ran.
    """
    dest = Path(dest)
    check_output(dest, force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dest.parent)
    fd, tmp = tempfile.mkstemp(prefix=f"{_tmp_prefix(dest)}{os.getpid()}.", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    give_umask_mode(tmp_path, directory=False)
    placed, olds = False, []
    try:
        with _locked(tmp_path):
            yield tmp_path
            hang_for_tests("output-written")
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
            olds = _put_in_place(tmp_path, dest, force)
            placed = True
        fsync_dir(dest.parent)
    except OSError as exc:
        _name_the_file(exc, dest, tmp_path)
        raise
    finally:
        if not placed:
            with contextlib.suppress(OSError):
                tmp_path.unlink()
        for old in olds:
            _remove(old)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``dest``; it becomes ``dest`` if the block succeeds.

    Without ``force`` the rename fails (OutputExistsError, nothing replaced) if ``dest``
    exists by then. With ``force`` an existing ``dest`` is swapped out atomically and removed
    only after the new one is in place, so a crash leaves either the old or the new output,
    never a mix.
    """
    dest = Path(dest)
    check_output(dest, force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dest.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(dest)}{os.getpid()}.", dir=dest.parent))
    give_umask_mode(tmp, directory=True)
    placed, olds = False, []
    try:
        with _locked(tmp):
            yield tmp
            hang_for_tests("output-written")
            for f in tmp.rglob("*"):
                if f.is_file() and not f.is_symlink():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            fsync_dir(tmp)
            olds = _put_in_place(tmp, dest, force)
            placed = True
        fsync_dir(dest.parent)
    except OSError as exc:
        _name_the_file(exc, dest, tmp)
        raise
    finally:
        if not placed:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in olds:
            _remove(old)


# -- copying files that belong to an input --------------------------------------------------


def contained_target(path: Path, roots: Iterable[Path]) -> Path | None:
    """``path``'s real location if it is a regular file inside one of ``roots`` (after every
    symlink is followed), else None: a link out of a model directory is not its file."""
    real = real_path(path)
    if not any(_inside(real, real_path(r)) for r in roots):
        return None
    try:
        if not real.is_file():
            return None
    except OSError:
        return None
    return real


def copy_contained(src: Path, dst: Path, roots: Iterable[Path]) -> None:
    """Copy ``src`` to ``dst`` only if it resolves to a regular file inside ``roots``; the
    resolved file is opened without following links, so a link swapped in since the check is
    refused rather than followed."""
    real = real_path(src)
    if not any(_inside(real, real_path(r)) for r in roots):
        raise ValidationError("is a link to outside the model directory; not copied", file=src)
    try:
        fd = os.open(real, os.O_RDONLY | _NOFOLLOW | _NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValidationError("became a link while it was copied", file=src) from exc
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped for a FIFO or a device meanwhile
        os.close(fd)
        raise ValidationError("is not a regular file; not copied", file=src)
    with os.fdopen(fd, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
