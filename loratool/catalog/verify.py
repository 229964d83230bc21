"""What ``verify`` checks, and the row checks every read goes through.

A row read from ``catalog.db`` is input like any file: someone may have edited it, or a disk
fault may have changed it. Every row a command uses is checked here first, so a tampered row
is one clear line (naming the adapter and the column) instead of a traceback; ``verify`` runs
every check over every row, table and blob, and lists everything it finds instead of stopping
at the first.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .blobs import sha256_file

if TYPE_CHECKING:
    from .db import Catalog

_SHA = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
_INT_COLUMNS = ("rank", "modules", "params", "dense_params", "bytes")
_TEXT_OR_NULL = ("base_model", "description", "source", "format", "dtype")
_MODULE_INTS = ("position", "rank", "params", "dense_params")
_SHAPES = ("a_shape", "b_shape", "base_shape")


@dataclass(frozen=True)
class Problem:
    """One thing ``verify`` found wrong. ``kind`` is a short stable word."""

    # corrupt-blob, missing-blob, orphan-blob, stray-file, temp-file, schema, rows, database,
    # recovery
    kind: str
    subject: str  # a path or an adapter name
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.subject}: {self.message}"


@dataclass
class VerifyReport:
    problems: list[Problem]
    adapters: int
    blobs: int

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "adapters": self.adapters,
            "blobs": self.blobs,
            "problems": [dataclasses.asdict(p) for p in self.problems],
        }


# -- row checks ------------------------------------------------------------------------
def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def adapter_row_problems(row: dict[str, Any]) -> list[str]:
    """What is wrong with one ``adapters`` row (empty when it is sound)."""
    out = []
    name = row.get("name")
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        out.append(f"name {name!r} is not a valid adapter name")
    task = row.get("task")
    if not isinstance(task, str) or not task.strip(_BLANK):
        out.append(f"task {task!r} is not a non-empty string")
    sha = row.get("sha256")
    if not isinstance(sha, str) or not _SHA.match(sha):
        out.append(f"sha256 {sha!r} is not a sha256")
    for col in ("file_sha256", "tensor_sha256"):  # NULL: not known (made here, or added before)
        v = row.get(col)
        if v is not None and (not isinstance(v, str) or not _SHA.match(v)):
            out.append(f"{col} {v!r} is not a sha256")
    for col in _INT_COLUMNS:
        v = row.get(col)
        if not _is_int(v) or v < 0:
            out.append(f"{col} {v!r} is not a count")
    if not _is_number(row.get("alpha")):
        out.append(f"alpha {row.get('alpha')!r} is not a finite number")
    if not _is_int(row.get("rslora")) or row.get("rslora") not in (0, 1):
        out.append(f"rslora {row.get('rslora')!r} is not 0 or 1")
    if not isinstance(row.get("created"), str):
        out.append(f"created {row.get('created')!r} is not a timestamp")
    for col in _TEXT_OR_NULL:
        if col in row and row[col] is not None and not isinstance(row[col], str):
            out.append(f"{col} {row[col]!r} is not text")
    return out


# The same checks as adapter_row_problems, as SQL: `list` asks SQLite whether the rows it lists
# are damaged, in its own query, instead of checking each row in Python (~70 ms for 10,000 rows,
# plus the rows' conversion). SQLite is slow at one thing: the hex check of the three sha256
# columns (~2 µs a string: 65 ms for 10,000 rows), which Python's regex does in ~8 ms; so
# `list` asks SQLite for BAD_ADAPTER_ROW_SHAPE and checks the hex text with bad_hash_text.
# BAD_ADAPTER_ROW is the whole check in SQL. tests/test_hostile_catalog.py keeps all three in
# agreement with adapter_row_problems.
_BLANK = " \t\n\v\f\r"
_HEX = "0123456789abcdef"
_HEXES = re.compile("[0-9a-f]*")
HASH_COLUMNS = ("sha256", "file_sha256", "tensor_sha256")
BAD_ADAPTER_ROW_SHAPE = " or ".join(
    [
        "typeof(name) != 'text'",
        "length(name) not between 1 and 200",
        "name glob '*[^A-Za-z0-9._-]*'",
        "name in ('.', '..')",
        "typeof(task) != 'text'",
        "trim(task, ' ' || char(9, 10, 11, 12, 13)) = ''",
        "typeof(sha256) != 'text'",
        "length(sha256) != 64",
        *(
            f"({c} is not null and (typeof({c}) != 'text' or length({c}) != 64))"
            for c in ("file_sha256", "tensor_sha256")
        ),
        *(f"typeof({c}) != 'integer' or {c} < 0" for c in _INT_COLUMNS),
        "typeof(alpha) not in ('integer', 'real')",
        "abs(alpha) > 1.7976931348623157e308",
        "typeof(rslora) != 'integer'",
        "rslora not in (0, 1)",
        "typeof(created) != 'text'",
        *(f"typeof({c}) not in ('text', 'null')" for c in _TEXT_OR_NULL),
    ]
)
BAD_ADAPTER_ROW = " or ".join(
    [BAD_ADAPTER_ROW_SHAPE, *(f"ltrim(ifnull({c}, ''), '{_HEX}') != ''" for c in HASH_COLUMNS)]
)


def bad_hash_text(row: dict[str, Any]) -> bool:
    """Whether a sha256 column of an ``adapters`` row holds text that is not lowercase hex
    (what BAD_ADAPTER_ROW_SHAPE leaves to Python; it checks their types and lengths itself).
    One regex over the three joined: ~1 µs a row."""
    text = "".join(v for c in HASH_COLUMNS if isinstance(v := row.get(c), str))
    return _HEXES.fullmatch(text) is None


def module_row_problems(row: dict[str, Any]) -> list[str]:
    """What is wrong with one ``modules`` row (``a_shape`` etc. still JSON text)."""
    out = []
    name = row.get("name")
    if not isinstance(name, str) or not name:
        out.append(f"module name {name!r} is not a non-empty string")
    where = f"module {name!r}: " if isinstance(name, str) else ""
    if not isinstance(row.get("kind"), str) or not row.get("kind"):
        out.append(f"{where}kind {row.get('kind')!r} is not a non-empty string")
    for col in _SHAPES:
        text = row.get(col)
        try:
            shape = json.loads(text) if isinstance(text, str) else None
        except ValueError:
            shape = None
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            out.append(f"{where}{col} {text!r} is not a JSON list of sizes")
    for col in _MODULE_INTS:
        v = row.get(col)
        if not _is_int(v) or v < 0:
            out.append(f"{where}{col} {v!r} is not a count")
    for col in ("alpha", "scale"):
        if not _is_number(row.get(col)):
            out.append(f"{where}{col} {row.get(col)!r} is not a finite number")
    if "dtype" in row and not isinstance(row.get("dtype"), str):
        out.append(f"{where}dtype {row.get('dtype')!r} is not text")
    return out


# -- verify ------------------------------------------------------------------------------
def verify(cat: Catalog) -> VerifyReport:
    """Every problem of the catalog: the database file, its schema, every row, every blob."""
    problems: list[Problem] = []
    where = str(cat.db_path)
    problems += _integrity(cat)
    try:
        problems += cat.schema_problems()
    except sqlite3.Error as exc:
        problems.append(Problem("schema", where, f"cannot read the schema: {exc}"))
    rows: dict[str, str] = {}
    with cat._snapshot():  # no add or remove is half-way while we look (when we can lock)
        rows, row_problems = _rows(cat)
        problems += row_problems
        files = list(cat.blobs.iter_files())
        temps = cat.blobs.stale_temp_files()
    by_sha: dict[str, list[str]] = {}
    for name, sha in rows.items():
        if isinstance(sha, str) and _SHA.match(sha):
            by_sha.setdefault(sha, []).append(name)
    present = set()
    for sha, path in files:
        if sha is None:
            problems.append(
                Problem("stray-file", str(path), "not a blob (name is not <sha256>.safetensors)")
            )
            continue
        present.add(sha)
        if sha not in by_sha:
            problems.append(Problem("orphan-blob", str(path), "no adapter refers to this blob"))
            continue
        try:
            got = sha256_file(path)
        except FileNotFoundError:
            continue  # removed since the snapshot, with its rows
        except OSError as exc:
            problems.append(Problem("corrupt-blob", str(path), f"cannot be read: {exc.strerror}"))
            continue
        if got != sha:
            problems.append(
                Problem(
                    "corrupt-blob",
                    str(path),
                    f"sha256 is {got}, not its name; adapters {', '.join(sorted(by_sha[sha]))} are damaged",
                )
            )
    for sha, names in sorted(by_sha.items()):
        if sha not in present:
            for name in sorted(names):
                problems.append(
                    Problem("missing-blob", name, f"its blob {cat.blobs.path(sha)} does not exist")
                )
    for p in temps:
        problems.append(
            Problem("temp-file", str(p), "left by a process that died; the next add removes it")
        )
    if cat.recovery_error:
        problems.append(Problem("recovery", str(cat.home), cat.recovery_error))
    return VerifyReport(problems, adapters=len(rows), blobs=len(present))


def _integrity(cat: Catalog) -> list[Problem]:
    """SQLite's own check of the file: damaged pages, broken indexes (up to 100 findings)."""
    where = str(cat.db_path)
    try:
        lines = [r[0] for r in cat.db.execute("PRAGMA integrity_check(100)").fetchall()]
    except sqlite3.Error as exc:
        return [Problem("database", where, f"the integrity check could not run: {exc}")]
    if lines == ["ok"]:
        return []
    return [Problem("database", where, str(line)) for line in lines]


