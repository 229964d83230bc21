"""The committed fixtures: reproducible from fixtures/make_fixtures.py, and loadable by the real
transformers and peft (offline), with the numbers the write-ups promise."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

os.environ["HF_HUB_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
SCRIPT = FIX / "make_fixtures.py"

# Trained by gradient descent: byte-identical on one machine, but another CPU's kernels (AVX2
# vs AVX-512 MKL paths) round float32 sums differently, and 300 Adam steps carry a last-bit
# difference up to ~1e-6 on values near 1 (measured 1.3e-6); those are compared by value.
TRAINED = {"rank1/adapter/adapter_model.safetensors"}

PEFT_ADAPTERS = {
    "llama-plain": "llama",
    "llama-rslora": "llama",
    "llama-embed": "llama",
    "gpt2-lora": "gpt2",
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    """A fresh run of the script, in its own process (it sets torch's thread count)."""
    out = tmp_path_factory.mktemp("fixtures")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)], check=True, env=env, timeout=300
    )
    return out


def test_committed_files_equal_a_fresh_run(fresh):
    made = files_under(fresh)
    assert made, "the script wrote nothing"
    missing = sorted(f for f in made if not (FIX / f).is_file())
    assert not missing, f"not committed: {missing}"
    differ = []
    for rel in sorted(made):
        if sha256(fresh / rel) == sha256(FIX / rel):
            continue
        if rel in TRAINED:
            a, b = load_file(fresh / rel), load_file(FIX / rel)
            assert a.keys() == b.keys()
            for k in a:
                torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, msg=f"{rel}: {k}")
        else:
            differ.append(rel)
    assert not differ, f"differ from a fresh run of make_fixtures.py: {differ}"


def test_script_is_deterministic_across_runs(fresh, tmp_path):
    """Two runs with different hash seeds give the same bytes (dict/set order must not leak)."""
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)], check=True, env=env, timeout=300
    )
    assert files_under(tmp_path) == files_under(fresh)
    for rel in files_under(fresh):
        assert sha256(tmp_path / rel) == sha256(fresh / rel), rel


