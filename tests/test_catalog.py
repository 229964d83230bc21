"""The catalog library: rows, blobs, migrations, verification, concurrency and crashes."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loratool.catalog import (
    KNOWN_MIGRATIONS,
    MIGRATIONS,
    SCHEMA_VERSION,
    AdapterRecord,
    Catalog,
    ModuleRecord,
    default_home,
    default_name,
    validate_name,
)
from loratool.catalog.blobs import STALE_AGE
from loratool.errors import CatalogError, FormatError, NotFoundError, ValidationError
from loratool.tensors.header import read_header

ROOT = Path(__file__).resolve().parent.parent

# A tiny llama-shaped model: q_proj 64×64, v_proj 32×64 (grouped-query attention).
SHAPES = {"q_proj": (64, 64), "v_proj": (32, 64)}


def make_peft_dir(
    path: Path,
    seed: int = 0,
    *,
    r: int = 4,
    alpha: float = 8,
    layers: int = 2,
    base_model: str | None = "tiny/llama",
    dtype: torch.dtype = torch.float32,
    rank_pattern: dict | None = None,
) -> Path:
    """A PEFT adapter directory written with safetensors directly (no peft, fast)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    targets = []
    for layer in range(layers):
        for proj, (d, k) in SHAPES.items():
            mod = f"model.layers.{layer}.self_attn.{proj}"
            rr = (rank_pattern or {}).get(mod, r)
            tensors[f"base_model.model.{mod}.lora_A.weight"] = torch.randn(rr, k, generator=g).to(
                dtype
            )
            tensors[f"base_model.model.{mod}.lora_B.weight"] = torch.randn(d, rr, generator=g).to(
                dtype
            )
            targets.append(proj)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(set(targets)),
        "base_model_name_or_path": base_model,
        "rank_pattern": rank_pattern or {},
        "alpha_pattern": {},
        "fan_in_fan_out": False,
        "use_rslora": False,
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return path


def make_kohya_file(path: Path, seed: int = 0, *, r: int = 4, alpha: float = 2.0) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(2):
        stem = f"lora_unet_down_blocks_0_attentions_0_proj_{i}"
        tensors[stem + ".lora_down.weight"] = torch.randn(r, 40, generator=g)
        tensors[stem + ".lora_up.weight"] = torch.randn(24, r, generator=g)
        tensors[stem + ".alpha"] = torch.tensor(alpha)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"ss_network_dim": str(r)})
    return path


def blob_files(home: Path) -> list[Path]:
    return sorted((home / "blobs").rglob("*.safetensors")) if (home / "blobs").exists() else []


def tmp_files(home: Path) -> list[Path]:
    return sorted((home / "tmp").iterdir()) if (home / "tmp").exists() else []


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def cat(loratool_home):
    c = Catalog(loratool_home)
    yield c
    c.close()


# -- add records everything ---------------------------------------------------------------
def test_add_records_every_field(cat, tmp_path):
    src = make_peft_dir(tmp_path / "sum-lora", r=4, alpha=8)
    row = cat.add(
        src, task="summarize", tags=["v1", "prod"], meta={"lr": "2e-4"}, description="a test"
    )
    assert row["name"] == "sum-lora"  # from the directory
    assert row["task"] == "summarize"
    assert row["base_model"] == "tiny/llama"  # from adapter_config.json
    assert row["tags"] == ["prod", "v1"]
    assert row["meta"] == {"lr": "2e-4"}
    assert row["description"] == "a test"
    assert row["source"] == str(src.resolve())
    assert row["format"] == "peft"
    assert row["rank"] == 4 and row["alpha"] == 8
    assert row["modules"] == 4
    # params count A and B; dense_params the d×k of each ΔW, written out here.
    assert row["params"] == 2 * (4 * 64 + 64 * 4) + 2 * (4 * 64 + 32 * 4)
    assert row["dense_params"] == 2 * (64 * 64 + 32 * 64)
    assert row["bytes"] == row["params"] * 4
    assert row["dtype"] == "float32"
    created = dt.datetime.fromisoformat(row["created"])
    assert (
        created.tzinfo is not None
        and abs(dt.datetime.now(dt.timezone.utc) - created).total_seconds() < 60
    )
    blob = cat.blobs.path(row["sha256"])
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == row["sha256"]
    mods = cat.modules("sum-lora")
    assert [m["name"] for m in mods] == [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
    ]
    v = mods[1]
    assert v["kind"] == "linear" and v["a_shape"] == [4, 64] and v["b_shape"] == [32, 4]
    assert v["base_shape"] == [32, 64] and v["rank"] == 4 and v["alpha"] == 8 and v["scale"] == 2.0
    assert v["params"] == 4 * 64 + 32 * 4 and v["dense_params"] == 32 * 64


