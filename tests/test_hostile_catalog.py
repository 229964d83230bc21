"""The catalog under attack (issue 16, items 5 and 10): interrupted at known moments, its disk
full or read-only, its file size limited, its database damaged or its rows tampered with.

The invariants: after any interruption `verify` passes at once (the interrupted process undid
its own work, or the next command recovers first); every failure is one line naming the path
and the cause; the reading commands work on a read-only or full disk; `verify` lists every
problem instead of stopping at the first.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from loratool.catalog import Catalog
from loratool.errors import CatalogError

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = ROOT / "fixtures" / "adapters"
PLAIN, RSLORA, EMBED = ADAPTERS / "llama-plain", ADAPTERS / "llama-rslora", ADAPTERS / "llama-embed"


def cli(*args, home: Path, env_extra: dict | None = None, **kw) -> subprocess.Popen:
    env = dict(os.environ, LORATOOL_HOME=str(home))
    env.pop("LORATOOL_TEST_HANG", None)
    env.update(env_extra or {})
    return subprocess.Popen(
        [sys.executable, "-m", "loratool", *map(str, args)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def run(*args, home: Path) -> subprocess.CompletedProcess:
    """The CLI in this process (fast); ``cli`` runs it in a child, for signals and limits."""
    from click.testing import CliRunner

    from loratool.cli import cli as root

    r = CliRunner().invoke(
        root, [str(a) for a in args], env={"LORATOOL_HOME": str(home)}, catch_exceptions=False
    )
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


def wait_for_hang(proc: subprocess.Popen, timeout: float = 120) -> None:
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        while True:
            line = proc.stderr.readline()
            if not line:
                pytest.fail(f"process ended before its hang point (rc {proc.wait()})")
            if line.startswith("loratool-test-hang"):
                return
    finally:
        timer.cancel()


def one_line_error(r) -> str:
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def untouched_report(home: Path):
    """verify as the library sees it, without the recovery that opening normally runs."""
    with Catalog(home, recover=False) as c:
        return c.verify()


def blob_files(home: Path) -> list[Path]:
    return sorted(p for p in (home / "blobs").rglob("*") if p.is_file())


def tmp_files(home: Path) -> list[Path]:
    return sorted((home / "tmp").iterdir()) if (home / "tmp").is_dir() else []


# -- item 5: interruptions ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "point"),
    [
        (["add", RSLORA, "--task", "t"], "blob-temp-written"),
        (["add", RSLORA, "--task", "t"], "blob-stored"),  # blob in place, row not committed
        (["add", RSLORA, "--task", "t"], "row-committed"),  # row committed, GC not run
        (["remove", "plain"], "row-deleted"),  # row gone, its blob not yet collected
    ],
)
def test_ctrl_c_leaves_a_catalog_that_verifies_at_once(loratool_home, command, point):
    with Catalog(loratool_home) as cat:
        cat.add(PLAIN, task="t", name="plain")
    victim = cli(*command, home=loratool_home, env_extra={"LORATOOL_TEST_HANG": point})
    wait_for_hang(victim)
    victim.send_signal(signal.SIGINT)
    _, err = victim.communicate(timeout=120)
    assert victim.returncode == 130
    assert err.strip() == "error: interrupted"
    # the interrupted process undid its own work: nothing for anyone to recover
    report = untouched_report(loratool_home)
    assert report.ok, [str(p) for p in report.problems]
    assert tmp_files(loratool_home) == []
    names = [r["name"] for r in json.loads(run("list", "--json", home=loratool_home).stdout)]
    if point == "row-committed":
        assert names == ["llama-rslora", "plain"]  # committed before the interrupt: kept
    elif point == "row-deleted":
        assert names == [] and blob_files(loratool_home) == []
    else:
        assert names == ["plain"]
    assert len(blob_files(loratool_home)) == len(names)


@pytest.mark.parametrize("point", ["blob-temp-written", "blob-stored", "row-committed"])
def test_verify_right_after_a_sigkill_passes(loratool_home, point):
    with Catalog(loratool_home) as cat:
        cat.add(PLAIN, task="t")
    victim = cli("add", RSLORA, "--task", "t", home=loratool_home,
                 env_extra={"LORATOOL_TEST_HANG": point})  # fmt: skip
    wait_for_hang(victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not untouched_report(loratool_home).ok  # something was left behind...
    r = run("verify", home=loratool_home)  # ...and verify recovers before it looks
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok: ")
    assert tmp_files(loratool_home) == []


def test_the_marker_stays_when_undo_fails_too(loratool_home, monkeypatch):
    """A failure whose undo also fails leaves the marker: the next command recovers."""
    cat = Catalog(loratool_home)
    real_gc = cat._gc_locked
    calls = []

    def gc_that_fails():
        calls.append(1)
        raise OSError(5, "Input/output error")

    def insert_then_fail(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(cat, "_insert_locked", insert_then_fail)
    monkeypatch.setattr(cat, "_gc_locked", gc_that_fails)
    with pytest.raises(KeyboardInterrupt):
        cat.add(PLAIN, task="t")
    assert calls  # the undo was tried
    markers = [p for p in tmp_files(loratool_home) if p.name.startswith("op-")]
    assert len(markers) == 1 and len(blob_files(loratool_home)) == 1  # orphan blob + marker
    monkeypatch.setattr(cat, "_gc_locked", real_gc)
    cat.close()
    # another process (this one's marker is its own pid's, alive): it recovers at once
    r = run("verify", home=loratool_home)
    assert r.returncode == 0, r.stdout + r.stderr
    assert blob_files(loratool_home) == [] and tmp_files(loratool_home) == []


class _FailingCommit:
    """A connection whose COMMIT fails like a full disk's (SQLITE_FULL)."""

    def __init__(self, conn):
        self._conn = conn

    def execute(self, sql, *args):
        if sql.strip().upper() == "COMMIT":
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._conn, name)


