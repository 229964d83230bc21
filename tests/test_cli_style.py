"""One CLI style across every command, as sqlite-utils, llm and hf users expect: usage errors
exit 2 in click's format, data errors exit 1 with one `error: …` line; options a method
ignores are refused; counts are pluralised; JSON shapes are stable; listing commands speak
--csv/--tsv/--nl; adapter names complete from the catalog."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loratool.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
PLAIN = FIX / "adapters" / "llama-plain"


def usage_error(r, *words: str) -> None:
    """click's usage error: exit 2, `Usage:`, `Try '… --help'`, `Error: …` on stderr."""
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert r.stdout == ""
    assert r.stderr.startswith("Usage: loratool "), r.stderr
    assert "Try 'loratool " in r.stderr and "\nError: " in r.stderr, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def data_error(r, *words: str) -> None:
    """A data error: exit 1, one line `error: …` on stderr, nothing on stdout."""
    assert r.exit_code == 1, (r.exit_code, r.output)
    assert r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


@pytest.fixture
def garbage(tmp_path) -> Path:
    p = tmp_path / "garbage.safetensors"
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    return p


def _data_error_args(name: str, tmp: Path, garbage: Path) -> list:
    out = tmp / "out"
    return {
        "add": ["add", garbage, "--task", "t"],
        "list": ["list"],  # with LORATOOL_HOME a file (see below)
        "show": ["show", "no-such-adapter"],
        "remove": ["remove", "no-such-adapter"],
        "export": ["export", "no-such-adapter", out],
        "convert": ["convert", garbage, out, "--to", "peft"],
        "verify": ["verify"],
        "savings": ["savings", "no-such-adapter"],
        "merge": ["merge", garbage, PLAIN, "-o", out],
        "unmerge": ["unmerge", garbage, PLAIN, "-o", out],
        "inspect-rank": ["inspect-rank", "no-such-adapter"],
        "resize": ["resize", "no-such-adapter", "--rank", "2", "-o", out],
        "extract": ["extract", garbage, FIX / "llama", "--rank", "2", "-o", out],
        "combine": ["combine", "no-such-adapter", PLAIN, "--method", "cat", "-o", out],
        "push": ["push", "no-such-adapter", "--repo", "alice/x"],
        # the tests run with HF_HUB_OFFLINE=1: the Hub is not asked
        "pull": ["pull", "alice/some-lora", "--task", "t"],
    }[name]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_usage_error_exits_2_and_data_error_exits_1(
    cli_run, name, tmp_path, garbage, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    usage_error(cli_run(name, "--no-such-option"), "No such option '--no-such-option'")
    if name in ("list", "verify"):  # a home that is a file: the catalog cannot be opened
        monkeypatch.setenv("LORATOOL_HOME", str(garbage))
    r = cli_run(*_data_error_args(name, tmp_path, garbage))
    data_error(r)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["merge", FIX / "llama"], ["Missing argument"]),
        (
            ["merge", "./no-such-dir", PLAIN, "-o", "x"],
            ["neither a file or directory nor a Hub id"],
        ),
        (["resize", PLAIN, "-o", "x"], ["give exactly one of --rank"]),
        (["resize", PLAIN, "--rank", "2"], ["give exactly one of --as NAME and -o DEST"]),
        (["combine", PLAIN, PLAIN, "--method", "svd", "-o", "x"], ["--method svd needs --rank"]),
        (["list", "--csv", "--json"], ["--csv", "--json"]),
        (["savings", "--rank", "4"], ["needs --rank, --targets"]),
        (["push", PLAIN, "--repo", "alice/x@dev"], ["--revision"]),
        (["inspect-rank", PLAIN, "--threshold", "abc"], ["not a valid float"]),
    ],
)
def test_usage_errors_raised_by_commands_look_like_clicks(cli_run, args, words):
    usage_error(cli_run(*args), *words)


@pytest.mark.parametrize(
    "method, extra, flag",
    [
        ("linear", ["--rank", "2"], "--rank"),
        ("cat", ["--rank", "2"], "--rank"),
        ("cat", ["--density", "0.5"], "--density"),  # even the default value, given
        ("svd", ["--rank", "2", "--density", "0.3"], "--density"),
        ("ties", ["--rank", "2", "--seed", "3"], "--seed"),
        ("svd", ["--rank", "2", "--max-memory", "1G"], "--max-memory"),
    ],
)
def test_combine_refuses_an_option_its_method_ignores(cli_run, tmp_path, method, extra, flag):
    r = cli_run("combine", PLAIN, PLAIN, "--method", method, *extra, "-o", tmp_path / "o")
    usage_error(r, f"--method {method} does not use {flag}")
    assert not (tmp_path / "o").exists()