def test_blob_is_canonical_safetensors_named_by_its_hash(cat, tmp_path):
    row = cat.add(make_peft_dir(tmp_path / "a"), task="t")
    header = read_header(cat.blobs.path(row["sha256"]))
    assert sorted(header.tensors) == sorted(
        f"model.layers.{i}.self_attn.{p}.weight.lora_{w}"
        for i in range(2)
        for p in SHAPES
        for w in "AB"
    )
    modules = json.loads(header.metadata["loratool.modules"])
    assert modules["model.layers.0.self_attn.q_proj.weight"] == {
        "kind": "linear",
        "alpha": 8.0,
        "rslora": False,
    }
    assert "loratool.meta" not in header.metadata  # names and tasks live in rows, not in blobs


def test_base_model_option_overrides_the_config(cat, tmp_path):
    row = cat.add(make_peft_dir(tmp_path / "a"), task="t", base_model="other/base")
    assert row["base_model"] == "other/base"


def test_per_module_rank_is_recorded(cat, tmp_path):
    pattern = {"model.layers.1.self_attn.q_proj": 8}
    row = cat.add(make_peft_dir(tmp_path / "a", r=4, rank_pattern=pattern), task="t")
    assert row["rank"] == 8  # the largest
    ranks = {m["name"]: m["rank"] for m in cat.modules(row["name"])}
    assert ranks["model.layers.1.self_attn.q_proj.weight"] == 8
    assert ranks["model.layers.0.self_attn.q_proj.weight"] == 4


def test_kohya_file_takes_its_stem_as_name(cat, tmp_path):
    row = cat.add(make_kohya_file(tmp_path / "style lora!.safetensors"), task="style")
    assert row["name"] == "style-lora"
    assert row["format"] == "kohya" and row["rank"] == 4 and row["alpha"] == 2
    assert row["base_model"] is None


def test_load_gives_back_the_same_tensors_and_metadata(cat, tmp_path):
    from loratool.formats import load_adapter

    src = make_peft_dir(tmp_path / "a", dtype=torch.bfloat16)
    cat.add(src, task="t", tags=["x"], meta={"k": "v"})
    original = load_adapter(src)
    loaded = cat.load("a")
    assert set(loaded.modules) == set(original.modules)
    for name, m in original.modules.items():
        assert (
            torch.equal(loaded.modules[name].A, m.A)
            and loaded.modules[name].A.dtype == torch.bfloat16
        )
        assert torch.equal(loaded.modules[name].B, m.B)
        assert loaded.modules[name].alpha == m.alpha
    assert loaded.meta.name == "a" and loaded.meta.task == "t" and loaded.meta.tags == ["x"]
    assert loaded.meta.extra == {"k": "v"} and loaded.meta.base_model == "tiny/llama"


# -- names --------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["", ".", "..", "../up", "a/b", "a b", "é", "x" * 201, "a\\b"])
def test_bad_names_are_refused(cat, tmp_path, bad):
    with pytest.raises(ValidationError):
        validate_name(bad)
    with pytest.raises(ValidationError):
        cat.add(make_peft_dir(tmp_path / "a"), task="t", name=bad)
    assert cat.count() == 0 and blob_files(cat.home) == []


