"""MLX (mlx-lm) and GGUF (llama.cpp) adapters: written as those runtimes read them, checked
with the real ``mlx-lm`` and ``gguf`` packages on the tiny Llama fixture, and read back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from loratool.formats import load_adapter

FIX = __import__("pathlib").Path(__file__).resolve().parent.parent / "fixtures"
LLAMA = FIX / "llama"


def permute(w, n_head, n_head_kv):
    # convert_hf_to_gguf.py, LlamaModel.permute, written out
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@pytest.mark.parametrize("name", ["llama-plain", "llama-rslora"])
def test_gguf_has_llama_cpp_names_keys_and_permuted_rows(name, tmp_path, cli_run):
    gguf = pytest.importorskip("gguf")
    src = FIX / "adapters" / name
    out = tmp_path / "a.gguf"
    r = cli_run("convert", src, out, "--to", "gguf", "--base", LLAMA, "--json")
    assert r.exit_code == 0, r.output
    warnings = json.loads(r.stdout)["warnings"]
    exact = name == "llama-plain"
    if exact:
        assert warnings == []  # one alpha carries every module exactly
    else:
        # rsLoRA with rank/alpha patterns: scale·r differs per module and alpha·√8 is not a
        # float32 (GGUF's alpha type), so B is rescaled: said so, and close
        assert len(warnings) == 1 and "approximate" in warnings[0]
    reader = gguf.GGUFReader(str(out))
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    cfg = json.loads((LLAMA / "config.json").read_text())
    peft_cfg = json.loads((src / "adapter_config.json").read_text())
    assert field("general.type") == "adapter" and field("adapter.type") == "lora"
    assert field("general.architecture") == "llama"
    adapter = load_adapter(src)
    r_ = peft_cfg["r"]
    scale = peft_cfg["lora_alpha"] / (r_**0.5 if peft_cfg.get("use_rslora") else r_)
    assert field("adapter.lora.alpha") == pytest.approx(scale * r_, rel=1e-7)
    tensors = {t.name: t for t in reader.tensors}
    expected = set()
    for m in adapter.modules.values():
        layer = m.name.split(".")[2]
        leaf = {
            "q_proj": "attn_q",
            "k_proj": "attn_k",
            "v_proj": "attn_v",
            "o_proj": "attn_output",
        }[m.name.split(".")[-2]]
        g = f"blk.{layer}.{leaf}.weight"
        expected |= {g + ".lora_a", g + ".lora_b"}
        a, b = tensors[g + ".lora_a"], tensors[g + ".lora_b"]
        assert list(a.shape) == [m.A.shape[1], m.rank] and list(b.shape) == [m.rank, m.B.shape[0]]
        want_b = m.B
        if leaf == "attn_q":
            want_b = permute(m.B, cfg["num_attention_heads"], cfg["num_attention_heads"])
        elif leaf == "attn_k":
            want_b = permute(m.B, cfg["num_attention_heads"], cfg["num_key_value_heads"])
        assert np.array_equal(np.array(a.data), m.A.float().numpy())
        if exact:
            assert np.array_equal(np.array(b.data), want_b.float().numpy())
    assert set(tensors) == expected
    # and back: the same factors and scales
    back = load_adapter(out)
    for n, m in adapter.modules.items():
        assert torch.equal(back.modules[n].A, m.A), n
        if exact:
            assert torch.equal(back.modules[n].B, m.B), n
        torch.testing.assert_close(back.modules[n].delta(), m.delta(), rtol=2e-6, atol=1e-7)


def test_gguf_embedding_lora_a_is_transposed(tmp_path, cli_run):
    gguf = pytest.importorskip("gguf")
    out = tmp_path / "e.gguf"
    r = cli_run("convert", FIX / "adapters" / "llama-embed", out, "--to", "gguf", "--base", LLAMA)
    assert r.exit_code == 0, r.output
    t = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    m = load_adapter(FIX / "adapters" / "llama-embed").modules["model.embed_tokens.weight"]
    # llama-adapter.cpp: token_embd lora_b ne = [r, n_embd], lora_a ne = [r, n_vocab]
    assert list(t["token_embd.weight.lora_a"].shape) == [m.rank, m.A.shape[1]]
    assert list(t["token_embd.weight.lora_b"].shape) == [m.rank, m.B.shape[0]]
    back = load_adapter(out).modules["model.embed_tokens.weight"]
    assert torch.equal(back.A, m.A) and torch.equal(back.B, m.B)


def test_gguf_needs_the_base_config(tmp_path, cli_run):
    r = cli_run("convert", FIX / "adapters" / "llama-plain", tmp_path / "x.gguf", "--to", "gguf")
    assert r.exit_code == 1 and "config.json" in r.stderr and not (tmp_path / "x.gguf").exists()


def test_mlx_layout_and_round_trip(tmp_path, cli_run):
    src = FIX / "adapters" / "llama-plain"
    out = tmp_path / "mlx"
    assert cli_run("convert", src, out, "--to", "mlx").exit_code == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["num_layers"] == -1
    assert cfg["lora_parameters"]["rank"] == 4 and cfg["lora_parameters"]["scale"] == 2.0
    t = load_file(out / "adapters.safetensors")
    a = load_adapter(src)
    m = a.modules["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(t["model.layers.0.self_attn.q_proj.lora_a"], m.A.T)  # in × r
    assert torch.equal(t["model.layers.0.self_attn.q_proj.lora_b"], m.B.T)  # r × out
    back = load_adapter(out)
    assert back.meta.format == "mlx"
    for n, mod in a.modules.items():
        assert torch.equal(back.modules[n].A, mod.A) and back.modules[n].scale == mod.scale


def test_mlx_lm_fuses_to_the_weights_loratool_merges(tmp_path, cli_run):
    mx = pytest.importorskip("mlx.core")
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from mlx_lm.tuner.lora import LoRALinear
    from mlx_lm.tuner.utils import load_adapters

    src = FIX / "adapters" / "llama-rslora"
    out = tmp_path / "mlx"
    assert cli_run("convert", src, out, "--to", "mlx").exit_code == 0
    cfg = json.loads((LLAMA / "config.json").read_text())
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    base = load_file(LLAMA / "model.safetensors")
    model.load_weights([(k, mx.array(v.float().numpy())) for k, v in base.items()], strict=False)
    load_adapters(model, str(out))
    fused = [(n, m.fuse()) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert fused
    merged_dir = tmp_path / "merged"
    assert cli_run("merge", LLAMA, src, "-o", merged_dir, "--dtype", "float32").exit_code == 0
    merged = load_file(merged_dir / "model.safetensors")
    for name, lin in fused:
        got = np.array(lin.weight)
        torch.testing.assert_close(
            torch.from_numpy(got), merged[name + ".weight"], rtol=0, atol=1e-6
        )
    assert len(fused) == len(load_adapter(src).modules)
    assert tree_flatten  # imported to make sure mlx.utils is the real one