def test_a_failed_commit_is_one_error_and_no_orphan(loratool_home, cli_run):
    cat = Catalog(loratool_home)
    cat.db.conn = _FailingCommit(cat.db.conn)
    with pytest.raises(CatalogError) as err:
        cat.add(PLAIN, task="t")
    text = str(err.value)
    assert "catalog.db" in text and "database or disk is full" in text and "\n" not in text
    cat.db.conn = cat.db.conn._conn
    cat.close()
    report = untouched_report(loratool_home)
    assert report.ok and report.adapters == 0, [str(p) for p in report.problems]
    assert blob_files(loratool_home) == [] and tmp_files(loratool_home) == []


# -- item 5: a damaged database, tampered rows -------------------------------------------------


def add_three(home: Path) -> Path:
    with Catalog(home) as cat:
        for path, name in ((PLAIN, "plain"), (RSLORA, "rslora"), (EMBED, "embed")):
            cat.add(path, task="t", name=name)
    return home


@pytest.fixture
def three(loratool_home):
    return add_three(loratool_home)


def _page_of(db: Path, table: str) -> int:
    with contextlib.closing(sqlite3.connect(db)) as c:
        return c.execute("select rootpage from sqlite_master where name = ?", [table]).fetchone()[0]


def test_a_damaged_page_is_one_line_everywhere_and_verify_lists_it(three, tmp_path):
    db = three / "catalog.db"
    page = _page_of(db, "adapters")
    with open(db, "r+b") as fh:  # overwrite the adapters table's root page with garbage
        fh.seek((page - 1) * 4096)
        fh.write(bytes(range(256)) * 16)
    for args in (
        ["list"],
        ["list", "--json"],
        ["show", "plain"],
        ["export", "plain", tmp_path / "out"],
        ["remove", "plain"],
        ["add", PLAIN, "--task", "t", "--name", "again"],
        ["savings", "plain"],
    ):
        line = one_line_error(run(*args, home=three))
        assert str(db) in line and "damaged" in line, (args, line)
    r = run("verify", "--json", home=three)
    assert r.returncode == 1, r.stderr
    report = json.loads(r.stdout)
    kinds = {p["kind"] for p in report["problems"]}
    assert "database" in kinds
    # every blob is still found and named, even though no row can be read
    assert sum(p["kind"] == "orphan-blob" for p in report["problems"]) == 3
    assert not (tmp_path / "out").exists()


def test_tampered_rows_are_one_line_and_verify_lists_every_one(three):
    db = three / "catalog.db"
    with contextlib.closing(sqlite3.connect(db)) as c:
        c.execute("update adapters set sha256 = '../../../etc/passwd' where name = 'plain'")
        c.execute("update adapters set alpha = 'abc', rank = -3 where name = 'rslora'")
        c.execute("update modules set a_shape = 'x[' where adapter = 'embed'")
        c.commit()
    one_line_error(run("list", home=three))
    for name in ("plain", "rslora", "embed"):
        line = one_line_error(run("show", name, home=three))
        assert f"adapter '{name}' is damaged" in line and str(db) in line
    r = run("verify", "--json", home=three)
    assert r.returncode == 1
    problems = json.loads(r.stdout)["problems"]
    rows = [(p["subject"], p["message"]) for p in problems if p["kind"] == "rows"]
    subjects = {s for s, _ in rows}
    assert subjects == {"plain", "rslora", "embed"}
    assert any("sha256" in m for s, m in rows if s == "plain")
    assert {m.split()[0] for s, m in rows if s == "rslora"} >= {"rank", "alpha"}
    assert any("a_shape" in m for s, m in rows if s == "embed")
    # the blob of the row whose sha256 was replaced is now no one's
    assert [p["kind"] for p in problems].count("orphan-blob") == 1
    # the plain text listing says the same, one problem a line
    text = run("verify", home=three)
    assert text.returncode == 1 and len(text.stdout.strip().splitlines()) == len(problems) + 1