def test_default_names(tmp_path):
    assert default_name(tmp_path / "my adapter (v2)") == "my-adapter-v2"
    d = make_peft_dir(tmp_path / "run.7")
    assert default_name(d / "adapter_model.safetensors") == "run.7"
    assert default_name(tmp_path / "x.safetensors") == "x"
    with pytest.raises(ValidationError):
        default_name(tmp_path / "!!!")


def test_taken_name_is_an_error_unless_replace(cat, tmp_path):
    first = cat.add(make_peft_dir(tmp_path / "a", seed=1), task="t")
    with pytest.raises(CatalogError, match="taken"):
        cat.add(make_peft_dir(tmp_path / "b", seed=2), task="t", name="a")
    second = cat.add(tmp_path / "b", task="u", name="a", replace=True)
    assert second["sha256"] != first["sha256"] and second["task"] == "u"
    assert cat.count() == 1
    assert [p.name for p in blob_files(cat.home)] == [
        second["sha256"] + ".safetensors"
    ]  # old blob gone


def test_identical_adapters_share_one_blob_until_both_are_removed(cat, tmp_path):
    src = make_peft_dir(tmp_path / "a")
    a = cat.add(src, task="t", name="one")
    b = cat.add(src, task="u", name="two", keep_both=True)  # the same weights, on purpose
    assert a["sha256"] == b["sha256"] and b["same_weights"] == ["one"]
    assert len(blob_files(cat.home)) == 1
    cat.remove("one")
    assert len(blob_files(cat.home)) == 1 and cat.exists("two")
    cat.remove("two")
    assert blob_files(cat.home) == [] and cat.count() == 0


def test_remove_unknown_is_not_found(cat):
    with pytest.raises(NotFoundError, match="nope"):
        cat.remove("nope")
    with pytest.raises(NotFoundError):
        cat.load("nope")


def test_bad_adapters_leave_nothing_behind(cat, tmp_path):
    src = make_peft_dir(tmp_path / "nan")
    from safetensors.torch import load_file

    t = load_file(str(src / "adapter_model.safetensors"))
    k = next(iter(t))
    t[k][0, 0] = float("nan")
    save_file(t, str(src / "adapter_model.safetensors"))
    with pytest.raises(ValidationError, match="NaN"):
        cat.add(src, task="t")
    pickle = tmp_path / "p.bin"
    pickle.write_bytes(b"\x80\x04junk")
    with pytest.raises(FormatError, match="pickle"):
        cat.add(pickle, task="t")
    truncated = tmp_path / "trunc.safetensors"
    data = (make_peft_dir(tmp_path / "ok") / "adapter_model.safetensors").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError):
        cat.add(truncated, task="t")
    assert cat.count() == 0 and blob_files(cat.home) == [] and tmp_files(cat.home) == []


def test_empty_task_and_tags_are_refused(cat, tmp_path):
    with pytest.raises(ValidationError):
        cat.add(make_peft_dir(tmp_path / "a"), task="  ")
    with pytest.raises(ValidationError):
        cat.add(tmp_path / "a", task="t", tags=[""])


# -- list ---------------------------------------------------------------------------------
def test_list_filters_and_order(cat, tmp_path):
    cat.add(make_peft_dir(tmp_path / "z", seed=1), task="b-task", tags=["v1"])
    cat.add(
        make_peft_dir(tmp_path / "y", seed=2, base_model="other"),
        task="a-task",
        tags=["v1", "prod"],
    )
    cat.add(make_peft_dir(tmp_path / "x", seed=3), task="b-task")
    assert [r["name"] for r in cat.list()] == ["y", "x", "z"]  # by task, then name
    assert [r["name"] for r in cat.list(task="b-task")] == ["x", "z"]
    assert [r["name"] for r in cat.list(base_model="other")] == ["y"]
    assert [r["name"] for r in cat.list(tag="v1")] == ["y", "z"]
    assert [r["name"] for r in cat.list(tag=["v1", "prod"])] == ["y"]
    assert cat.list(task="none") == []
    assert cat.list()[0]["tags"] == ["prod", "v1"]


