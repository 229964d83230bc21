"""savings_config: LoRA and base sizes from a config.json, against the LoRA paper and real models.

The reference for every family is transformers 5 itself: the model is built from the same
config on the meta device (no memory, no download) and its parameters, its Linear / Conv1D /
Embedding modules and the trainable parameters real peft adds are compared with ours.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from loratool.errors import ValidationError
from loratool.savings_config import (
    DTYPE_BYTES,
    SUPPORTED_MODEL_TYPES,
    ModuleShape,
    base_param_count,
    config_module_shapes,
    config_parameters,
    hypothetical_adapter,
    match_targets,
)

MiB = 1 << 20

# ---------------------------------------------------------------- the LoRA paper's numbers
# Hu et al. 2021, Table 2 and section 4.2: trainable parameters of LoRA on W_q and W_v.


# A one-layer Llama small enough to count by hand.
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "intermediate_size": 48,
    "vocab_size": 100,
}


def roberta(hidden: int, layers: int) -> dict:
    return {
        "model_type": "roberta",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 64,
        "intermediate_size": 4 * hidden,
        "vocab_size": 50265,
        "max_position_embeddings": 514,
        "type_vocab_size": 1,
    }


def gpt3_175b() -> dict:
    # GPT-2's attention is one fused c_attn, so the paper's separate W_q and W_v are modelled on
    # a llama-shaped decoder of GPT-3's size with full multi-head attention (no GQA); its gated
    # MLP has three matrices, so 8/3·d = 32768 keeps GPT-3's 8·d² MLP weights per layer
    return {
        "model_type": "llama",
        "hidden_size": 12288,
        "num_hidden_layers": 96,
        "num_attention_heads": 96,
        "num_key_value_heads": 96,
        "intermediate_size": 32768,
        "vocab_size": 50257,
    }


def test_paper_roberta_base():
    doc = hypothetical_adapter(roberta(768, 12), 8, ["query", "value"])
    assert doc["params"] == 294_912  # the paper's 0.3M
    assert doc["modules"] == 24
    assert doc["dense_params"] == 24 * 768 * 768
    assert doc["compression"] == pytest.approx(768 * 768 / (8 * 2 * 768))


def test_paper_roberta_large():
    assert (
        hypothetical_adapter(roberta(1024, 24), 8, ["query", "value"])["params"] == 786_432
    )  # 0.8M


def test_paper_deberta_xxl():
    cfg = {
        "model_type": "deberta-v2",
        "hidden_size": 1536,
        "num_hidden_layers": 48,
        "num_attention_heads": 24,
        "attention_head_size": 64,
        "intermediate_size": 6144,
        "vocab_size": 128100,
        "relative_attention": True,
        "pos_att_type": "p2c|c2p",
        "share_att_key": True,
        "position_buckets": 256,
        "norm_rel_ebd": "layer_norm",
        "conv_kernel_size": 3,
        "position_biased_input": False,
    }
    doc = hypothetical_adapter(cfg, 16, ["query_proj", "value_proj"])
    assert doc["params"] == 4_718_592  # 4.7M
    assert doc["modules"] == 96
    # DeBERTa-XXL is the paper's 1.5B model
    assert 1.5e9 < base_param_count(cfg) < 1.6e9


def test_paper_gpt3():
    cfg = gpt3_175b()
    assert hypothetical_adapter(cfg, 1, ["q_proj", "v_proj"])["params"] == 4_718_592  # 4.7M
    assert hypothetical_adapter(cfg, 8, ["q_proj", "v_proj"])["params"] == 37_748_736  # 37.7M
    assert 174e9 < base_param_count(cfg) < 176e9
    # "reduces the checkpoint size by roughly 10,000× (from 350GB to 35MB)" at r=4 on q, v
    doc = hypothetical_adapter(cfg, 4, ["q_proj", "v_proj"], dtype="float16")
    assert doc["bytes"] == doc["params"] * 2
    assert 35 * MiB <= doc["bytes"] <= 37 * MiB
    assert 345e9 < doc["base_bytes"] < 355e9
    assert 9_000 < doc["base_bytes"] / doc["bytes"] < 10_000


# ---------------------------------------------------------------- shapes, by hand


def test_grouped_query_attention_and_explicit_head_dim():
    cfg = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 24,
        "intermediate_size": 112,
        "vocab_size": 96,
    }
    shapes = {s.name: s for s in config_module_shapes(cfg)}
    q, k, v, o = (shapes[f"model.layers.1.self_attn.{n}_proj"] for n in "qkvo")
    assert (q.out_features, q.in_features) == (4 * 24, 64)  # head_dim 24, not 64/4
    assert (k.out_features, k.in_features) == (2 * 24, 64)  # num_key_value_heads × head_dim
    assert (v.out_features, v.in_features) == (2 * 24, 64)
    assert (o.out_features, o.in_features) == (64, 4 * 24)
    assert shapes["model.layers.0.mlp.down_proj"].weight_shape == (64, 112)
    doc = hypothetical_adapter(cfg, 8, ["q_proj", "v_proj"], dtype="float32")
    assert doc["params"] == 2 * (8 * (64 + 96) + 8 * (64 + 48))
    assert doc["dense_params"] == 2 * (96 * 64 + 48 * 64)
    assert doc["bytes"] == doc["params"] * 4


def test_gemma_head_dim_default_is_not_hidden_over_heads():
    # Gemma-7B: hidden 3072, 16 heads, head_dim 256 (16·256 = 4096 ≠ 3072); a config.json
    # written by save_pretrained leaves head_dim out when it is the class default
    cfg = {
        "model_type": "gemma",
        "hidden_size": 3072,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_hidden_layers": 28,
        "intermediate_size": 24576,
        "vocab_size": 256000,
    }
    q = next(s for s in config_module_shapes(cfg) if s.name.endswith("q_proj"))
    assert (q.out_features, q.in_features) == (4096, 3072)
    assert base_param_count(cfg) == 8_537_680_896  # google/gemma-7b


def test_gpt2_fused_conv1d_and_inner_default():
    cfg = {
        "model_type": "gpt2",
        "n_embd": 48,
        "n_layer": 2,
        "n_head": 4,
        "vocab_size": 96,
        "n_positions": 32,
    }
    shapes = {s.name: s for s in config_module_shapes(cfg)}
    c_attn = shapes["transformer.h.0.attn.c_attn"]
    assert c_attn.kind == "conv1d"
    assert (c_attn.in_features, c_attn.out_features) == (48, 3 * 48)
    assert c_attn.weight_shape == (48, 144)  # Conv1D stores in × out
    assert shapes["transformer.h.0.mlp.c_fc"].out_features == 4 * 48  # n_inner: None → 4·n_embd
    assert shapes["transformer.wpe"].kind == "embedding"
    cfg["n_inner"] = 100
    assert {s.name: s for s in config_module_shapes(cfg)}[
        "transformer.h.1.mlp.c_proj"
    ].in_features == 100


def test_gpt2_real_sizes():
    # gpt2 (124M) and gpt2-xl (1.5B): the counts everyone quotes
    assert (
        base_param_count({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
        == 124_439_808
    )
    xl = {"model_type": "gpt2", "n_embd": 1600, "n_layer": 48, "n_head": 25}
    assert base_param_count(xl) == 1_557_611_200


def test_gpt2_sizes_under_either_spelling():
    # GPT2Config's attribute_map: hidden_size is n_embd, num_hidden_layers is n_layer, …
    short = {"model_type": "gpt2", "n_embd": 48, "n_layer": 2, "n_head": 4, "n_positions": 32}
    long = {
        "model_type": "gpt2",
        "hidden_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 32,
    }
    assert config_parameters(short) == config_parameters(long)


def test_gpt_neox_fused_query_key_value():
    cfg = {
        "model_type": "gpt_neox",
        "hidden_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "intermediate_size": 256,
        "vocab_size": 100,
    }
    qkv = next(s for s in config_module_shapes(cfg) if s.leaf == "query_key_value")
    assert (qkv.out_features, qkv.in_features) == (3 * 64, 64)
    assert qkv.name == "gpt_neox.layers.0.attention.query_key_value"


def test_tied_embeddings():
    base = dict(TINY_LLAMA)
    untied = dict(base, tie_word_embeddings=False)
    tied = dict(base, tie_word_embeddings=True)
    assert base_param_count(untied) - base_param_count(tied) == 100 * 32  # lm_head counted once
    head = next(s for s in config_module_shapes(tied) if s.name == "lm_head")
    assert head.tied_to == "model.embed_tokens"  # still a module LoRA can target
    assert "lm_head.weight" not in config_parameters(tied)
    assert "lm_head.weight" in config_parameters(untied)
    # LoRA on a tied head is as big as on an untied one
    assert hypothetical_adapter(tied, 4, ["lm_head"])["params"] == 4 * (32 + 100)


def test_embedding_lora_counts_num_embeddings_plus_dim():
    cfg = dict(TINY_LLAMA)
    emb = next(s for s in config_module_shapes(cfg) if s.kind == "embedding")
    assert (emb.in_features, emb.out_features, emb.weight_shape) == (100, 32, (100, 32))
    doc = hypothetical_adapter(cfg, 4, ["embed_tokens"])
    assert doc["params"] == 4 * (100 + 32) and doc["dense_params"] == 100 * 32


def test_real_config_fixtures(fixtures):
    llama = json.loads((fixtures / "configs" / "llama-2-7b.json").read_text())
    assert base_param_count(llama) == 6_738_415_616  # meta-llama/Llama-2-7b-hf
    assert hypothetical_adapter(llama, 8, ["q_proj", "v_proj"])["params"] == 32 * 2 * 8 * (
        4096 + 4096
    )
    rob = json.loads((fixtures / "configs" / "roberta-base.json").read_text())
    assert base_param_count(rob) == 124_697_433  # roberta-base as RobertaForMaskedLM
    names = [s.name for s in config_module_shapes(rob)]
    assert "roberta.encoder.layer.11.attention.self.value" in names and "lm_head.decoder" in names


def test_match_targets_is_peft_suffix_rule():
    names = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "lm_head",
        "encoder.layer.0.attention.self.pos_query_proj",
        "encoder.layer.0.attention.self.query_proj",
        "xq_proj",
    ]
    assert match_targets(names, ["q_proj"]) == ["model.layers.0.self_attn.q_proj"]
    assert match_targets(names, ["self_attn.k_proj", "lm_head"]) == [
        "model.layers.0.self_attn.k_proj",
        "lm_head",
    ]
    assert match_targets(names, ["query_proj"]) == ["encoder.layer.0.attention.self.query_proj"]
    assert match_targets(names, ["model.layers.0.self_attn.q_proj"]) == [
        "model.layers.0.self_attn.q_proj"
    ]
    assert match_targets(names, ["proj"]) == []
    assert match_targets(names, []) == []


def test_all_linear_shorthand():
    cfg = {
        "model_type": "llama",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 48,
        "vocab_size": 100,
    }
    doc = hypothetical_adapter(cfg, 4, "all-linear")
    assert doc["modules"] == 2 * 7  # q k v o gate up down; not lm_head, not the embedding
    assert hypothetical_adapter(cfg, 4, ["all-linear"]) == doc


def test_dtype_sizes():
    cfg = roberta(768, 12)
    for dtype, size in [
        ("float32", 4),
        ("float16", 2),
        ("bfloat16", 2),
        ("float8", 1),
        ("float8_e4m3fn", 1),
        ("float8_e5m2", 1),
    ]:
        doc = hypothetical_adapter(cfg, 8, ["query"], dtype=dtype)
        assert DTYPE_BYTES[dtype] == size
        assert (
            doc["bytes"] == doc["params"] * size and doc["base_bytes"] == doc["base_params"] * size
        )
    with pytest.raises(ValidationError, match="unknown dtype 'int3'"):
        hypothetical_adapter(cfg, 8, ["query"], dtype="int3")


def test_unknown_model_type(tmp_path):
    path = str(tmp_path / "config.json")
    with pytest.raises(ValidationError) as err:
        config_module_shapes({"model_type": "mamba"}, source=path)
    text = str(err.value)
    assert text.startswith(path + ": ") and "'mamba'" in text
    assert all(t in text for t in SUPPORTED_MODEL_TYPES)
    with pytest.raises(ValidationError, match="no model_type"):
        base_param_count({"hidden_size": 8})
    for t in (
        "llama",
        "mistral",
        "qwen2",
        "gemma",
        "gpt2",
        "gpt_neox",
        "bert",
        "roberta",
        "deberta-v2",
    ):
        assert t in SUPPORTED_MODEL_TYPES


def test_target_that_matches_nothing(tmp_path):
    path = str(tmp_path / "config.json")
    cfg = roberta(64, 2)
    with pytest.raises(ValidationError) as err:
        hypothetical_adapter(cfg, 8, ["query", "q_proj"], source=path)
    text = str(err.value)
    assert text.startswith(path + ": ") and "'q_proj'" in text
    for leaf in ("query", "key", "value", "dense", "word_embeddings"):
        assert leaf in text
    with pytest.raises(ValidationError, match="no target"):
        hypothetical_adapter(cfg, 8, [])


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_rank(bad):
    with pytest.raises(ValidationError, match="rank"):
        hypothetical_adapter(roberta(64, 2), bad, ["query"])


def test_bad_config_values():
    with pytest.raises(ValidationError, match="'hidden_size' must be an integer"):
        base_param_count({"model_type": "llama", "hidden_size": "big"}, source="c.json")
    with pytest.raises(ValidationError, match="JSON object"):
        base_param_count(["llama"])


def test_module_shape_arithmetic():
    s = ModuleShape("a.b", out_features=6, in_features=4, kind="linear")
    assert (s.leaf, s.weight_shape, s.dense_params, s.lora_params(2)) == ("b", (6, 4), 24, 20)


def test_importing_the_module_does_not_import_torch():
    code = (
        "import sys, loratool.savings_config as m; m.base_param_count({'model_type': 'llama'}); "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["False", "False"]


# ---------------------------------------------------------------- against transformers and peft

TINY_DECODER = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 48,
    "vocab_size": 96,
    "max_position_embeddings": 64,
}
TINY_ENCODER = {**TINY_DECODER, "max_position_embeddings": 40, "type_vocab_size": 2}

# (id, config dict, target lists to check against peft; "all-linear" is checked for each too)
# fmt: off
CASES = [
    ("llama-gqa-head_dim", {"model_type": "llama", **TINY_DECODER, "num_key_value_heads": 2, "head_dim": 12},
     [["q_proj", "v_proj"], ["k_proj", "o_proj", "down_proj"], ["embed_tokens", "lm_head"]]),
    ("llama-tied-biases", {"model_type": "llama", **TINY_DECODER, "tie_word_embeddings": True,
                           "attention_bias": True, "mlp_bias": True}, [["q_proj", "lm_head"], ["gate_proj", "up_proj"]]),
    ("llama-seqcls", {"model_type": "llama", **TINY_DECODER, "architectures": ["LlamaForSequenceClassification"],
                      "id2label": {"0": "a", "1": "b", "2": "c"}}, [["q_proj", "score"]]),
    ("llama-bare", {"model_type": "llama", **TINY_DECODER, "architectures": ["LlamaModel"]}, [["v_proj"]]),
    ("mistral", {"model_type": "mistral", **TINY_DECODER, "num_key_value_heads": 1}, [["q_proj", "k_proj", "v_proj"]]),
    # num_key_value_heads absent: MistralConfig's default 8, not num_attention_heads
    ("mistral-default-kv", {"model_type": "mistral", **TINY_DECODER, "num_attention_heads": 16}, [["k_proj"]]),
    ("qwen2", {"model_type": "qwen2", **TINY_DECODER, "num_key_value_heads": 2, "tie_word_embeddings": True},
     [["q_proj", "k_proj", "v_proj", "o_proj"], ["lm_head"]]),
    ("qwen3", {"model_type": "qwen3", **TINY_DECODER, "num_key_value_heads": 2, "head_dim": 16},
     [["q_proj", "v_proj"]]),
    ("gemma", {"model_type": "gemma", **TINY_DECODER, "num_key_value_heads": 1, "head_dim": 16},
     [["q_proj", "v_proj"], ["embed_tokens"]]),
    ("gemma2", {"model_type": "gemma2", **TINY_DECODER, "num_key_value_heads": 2, "head_dim": 16},
     [["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]]),
    ("phi3", {"model_type": "phi3", **TINY_DECODER, "num_key_value_heads": 2, "pad_token_id": 0,
              "eos_token_id": 1, "bos_token_id": 1}, [["qkv_proj", "gate_up_proj"], ["o_proj"]]),
    ("gpt2", {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 96, "n_positions": 24,
              "bos_token_id": 0, "eos_token_id": 0}, [["c_attn"], ["c_attn", "c_proj", "c_fc"], ["wte", "wpe"]]),
    ("gpt2-inner-untied-cross", {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 4, "vocab_size": 96,
                                 "n_positions": 24, "n_inner": 40, "tie_word_embeddings": False,
                                 "add_cross_attention": True, "bos_token_id": 0, "eos_token_id": 0},
     [["c_attn", "q_attn", "lm_head"]]),
    ("gpt_neox", {"model_type": "gpt_neox", **TINY_DECODER}, [["query_key_value"], ["dense", "dense_h_to_4h"]]),
    ("gpt_neox-nobias-tied", {"model_type": "gpt_neox", **TINY_DECODER, "attention_bias": False,
                              "tie_word_embeddings": True}, [["query_key_value", "lm_head"]]),
    ("bert", {"model_type": "bert", **TINY_ENCODER}, [["query", "value"], ["dense"], ["word_embeddings"]]),
    ("bert-mlm", {"model_type": "bert", **TINY_ENCODER, "architectures": ["BertForMaskedLM"]},
     [["query", "value"], ["decoder"]]),
    ("bert-mlm-untied", {"model_type": "bert", **TINY_ENCODER, "architectures": ["BertForMaskedLM"],
                         "tie_word_embeddings": False}, [["key"]]),
    ("bert-seqcls", {"model_type": "bert", **TINY_ENCODER, "architectures": ["BertForSequenceClassification"],
                     "num_labels": 5}, [["query", "classifier"]]),
    ("bert-decoder-cross", {"model_type": "bert", **TINY_ENCODER, "is_decoder": True, "add_cross_attention": True},
     [["query"]]),
    ("roberta", {"model_type": "roberta", **TINY_ENCODER, "type_vocab_size": 1, "pad_token_id": 1},
     [["query", "value"]]),
    ("roberta-mlm", {"model_type": "roberta", **TINY_ENCODER, "architectures": ["RobertaForMaskedLM"]},
     [["query", "value"], ["dense"]]),
    ("roberta-seqcls", {"model_type": "roberta", **TINY_ENCODER,
                        "architectures": ["RobertaForSequenceClassification"]}, [["query", "out_proj"]]),
    ("deberta-v2", {"model_type": "deberta-v2", **TINY_ENCODER}, [["query_proj", "value_proj"]]),
    ("deberta-v3-like", {"model_type": "deberta-v2", **TINY_ENCODER, "type_vocab_size": 0, "relative_attention": True,
                         "pos_att_type": ["p2c", "c2p"], "share_att_key": True, "position_buckets": 16,
                         "norm_rel_ebd": "layer_norm", "position_biased_input": False,
                         "architectures": ["DebertaV2ForMaskedLM"], "legacy": False},
     [["query_proj", "value_proj"], ["rel_embeddings"]]),
    ("deberta-xxl-like", {"model_type": "deberta-v2", **TINY_ENCODER, "attention_head_size": 4,
                          "relative_attention": True, "pos_att_type": "p2c|c2p", "max_relative_positions": -1,
                          "conv_kernel_size": 3, "conv_groups": 2, "embedding_size": 24,
                          "architectures": ["DebertaV2ForMaskedLM"]},
     [["query_proj", "value_proj"], ["pos_key_proj", "pos_query_proj", "embed_proj"], ["decoder"]]),
    ("deberta-seqcls", {"model_type": "deberta-v2", **TINY_ENCODER, "pooler_hidden_size": 32,
                        "architectures": ["DebertaV2ForSequenceClassification"], "num_labels": 3},
     [["query_proj", "classifier"]]),
]
# fmt: on


def _build_model(cfg: dict):
    """The transformers model a config describes, on the meta device (no memory, no weights)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rest = {k: v for k, v in cfg.items() if k != "model_type"}
    config = transformers.AutoConfig.for_model(cfg["model_type"], **rest)
    arch = (cfg.get("architectures") or [None])[0]
    with torch.device("meta"):
        if arch is not None:
            return getattr(transformers, arch)(config)
        if cfg["model_type"] in ("bert", "roberta", "deberta-v2"):
            return transformers.AutoModel.from_config(config)
        return transformers.AutoModelForCausalLM.from_config(config)