def _select(cat: Catalog, sql: str, problems: list[Problem], what: str) -> list[dict[str, Any]]:
    try:
        cur = cat.db.execute(sql)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
    except sqlite3.Error as exc:
        problems.append(Problem("database", str(cat.db_path), f"cannot read {what}: {exc}"))
        return []


def _rows(cat: Catalog) -> tuple[dict[str, str], list[Problem]]:
    """name → sha256 of every adapter row, and every problem of every row."""
    problems: list[Problem] = []
    adapters = _select(cat, "select * from adapters", problems, "the adapters table")
    rows: dict[str, str] = {}
    declared: dict[str, Any] = {}
    for i, row in enumerate(adapters):
        name = row.get("name")
        label = name if isinstance(name, str) and name else f"(adapters row {i + 1})"
        for what in adapter_row_problems(row):
            problems.append(Problem("rows", label, what))
        if isinstance(name, str):
            rows[name] = row.get("sha256")
            declared[name] = row.get("modules")
    counts: dict[str, int] = {}
    modules = _select(cat, "select * from modules", problems, "the modules table")
    for row in modules:
        owner = row.get("adapter")
        counts[owner] = counts.get(owner, 0) + 1
        if owner in rows:
            for what in module_row_problems(row):
                problems.append(Problem("rows", owner, what))
    for name, n in declared.items():
        if counts.get(name, 0) != n:
            problems.append(
                Problem("rows", name, f"row says {n!r} modules, {counts.get(name, 0)} module rows")
            )
    for row in _select(cat, "select * from training", problems, "the training table"):
        key, value = row.get("key"), row.get("value")
        if row.get("adapter") in rows and (
            not isinstance(key, str) or not key or not isinstance(value, str)
        ):
            problems.append(
                Problem("rows", row["adapter"], f"training fact {key!r} = {value!r} is not text")
            )
    for table in ("modules", "tags", "meta", "remotes", "training"):
        for row in _select(cat, f"select distinct adapter from {table}", problems, table):
            if row["adapter"] not in rows:
                problems.append(
                    Problem(
                        "rows",
                        str(row["adapter"]),
                        f"rows in {table} for an adapter that does not exist",
                    )
                )
    return rows, problems


