"""Attacks on "nothing lost": each test is the command that once destroyed or leaked data.

Issue 16, items 1–4 and 11: an output never overlaps an input or the catalog; "exists" is
decided at the final rename; weights are numbers; links out of a base are not followed into
outputs; interrupted writes leave nothing behind. The randomized interruption test lives in
tests/test_interrupt.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loratool.fsutil as fsutil
import loratool.merge.engine as merge_mod
from loratool.errors import OutputExistsError, ValidationError
from loratool.fsutil import TMP_MARK, check_destination, clean_stale, rename_noreplace

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


def tree(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root``: files by bytes, links by target, directories as 'dir'."""
    if root.is_file():
        return {".": root.read_bytes()}
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "link→" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = p.read_bytes()
    return out


def temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(TMP_MARK))


def one_error_line(r, *needles: str) -> None:
    assert r.exit_code == 1, (r.exit_code, r.output)
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.output
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


@pytest.fixture
def work(tmp_path):
    """Writable copies of the fixtures: work/llama (a base), work/sharded, work/adapter."""
    w = tmp_path / "work"
    shutil.copytree(FIXTURES / "llama", w / "llama")
    shutil.copytree(FIXTURES / "llama-sharded", w / "sharded")
    shutil.copytree(FIXTURES / "adapters" / "llama-plain", w / "adapter")
    return w


@pytest.fixture
def cataloged(cli_run, work, loratool_home):
    """The adapter added to the catalog as 'a' (and a second, 'b')."""
    assert cli_run("add", work / "adapter", "--task", "t", "--name", "a").exit_code == 0
    # the same weights a second time, on purpose (add refuses that without --keep-both)
    r = cli_run("add", work / "adapter", "--task", "t", "--name", "b", "--keep-both")
    assert r.exit_code == 0
    return loratool_home


