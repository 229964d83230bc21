"""extract end to end: real transformers + peft on a tiny Llama built from a config (offline).

The references: AutoPeftModelForCausalLM loading the written adapter, against the logits of
the base model with W + B·A merged by hand from the saved tensors; the fine-tuned model's own
logits where the update is exactly low-rank; float64 residuals computed in the test.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
import torch
from peft_models import build, llama_config
from safetensors.torch import load_file, save_file

from loratool import extract as X
from loratool.rank import RankRule
from loratool.tensors.header import read_base

TOKENS = torch.tensor([[1, 5, 9, 33, 2, 70, 11, 4]])


def save_model(model, folder: Path, tensors=None) -> Path:
    model.save_pretrained(folder)
    if tensors is not None:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny Llama base and a fine-tune whose every 2-D weight moved by an exact rank-3
    update (embed_tokens and lm_head included)."""
    root = tmp_path_factory.mktemp("pair")
    base_model = build(llama_config(), seed=0)
    base = save_model(base_model, root / "base")
    tensors = load_file(base / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    ft = {}
    for k, v in tensors.items():
        if v.dim() == 2:
            d, n = v.shape
            ft[k] = v + (torch.randn(d, 3, generator=g) @ torch.randn(3, n, generator=g)) * 0.02
        else:
            ft[k] = v.clone()
    ft_dir = root / "ft"
    ft_dir.mkdir()
    save_file(ft, ft_dir / "model.safetensors", metadata={"format": "pt"})
    (ft_dir / "config.json").write_text((base / "config.json").read_text())
    return base, ft_dir, tensors, ft


def logits_of(model):
    with torch.no_grad():
        return model(TOKENS).logits


def merged_by_hand(base: Path, adapter: Path):
    """The base's tensors with scale·B·A (ΔW = (B·A)ᵀ for embeddings) added, from the files."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    w = load_file(adapter / "adapter_model.safetensors")
    tensors = load_file(base / "model.safetensors")
    prefix = "base_model.model."
    for key in w:
        if key.endswith("lora_A.weight"):
            path = key[len(prefix) : -len(".lora_A.weight")]
            A, B = w[key].double(), w[key.replace("lora_A", "lora_B")].double()
            r = A.shape[0]
            scale = cfg["alpha_pattern"].get(path, cfg["lora_alpha"]) / cfg["rank_pattern"].get(
                path, cfg["r"]
            )
            t = path + ".weight"
            tensors[t] = (tensors[t].double() + scale * (B @ A)).float()
            assert r == cfg["rank_pattern"].get(path, cfg["r"])
        elif key.endswith("lora_embedding_A"):
            path = key[len(prefix) : -len(".lora_embedding_A")]
            A, B = w[key].double(), w[key.replace("_A", "_B")].double()
            scale = cfg["lora_alpha"] / cfg["r"]
            t = path + ".weight"
            tensors[t] = (tensors[t].double() + scale * (B @ A).T).float()
    return tensors


def test_extracted_adapter_loads_with_auto_peft_and_gives_the_low_rank_merge(
    cli_run, pair, tmp_path
):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    base, ft_dir, _, ft = pair
    out = tmp_path / "lora"
    r = cli_run("extract", base, ft_dir, "--rank", "3", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["task_type"] == "CAUSAL_LM"
    assert doc["base_model"] == str(base.resolve())
    assert len(doc["modules"]) == 2 * 7 + 2  # every projection, embed_tokens, lm_head
    assert doc["modules"]["model.embed_tokens.weight"]["kind"] == "embedding"
    assert all(m["method"] == "randomized" for m in doc["modules"].values())
    assert doc["max_relative_error"] < 1e-5  # rank 3 holds an exact rank-3 update
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["base_model_name_or_path"] == str(base.resolve())

    peft_model = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    got = logits_of(peft_model)
    by_hand = AutoModelForCausalLM.from_pretrained(base).eval()
    by_hand.load_state_dict(merged_by_hand(base, out), strict=False)
    torch.testing.assert_close(got, logits_of(by_hand), rtol=1e-4, atol=1e-5)
    # and, the update being exactly rank 3, the fine-tuned model's own logits
    finetuned = AutoModelForCausalLM.from_pretrained(base).eval()
    finetuned.load_state_dict(ft, strict=False)
    torch.testing.assert_close(got, logits_of(finetuned), rtol=1e-4, atol=1e-4)


def test_embed_full_saves_modules_to_save_that_auto_peft_loads(cli_run, pair, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    base, ft_dir, _, ft = pair
    out = tmp_path / "full"
    r = cli_run("extract", base, ft_dir, "--rank", "3", "--embed-full", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert sorted(doc["full"]) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert len(doc["modules"]) == 2 * 7  # the projections only
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["embed_tokens", "lm_head"]
    w = load_file(out / "adapter_model.safetensors")
    # saved as peft saves modules_to_save, the fine-tuned tensors bit for bit
    assert torch.equal(
        w["base_model.model.model.embed_tokens.weight"], ft["model.embed_tokens.weight"]
    )
    assert torch.equal(w["base_model.model.lm_head.weight"], ft["lm_head.weight"])
    got = logits_of(AutoPeftModelForCausalLM.from_pretrained(out).eval())
    finetuned = AutoModelForCausalLM.from_pretrained(base).eval()
    finetuned.load_state_dict(ft, strict=False)  # rank 3 holds the projections' update exactly
    torch.testing.assert_close(got, logits_of(finetuned), rtol=1e-4, atol=1e-4)
    # and loratool's own merge of it gives the fine-tuned weights
    r = cli_run("merge", base, out, "-o", tmp_path / "merged", "--device", "cpu")
    assert r.exit_code == 0, r.output
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert torch.equal(merged["lm_head.weight"], ft["lm_head.weight"])
    key = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(merged[key], ft[key], rtol=0, atol=1e-5)


def test_measured_errors_and_dtype(cli_run, pair, tmp_path):
    base, ft_dir, tensors, ft = pair
    out = tmp_path / "bf16"
    r = cli_run(
        "extract",
        base,
        ft_dir,
        "--rank",
        "2",
        "--dtype",
        "bfloat16",
        "-o",
        out,
        "--json",
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    w = load_file(out / "adapter_model.safetensors")
    assert {t.dtype for t in w.values()} == {torch.bfloat16}
    key = "model.layers.1.mlp.up_proj"
    A = w[f"base_model.model.{key}.lora_A.weight"].double()
    B = w[f"base_model.model.{key}.lora_B.weight"].double()
    delta = ft[key + ".weight"].double() - tensors[key + ".weight"].double()
    want = float((delta - B @ A).norm() / delta.norm())  # on the stored, rounded factors
    assert doc["modules"][key + ".weight"]["relative_error"] == pytest.approx(want, rel=1e-3)
    S = torch.linalg.svdvals(delta)
    optimum = float(S[2:].square().sum().sqrt() / S.square().sum().sqrt())
    assert optimum <= want < optimum * 1.01


def test_changed_norms_are_listed_not_dropped_silently(cli_run, pair, tmp_path):
    base, _, _, ft = pair
    ft2 = dict(ft)
    ft2["model.norm.weight"] = ft2["model.norm.weight"] + 0.5
    d = tmp_path / "ft2"
    d.mkdir()
    save_file(ft2, d / "model.safetensors")
    r = cli_run("extract", base, d, "--rank", "3", "-o", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [x["name"] for x in doc["not_extracted"]] == ["model.norm.weight"]
    r = cli_run("extract", base, d, "--rank", "3", "-o", tmp_path / "o2")
    assert "model.norm.weight" in r.stderr


def test_dynamic_rules_and_exact(cli_run, pair, tmp_path):
    base, ft_dir, _, _ = pair
    for args, want in (
        (["--energy", "0.999999"], 3),  # exactly rank 3: recovered exactly
        (["--sv-ratio", "1000"], 3),
        (["--sv-epsilon", "1e-3"], 3),
        (["--sv-fro", "0.999999", "--max-rank", "2"], 2),
        (["--sv-cumulative", "0.999"], 3),  # Σσ: the float32 noise floor counts more
    ):
        out = tmp_path / args[0].strip("-")
        r = cli_run("extract", base, ft_dir, *args, "-o", out, "--json")
        assert r.exit_code == 0, r.output
        mods = json.loads(r.stdout)["modules"]
        assert {m["rank"] for m in mods.values()} == {want}, args
    r = cli_run(
        "extract",
        base,
        ft_dir,
        "--rank",
        "3",
        "--exact",
        "-o",
        tmp_path / "x",
        "--json",
    )
    mods = json.loads(r.stdout)["modules"]
    assert {m["method"] for m in mods.values()} == {"exact"}
    r = cli_run(
        "extract",
        base,
        ft_dir,
        "--rank",
        "3",
        "--energy",
        "0.9",
        "-o",
        tmp_path / "y",
    )
    assert r.exit_code == 2 and "exactly one of" in r.stderr


def test_same_result_every_run_and_reader_overlaps(pair, monkeypatch):
    base, ft_dir, _, _ = pair
    threads = set()
    read = X._Reader.read

    def spy(self, info):
        threads.add(threading.current_thread().name)
        return read(self, info)

    monkeypatch.setattr(X._Reader, "read", spy)
    rule = RankRule("rank", 2)
    a = X.run_extract(X.plan_extract(base, ft_dir, rule, device="cpu"))
    b = X.run_extract(X.plan_extract(base, ft_dir, rule, device="cpu"))
    assert threads and all(t.startswith("loratool-read") for t in threads)
    for name, m in a.adapter.modules.items():
        assert torch.equal(m.A, b.adapter.modules[name].A)
        assert torch.equal(m.B, b.adapter.modules[name].B)
    c = X.run_extract(X.plan_extract(base, ft_dir, rule, device="cpu", seed=7))
    m = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a.adapter.modules[m].A, c.adapter.modules[m].A)
    assert c.modules[m]["relative_error"] == pytest.approx(a.modules[m]["relative_error"], rel=0.01)


def test_base_name_from_hf_cache_config_and_option(pair, tmp_path):
    base, _, tensors, _ = pair
    snap = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    save_file(tensors, snap / "model.safetensors")
    (snap / "config.json").write_text((base / "config.json").read_text())
    assert X.base_model_id(read_base(snap)) == ("acme/tiny-llama", "0123abcd", "hf-cache")
    assert X.base_model_id(read_base(snap), "me/llama@v2") == ("me/llama", "v2", "option")
    cfg = json.loads((base / "config.json").read_text())
    other = tmp_path / "plain"
    other.mkdir()
    save_file(tensors, other / "model.safetensors")
    (other / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "acme/named"}))
    assert X.base_model_id(read_base(other))[0] == "acme/named"
    (other / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "llama"}))
    assert X.base_model_id(read_base(other)) == (str(other.resolve()), None, "path")


@pytest.mark.parametrize(
    "arch,model_type,want",
    [
        ("LlamaForCausalLM", "llama", "CAUSAL_LM"),
        ("T5ForConditionalGeneration", "t5", "SEQ_2_SEQ_LM"),
        ("LlavaForConditionalGeneration", "llava", "CAUSAL_LM"),
        ("BertForSequenceClassification", "bert", "SEQ_CLS"),
        ("BertForTokenClassification", "bert", "TOKEN_CLS"),
        ("BertForQuestionAnswering", "bert", "QUESTION_ANS"),
        ("BertModel", "bert", "FEATURE_EXTRACTION"),
        ("Something", "x", None),
    ],
)
def test_task_type_from_architectures(tmp_path, arch, model_type, want):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": [arch], "model_type": model_type})
    )
    assert X.task_type_of(tmp_path) == want


def test_task_type_option_and_refusals(cli_run, pair, tmp_path):
    base, ft_dir, tensors, _ = pair
    out = tmp_path / "o"
    r = cli_run(
        "extract",
        base,
        ft_dir,
        "--rank",
        "1",
        "--task-type",
        "FEATURE_EXTRACTION",
        "--base-model",
        "acme/base",
        "-o",
        out,
    )
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (
        cfg["task_type"] == "FEATURE_EXTRACTION" and cfg["base_model_name_or_path"] == "acme/base"
    )
    # a resized vocabulary cannot be a LoRA: one line naming the tensor
    bad = dict(tensors)
    bad["model.embed_tokens.weight"] = torch.zeros(
        97, tensors["model.embed_tokens.weight"].shape[1]
    )
    d = tmp_path / "bad"
    d.mkdir()
    save_file(bad, d / "model.safetensors")
    r = cli_run("extract", base, d, "--rank", "1", "-o", tmp_path / "x")
    assert r.exit_code == 1 and "model.embed_tokens.weight" in r.stderr and "vocabulary" in r.stderr
    assert not (tmp_path / "x").exists()
    r = cli_run("extract", base, base, "--rank", "1", "-o", tmp_path / "x")
    assert r.exit_code == 1 and "nothing to extract" in r.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_extract_on_cuda_matches_cpu(pair):
    base, ft_dir, _, _ = pair
    rule = RankRule("rank", 2)
    cpu = X.run_extract(X.plan_extract(base, ft_dir, rule, device="cpu"))
    gpu = X.run_extract(X.plan_extract(base, ft_dir, rule, device="cuda"))
    assert gpu.device.startswith("cuda")
    for name, m in cpu.adapter.modules.items():
        g = gpu.adapter.modules[name]
        torch.testing.assert_close(g.B @ g.A, m.B @ m.A, rtol=1e-4, atol=1e-6)
        assert math.isclose(
            gpu.modules[name]["relative_error"], cpu.modules[name]["relative_error"], rel_tol=1e-3
        )