# -- remotes, records ---------------------------------------------------------------------
def test_remotes_are_recorded_and_removed_with_the_adapter(cat, tmp_path):
    cat.add(make_peft_dir(tmp_path / "a"), task="t")
    cat.add_remote("a", repo="me/a", revision="main", commit="abc123")
    info = cat.info("a")
    assert [(r["repo"], r["revision"], r["commit"]) for r in info["remotes"]] == [
        ("me/a", "main", "abc123")
    ]
    with pytest.raises(NotFoundError):
        cat.add_remote("nope", repo="me/x")
    cat.remove("a")
    assert cat.db.execute("select count(*) from remotes").fetchone()[0] == 0


def test_insert_records_needs_the_blob(cat, tmp_path):
    row = cat.add(make_peft_dir(tmp_path / "a"), task="t")
    mod = ModuleRecord("w.weight", "linear", [2, 8], [8, 2], [8, 8], 2, 4.0, 2.0, 32, 64, "float32")
    rec = AdapterRecord(
        name="syn", task="t", sha256=row["sha256"], modules=[mod], bytes=128, dtype="float32"
    )
    assert cat.insert_records([rec]) == 1
    assert cat.get("syn")["params"] == 32
    missing = AdapterRecord(
        name="syn2", task="t", sha256="0" * 64, modules=[mod], bytes=128, dtype="float32"
    )
    with pytest.raises(CatalogError, match="no blob"):
        cat.insert_records([missing])
    assert not cat.exists("syn2")


