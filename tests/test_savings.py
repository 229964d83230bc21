"""savings: the catalog view against a base, from headers only."""

from __future__ import annotations

import builtins
import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from peft_models import make_case
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("sav")
    return {n: make_case(n, root, seed=5) for n in ("llama", "llama_rslora", "gpt2")}


def test_catalog_view_against_a_base(cases, cli_run):
    for n in ("llama", "llama_rslora", "gpt2"):
        assert cli_run("add", cases[n].adapter_dir, "--task", n, "--name", n).exit_code == 0
    r = cli_run("savings", "--base", cases["llama"].base_dir, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    names = sorted(a["name"] for a in doc["adapters"])
    assert names == ["llama", "llama_rslora"] and doc["other_adapters"] == ["gpt2"]
    # independent figures: the safetensors file's data bytes and the adapters' tensors
    from safetensors import safe_open

    base_file = cases["llama"].base_dir / "model.safetensors"
    with safe_open(base_file, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    base_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert doc["base"]["bytes"] == base_bytes
    assert doc["base"]["params"] == sum(t.numel() for t in tensors.values())
    adapter_bytes = {}
    for n in names:
        with safe_open(cases[n].adapter_dir / "adapter_model.safetensors", "pt") as f:
            ts = [f.get_tensor(k) for k in f.keys()]
        adapter_bytes[n] = sum(t.numel() * t.element_size() for t in ts)
        a = next(a for a in doc["adapters"] if a["name"] == n)
        assert a["bytes"] == adapter_bytes[n]
        assert a["params"] == sum(t.numel() for t in ts)
        assert a["compression"] == pytest.approx(a["dense_params"] / a["params"])
    c = doc["catalog"]
    assert c["n_adapters"] == 2
    assert c["full_copies_bytes"] == 2 * base_bytes
    assert c["lora_bytes"] == base_bytes + sum(adapter_bytes.values())
    assert c["saved_bytes"] == c["full_copies_bytes"] - c["lora_bytes"]
    assert c["ratio"] == pytest.approx(c["full_copies_bytes"] / c["lora_bytes"])
    # the dense figure of a module is d·k of the weight it changes
    llama = next(a for a in doc["adapters"] if a["name"] == "llama")
    q = tensors["model.layers.0.self_attn.q_proj.weight"]
    k = tensors["model.layers.0.self_attn.k_proj.weight"]
    assert llama["dense_params"] == 2 * 2 * (
        q.numel() + k.numel()
    )  # q,k,v,o ×2 layers; v,o like k,q
    # without --base: grouped by base model; human output too
    r = cli_run("savings", "--json")
    assert set(json.loads(r.stdout)) >= {"adapters", "by_base_model"}
    r = cli_run("savings", "--base", cases["llama"].base_dir)
    assert r.exit_code == 0 and "saved" in r.stdout and "gpt2" in r.stdout


def test_savings_of_named_adapters_and_unknown_name(cases, cli_run):
    cli_run("add", cases["llama"].adapter_dir, "--task", "t", "--name", "a")
    r = cli_run("savings", "a", "--json")
    assert [x["name"] for x in json.loads(r.stdout)["adapters"]] == ["a"]
    r = cli_run("savings", "nope")
    assert r.exit_code == 1 and r.stderr.startswith("error: ")


def _sharded_base(root, shards=3):
    root.mkdir()
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        t = {
            f"model.layers.{i}.self_attn.q_proj.weight": torch.randn(64, 64),
            f"model.layers.{i}.input_layernorm.weight": torch.ones(64),
        }
        save_file(t, root / name)
        weight_map.update({k: name for k in t})
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return root


def test_base_figures_read_no_tensor_data(tmp_path, monkeypatch):
    from loratool.savings import base_figures

    base = _sharded_base(tmp_path / "base")
    read = {}
    real_open = builtins.open

    class Counting:
        def __init__(self, fh, path):
            self.fh, self.path = fh, str(path)

        def read(self, n=-1):
            data = self.fh.read(n)
            read[self.path] = read.get(self.path, 0) + len(data)
            return data

        def __getattr__(self, k):
            return getattr(self.fh, k)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.fh.close()

    def counting_open(path, mode="r", *a, **k):
        fh = real_open(path, mode, *a, **k)
        return Counting(fh, path) if "b" in mode else fh

    monkeypatch.setattr(builtins, "open", counting_open)
    fig = base_figures(base)
    monkeypatch.undo()
    assert fig["files"] == 3 and fig["params"] == 3 * (64 * 64 + 64)
    for path, n in read.items():
        if path.endswith(".safetensors"):
            (header_len,) = struct.unpack("<Q", real_open(path, "rb").read(8))
            assert n <= 8 + header_len + 1, f"{path}: read {n} bytes, header is {header_len}"


def test_a_100_gb_sparse_sharded_base_answers(tmp_path):
    """Shards whose headers describe 100 GB of tensors in sparse files: only headers are read."""
    root = tmp_path / "huge"
    root.mkdir()
    weight_map = {}
    per_shard = 25 * 10**9
    for i in range(4):
        name = f"model-{i + 1:05d}-of-00004.safetensors"
        n = per_shard // 2
        header = json.dumps(
            {f"layer.{i}.weight": {"dtype": "BF16", "shape": [n], "data_offsets": [0, per_shard]}}
        ).encode()
        header += b" " * (-len(header) % 8)
        with open(root / name, "wb") as fh:
            fh.write(struct.pack("<Q", len(header)) + header)
            fh.truncate(8 + len(header) + per_shard)  # sparse: no disk used
        weight_map[f"layer.{i}.weight"] = name
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    env = dict(os.environ)
    p = subprocess.run(
        [sys.executable, "-m", "loratool", "savings", "--base", str(root), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["base"]["bytes"] == 4 * per_shard and doc["base"]["params"] == 2 * per_shard


def test_hypothetical_from_base_headers(cases, cli_run):
    r = cli_run(
        "savings",
        "--base",
        cases["llama"].base_dir,
        "--rank",
        "8",
        "--targets",
        "q_proj,v_proj",
        "--dtype",
        "float32",
        "--json",
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    # llama_config: hidden 64, 2 layers, GQA k/v 32×64: q 8·(64+64), v 8·(32+64) per layer
    assert doc["params"] == 2 * (8 * 128 + 8 * 96)
    assert doc["dense_params"] == 2 * (64 * 64 + 32 * 64)
    assert doc["bytes"] == doc["params"] * 4
    r = cli_run("savings", "--base", cases["llama"].base_dir, "--rank", "8", "--targets", "nope")
    assert r.exit_code == 1 and "q_proj" in r.stderr


def test_savings_rows_as_csv_tsv_and_nl(cases, cli_run):
    """--csv/--tsv/--nl print the report's rows (sqlite-utils style), the same figures as
    --json: one row per adapter, or the one hypothetical adapter."""
    import csv
    import io

    for n in ("llama", "gpt2"):
        assert cli_run("add", cases[n].adapter_dir, "--task", n, "--name", n).exit_code == 0
    keys = ["name", "task", "base_model", "params", "dense_params", "compression", "bytes"]
    for extra, more in (([], []), (["--base", cases["llama"].base_dir], ["share_of_base"])):
        adapters = json.loads(cli_run("savings", *extra, "--json").stdout)["adapters"]
        assert adapters
        for fmt, delim in (("--csv", ","), ("--tsv", "\t")):
            r = cli_run("savings", *extra, fmt)
            assert r.exit_code == 0 and r.stderr == "", r.output
            rows = list(csv.reader(io.StringIO(r.stdout), delimiter=delim))
            assert rows[0] == keys + more
            cell = {None: ""}  # an unknown base_model is an empty cell, as sqlite-utils writes NULL
            assert rows[1:] == [[cell.get(a[k], str(a[k])) for k in keys + more] for a in adapters]
        r = cli_run("savings", *extra, "--nl")
        assert [json.loads(line) for line in r.stdout.splitlines()] == adapters
    # the hypothetical adapter: one row
    hyp = ["--base", cases["llama"].base_dir, "--rank", "4", "--targets", "q_proj,v_proj"]
    doc = json.loads(cli_run("savings", *hyp, "--json").stdout)
    r = cli_run("savings", *hyp, "--csv")
    assert r.exit_code == 0, r.output
    header, row = list(csv.reader(io.StringIO(r.stdout)))
    assert dict(zip(header, row, strict=True)) == {
        k: json.dumps(doc[k]) if isinstance(doc[k], list) else str(doc[k]) for k in header
    }
    assert {"params", "bytes", "base_bytes", "targets"} <= set(header)
    # one output format at a time, as a usage error
    r = cli_run("savings", "--csv", "--json")
    assert r.exit_code == 2 and "Usage: loratool savings" in r.stderr