# -- item 10: the disk says no -----------------------------------------------------------------


def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


needs_mount = pytest.mark.skipif(
    not _can_mount(), reason="needs root and mount(8) for a read-only bind mount or a tmpfs"
)


@contextlib.contextmanager
def mounted(*argv: str, target: Path):
    r = subprocess.run(["mount", *argv, str(target)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount here: {r.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


@contextlib.contextmanager
def read_only(home: Path):
    with mounted("--bind", str(home), target=home):
        r = subprocess.run(["mount", "-o", "remount,ro,bind", str(home)], capture_output=True)
        if r.returncode != 0:
            pytest.skip("cannot remount read-only here")
        yield home


def _reading_commands_work(home: Path, tmp_path: Path) -> None:
    r = run("list", "--json", home=home)
    assert r.returncode == 0, r.stderr
    assert [x["name"] for x in json.loads(r.stdout)] == ["embed", "plain", "rslora"]
    for args in (["list"], ["show", "plain"], ["show", "rslora", "--json"], ["savings", "plain"]):
        r = run(*args, home=home)
        assert r.returncode == 0, (args, r.stderr)
    r = run("verify", home=home)
    assert r.returncode == 0 and r.stdout.startswith("ok: "), r.stdout + r.stderr
    r = run("export", "plain", tmp_path / "exported", home=home)
    assert r.returncode == 0 and (tmp_path / "exported" / "adapter_config.json").exists(), r.stderr


@needs_mount
def test_a_read_only_home(three, tmp_path):
    with read_only(three):
        _reading_commands_work(three, tmp_path)
        for args in (["add", RSLORA, "--task", "t", "--name", "x"], ["remove", "plain"]):
            line = one_line_error(run(*args, home=three))
            assert str(three) in line and "read-only" in line, line
    assert run("verify", home=three).returncode == 0


@needs_mount
def test_a_read_only_home_with_recovery_pending(three):
    victim = cli("add", ADAPTERS / "gpt2-lora", "--task", "t", home=three,
                 env_extra={"LORATOOL_TEST_HANG": "blob-stored"})  # fmt: skip
    wait_for_hang(victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    with read_only(three):
        r = run("list", "--json", home=three)
        assert r.returncode == 0
        assert len(json.loads(r.stdout)) == 3
        assert "warning:" in r.stderr and "recovery could not run" in r.stderr
        r = run("verify", home=three)
        assert r.returncode == 1
        assert "recovery:" in r.stdout and "orphan-blob" in r.stdout
    r = run("verify", home=three)  # writable again: recovered, then clean
    assert r.returncode == 0, r.stdout


def _fill(path: Path) -> None:
    """Fill the file system holding ``path`` to its last byte."""
    for chunk in (1 << 16, 4096, 1):
        try:
            fd = os.open(path / f"fill-{uuid.uuid4().hex}", os.O_CREAT | os.O_WRONLY)
        except OSError:
            return  # not even an inode left
        try:
            while True:
                os.write(fd, b"\0" * chunk)
        except OSError:
            pass
        finally:
            os.close(fd)


@needs_mount
def test_a_full_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    with mounted("-t", "tmpfs", "-o", "size=2m", "tmpfs", target=disk):
        home = add_three(disk / "home")
        _fill(disk)
        _reading_commands_work(home, tmp_path)
        line = one_line_error(run("add", ADAPTERS / "gpt2-lora", "--task", "t", home=home))
        assert "no space left on the device" in line and str(home) in line, line
        line = one_line_error(run("remove", "plain", home=home))
        assert "no space left on the device" in line, line
        for p in disk.glob("fill-*"):
            p.unlink()
        r = run("verify", home=home)
        assert r.returncode == 0, r.stdout + r.stderr


@needs_mount
def test_every_free_size_at_the_moment_of_add(tmp_path):
    """However little room is left, add either completes or fails in one line, leaving the
    catalog as it was (no orphan blob, no marker): the failure lands in the blob write, in the
    write-ahead log at COMMIT, or in the collection after it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    outcomes = set()
    with mounted("-t", "tmpfs", "-o", "size=2m", "tmpfs", target=disk):
        for free_pages in range(0, 64, 3):
            home = disk / "home"
            shutil.rmtree(home, ignore_errors=True)
            for p in disk.glob("fill-*"):
                p.unlink()
            with Catalog(home) as cat:  # WAL and shared memory exist, as in a running process
                cat.add(PLAIN, task="t", name="plain")
                _fill(disk)
                for p in sorted(disk.glob("fill-*"))[:1]:
                    size = p.stat().st_size
                    with open(p, "r+b") as fh:
                        fh.truncate(max(0, size - free_pages * 4096))
                try:
                    cat.add(RSLORA, task="t", name="new")
                    outcomes.add("added")
                except (CatalogError, OSError) as exc:
                    text = str(exc)
                    assert "\n" not in text
                    outcomes.add("commit" if "catalog.db" in text else "blob")
            for p in disk.glob("fill-*"):
                p.unlink()
            report = untouched_report(home)
            assert report.ok, (free_pages, [str(p) for p in report.problems])
            assert tmp_files(home) == []
    assert "added" in outcomes and len(outcomes) >= 2, outcomes


def test_a_file_size_limit_names_the_file(loratool_home):
    """`ulimit -f`: the first write past it fails with EFBIG; the error names the file."""
    assert run("list", home=loratool_home).returncode == 0  # the catalog exists, small
    script = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
        "from loratool.__main__ import run; sys.argv = ['loratool', *sys.argv[1:]]; run()"
    )
    env = dict(os.environ, LORATOOL_HOME=str(loratool_home))
    r = subprocess.run(
        [sys.executable, "-c", script, "add", str(RSLORA), "--task", "t"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    line = one_line_error(r)
    assert str(loratool_home) in line and ("file too large" in line or "ulimit -f" in line), line
    report = untouched_report(loratool_home)
    assert report.ok, [str(p) for p in report.problems]


def test_the_sql_row_check_agrees_with_the_python_one(loratool_home):
    """`list` asks SQLite for damaged rows (BAD_ADAPTER_ROW), everything else checks rows in
    Python (adapter_row_problems): both must call the same rows damaged."""
    from loratool.catalog.verify import (
        BAD_ADAPTER_ROW,
        BAD_ADAPTER_ROW_SHAPE,
        adapter_row_problems,
        bad_hash_text,
    )

    with Catalog(loratool_home) as cat:
        cat.add(PLAIN, task="t", name="good")
        good = next(cat.db.query("select * from adapters"))
    # (values SQLite's column affinity turns into valid ones, like "4" in an integer column,
    # are not damage: they read back valid)
    bad_values = {
        "name": [None, "", "a/b", ".", "..", "x" * 201, "é", b"n"],
        "task": ["", " ", "\t\n", b"t"],  # (task, sha256, created: NOT NULL)
        "sha256": ["zz", "A" * 64, "g" * 64, "a" * 63, 7],
        "rank": [None, -1, 1.5, "four", b"\x00"],
        "modules": [None, -3, 2.5, "x"],
        "params": [None, -1, "1e999"],
        "dense_params": [0.5, None],
        "bytes": ["big", -1],
        "alpha": [None, "abc", float("inf"), float("-inf"), b"\x01"],
        "rslora": [None, 2, -1, 0.5, "yes"],
        "created": [b"\x00"],
        "base_model": [b"x"],
        "description": [b"d"],
        "source": [b"s"],
        "format": [b"f"],
        "dtype": [b"f16"],
        "file_sha256": ["zz", "A" * 64, 5, "a" * 63 + "g"],
        "tensor_sha256": ["a" * 65, b"x"],
    }
    fine_values = {"task": ["x y", "é", 5], "alpha": [0, -2.5, 1e308, "7"], "base_model": [None, 5],
                   "rank": [0, "4"], "rslora": [1.0], "name": ["a.b-c_D9", 3],
                   "file_sha256": [None, "b" * 64]}  # fmt: skip
    db = sqlite3.connect(loratool_home / "catalog.db")
    cases = []
    n = 0
    for values, expect_bad in ((bad_values, True), (fine_values, False)):
        for col, vals in values.items():
            for v in vals:
                n += 1
                row = {**good, "name": f"case-{n}", col: v}
                cols = ", ".join(row)
                db.execute(
                    f"insert into adapters ({cols}) values ({', '.join('?' * len(row))})",
                    list(row.values()),
                )
                rowid = db.execute("select max(rowid) from adapters").fetchone()[0]
                cases.append((rowid, col, v, expect_bad))
    db.commit()
    flagged = {r[0] for r in db.execute(f"select rowid from adapters where {BAD_ADAPTER_ROW}")}
    shape = {r[0] for r in db.execute(f"select rowid from adapters where {BAD_ADAPTER_ROW_SHAPE}")}
    db.row_factory = sqlite3.Row
    for rowid, col, v, expect_bad in cases:
        row = dict(db.execute("select * from adapters where rowid = ?", [rowid]).fetchone())
        python_bad = bool(adapter_row_problems(row))
        assert python_bad == expect_bad, (col, v, adapter_row_problems(row))
        assert (rowid in flagged) == python_bad, (col, v)
        # what `list` asks: SQLite for the shape, Python for the hashes' hex text
        assert (rowid in shape or bad_hash_text(row)) == python_bad, (col, v)
    db.close()