def test_layout():
    expected = {
        "llama/config.json",
        "llama/model.safetensors",
        "llama-sharded/config.json",
        "llama-sharded/model.safetensors.index.json",
        *(f"llama-sharded/model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)),
        "gpt2/config.json",
        "gpt2/model.safetensors",
        "conv/config.json",
        "conv/model.safetensors",
        "adapters/conv-kohya.safetensors",
        "rank1/config.json",
        "rank1/model.safetensors",
        "rank1/adapter/adapter_config.json",
        "rank1/adapter/adapter_model.safetensors",
        *(f"adapters/{a}/adapter_config.json" for a in PEFT_ADAPTERS),
        *(f"adapters/{a}/adapter_model.safetensors" for a in PEFT_ADAPTERS),
    }
    assert expected <= files_under(FIX)


def test_fixtures_are_small():
    total = sum(p.stat().st_size for p in FIX.rglob("*") if p.is_file())
    assert total < 5 * 1024 * 1024, f"fixtures/ holds {total} bytes"


# ----------------------------------------------------------------------------- bases


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_transformers_loads_the_base(name):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        FIX / name, output_loading_info=True, local_files_only=True
    )
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert not info.get("error_msgs"), info
    want = load_file(FIX / name / "model.safetensors")
    got = model.state_dict()
    for key, tensor in want.items():
        torch.testing.assert_close(got[key], tensor, atol=0, rtol=0, msg=key)
    if name == "gpt2":  # tied head: not saved, and the same tensor as wte once loaded
        assert "lm_head.weight" not in want
        assert torch.equal(got["lm_head.weight"], want["transformer.wte.weight"])
    else:
        assert model.config.num_key_value_heads == 2
        assert want["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)


def test_llama_matches_what_save_pretrained_writes(tmp_path):
    """Same keys, shapes and dtypes as LlamaForCausalLM.save_pretrained from this config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(FIX / "llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with (
        safe_open(tmp_path / "model.safetensors", "pt") as ref,
        safe_open(FIX / "llama" / "model.safetensors", "pt") as ours,
    ):
        assert sorted(ref.keys()) == sorted(ours.keys())
        assert ours.metadata() == ref.metadata() == {"format": "pt"}
        for key in ref.keys():
            a, b = ref.get_slice(key), ours.get_slice(key)
            assert (a.get_shape(), a.get_dtype()) == (b.get_shape(), b.get_dtype()), key


def test_sharded_equals_single_file():
    single = load_file(FIX / "llama" / "model.safetensors")
    folder = FIX / "llama-sharded"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(single)
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    seen = {}
    for shard in shards:
        part = load_file(folder / shard)
        for key in part:
            assert index["weight_map"][key] == shard
        seen.update(part)
    assert seen.keys() == single.keys()
    for key in single:
        assert torch.equal(seen[key], single[key]), key
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in single.values()
    )
    sharded_cfg = json.loads((folder / "config.json").read_text())
    assert sharded_cfg.pop("_name_or_path") == "fixtures/llama"
    assert sharded_cfg == json.loads((FIX / "llama" / "config.json").read_text())


# ----------------------------------------------------------------------------- PEFT adapters


def _peft_load(adapter: str):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(FIX / PEFT_ADAPTERS[adapter], local_files_only=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, FIX / "adapters" / adapter)
    complaints = [
        str(w.message)
        for w in caught
        if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()
    ]
    assert not complaints, complaints
    return model


@pytest.mark.parametrize("adapter", sorted(PEFT_ADAPTERS))
def test_peft_loads_the_adapter_exactly(adapter):
    model = _peft_load(adapter)
    file = load_file(FIX / "adapters" / adapter / "adapter_model.safetensors")
    # peft names its parameters with the adapter name ("default"); the file does not.
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert loaded.keys() == file.keys(), "missing or unexpected LoRA tensors"
    for key, tensor in file.items():
        assert torch.equal(loaded[key], tensor), key
        if key.endswith(("lora_B.weight", "lora_embedding_B")):
            assert tensor.abs().min() > 0, f"{key}: B must be nonzero so merges are not trivial"
    config = json.loads((FIX / "adapters" / adapter / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(config["target_modules"])
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"


def test_rslora_ranks_and_scales():
    """rank_pattern / alpha_pattern give each module its own r and alpha; scale = alpha/√r."""
    model = _peft_load("llama-rslora")
    want = {  # written out by hand from the config: q 8 (layer 1: 4), k 8 with alpha 4, v 8, o 2
        ("0", "q_proj"): (8, 16), ("1", "q_proj"): (4, 16),
        ("0", "k_proj"): (8, 4), ("1", "k_proj"): (8, 4),
        ("0", "v_proj"): (8, 16), ("1", "v_proj"): (8, 16),
        ("0", "o_proj"): (2, 16), ("1", "o_proj"): (2, 16),
    }  # fmt: skip
    layers = model.base_model.model.model.layers
    for (layer, proj), (r, alpha) in want.items():
        module = getattr(layers[int(layer)].self_attn, proj)
        assert module.r["default"] == r, (layer, proj)
        assert module.scaling["default"] == pytest.approx(alpha / math.sqrt(r)), (layer, proj)


def test_gpt2_adapter_covers_both_c_proj_and_is_fan_in_fan_out():
    config = json.loads((FIX / "adapters" / "gpt2-lora" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    file = load_file(FIX / "adapters" / "gpt2-lora" / "adapter_model.safetensors")
    base = load_file(FIX / "gpt2" / "model.safetensors")
    prefixes = {k.rsplit(".lora_", 1)[0].removeprefix("base_model.model.") for k in file}
    assert prefixes == {
        f"transformer.h.{i}.{m}"
        for i in (0, 1)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")
    }
    for p in prefixes:
        a, b = (
            file[f"base_model.model.{p}.lora_A.weight"],
            file[f"base_model.model.{p}.lora_B.weight"],
        )
        # Conv1D stores (in, out): ΔW = B·A is (out, in) and goes in transposed.
        assert (b @ a).T.shape == base[p + ".weight"].shape, p


def test_merged_peft_model_matches_dense_math():
    """One independent end-to-end check: peft's merge of llama-plain is W + (alpha/r)·B·A."""
    model = _peft_load("llama-plain")
    file = load_file(FIX / "adapters" / "llama-plain" / "adapter_model.safetensors")
    base = load_file(FIX / "llama" / "model.safetensors")
    merged = model.merge_and_unload().state_dict()
    for key in base:
        prefix = f"base_model.model.{key.removesuffix('.weight')}"
        if prefix + ".lora_A.weight" in file:
            delta = (8 / 4) * file[prefix + ".lora_B.weight"] @ file[prefix + ".lora_A.weight"]
            torch.testing.assert_close(merged[key], base[key] + delta)
            assert not torch.equal(merged[key], base[key])
        else:
            assert torch.equal(merged[key], base[key]), key


# ----------------------------------------------------------------------------- kohya conv


def test_kohya_conv_adapter_fits_the_conv_base():
    base = load_file(FIX / "conv" / "model.safetensors")
    with safe_open(FIX / "adapters" / "conv-kohya.safetensors", "pt") as f:
        meta = f.metadata()
        lora = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    names = {
        "lora_unet_conv_in": "conv_in",
        "lora_unet_down_0_proj": "down.0.proj",
        "lora_unet_mid_attn_to_q": "mid.attn.to_q",
    }
    assert {k.split(".", 1)[0] for k in lora} == set(names)
    for kohya, path in names.items():
        down, up, alpha = (
            lora[kohya + ".lora_down.weight"],
            lora[kohya + ".lora_up.weight"],
            lora[kohya + ".alpha"],
        )
        assert alpha.dim() == 0 and alpha.item() == 2.0
        assert up.abs().min() > 0
        w = base[path + ".weight"]
        # ΔW = up·down over the rank axis; a conv's down keeps the kernel, its up is 1×1
        delta = torch.einsum("or,r...->o...", up.flatten(1), down)
        assert delta.shape == w.shape, kohya


# ----------------------------------------------------------------------------- rank 1


def test_rank1_adapter_is_the_ones_matrix():
    config = json.loads((FIX / "rank1" / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (1, 1, ["linear"])
    t = load_file(FIX / "rank1" / "adapter" / "adapter_model.safetensors")
    a, b = t["base_model.model.linear.lora_A.weight"], t["base_model.model.linear.lora_B.weight"]
    assert a.shape == (1, 1000) and b.shape == (1001, 1)
    delta = (config["lora_alpha"] / config["r"]) * (b.double() @ a.double())
    assert (delta - 1).abs().max() < 1e-2
    base = load_file(FIX / "rank1" / "model.safetensors")["linear.weight"]
    assert base.shape == (1001, 1000) and base.dtype == torch.float16
    meta = json.loads((FIX / "rank1" / "config.json").read_text())
    assert (meta["in_features"], meta["out_features"]) == (1000, 1001)


def test_rank1_adapter_loads_in_peft_on_a_plain_module():
    from peft import PeftModel

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(1000, 1001, bias=False)

    toy = Toy()
    base = load_file(FIX / "rank1" / "model.safetensors")["linear.weight"].float()
    with torch.no_grad():
        toy.linear.weight.copy_(base)
    model = PeftModel.from_pretrained(toy, FIX / "rank1" / "adapter")
    merged = model.merge_and_unload().linear.weight.detach()
    assert (merged - base - 1).abs().max() < 1e-2


def test_sharded_llama_is_the_same_model_and_merges_like_it(cli_run, tmp_path):
    """llama-sharded holds fixtures/llama's tensors in three shards and says so in its config:
    its adapters merge without a base warning, and the result equals the single-file merge."""
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    adapter = FIX / "adapters" / "llama-plain"
    r = cli_run("merge", FIX / "llama", adapter, "-o", one, "--device", "cpu")
    assert r.exit_code == 0 and "warning" not in r.stderr, r.output
    r = cli_run("merge", FIX / "llama-sharded", adapter, "-o", sharded, "--device", "cpu")
    assert r.exit_code == 0 and "warning" not in r.stderr, r.output
    whole = {}
    for shard in sorted(sharded.glob("model-*.safetensors")):
        whole.update(load_file(shard))
    ref = load_file(one / "model.safetensors")
    assert set(whole) == set(ref)
    for k in ref:
        assert torch.equal(whole[k], ref[k]), k