LOHA = FIX / "adapters" / "conv-loha.safetensors"
LLAMA = FIX / "llama"


@pytest.mark.parametrize(
    "case",
    [
        # --task is the catalog task of --as: -o writes a PEFT directory, which has none
        (["resize", PLAIN, "--rank", "2", "--task", "t"], ["-o does not use --task"]),
        (["combine", PLAIN, PLAIN, "--method", "cat", "--task", "t"], ["-o does not use --task"]),
        (["extract", LLAMA, LLAMA, "--rank", "2", "--task", "t"], ["-o does not use --task"]),
        # the randomized SVD's knobs, with the exact SVD
        (
            ["extract", LLAMA, LLAMA, "--rank", "2", "--exact", "--niter", "3"],
            ["--exact", "--niter"],
        ),
        (
            ["extract", LLAMA, LLAMA, "--rank", "2", "--exact", "--oversample", "4"],
            ["--oversample"],
        ),
        (["extract", LLAMA, LLAMA, "--rank", "2", "--exact", "--seed", "0"], ["--seed"]),
        (["extract", LLAMA, LLAMA, "--sv-cumulative", "0.9", "--seed", "1"], ["--sv-cumulative"]),
        # a format that writes every component, or keeps LyCORIS modules as they are
        (["convert", PLAIN, "{out}", "--to", "kohya", "--component", "unet"], ["--component"]),
        (["convert", LOHA, "{out}", "--to", "lycoris", "--rank", "2"], ["--to lycoris", "--rank"]),
        (["convert", LOHA, "{out}", "--to", "loratool", "--energy", "0.9"], ["--energy"]),
        (["export", PLAIN, "{out}", "--format", "lycoris", "--component", "unet"], ["--component"]),
        # an adapter with no LyCORIS module: --rank/--energy would change nothing
        (["convert", PLAIN, "{out}", "--to", "peft", "--rank", "2"], ["no LyCORIS module"]),
        (["export", PLAIN, "{out}", "--format", "kohya", "--energy", "0.9"], ["no LyCORIS module"]),
    ],
    ids=lambda case: " ".join([case[0][0]] + [a for a in case[0] if str(a)[:2] == "--"]),
)
def test_an_option_the_command_would_ignore_is_refused(cli_run, tmp_path, case):
    args, words = case
    out = tmp_path / "out"
    args = [out if a == "{out}" else a for a in args]
    if args[0] in ("resize", "combine", "extract"):
        args += ["-o", out]
    usage_error(cli_run(*args), *words)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_the_options_refused_elsewhere_still_work_where_they_are_used(cli_run, tmp_path):
    """The same options where the command reads them: --task with --as, the SVD knobs with
    the randomized SVD, --component for a one-component format, --rank for LyCORIS → LoRA."""
    r = cli_run("resize", PLAIN, "--rank", "2", "--as", "r2", "--task", "t", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(cli_run("show", "r2", "--json").stdout)["task"] == "t"
    r = cli_run("extract", LLAMA, LLAMA, "--rank", "2", "--seed", "1", "--niter", "1")
    assert r.exit_code == 2 and "-o DEST" in r.stderr  # only the output choice is missing
    r = cli_run("convert", LOHA, tmp_path / "loha.safetensors", "--to", "kohya", "--rank", "2")
    assert r.exit_code == 0, r.output
    # a catalog adapter is checked as a path is: no LyCORIS module, --rank refused; one, used
    assert cli_run("add", PLAIN, "--task", "t", "--name", "plain").exit_code == 0
    assert cli_run("add", LOHA, "--task", "t", "--name", "loha").exit_code == 0
    r = cli_run("export", "plain", tmp_path / "e", "--format", "kohya", "--rank", "2")
    usage_error(r, "no LyCORIS module")
    assert not (tmp_path / "e").exists()
    r = cli_run("export", "loha", tmp_path / "e.safetensors", "--format", "kohya", "--rank", "2")
    assert r.exit_code == 0, r.output
    r = cli_run("convert", PLAIN, tmp_path / "p", "--to", "peft", "--component", "unet")
    assert r.exit_code == 1 and "no modules of component 'unet'" in r.stderr  # read, not ignored


def test_combine_as_names_the_real_reason_it_needs_a_task(cli_run, tmp_path):
    rslora = FIX / "adapters" / "llama-rslora"
    assert cli_run("add", PLAIN, "--task", "summarize", "--name", "a").exit_code == 0
    assert cli_run("add", rslora, "--task", "translate", "--name", "b").exit_code == 0
    r = cli_run("add", rslora, "--task", "translate", "--name", "c", "--keep-both")
    assert r.exit_code == 0, r.output
    usage_error(
        cli_run("combine", "a", "b", "--method", "cat", "--as", "ab"),
        "--as needs --task: the inputs have different tasks (summarize, translate)",
    )
    usage_error(
        cli_run("combine", "a", PLAIN, "--method", "cat", "--as", "ab"),
        f"{PLAIN} is a path, with no catalog task",
    )
    usage_error(
        cli_run("resize", PLAIN, "--rank", "2", "--as", "r"),
        f"{PLAIN} is a path, not a catalog adapter: it has no task to inherit",
    )
    # one task between them: inherited
    r = cli_run("combine", "b", "c", "--method", "cat", "--as", "bc", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(cli_run("show", "bc", "--json").stdout)["task"] == "translate"


def test_counts_are_pluralised(cli_run, tmp_path):
    """A one-module adapter says "1 module", not "1 modules", everywhere it is counted."""
    from safetensors.torch import load_file, save_file

    one = tmp_path / "one"
    one.mkdir()
    cfg = json.loads((PLAIN / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj"]
    (one / "adapter_config.json").write_text(json.dumps(cfg))
    t = load_file(PLAIN / "adapter_model.safetensors")
    keep = {k: v for k, v in t.items() if "layers.0.self_attn.q_proj" in k}
    save_file(keep, one / "adapter_model.safetensors")
    outputs = [
        cli_run("add", one, "--task", "t", "--name", "one").stdout,
        cli_run("resize", "one", "--rank", "2", "-o", tmp_path / "r").stdout,
        cli_run("combine", "one", "--method", "cat", "-o", tmp_path / "c").stdout,
        cli_run("inspect-rank", "one").stdout,
        cli_run("export", "one", tmp_path / "e").stdout,
        cli_run("merge", FIX / "llama", "one", "-o", tmp_path / "m").stdout,
    ]
    text = "\n".join(outputs)
    assert "1 module," in text and "1 module at rank" in text and "1 module;" in text
    assert "1 modules" not in text and "1 tensors" not in text
    assert "1 tensor changed" in text


def test_json_shapes_name_the_count_and_the_list_apart(cli_run):
    assert cli_run("add", PLAIN, "--task", "t", "--name", "p").exit_code == 0
    (row,) = json.loads(cli_run("list", "--json").stdout)
    shown = json.loads(cli_run("show", "p", "--json").stdout)
    # SPEC's keys are all there
    for key in (
        "name", "task", "base_model", "rank", "alpha", "modules", "params", "dense_params",
        "bytes", "dtype", "format", "tags", "created", "sha256",
    ):  # fmt: skip
        assert key in row, key
        assert shown[key] == row[key], key
    # `modules` and `module_count` are the count wherever a catalog row is printed
    assert row["modules"] == row["module_count"] == 4
    assert shown["modules"] == shown["module_count"] == 4
    assert [m["name"] for m in shown["module_details"]] == sorted(
        m["name"] for m in shown["module_details"]
    )
    assert len(shown["module_details"]) == 4
    # reports of work keep the modules and say how many
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        doc = json.loads(
            cli_run("resize", "p", "--rank", "2", "-o", Path(d) / "r", "--json").stdout
        )
        assert doc["module_count"] == len(doc["modules"]) == 4
        doc = json.loads(
            cli_run("combine", "p", "p", "--method", "cat", "-o", Path(d) / "c", "--json").stdout
        )
        assert doc["module_count"] == len(doc["modules"]) == 4


def _csv(text: str, delimiter=",") -> list[dict]:
    return list(csv.DictReader(io.StringIO(text), delimiter=delimiter))


def test_list_csv_tsv_nl_as_sqlite_utils_prints_them(cli_run):
    assert cli_run("add", PLAIN, "--task", "summarize", "--name", "p", "--tag", "v1").exit_code == 0
    rs = FIX / "adapters" / "llama-rslora"
    assert cli_run("add", rs, "--task", "translate", "--name", "q").exit_code == 0
    rows = json.loads(cli_run("list", "--json").stdout)
    got_csv = _csv(cli_run("list", "--csv").stdout)
    got_tsv = _csv(cli_run("list", "--tsv").stdout, "\t")
    got_nl = [json.loads(line) for line in cli_run("list", "--nl").stdout.splitlines()]
    assert got_nl == rows
    assert got_csv == got_tsv
    assert [r["name"] for r in got_csv] == [r["name"] for r in rows] == ["p", "q"]
    assert list(got_csv[0])[:6] == ["name", "task", "base_model", "rank", "alpha", "modules"]
    for c, j in zip(got_csv, rows, strict=True):
        assert int(c["modules"]) == j["modules"] and int(c["bytes"]) == j["bytes"]
        assert json.loads(c["tags"]) == j["tags"]  # lists as JSON, as sqlite-utils does
    # an empty catalog: a header row only, an empty array, nothing
    assert cli_run("list", "--task", "nope", "--csv").stdout.startswith("name,task,")
    assert cli_run("list", "--task", "nope", "--json").stdout == "[]\n"
    assert cli_run("list", "--task", "nope", "--nl").stdout == ""


def test_verify_and_inspect_rank_rows(cli_run, loratool_home):
    assert cli_run("add", PLAIN, "--task", "t", "--name", "p").exit_code == 0
    r = cli_run("verify", "--csv")
    assert r.exit_code == 0 and r.stdout == "kind,subject,message\n"
    stray = loratool_home / "blobs" / "stray.txt"
    stray.write_text("x")
    r = cli_run("verify", "--tsv")
    assert r.exit_code == 1
    (problem,) = _csv(r.stdout, "\t")
    assert problem["subject"].endswith("stray.txt") and problem["kind"]
    doc = json.loads(cli_run("inspect-rank", "p", "--json").stdout)
    rows = _csv(cli_run("inspect-rank", "p", "--csv").stdout)
    assert [r["name"] for r in rows] == [m["name"] for m in doc["modules"]]
    for r, m in zip(rows, doc["modules"], strict=True):
        assert int(r["energy_rank"]) == m["energy_rank"]
        assert json.loads(r["singular_values"]) == pytest.approx(m["singular_values"])
    nl = [json.loads(line) for line in cli_run("inspect-rank", "p", "--nl").stdout.splitlines()]
    assert nl == doc["modules"]


def _complete(env_home: Path, words: str, cword: int) -> list[str]:
    env = {
        **os.environ,
        "LORATOOL_HOME": str(env_home),
        "_LORATOOL_COMPLETE": "bash_complete",
        "COMP_WORDS": words,
        "COMP_CWORD": str(cword),
    }
    code = (
        "import sys\n"
        "from loratool.cli import cli\n"
        "try:\n    cli.main(prog_name='loratool', complete_var='_LORATOOL_COMPLETE')\n"
        "except SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'completion imported torch'\n"
    )
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return [line for line in p.stdout.splitlines() if line]


def test_shell_completion_offers_catalog_names_without_torch(cli_run, loratool_home):
    for name in ("summarize-v1", "summarize-v2", "translate"):
        assert cli_run("add", PLAIN, "--task", "t", "--name", name, "--keep-both").exit_code == 0
    # bash_complete prints "type,value" lines
    got = _complete(loratool_home, "loratool show summ", 2)
    assert got == ["plain,summarize-v1", "plain,summarize-v2"]
    got = _complete(loratool_home, "loratool merge ./base tr", 3)
    assert "plain,translate" in got and "file,tr" in got  # names, and files as well
    got = _complete(loratool_home, "loratool export ", 2)
    assert {"plain,summarize-v1", "plain,summarize-v2", "plain,translate"} <= set(got)
    # a home with no catalog completes nothing, and creates nothing
    empty = loratool_home.parent / "empty-home"
    assert _complete(empty, "loratool show s", 2) == []
    assert not empty.exists()


def test_export_and_push_take_a_path_as_well_as_a_name(cli_run, tmp_path):
    r = cli_run("export", PLAIN, tmp_path / "k.safetensors", "--format", "kohya", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["to"] == "kohya"
    r = cli_run("inspect-rank", tmp_path / "k.safetensors", "--json")
    assert r.exit_code == 0, r.output
    r = cli_run("export", PLAIN, tmp_path / "k.safetensors", "--format", "kohya")
    data_error(r, "already exists")  # the same output checks as a catalog export


def test_inspect_rank_suggests_a_resize_only_below_the_adapters_rank(cli_run, tmp_path):
    import torch
    from safetensors.torch import save_file

    # full rank: every module needs its 4 singular values
    r = cli_run("inspect-rank", PLAIN)
    assert r.exit_code == 0
    assert "--rank 4" not in r.stdout and "nothing to shrink" in r.stdout
    # rank 8 factors of a rank-2 product: resize to 2
    d = tmp_path / "low"
    d.mkdir()
    cfg = json.loads((PLAIN / "adapter_config.json").read_text())
    cfg.update(r=8, lora_alpha=8, target_modules=["q_proj"])
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    t = {}
    for layer in range(2):
        p = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        B = torch.randn(64, 2, generator=g) @ torch.randn(2, 8, generator=g)
        t[p + ".lora_B.weight"] = B.contiguous()
        t[p + ".lora_A.weight"] = torch.randn(8, 64, generator=g)
    save_file(t, d / "adapter_model.safetensors")
    r = cli_run("inspect-rank", d)
    assert r.exit_code == 0, r.output
    assert f"`loratool resize {d} --rank 2` keeps it" in r.stdout