def _module_table(model) -> dict[str, tuple[str, tuple[int, ...]]]:
    import torch
    from transformers.pytorch_utils import Conv1D

    kinds = ((torch.nn.Embedding, "embedding"), (Conv1D, "conv1d"), (torch.nn.Linear, "linear"))
    table = {}
    for name, module in model.named_modules():
        for cls, kind in kinds:
            if isinstance(module, cls):
                table[name] = (kind, tuple(module.weight.shape))
                break
    return table


@pytest.mark.parametrize("case_id, cfg, target_sets", CASES, ids=[c[0] for c in CASES])
def test_against_transformers(case_id, cfg, target_sets):
    model = _build_model(cfg)
    # every parameter, by name and shape; tied ones once
    theirs = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert config_parameters(cfg) == theirs
    assert base_param_count(cfg) == sum(p.numel() for p in model.parameters())
    # every Linear / Conv1D / Embedding, by name, kind and stored weight shape
    ours = {s.name: (s.kind, s.weight_shape) for s in config_module_shapes(cfg)}
    assert ours == _module_table(model)


@pytest.mark.parametrize("case_id, cfg, target_sets", CASES, ids=[c[0] for c in CASES])
def test_against_peft(case_id, cfg, target_sets):
    peft = pytest.importorskip("peft")
    import warnings

    for targets in [*target_sets, "all-linear"]:
        for rank in (1, 4):
            model = _build_model(cfg)
            lora = peft.LoraConfig(r=rank, target_modules=targets)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # fan_in_fan_out for Conv1D, tied lm_head notes
                wrapped = peft.get_peft_model(model, lora)
            trainable = wrapped.get_nb_trainable_parameters()[0]
            doc = hypothetical_adapter(cfg, rank, targets, dtype="float32")
            assert doc["params"] == trainable, (targets, rank)
            lora_modules = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in wrapped.modules())
            assert doc["modules"] == lora_modules, targets
            assert doc["bytes"] == 4 * trainable


def test_dense_params_against_peft_delta_shapes():
    """dense_params is Σ in·out of the matched weights: the elements of the ΔW peft would merge."""
    peft = pytest.importorskip("peft")
    cfg = CASES[0][1]
    targets = ["q_proj", "k_proj", "embed_tokens"]
    wrapped = peft.get_peft_model(_build_model(cfg), peft.LoraConfig(r=2, target_modules=targets))
    dense = 0
    for _, module in wrapped.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            dense += math.prod(module.get_base_layer().weight.shape)
    assert hypothetical_adapter(cfg, 2, targets)["dense_params"] == dense
