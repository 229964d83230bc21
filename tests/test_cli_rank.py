"""resize, extract, combine and inspect-rank end to end, against dense math and merges."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FIX = Path(__file__).resolve().parent.parent / "fixtures"


def merged(cli_run, tmp_path, name, *adapters):
    out = tmp_path / name
    r = cli_run("merge", FIX / "llama", *adapters, "-o", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    return load_file(out / "model.safetensors")


def test_inspect_rank_rank1_example(cli_run):
    r = cli_run("inspect-rank", FIX / "rank1" / "adapter", "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)["modules"][0]
    assert m["numerical_rank"] == 1 and m["shape"] == [1001, 1000]
    # σ₁ of an all-ones 1001×1000 matrix is √(1001·1000)
    assert abs(m["singular_values"][0] - (1001 * 1000) ** 0.5) / (1001 * 1000) ** 0.5 < 1e-2


def test_resize_to_full_rank_is_lossless_and_lower_keeps_energy(cli_run, tmp_path):
    src = FIX / "adapters" / "llama-rslora"
    r = cli_run("resize", src, "--rank", "8", "-o", tmp_path / "full", "--json")
    assert r.exit_code == 0, r.output
    a, b = merged(cli_run, tmp_path, "a", src), merged(cli_run, tmp_path, "b", tmp_path / "full")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    r = cli_run("resize", src, "--rank", "1", "-o", tmp_path / "r1", "--json")
    doc = json.loads(r.stdout)
    assert all(m["rank_after"] == 1 and 0 < m["energy_kept"] <= 1 for m in doc["modules"].values())


def test_combine_cat_and_linear_merge_like_the_parts(cli_run, tmp_path):
    p, q = FIX / "adapters" / "llama-plain", FIX / "adapters" / "llama-rslora"
    ref = merged(cli_run, tmp_path, "ref", f"{p}=0.5", f"{q}=2")
    for method in ("cat", "linear"):
        r = cli_run("combine", f"{p}=0.5", f"{q}=2", "--method", method, "-o", tmp_path / method)
        assert r.exit_code == 0, r.output
        got = merged(cli_run, tmp_path, f"m-{method}", tmp_path / method)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-5)


def test_extract_recovers_a_low_rank_delta(cli_run, tmp_path):
    base = load_file(FIX / "llama" / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    ft = dict(base)
    key = "model.layers.0.mlp.up_proj.weight"
    d, k = base[key].shape
    delta = torch.randn(d, 3, generator=g) @ torch.randn(3, k, generator=g) * 0.01
    ft[key] = base[key] + delta
    (tmp_path / "ft").mkdir()
    save_file(ft, tmp_path / "ft" / "model.safetensors")
    r = cli_run(
        "extract",
        FIX / "llama",
        tmp_path / "ft",
        "--rank",
        "3",
        "-o",
        tmp_path / "x",
        "--json",
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert list(doc["modules"]) == [key]
    import loratool

    m = loratool.load_adapter(tmp_path / "x").modules[key]
    got = m.delta()
    want = ft[key].float() - base[key].float()  # what the files actually differ by
    assert ((got - want).norm() / want.norm()).item() < 1e-5