# -- home, database settings --------------------------------------------------------------
def test_default_home(monkeypatch, tmp_path):
    monkeypatch.setenv("LORATOOL_HOME", str(tmp_path / "h"))
    assert default_home() == tmp_path / "h"
    monkeypatch.delenv("LORATOOL_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert default_home() == tmp_path / "user" / ".loratool"
    c = Catalog()
    assert c.db_path == tmp_path / "user" / ".loratool" / "catalog.db" and c.db_path.exists()
    c.close()


def test_wal_busy_timeout_and_indexes(cat):
    assert cat.db.journal_mode == "wal"
    assert cat.db.execute("PRAGMA busy_timeout").fetchone()[0] >= 30_000
    plan = " ".join(
        str(r)
        for r in cat.db.execute(
            "explain query plan select * from adapters where task = 'x' order by task, name"
        )
    )
    assert "idx_adapters_task_name" in plan
    plan = " ".join(
        str(r)
        for r in cat.db.execute("explain query plan select * from adapters where base_model = 'x'")
    )
    assert "idx_adapters_base_model" in plan


# -- migrations ---------------------------------------------------------------------------
def test_migrations_are_recorded(cat):
    applied = [
        r[0]
        for r in cat.db.execute(
            "select name from _sqlite_migrations where migration_set = 'loratool' order by id"
        )
    ]
    assert applied == list(KNOWN_MIGRATIONS) and len(applied) == SCHEMA_VERSION >= 2
    assert cat.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_an_older_catalog_is_upgraded_in_place(loratool_home, tmp_path):
    import sqlite_utils

    loratool_home.mkdir(parents=True)
    db = sqlite_utils.Database(loratool_home / "catalog.db")
    MIGRATIONS.apply(db, stop_before=KNOWN_MIGRATIONS[1])  # a catalog from before `remotes`
    db.execute("PRAGMA user_version = 1")
    db["adapters"].insert(
        {
            "name": "old",
            "task": "t",
            "rank": 4,
            "alpha": 8.0,
            "modules": 0,
            "params": 0,
            "dense_params": 0,
            "bytes": 0,
            "rslora": 0,
            "created": "2020-01-01T00:00:00+00:00",
            "sha256": "a" * 64,
        }
    )
    db.conn.commit()
    assert "remotes" not in db.table_names()
    db.close()
    c = Catalog(loratool_home)
    assert "remotes" in c.db.table_names()
    assert c.get("old")["task"] == "t"
    assert [m.name for m in MIGRATIONS.applied(c.db)] == list(KNOWN_MIGRATIONS)
    assert c.schema_problems() == []
    c.close()


def test_a_newer_catalog_is_refused(loratool_home):
    Catalog(loratool_home).close()
    conn = sqlite3.connect(loratool_home / "catalog.db")
    conn.execute(
        "insert into _sqlite_migrations (migration_set, name, applied_at) values ('loratool', '9999_future', 'now')"
    )
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(CatalogError, match="newer loratool") as err:
        Catalog(loratool_home)
    assert "\n" not in str(err.value) and "catalog.db" in str(err.value)
    # Even when user_version was not bumped, the unknown migration record is caught.
    conn = sqlite3.connect(loratool_home / "catalog.db")
    conn.execute("PRAGMA user_version = 0")
    conn.commit()
    conn.close()
    with pytest.raises(CatalogError, match="9999_future"):
        Catalog(loratool_home)


# -- verify -------------------------------------------------------------------------------
def kinds(report) -> list[str]:
    return sorted(p.kind for p in report.problems)


def test_verify_is_clean_on_a_healthy_catalog(cat, tmp_path):
    cat.add(make_peft_dir(tmp_path / "a", seed=1), task="t")
    cat.add(make_peft_dir(tmp_path / "b", seed=2), task="t")
    report = cat.verify()
    assert report.ok and report.adapters == 2 and report.blobs == 2


def test_corrupt_blob_is_found_and_refused(cat, tmp_path):
    row = cat.add(make_peft_dir(tmp_path / "a"), task="t")
    blob = cat.blobs.path(row["sha256"])
    data = bytearray(blob.read_bytes())
    data[-3] ^= 0x40  # one bit of a tensor, the header stays valid
    blob.write_bytes(bytes(data))
    report = cat.verify()
    assert kinds(report) == ["corrupt-blob"]
    assert report.problems[0].subject == str(blob) and "a" in report.problems[0].message
    with pytest.raises(CatalogError, match="corrupt"):
        cat.load("a")
    with pytest.raises(CatalogError, match="corrupt"):
        cat.export("a", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # Adding the same adapter again repairs the blob.
    cat.add(tmp_path / "a", task="t", name="again", keep_both=True)
    assert cat.verify().ok


def test_verify_finds_missing_orphan_stray_and_temp_files(cat, tmp_path):
    a = cat.add(make_peft_dir(tmp_path / "a", seed=1), task="t")
    b = cat.add(make_peft_dir(tmp_path / "b", seed=2), task="t")
    cat.blobs.path(a["sha256"]).unlink()
    orphan = cat.blobs.path("f" * 64)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"x")
    stray = cat.blobs.path(b["sha256"]).parent / "notes.txt"
    stray.write_text("hi")
    temp = cat.home / "tmp" / f"blob-{dead_pid()}-00ff.tmp"
    temp.parent.mkdir(exist_ok=True)
    temp.write_bytes(b"partial")
    report = cat.verify()
    assert kinds(report) == ["missing-blob", "orphan-blob", "stray-file", "temp-file"]
    subjects = {p.kind: p.subject for p in report.problems}
    assert subjects["missing-blob"] == "a"
    assert subjects["orphan-blob"] == str(orphan)
    assert subjects["stray-file"] == str(stray)
    assert subjects["temp-file"] == str(temp)


def test_verify_finds_schema_drift(cat):
    cat.db.execute("drop index idx_adapters_base_model")
    cat.db.execute("alter table adapters add column extra text")
    cat.db.execute("create table surprise (x)")
    cat.db.conn.commit()
    messages = [p.message for p in cat.verify().problems if p.kind == "schema"]
    assert any("idx_adapters_base_model" in m and "missing" in m for m in messages)
    assert any("table adapters has columns" in m for m in messages)
    assert any("unexpected table surprise" in m for m in messages)


# -- temp files and concurrency -----------------------------------------------------------
def test_add_cleans_stale_temp_files_but_not_live_ones(cat, tmp_path):
    tmp = cat.home / "tmp"
    tmp.mkdir(exist_ok=True)
    stale = tmp / f"blob-{dead_pid()}-0a.tmp"
    stale.write_bytes(b"half")
    old_unknown = tmp / "leftover"
    old_unknown.write_bytes(b"?")
    past = time.time() - 10 * STALE_AGE
    os.utime(old_unknown, (past, past))
    # A live writer: another process holds the lock on its temp file, and it is old.
    live = tmp / "blob-1-0b.tmp"
    live.write_bytes(b"writing")
    os.utime(live, (past, past))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'rb'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('locked', flush=True); time.sleep(60)",
            str(live),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        # A young file not yet under its final name: a writer between create and lock
        # (a blob-/op- file is locked before it gets its name, so unlocked means stale).
        young = tmp / f".new-{os.getpid()}-0c"
        young.write_bytes(b"just created")
        cat.add(make_peft_dir(tmp_path / "a"), task="t")
        left = {p.name for p in tmp_files(cat.home)}
        assert left == {live.name, young.name}
        assert cat.verify().ok  # live ones are not problems
    finally:
        holder.kill()
        holder.wait()
    young.unlink()
    cat.add(make_peft_dir(tmp_path / "b", seed=5), task="t")
    assert tmp_files(cat.home) == []  # the holder is gone and the file is old


def run_cli(args, home, env_extra=None, **kw):
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


@pytest.mark.slow
def test_eight_processes_add_at_once(loratool_home, tmp_path):
    sources = [make_peft_dir(tmp_path / f"src{i}", seed=i) for i in range(8)]
    # Two of them share a blob, so they also race on the same content.
    sources.append(sources[0])
    procs = [
        run_cli(["add", s, "--task", f"t{i % 3}", "--name", f"ad{i}"], loratool_home)
        for i, s in enumerate(sources)
    ]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    for rc, out, err in results:
        assert rc == 0, err
        assert "database is locked" not in err + out
    c = Catalog(loratool_home)
    assert sorted(r["name"] for r in c.list()) == [f"ad{i}" for i in range(9)]
    assert len(blob_files(loratool_home)) == 8
    assert c.verify().ok
    c.close()


def wait_for_hang(proc, timeout=120) -> None:
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


@pytest.mark.parametrize(
    ("point", "left_behind"),
    [
        ("blob-temp-written", ["temp-file", "temp-file"]),  # the blob's temp file and the op marker
        ("blob-stored", ["orphan-blob", "temp-file"]),  # renamed into place, row not committed
        ("row-committed", ["temp-file"]),  # committed, garbage collection not run
    ],
)
@pytest.mark.parametrize("next_command", ["add", "list"])
def test_sigkill_in_the_middle_of_add(loratool_home, tmp_path, point, left_behind, next_command):
    first = make_peft_dir(tmp_path / "first", seed=1)
    Catalog(loratool_home).add(first, task="t")
    before = Catalog(loratool_home).list()
    victim = run_cli(
        ["add", make_peft_dir(tmp_path / "victim", seed=2), "--task", "t"],
        loratool_home,
        {"LORATOOL_TEST_HANG": point},
    )
    wait_for_hang(victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    c = Catalog(loratool_home, recover=False)  # look without repairing
    assert kinds(c.verify()) == left_behind
    names = [r["name"] for r in c.list()]
    assert names == (
        ["first", "victim"] if point == "row-committed" else [r["name"] for r in before]
    )
    c.close()
    if next_command == "add":
        p = run_cli(["add", make_peft_dir(tmp_path / "next", seed=3), "--task", "t"], loratool_home)
    else:
        p = run_cli(["list"], loratool_home)
    assert p.wait(timeout=300) == 0, p.stderr.read()
    c = Catalog(loratool_home, recover=False)
    report = c.verify()
    assert report.ok, [str(x) for x in report.problems]
    assert tmp_files(loratool_home) == []
    c.close()
