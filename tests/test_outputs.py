"""What loratool writes is readable by other programs and users: file modes from the umask,
config.json's dtype after --dtype, adapters that AutoPeftModelForCausalLM loads."""

from __future__ import annotations

import json
import os
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"


@contextmanager
def umask(value: int):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """Every path under (and including) ``root`` → its permission bits."""
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    return {str(p.relative_to(root.parent)): stat.S_IMODE(p.stat().st_mode) for p in paths}


def expect(root: Path, mask: int) -> None:
    want_dir, want_file = 0o777 & ~mask, 0o666 & ~mask
    for rel, mode in modes(root).items():
        p = root.parent / rel
        want = want_dir if p.is_dir() else want_file
        assert mode == want, f"{rel}: {oct(mode)}, expected {oct(want)} under umask {oct(mask)}"


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_every_output_gets_the_umask_mode(cli_run, tmp_path, mask, loratool_home):
    out = tmp_path / "out"
    out.mkdir()
    with umask(mask):
        assert (
            cli_run(
                "merge", FIX / "llama", FIX / "adapters/llama-plain", "-o", out / "merged"
            ).exit_code
            == 0
        )
        assert (
            cli_run(
                "merge",
                FIX / "llama" / "model.safetensors",
                FIX / "adapters/llama-plain",
                "-o",
                out / "m.safetensors",
            ).exit_code
            == 0
        )
        assert (
            cli_run(
                "merge", FIX / "llama-sharded", FIX / "adapters/llama-plain", "-o", out / "sharded"
            ).exit_code
            == 0
        )
        assert (
            cli_run("add", FIX / "adapters/llama-plain", "--task", "t", "--name", "p").exit_code
            == 0
        )
        assert cli_run("export", "p", out / "exported").exit_code == 0
        assert cli_run("export", "p", out / "k.safetensors", "--format", "kohya").exit_code == 0
        assert (
            cli_run("convert", FIX / "adapters/llama-plain", out / "conv", "--to", "peft").exit_code
            == 0
        )
        assert cli_run("resize", "p", "--rank", "2", "-o", out / "resized").exit_code == 0
        r = cli_run("unmerge", out / "merged", FIX / "adapters/llama-plain", "-o", out / "restored")
        assert r.exit_code == 0, r.output
    for name in (
        "merged",
        "m.safetensors",
        "sharded",
        "exported",
        "k.safetensors",
        "conv",
        "resized",
        "restored",
    ):
        expect(out / name, mask)
    # the catalog's blobs and folders too (they are copied and served like any output)
    for p in (loratool_home / "blobs").rglob("*"):
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(p.stat().st_mode) == want, p


def test_plot_gets_the_umask_mode(cli_run, tmp_path):
    pytest.importorskip("matplotlib")
    with umask(0o022):
        r = cli_run("inspect-rank", FIX / "adapters/llama-plain", "--plot", tmp_path / "s.png")
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE((tmp_path / "s.png").stat().st_mode) == 0o644


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_merge_dtype_rewrites_config_so_auto_loads_it(cli_run, tmp_path, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    r = cli_run("merge", FIX / "llama", FIX / "adapters/llama-plain", "-o", out, "--dtype", dtype)
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == dtype and cfg["torch_dtype"] == dtype
    # every other key is the base's
    base_cfg = json.loads((FIX / "llama" / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if "dtype" not in k} == {
        k: v for k, v in base_cfg.items() if "dtype" not in k
    }
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == getattr(torch, dtype)
    assert all(p.dtype == getattr(torch, dtype) for p in model.parameters())


def test_merge_same_dtype_copies_config_untouched(cli_run, tmp_path):
    out = tmp_path / "merged"
    assert cli_run("merge", FIX / "llama", FIX / "adapters/llama-plain", "-o", out).exit_code == 0
    assert (out / "config.json").read_bytes() == (FIX / "llama" / "config.json").read_bytes()


def test_dtype_in_sub_configs_is_rewritten(cli_run, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(FIX / "llama", base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["text_config"] = {"model_type": "llama", "dtype": "float32", "hidden_size": 64}
    cfg["vision_config"] = {"hidden_size": 8}  # states no dtype: left alone
    (base / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "merged"
    r = cli_run("merge", base, FIX / "adapters/llama-plain", "-o", out, "--dtype", "bfloat16")
    assert r.exit_code == 0, r.output
    got = json.loads((out / "config.json").read_text())
    assert got["text_config"] == {"model_type": "llama", "dtype": "bfloat16", "hidden_size": 64}
    assert got["vision_config"] == {"hidden_size": 8}