# -- schema --------------------------------------------------------------------------------
def schema_problems(cat: Catalog) -> list[Problem]:
    """Differences between this database's schema and the one the migrations build."""
    from .db import KNOWN_MIGRATIONS, MIGRATIONS, SCHEMA_VERSION, sqlite_utils

    problems: list[Problem] = []
    where = str(cat.db_path)
    version = cat._user_version()
    applied = [m.name for m in MIGRATIONS.applied(cat.db)]
    if applied != list(KNOWN_MIGRATIONS):
        problems.append(
            Problem(
                "schema", where, f"migrations recorded {applied}, expected {list(KNOWN_MIGRATIONS)}"
            )
        )
    if version != SCHEMA_VERSION:
        problems.append(
            Problem("schema", where, f"user_version is {version}, expected {SCHEMA_VERSION}")
        )
    ref = sqlite_utils.Database(memory=True, execute_plugins=False)
    MIGRATIONS.apply(ref)
    want, have = _schema_of(ref), _schema_of(cat.db)
    ref.close()
    for table in sorted(set(want) | set(have)):
        if table not in have:
            problems.append(Problem("schema", where, f"table {table} is missing"))
        elif table not in want:
            problems.append(Problem("schema", where, f"unexpected table {table}"))
        else:
            wc, hc = want[table]["columns"], have[table]["columns"]
            if wc != hc:
                problems.append(
                    Problem("schema", where, f"table {table} has columns {hc}, expected {wc}")
                )
            wi, hi = want[table]["indexes"], have[table]["indexes"]
            for idx in sorted(set(wi) - set(hi)):
                problems.append(Problem("schema", where, f"index {idx} on {table} is missing"))
            for idx in sorted(set(hi) - set(wi)):
                problems.append(Problem("schema", where, f"unexpected index {idx} on {table}"))
            for idx in sorted(set(wi) & set(hi)):
                if wi[idx] != hi[idx]:
                    problems.append(
                        Problem(
                            "schema",
                            where,
                            f"index {idx} on {table} is {hi[idx]}, expected {wi[idx]}",
                        )
                    )
    return problems


def _schema_of(db: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    tables = [
        r[0]
        for r in db.execute(
            "select name from sqlite_master where type = 'table' and name not like 'sqlite_%'"
        )
    ]
    for t in tables:
        cols = [
            (c[1], (c[2] or "").upper(), bool(c[3]), c[5])
            for c in db.execute(f'PRAGMA table_info("{t}")')
        ]
        indexes = {}
        for idx in db.execute(f'PRAGMA index_list("{t}")').fetchall():
            iname, unique = idx[1], bool(idx[2])
            if iname.startswith("sqlite_autoindex"):
                iname = f"(primary key of {t})"
            icols = [c[2] for c in db.execute(f'PRAGMA index_info("{idx[1]}")')]
            indexes[iname] = (icols, unique)
        out[t] = {"columns": cols, "indexes": indexes}
    return out
