"""The catalog commands through the CLI, and the PEFT export checked against real peft."""

from __future__ import annotations

import datetime as dt
import json

import pytest
import torch
from test_catalog import blob_files, make_peft_dir

from loratool.catalog import Catalog

CATALOG_COMMANDS = ["add", "list", "show", "remove", "export", "verify"]
LIST_KEYS = {
    "name",
    "task",
    "base_model",
    "rank",
    "alpha",
    "modules",
    "params",
    "dense_params",
    "bytes",
    "dtype",
    "format",
    "tags",
    "created",
    "sha256",
}


@pytest.fixture
def wide(monkeypatch):
    """rich tables 200 columns wide, so that cells are not folded at 80 when piped."""
    from loratool.cli import render

    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(render, "_console", None)


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("command", CATALOG_COMMANDS)
def test_every_catalog_command_has_help_with_an_example(cli_run, command):
    from loratool.cli import cli

    result = cli_run(command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.stdout and f"loratool {command}" in result.stdout
    doc = cli.get_command(None, command).help
    assert " ".join(doc.split("\n")[0].split()) in " ".join(result.stdout.split())


def test_add_list_show_remove(cli_run, tmp_path, loratool_home, wide):
    src = make_peft_dir(tmp_path / "sum-lora")
    r = cli_run(
        "add", src, "--task", "summarize", "--tag", "v1", "--meta", "lr=2e-4", "--meta", "note=a=b"
    )
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "sum-lora" and len(lines) == 2
    assert "summarize" in lines[1] and "4 modules" in lines[1] and "rank 4" in lines[1]

    r = cli_run("list")
    assert r.exit_code == 0
    assert "sum-lora" in r.stdout and "summarize" in r.stdout and "kB" in r.stdout

    r = cli_run("list", "--json")
    rows = json.loads(r.stdout)
    assert len(rows) == 1 and LIST_KEYS <= set(rows[0])
    row = rows[0]
    assert row["name"] == "sum-lora" and row["rank"] == 4 and row["alpha"] == 8
    assert row["tags"] == ["v1"] and row["format"] == "peft" and row["dtype"] == "float32"
    assert isinstance(row["params"], int) and row["dense_params"] > row["params"]
    assert dt.datetime.fromisoformat(row["created"]).tzinfo is not None
    assert json.loads(cli_run("list", "--task", "other", "--json").stdout) == []
    assert json.loads(cli_run("list", "--tag", "v1", "--json").stdout)[0]["name"] == "sum-lora"
    assert (
        json.loads(cli_run("list", "--base-model", "tiny/llama", "--json").stdout)[0]["name"]
        == "sum-lora"
    )

    r = cli_run("show", "sum-lora")
    assert r.exit_code == 0
    for text in (
        "summarize",
        "tiny/llama",
        "lr = 2e-4",
        "note = a=b",
        "64×64",
        "32×64",
        "linear",
        row["sha256"],
    ):
        assert text in r.stdout, text

    info = json.loads(cli_run("show", "sum-lora", "--json").stdout)
    assert info["meta"] == {"lr": "2e-4", "note": "a=b"}
    # as in list --json, `modules` is the count; the modules themselves are module_details
    assert info["modules"] == info["module_count"] == 4
    assert [m["name"] for m in info["module_details"]][
        0
    ] == "model.layers.0.self_attn.q_proj.weight"
    assert {"name", "kind", "base_shape", "rank", "alpha", "scale", "params"} <= set(
        info["module_details"][0]
    )
    assert info["remotes"] == []

    r = cli_run("remove", "sum-lora")
    assert r.exit_code == 0 and "removed sum-lora" in r.stdout
    assert json.loads(cli_run("list", "--json").stdout) == []
    assert blob_files(loratool_home) == []
    r = cli_run("remove", "sum-lora")
    assert r.exit_code == 1 and "sum-lora" in one_error_line(r)


def test_show_lists_remotes(cli_run, tmp_path, loratool_home, wide):
    cli_run("add", make_peft_dir(tmp_path / "a"), "--task", "t")
    with Catalog(loratool_home) as c:
        c.add_remote("a", repo="me/a-lora", revision="main", commit="0123abc")
    r = cli_run("show", "a")
    assert "me/a-lora" in r.stdout and "0123abc" in r.stdout


def test_add_json_and_home_option(cli_run, tmp_path):
    home = tmp_path / "elsewhere"
    r = cli_run(
        "--home", home, "add", make_peft_dir(tmp_path / "a"), "--task", "t", "--name", "x", "--json"
    )
    assert r.exit_code == 0 and json.loads(r.stdout)["name"] == "x"
    assert (home / "catalog.db").exists()
    assert json.loads(cli_run("--home", home, "list", "--json").stdout)[0]["name"] == "x"
    assert json.loads(cli_run("list", "--json").stdout) == []  # $LORATOOL_HOME is another home


def test_add_errors(cli_run, tmp_path):
    src = make_peft_dir(tmp_path / "a")
    assert cli_run("add", tmp_path / "missing", "--task", "t").exit_code == 2
    assert cli_run("add", src).exit_code == 2  # --task is required
    assert cli_run("add", src, "--task", "t", "--meta", "novalue").exit_code == 2
    r = cli_run("add", src, "--task", "t", "--name", "../escape")
    assert r.exit_code == 1 and "bad adapter name" in one_error_line(r)
    assert cli_run("add", src, "--task", "t").exit_code == 0
    r = cli_run("add", src, "--task", "t")
    assert r.exit_code == 1 and "taken" in one_error_line(r) and "--replace" in r.stderr
    assert cli_run("add", src, "--task", "u", "--replace").exit_code == 0
    assert json.loads(cli_run("list", "--json").stdout)[0]["task"] == "u"


def _long_listing(cli_run, tmp_path, home, task: str) -> int:
    """Adapter "a", then more rows than RICH_ROWS sharing its blob (task ``task``)."""
    from loratool.catalog import AdapterRecord, ModuleRecord
    from loratool.cli.catalog_cmds import RICH_ROWS

    cli_run("add", make_peft_dir(tmp_path / "a"), "--task", "t")
    with Catalog(home) as c:
        sha = c.get("a")["sha256"]
        mod = ModuleRecord(
            "w.weight", "linear", [2, 8], [8, 2], [8, 8], 2, 4.0, 2.0, 32, 64, "float32"
        )
        c.insert_records(
            AdapterRecord(
                name=f"n{i:04d}", task=task, sha256=sha, modules=[mod], bytes=2048, dtype="float32"
            )
            for i in range(RICH_ROWS + 1)
        )
    return RICH_ROWS + 1


def test_list_prints_plain_columns_for_long_listings(cli_run, tmp_path, loratool_home):
    from loratool.cli.catalog_cmds import RICH_ROWS

    _long_listing(cli_run, tmp_path, loratool_home, "t")
    lines = cli_run("list").stdout.splitlines()
    assert lines[0].split() == [
        "name",
        "task",
        "base",
        "model",
        "rank",
        "alpha",
        "modules",
        "params",
        "size",
        "created",
    ]
    assert lines[2].split()[:9] == ["a", "t", "tiny/llama", "4", "8", "4", "1.8K", "7.2", "kB"]
    assert len(lines) == 2 + RICH_ROWS + 2


def test_long_listings_escape_terminal_sequences_and_check_the_rows_they_list(
    cli_run, tmp_path, loratool_home
):
    """The plain table (above RICH_ROWS) escapes control characters as the rich one does; a
    damaged row stops every listing that reads it, and only those."""
    import sqlite3

    n = _long_listing(cli_run, tmp_path, loratool_home, "red\x1b[31m")
    out = cli_run("list").stdout
    assert "\x1b" not in out and out.count("red\\x1b[31m") == n
    db = sqlite3.connect(loratool_home / "catalog.db")
    db.execute("update adapters set rslora = 7 where name = 'n0003'")
    db.commit()
    db.close()
    r = cli_run("list")
    assert r.exit_code == 1 and "'n0003' is damaged: rslora 7" in r.stderr, r.output
    assert cli_run("list", "--task", "t").exit_code == 0  # n0003 is not read
    db = sqlite3.connect(loratool_home / "catalog.db")
    db.execute("update adapters set rslora = 0 where name = 'n0003'")
    db.execute("update adapters set file_sha256 = ? where name = 'n0005'", ["a" * 63 + "g"])
    db.commit()
    db.close()
    r = cli_run("list")  # the hashes' hex text is checked in Python (catalog/verify.py)
    assert r.exit_code == 1 and "'n0005' is damaged: file_sha256" in r.stderr, r.output


def test_verify_and_corrupt_blob(cli_run, tmp_path, loratool_home):
    cli_run("add", make_peft_dir(tmp_path / "a"), "--task", "t")
    r = cli_run("verify")
    assert r.exit_code == 0 and r.stdout.startswith("ok: 1 adapter, 1 blob")
    assert json.loads(cli_run("verify", "--json").stdout)["ok"] is True
    (blob,) = blob_files(loratool_home)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    r = cli_run("verify")
    assert r.exit_code == 1 and str(blob) in r.stdout and "corrupt-blob" in r.stdout
    r = cli_run("verify", "--json")
    doc = json.loads(r.stdout)
    assert r.exit_code == 1 and doc["ok"] is False
    assert [(p["kind"], p["subject"]) for p in doc["problems"]] == [("corrupt-blob", str(blob))]
    r = cli_run("export", "a", tmp_path / "out")
    assert r.exit_code == 1 and "corrupt" in one_error_line(r)
    assert not (tmp_path / "out").exists()


def test_export_refuses_an_existing_destination_without_force(cli_run, tmp_path):
    cli_run("add", make_peft_dir(tmp_path / "a"), "--task", "t")
    dest = tmp_path / "out"
    dest.mkdir()
    r = cli_run("export", "a", dest)
    assert r.exit_code == 1 and "exists" in one_error_line(r)
    assert cli_run("export", "a", dest, "--force").exit_code == 0
    assert (dest / "adapter_config.json").exists()
    r = cli_run("export", "nope", tmp_path / "x")
    assert r.exit_code == 1 and "nope" in one_error_line(r)


# -- compatibility with real peft ---------------------------------------------------------
@pytest.fixture(scope="session")
def peft_cases(tmp_path_factory):
    from peft_models import make_case

    root = tmp_path_factory.mktemp("catalog-peft")
    return {
        name: make_case(name, root) for name in ("llama", "llama_rslora", "llama_embed", "gpt2")
    }


def logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", ["llama", "llama_rslora", "llama_embed", "gpt2"])
def test_peft_export_loads_in_peft_and_gives_the_same_logits(cli_run, peft_cases, tmp_path, name):
    from peft import PeftModel

    case = peft_cases[name]
    assert cli_run("add", case.adapter_dir, "--task", "t", "--name", name).exit_code == 0
    out = tmp_path / "exported"
    r = cli_run("export", name, out, "--format", "peft")
    assert r.exit_code == 0, r.stderr
    reloaded = PeftModel.from_pretrained(case.fresh_base(), out).eval()
    want = logits(case.peft_model)
    torch.testing.assert_close(logits(reloaded), want, rtol=0, atol=0)
    # and the adapter does something, so the comparison means something
    assert not torch.equal(logits(case.fresh_base()), want)


def test_kohya_export_keeps_every_delta(cli_run, peft_cases, tmp_path):
    from loratool import load_adapter, read_base, resolve

    case = peft_cases["llama"]
    cli_run("add", case.adapter_dir, "--task", "t", "--name", "k")
    out = tmp_path / "k.safetensors"
    assert cli_run("export", "k", out, "--format", "kohya").exit_code == 0
    base = read_base(case.base_dir)
    want = resolve(load_adapter(case.adapter_dir), base).deltas()
    got = resolve(load_adapter(out), base).deltas()
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key])