def verify_ok(cli_run) -> None:
    r = cli_run("verify", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ok"]


# -- 1. an output never overlaps an input or the catalog -------------------------------------


def test_merge_into_the_directory_holding_the_base_is_refused(cli_run, work):
    """merge BASE_DIR/llama A -o BASE_DIR --force used to delete the base and its siblings."""
    before = tree(work)
    r = cli_run("merge", work / "llama", work / "adapter", "-o", work, "--force")
    one_error_line(r, "contains an input")
    assert tree(work) == before


def test_merge_onto_a_shard_index_is_refused(cli_run, work):
    """-o s/model.safetensors.index.json --force used to turn the index into a directory."""
    index = work / "sharded" / "model.safetensors.index.json"
    before = tree(work)
    for out in (index, work / "sharded" / "model-00001-of-00003.safetensors", work / "sharded"):
        r = cli_run("merge", work / "sharded", work / "adapter", "-o", out, "--force")
        one_error_line(r, "an input")
    assert tree(work) == before and index.is_file()


@pytest.mark.parametrize(
    "out",
    [
        "llama/../llama",  # `..`
        "llama/merged",  # inside the base directory
        "adapter",  # an adapter it reads
        "adapter/sub/deeper",
        "link-to-llama",  # a symlink to the base
        "link-to-work/llama",
    ],
)
def test_merge_output_resolving_to_an_input_is_refused(cli_run, work, out):
    (work / "link-to-llama").symlink_to(work / "llama")
    (work / "link-to-work").symlink_to(work)
    before = tree(work)
    r = cli_run("merge", work / "llama", work / "adapter", "-o", work / out, "--force")
    one_error_line(r, "an input")
    assert tree(work) == before


def test_merge_into_the_catalog_home_is_refused(cli_run, work, cataloged):
    """merge … -o HOME --force used to destroy the catalog."""
    before = tree(cataloged)
    for out in (cataloged, cataloged / "blobs", cataloged / "catalog.db", cataloged / "new"):
        r = cli_run("merge", work / "llama", "a", "-o", out, "--force")
        one_error_line(r, "the catalog home")
    r = cli_run("merge", work / "llama", "a", "-o", cataloged.parent, "--force")
    one_error_line(r, "contains")
    assert tree(cataloged) == before
    verify_ok(cli_run)


@pytest.mark.parametrize("dest", ["", "catalog.db", "blobs/zz", "blobs", "tmp/x"])
@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_export_into_the_catalog_home_is_refused(cli_run, cataloged, dest, fmt):
    """export A HOME --force, export A HOME/catalog.db --force, export A HOME/blobs/zz."""
    before = tree(cataloged)
    for force in ((), ("--force",)):
        r = cli_run("export", "a", cataloged / dest, "--format", fmt, *force)
        one_error_line(r, "the catalog home")
    assert tree(cataloged) == before
    verify_ok(cli_run)


def test_export_through_a_link_into_the_home_is_refused(cli_run, cataloged, tmp_path):
    (tmp_path / "innocent").symlink_to(cataloged / "blobs")
    r = cli_run("export", "a", tmp_path / "innocent" / "zz", "--force")
    one_error_line(r, "the catalog home")
    verify_ok(cli_run)


def test_unmerge_output_may_not_be_its_check_base(cli_run, work, tmp_path):
    assert cli_run("merge", work / "llama", work / "adapter", "-o", tmp_path / "m").exit_code == 0
    before = tree(work)
    r = cli_run(
        "unmerge",
        tmp_path / "m",
        work / "adapter",
        "-o",
        work / "llama",
        "--check",
        work / "llama",
        "--force",
    )
    one_error_line(r, "an input")
    assert tree(work) == before


def test_resize_extract_combine_outputs_may_not_replace_inputs(cli_run, work, tmp_path):
    before = tree(work)
    r = cli_run("resize", work / "adapter", "--rank", "2", "-o", work / "adapter", "--force")
    one_error_line(r, "is an input")
    r = cli_run("combine", work / "adapter", "--method", "cat", "-o", work, "--force")
    one_error_line(r, "contains an input")
    assert cli_run("merge", work / "llama", work / "adapter", "-o", tmp_path / "ft").exit_code == 0
    r = cli_run(
        "extract", work / "llama", tmp_path / "ft", "--rank", "2",
        "-o", tmp_path / "ft", "--force",
    )  # fmt: skip
    one_error_line(r, "is an input")
    assert tree(work) == before


def test_as_name_force_may_not_replace_an_input(cli_run, cataloged):
    """resize a --as a --force would replace the adapter it reads."""
    before = tree(cataloged)
    r = cli_run("resize", "a", "--rank", "2", "--as", "a", "--force")
    one_error_line(r, "would replace an input")
    r = cli_run("combine", "a", "b=0.5", "--method", "cat", "--as", "b", "--force")
    one_error_line(r, "would replace an input")
    assert tree(cataloged) == before
    # an earlier output may be replaced
    assert cli_run("resize", "a", "--rank", "2", "--as", "c").exit_code == 0
    assert cli_run("resize", "a", "--rank", "3", "--as", "c", "--force").exit_code == 0


def test_plot_may_not_overwrite_the_adapter(cli_run, work):
    before = tree(work)
    target = work / "adapter" / "adapter_model.safetensors"
    r = cli_run("inspect-rank", work / "adapter", "--plot", target, "--force")
    one_error_line(r, "an input")
    assert tree(work) == before


@pytest.mark.parametrize(
    ("dest", "to", "needle"),
    [
        ("adapter", "peft", "is an input"),
        ("adapter/x.safetensors", "kohya", "lies inside an input"),
        (".", "peft", "contains an input"),
        ("llama/model.safetensors", "kohya", "an input"),  # the --base it reads
    ],
)
def test_convert_output_may_not_replace_an_input(cli_run, work, dest, to, needle):
    before = tree(work)
    r = cli_run(
        "convert", work / "adapter", work / dest, "--to", to, "--base", work / "llama", "--force"
    )
    one_error_line(r, needle)
    assert tree(work) == before


def test_convert_and_export_into_the_home_or_the_base_are_refused(cli_run, work, cataloged):
    before = tree(cataloged)
    for dest in (cataloged, cataloged / "blobs" / "x.safetensors"):
        r = cli_run("convert", "a", dest, "--to", "kohya", "--force")
        one_error_line(r, "the catalog home")
    r = cli_run(
        "export", "a", work / "llama" / "model.safetensors", "--format", "kohya",
        "--base", work / "llama", "--force",
    )  # fmt: skip
    one_error_line(r, "an input")
    assert tree(cataloged) == before
    verify_ok(cli_run)


def test_library_convert_refuses_its_base(work):
    from loratool.formats import load_adapter
    from loratool.formats.convert import convert

    adapter = load_adapter(work / "adapter")
    with pytest.raises(ValidationError, match="an input"):
        convert(adapter, work / "llama", "peft", base=work / "llama", force=True)
    assert (work / "llama" / "model.safetensors").is_file()


def test_library_plan_merge_refuses_what_the_cli_refuses(work, tmp_path):
    from loratool.merge import AdapterInput, plan_merge
    from loratool.sources import open_adapter

    opened = open_adapter(str(work / "adapter"), lazy=True)
    inputs = [AdapterInput(opened.adapter, 1.0, opened.label, opened.sha256)]
    for out in (work, work / "llama", work / "llama" / "model.safetensors", work / "adapter"):
        with pytest.raises(ValidationError, match="an input"):
            plan_merge(work / "llama", inputs, out, force=True, device="cpu")
    # a shard that is a link to elsewhere: its real file is protected too
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shard = work / "sharded" / "model-00002-of-00003.safetensors"
    shutil.move(shard, elsewhere / shard.name)
    shard.symlink_to(elsewhere / shard.name)
    with pytest.raises(ValidationError, match="an input"):
        plan_merge(work / "sharded", inputs, elsewhere, force=True, device="cpu")


def test_check_destination_sees_a_second_name_for_the_same_directory(tmp_path):
    """A bind mount (needs root) or a hard-linked file: same inode, other path."""
    src = tmp_path / "src.safetensors"
    src.write_bytes(b"x")
    os.link(src, tmp_path / "alias.safetensors")
    with pytest.raises(ValidationError, match="is an input"):
        check_destination(tmp_path / "alias.safetensors", inputs=[src], force=True)
    check_destination(tmp_path / "other", inputs=[src])  # no overlap: fine


# -- 2. "exists" is decided at the final rename -----------------------------------------------


def _appear_during_write(monkeypatch, make):
    """Call ``make()`` after the merge has written its output files, before the rename."""
    orig = merge_mod._write_file

    def write_then_appear(*a, **kw):
        n = orig(*a, **kw)
        make()
        return n

    monkeypatch.setattr(merge_mod, "_write_file", write_then_appear)


@pytest.mark.parametrize("kind", ["dir", "empty-dir", "file", "dangling-link"])
def test_output_that_appears_during_the_merge_is_not_replaced(
    cli_run, work, tmp_path, monkeypatch, kind
):
    """A directory created at -o during a merge used to be replaced silently (exit 0)."""
    out = tmp_path / "out"

    def make():
        if kind == "dir":
            out.mkdir()
            (out / "precious.txt").write_text("mine")
        elif kind == "empty-dir":
            out.mkdir()  # os.rename of a directory onto an empty one would succeed
        elif kind == "file":
            out.write_text("mine")
        else:
            out.symlink_to(tmp_path / "nowhere")

    _appear_during_write(monkeypatch, make)
    r = cli_run("merge", work / "llama", work / "adapter", "-o", out)
    one_error_line(r, "appeared while the output was being written", str(out))
    assert temporaries(tmp_path) == []
    if kind == "dir":
        assert tree(out) == {"precious.txt": b"mine"}
    elif kind == "empty-dir":
        assert tree(out) == {}
    elif kind == "file":
        assert out.read_text() == "mine"
    else:
        assert out.is_symlink() and not (tmp_path / "nowhere").exists()


def test_single_file_output_that_appears_during_the_merge_is_not_replaced(
    cli_run, work, tmp_path, monkeypatch
):
    out = tmp_path / "merged.safetensors"
    _appear_during_write(monkeypatch, lambda: out.write_text("mine"))
    r = cli_run("merge", work / "llama" / "model.safetensors", work / "adapter", "-o", out)
    one_error_line(r, "appeared")
    assert out.read_text() == "mine" and temporaries(tmp_path) == []


def test_two_merges_to_one_new_output_one_wins(cli_run, work, tmp_path, monkeypatch):
    """Two merges to one new -o both used to exit 0. The second starts (and finishes) while
    the first is writing: the second wins, the first exits 1 and leaves nothing."""
    out = tmp_path / "out"
    results = []
    orig = merge_mod._write_file

    def write(*a, **kw):
        n = orig(*a, **kw)
        if not results:
            monkeypatch.setattr(merge_mod, "_write_file", orig)
            results.append(cli_run("merge", work / "llama", work / "adapter", "-o", out))
        return n

    monkeypatch.setattr(merge_mod, "_write_file", write)
    first = cli_run("merge", work / "llama", f"{work / 'adapter'}=0.5", "-o", out)
    assert results[0].exit_code == 0, results[0].output
    one_error_line(first, "appeared")
    hist = json.loads(
        load_file_meta(out / "model.safetensors")["loratool.merges"]
    )  # the winner's output, whole
    assert [h["weight"] for h in hist] == [1.0]
    assert temporaries(tmp_path) == []


def load_file_meta(path: Path) -> dict:
    from loratool.tensors.header import read_header

    return read_header(path).metadata


def test_two_merge_processes_race_for_one_output(work, tmp_path):
    """Two real processes at once: exactly one exits 0; the other exits 1 with one line."""
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "loratool", "merge", str(work / "llama"), str(work / "adapter")]
    procs = [
        subprocess.Popen(
            [*argv, "-o", str(out), "--device", "cpu"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 1], results
    err = next(e for rc, e in results if rc == 1)
    assert (
        err.startswith("error: ")
        and err.count("\n") == 1
        and ("exists" in err or "appeared" in err)
    )
    assert load_file(out / "model.safetensors")  # whole
    assert temporaries(tmp_path) == []


def test_dangling_symlink_at_the_output_needs_force(cli_run, work, tmp_path):
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "nowhere")
    r = cli_run("merge", work / "llama", work / "adapter", "-o", out)
    one_error_line(r, "already exists")
    assert out.is_symlink() and not (tmp_path / "nowhere").exists()
    r = cli_run("merge", work / "llama", work / "adapter", "-o", out, "--force")
    assert r.exit_code == 0, r.output
    assert not out.is_symlink() and (out / "model.safetensors").is_file()
    assert not (tmp_path / "nowhere").exists()  # the link was replaced, not followed


def test_existing_plot_file_needs_force(cli_run, work, tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "spectra.png"
    plot.write_text("mine")
    r = cli_run("inspect-rank", work / "adapter", "--plot", plot)
    one_error_line(r, "already exists")
    assert plot.read_text() == "mine"
    r = cli_run("inspect-rank", work / "adapter", "--plot", plot, "--force")
    assert r.exit_code == 0, r.output
    assert plot.read_bytes().startswith(b"\x89PNG")
    link = tmp_path / "dangling.png"
    link.symlink_to(tmp_path / "nowhere.png")
    one_error_line(cli_run("inspect-rank", work / "adapter", "--plot", link), "already exists")
    assert link.is_symlink() and not (tmp_path / "nowhere.png").exists()


@pytest.fixture(params=["renameat2", "portable"])
def rename_mode(request, monkeypatch):
    """The kernel's rename without replace, and the fallback used where it is missing."""
    if request.param == "renameat2":
        if fsutil._renameat2 is None:
            pytest.skip("no renameat2 here")
        probe = request.getfixturevalue("tmp_path") / "probe"
        probe.mkdir()
        if not fsutil._rename2(probe, probe.with_name("probe2"), fsutil._RENAME_NOREPLACE):
            pytest.skip("this filesystem has no RENAME_NOREPLACE")
        probe.with_name("probe2").rmdir()
    else:
        monkeypatch.setattr(fsutil, "_renameat2", None)
    return request.param


@pytest.mark.parametrize("src_kind", ["file", "dir"])
@pytest.mark.parametrize("dst_kind", ["file", "dir", "empty-dir", "dangling-link", "link-to-dir"])
def test_rename_noreplace_never_replaces(tmp_path, rename_mode, src_kind, dst_kind):
    src, dst = tmp_path / "src", tmp_path / "dst"
    if src_kind == "file":
        src.write_text("new")
    else:
        src.mkdir()
        (src / "f").write_text("new")
    if dst_kind == "file":
        dst.write_text("old")
    elif dst_kind == "dir":
        dst.mkdir()
        (dst / "g").write_text("old")
    elif dst_kind == "empty-dir":
        dst.mkdir()
    elif dst_kind == "dangling-link":
        dst.symlink_to(tmp_path / "nowhere")
    else:
        (tmp_path / "target").mkdir()
        dst.symlink_to(tmp_path / "target")
    before = tree(tmp_path)
    with pytest.raises(FileExistsError):
        rename_noreplace(src, dst)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("src_kind", ["file", "dir"])
def test_rename_noreplace_moves_when_free(tmp_path, rename_mode, src_kind):
    src, dst = tmp_path / "src", tmp_path / "dst"
    if src_kind == "file":
        src.write_text("new")
    else:
        src.mkdir()
        (src / "f").write_text("new")
    rename_noreplace(src, dst)
    assert not os.path.lexists(src)
    assert (dst.read_text() if src_kind == "file" else (dst / "f").read_text()) == "new"


def test_force_replaces_an_earlier_output_whole(cli_run, work, tmp_path, rename_mode):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("an earlier output")
    r = cli_run("merge", work / "llama", work / "adapter", "-o", out, "--force")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert temporaries(tmp_path) == []
    single = tmp_path / "single.safetensors"
    single.write_text("an earlier output")
    r = cli_run(
        "merge", work / "llama" / "model.safetensors", work / "adapter", "-o", single, "--force"
    )
    assert r.exit_code == 0, r.output
    assert load_file(single) and temporaries(tmp_path) == []


def test_atomic_dir_without_force_fails_at_the_rename(tmp_path, rename_mode):
    dest = tmp_path / "d"
    with pytest.raises(OutputExistsError):
        with fsutil.atomic_dir(dest) as tmp:
            (tmp / "f").write_text("new")
            dest.mkdir()  # appears meanwhile, empty
    assert list(dest.iterdir()) == [] and temporaries(tmp_path) == []


# -- 3. weights are numbers --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weight", "needle"),
    [
        ("nan", "not a number"),
        ("inf", "not a number"),
        ("-inf", "not a number"),
        ("abc", "not a number"),
        ("", "not a number"),
        ("0x10", "not a number"),
        ("1_0", "not a number"),
        ("1e39", "does not fit in float32"),
        ("-1e39", "does not fit in float32"),
        ("2e38", "overflows float32"),  # the adapter's scale is 2: weight·scale = 4e38
    ],
)
def test_merge_weight_must_be_a_finite_number(cli_run, work, tmp_path, weight, needle):
    """merge BASE A=nan exited 0 with wrong weights; =1e39 gave a traceback."""
    out = tmp_path / "out"
    r = cli_run("merge", work / "llama", f"{work / 'adapter'}={weight}", "-o", out)
    one_error_line(r, needle)
    assert not out.exists() and temporaries(tmp_path) == []


@pytest.fixture
def big(work):
    """The adapter with factors a thousand times larger (still finite)."""
    d = work / "big"
    shutil.copytree(work / "adapter", d)
    t = load_file(d / "adapter_model.safetensors")
    save_file({k: v * 1e3 for k, v in t.items()}, d / "adapter_model.safetensors")
    return d


def test_merge_weight_whose_factors_overflow_is_refused(cli_run, work, big, tmp_path):
    """Finite weight·scale, but scale·B·A overflows float32: NaN/Inf refused, nothing written."""
    out = tmp_path / "out"
    r = cli_run("merge", work / "llama", f"{big}=1e36", "-o", out)
    one_error_line(r, "NaN or Inf")
    assert not out.exists() and temporaries(tmp_path) == []


@pytest.mark.parametrize("method", ["cat", "linear", "svd", "ties"])
@pytest.mark.parametrize("weight", ["nan", "1e39", "1e36", "1.5e38"])
def test_combine_never_writes_non_finite_factors(cli_run, work, big, tmp_path, method, weight):
    """combine A=nan … -o used to write NaN factors. Whatever the weight, the command either
    writes finite factors or refuses in one line and writes nothing."""
    out = tmp_path / "out"
    extra = ("--rank", "2") if method in ("svd", "ties") else ()
    r = cli_run(
        "combine",
        f"{big}={weight}",
        work / "adapter",
        "--method",
        method,
        *extra,
        "-o",
        out,
    )
    if r.exit_code == 0:
        assert weight not in ("nan", "1e39", "1.5e38"), r.output  # these overflow here
        factors = load_file(out / "adapter_model.safetensors")
        assert all(bool(torch.isfinite(t).all()) for t in factors.values())
    else:
        one_error_line(r)
        assert not out.exists() and temporaries(tmp_path) == []


def test_save_adapter_refuses_nan(work, tmp_path):
    from loratool.formats import load_adapter, save_adapter

    adapter = load_adapter(work / "adapter")
    mod = next(iter(adapter.modules.values()))
    mod.B[0, 0] = float("nan")
    for fmt, dest in (("peft", tmp_path / "p"), ("kohya", tmp_path / "k.safetensors")):
        with pytest.raises(ValidationError, match="NaN"):
            save_adapter(adapter, dest, fmt)
        assert not dest.exists()


def test_path_holding_an_equals_sign_still_works(cli_run, work, tmp_path):
    """parse splits at the last '=': a path with '=' is itself, a suffix weighs it."""
    odd = tmp_path / "lr=1e-4"
    shutil.copytree(work / "adapter", odd)
    r = cli_run("merge", work / "llama", odd, "-o", tmp_path / "m1")
    assert r.exit_code == 0, r.output
    r = cli_run("merge", work / "llama", f"{odd}=0.5", "-o", tmp_path / "m2")
    assert r.exit_code == 0, r.output
    weights = [
        json.loads(load_file_meta(tmp_path / m / "model.safetensors")["loratool.merges"])[-1][
            "weight"
        ]
        for m in ("m1", "m2")
    ]
    assert weights == [1.0, 0.5]
    # a path whose '=' suffix is not a number, while no such path exists: an error
    r = cli_run("merge", work / "llama", f"{work / 'adapter'}=x", "-o", tmp_path / "m3")
    one_error_line(r, "not a number")


def test_catalog_weights_are_parsed_the_same_way(cli_run, work, cataloged, tmp_path):
    one_error_line(cli_run("merge", work / "llama", "a=nan", "-o", tmp_path / "o"), "not a number")
    one_error_line(cli_run("combine", "a=nan", "b", "--method", "cat", "--as", "c"), "not a number")
    r = cli_run("combine", "a=0.5", "b=-0.25", "--method", "cat", "--as", "c", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["inputs"] == ["a=0.5", "b=-0.25"]


def test_library_merge_refuses_a_nan_weight(work, tmp_path):
    from loratool.merge import AdapterInput, plan_merge
    from loratool.sources import open_adapter

    opened = open_adapter(str(work / "adapter"), lazy=True)
    for w in (float("nan"), float("inf"), 1e39):
        with pytest.raises(ValidationError):
            plan_merge(
                work / "llama",
                [AdapterInput(opened.adapter, w, opened.label, opened.sha256)],
                tmp_path / "o",
                device="cpu",
            )


# -- 4. links in a base are not followed into outputs ------------------------------------------


@pytest.fixture
def secret(tmp_path):
    p = tmp_path / "secret.txt"
    p.write_bytes(b"hf_SECRET_TOKEN_do_not_leak")
    return p


def _all_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("how", ["absolute", "relative", "chain"])
def test_base_link_to_a_secret_is_not_copied(cli_run, work, tmp_path, secret, how):
    """tokenizer.json → a secret file used to put the secret in the merged model."""
    link = work / "llama" / "tokenizer.json"
    if how == "absolute":
        link.symlink_to(secret)
    elif how == "relative":
        link.symlink_to(os.path.relpath(secret, link.parent))
    else:  # a link inside the base that points to a link out of it
        (work / "llama" / "inner.json").symlink_to(secret)
        link.symlink_to("inner.json")
    out = tmp_path / "out"
    r = cli_run("merge", work / "llama", work / "adapter", "-o", out)
    assert r.exit_code == 0, r.output
    assert "tokenizer.json" in r.stderr and "link to outside" in r.stderr
    assert not (out / "tokenizer.json").exists()
    assert b"SECRET" not in _all_bytes(out)
    assert (out / "config.json").read_bytes() == (work / "llama" / "config.json").read_bytes()
    r = cli_run("merge", work / "llama", work / "adapter", "-o", tmp_path / "strict", "--strict")
    one_error_line(r, "inner.json" if how == "chain" else "tokenizer.json", "link to outside")
    assert not (tmp_path / "strict").exists()


def test_base_link_inside_the_base_is_copied(cli_run, work, tmp_path):
    (work / "llama" / "real").mkdir()
    (work / "llama" / "real" / "tok.json").write_text('{"ok": 1}')
    (work / "llama" / "tokenizer.json").symlink_to("real/tok.json")
    r = cli_run("merge", work / "llama", work / "adapter", "-o", tmp_path / "out")
    assert r.exit_code == 0 and "link" not in r.stderr, r.output
    copied = tmp_path / "out" / "tokenizer.json"
    assert not copied.is_symlink() and copied.read_text() == '{"ok": 1}'


def test_hf_cache_snapshot_links_are_copied(cli_run, work, tmp_path, secret):
    """A snapshot in the Hugging Face cache links every file to ../../blobs: those are the
    model's own files; a link elsewhere is still refused."""
    repo = tmp_path / "hub" / "models--org--llama"
    snap = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        blob = repo / "blobs" / f"blob-{name}"
        shutil.copyfile(work / "llama" / name, blob)
        (snap / name).symlink_to(Path("..", "..", "blobs", blob.name))
    (snap / "leak.txt").symlink_to(secret)
    r = cli_run("merge", snap, work / "adapter", "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "config.json").read_bytes() == (
        work / "llama" / "config.json"
    ).read_bytes()
    assert "leak.txt" in r.stderr and not (tmp_path / "out" / "leak.txt").exists()


@pytest.mark.parametrize("swap", ["link", "fifo"])
def test_file_swapped_after_planning_is_not_followed(work, tmp_path, secret, swap):
    """The check is repeated when the file is copied: a link made after the plan is refused,
    and a FIFO put in its place does not hang the merge."""
    from loratool.merge import AdapterInput, execute, plan_merge
    from loratool.sources import open_adapter

    opened = open_adapter(str(work / "adapter"), lazy=True)
    plan = plan_merge(
        work / "llama",
        [AdapterInput(opened.adapter, 1.0, opened.label, opened.sha256)],
        tmp_path / "out",
        device="cpu",
    )
    cfg = work / "llama" / "config.json"
    cfg.unlink()
    if swap == "link":
        cfg.symlink_to(secret)
    else:
        os.mkfifo(cfg)
    msg = "link to outside" if swap == "link" else "not a regular file"
    with pytest.raises(ValidationError, match=msg):
        execute(plan)
    assert not (tmp_path / "out").exists() and temporaries(tmp_path) == []


# -- 11. interrupted writes leave nothing behind -----------------------------------------------


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_sigkilled_merge_temporaries_are_cleaned_by_a_write_to_another_name(work, tmp_path):
    """A SIGKILLed merge left .loratool-tmp-* until the same -o was written again."""
    outdir = tmp_path / "outs"
    outdir.mkdir()
    code = (
        "import sys, time, loratool.merge.engine as m\n"
        "orig = m._write_file\n"
        "def slow(*a, **k):\n"
        "    n = orig(*a, **k); print('written', flush=True); time.sleep(3600); return n\n"
        "m._write_file = slow\n"
        "from loratool.cli import main\n"
        f"sys.argv = ['loratool', 'merge', {str(work / 'llama')!r}, {str(work / 'adapter')!r},"
        f" '-o', {str(outdir / 'first')!r}, '--device', 'cpu']\n"
        "main()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"written"
    left = temporaries(outdir)
    assert len(left) == 1 and left[0].startswith(f"{TMP_MARK}first.{proc.pid}.")
    # while it lives, its temporary is kept
    assert clean_stale(outdir) == [] and temporaries(outdir) == left
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert temporaries(outdir) == left
    # a write of another output in the same directory cleans it
    r = subprocess.run(
        [sys.executable, "-m", "loratool", "merge", str(work / "llama"), str(work / "adapter")]
        + ["-o", str(outdir / "second"), "--device", "cpu"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert temporaries(outdir) == []
    assert sorted(p.name for p in outdir.iterdir()) == ["second"]


def _holder(path: Path):
    """A live process holding ``path``'s lock, as a writer does."""
    code = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(path)!r}, os.O_RDONLY)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(3600)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"locked"
    return p


def test_clean_stale_rules(tmp_path):
    d = tmp_path
    dead = _dead_pid()
    old = time.time() - 10 * fsutil.STALE_AGE
    stale_dir = d / f"{TMP_MARK}a.b.{dead}.x1y2z3"  # another destination, dots in its name
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"partial")
    stale_file = d / f"{TMP_MARK}c.safetensors.{dead}.q9"
    stale_file.write_bytes(b"partial")
    stale_link = d / f"{TMP_MARK}l.{dead}.k"
    stale_link.symlink_to(d / "victim")
    (d / "victim").write_text("not ours")
    # a live writer's temporary (locked), even old and whatever pid it carries
    live = d / f"{TMP_MARK}live.{dead}.aaa"
    live.mkdir()
    os.utime(live, (old, old))
    holder = _holder(live)
    # a reused pid: alive, but nobody holds the lock and it is old → stale
    reused = d / f"{TMP_MARK}reused.{os.getppid()}.bbb"
    reused.mkdir()
    os.utime(reused, (old, old))
    # the same, young: the writer may not have taken its lock yet → kept
    young = d / f"{TMP_MARK}young.{os.getppid()}.ccc"
    young.mkdir()
    # this process's own: never touched
    own = d / f"{TMP_MARK}own.{os.getpid()}.ddd"
    own.mkdir()
    os.utime(own, (old, old))
    fifo = d / f"{TMP_MARK}f.{dead}.eee"  # opening it to test the lock would block
    os.mkfifo(fifo)
    unrelated = d / ".loratool-tmp-not-a-temp"
    unrelated.write_text("x")
    try:
        removed = clean_stale(d)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in removed) == sorted(
        p.name for p in (stale_dir, stale_file, stale_link, fifo, reused)
    )
    assert (d / "victim").read_text() == "not ours"
    assert temporaries(d) == sorted(p.name for p in (live, young, own, unrelated))
    # once its holder is gone, the live one is stale too
    assert [p.name for p in clean_stale(d)] == [live.name]


def test_every_writer_cleans_its_directory(cli_run, work, tmp_path, cataloged):
    """export, resize -o and inspect-rank --plot clean dead writers' temporaries too."""
    dead = _dead_pid()
    for cmd in (
        ("export", "a", tmp_path / "e"),
        ("resize", "a", "--rank", "2", "-o", tmp_path / "r"),
        ("export", "a", tmp_path / "k.safetensors", "--format", "kohya"),
    ):
        stale = tmp_path / f"{TMP_MARK}zzz.{dead}.abc"
        stale.mkdir()
        r = cli_run(*cmd)
        assert r.exit_code == 0, r.output
        assert temporaries(tmp_path) == []


def test_sigint_during_merge_leaves_nothing(work, tmp_path):
    code = (
        "import sys, time, loratool.merge.engine as m\n"
        "orig = m._write_file\n"
        "def slow(*a, **k):\n"
        "    n = orig(*a, **k); print('written', flush=True); time.sleep(3600); return n\n"
        "m._write_file = slow\n"
        "from loratool.cli import main\n"
        f"sys.argv = ['loratool', 'merge', {str(work / 'llama')!r}, {str(work / 'adapter')!r},"
        f" '-o', {str(tmp_path / 'out')!r}, '--device', 'cpu']\n"
        "main()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout.readline().strip() == b"written"
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert not (tmp_path / "out").exists() and temporaries(tmp_path) == []


def test_force_over_a_big_output_keeps_the_old_until_the_new_is_in_place(work, tmp_path):
    """With --force the old output stays under the final name until the new one replaces it
    (swapped atomically), so a crash at any moment leaves a whole output there."""
    out = tmp_path / "out"
    out.mkdir()
    save_file({"w": torch.zeros(2)}, out / "model.safetensors")
    seen = []
    orig = merge_mod._write_file

    def write(*a, **kw):
        n = orig(*a, **kw)
        seen.append(load_file(out / "model.safetensors"))  # the old one, still in place
        return n

    merge_mod._write_file = write
    try:
        from click.testing import CliRunner

        from loratool.cli import cli

        r = CliRunner().invoke(
            cli, ["merge", str(work / "llama"), str(work / "adapter"), "-o", str(out), "--force"]
        )
    finally:
        merge_mod._write_file = orig
    assert r.exit_code == 0, r.output
    assert list(seen[0]) == ["w"]
    assert "w" not in load_file(out / "model.safetensors")
    assert temporaries(tmp_path) == []
