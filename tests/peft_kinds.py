"""Tiny transformers models and real peft adapters of every kind issue 11 names.

Each case builds a base from a config with a fixed seed, saves it the way save_pretrained
does, wraps a copy in peft with the case's LoraConfig, moves every trainable tensor away from
its initial value (so that a dropped magnitude, head, bias or token row shows in the numbers)
and saves the adapter. ``model_cls`` is the transformers auto class to load the base with.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch


def _llama(**over):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    kw.update(over)
    return LlamaConfig(**kw)


def _gpt2(**over):
    from transformers import GPT2Config

    kw = dict(vocab_size=96, n_positions=32, n_embd=48, n_layer=2, n_head=4, pad_token_id=0)
    kw.update(over)
    return GPT2Config(**kw)


def _qwen3_moe():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings=False,
    )


def _gpt_oss():
    from transformers import GptOssConfig

    # hidden == intermediate: down_proj is square, as in the real gpt-oss (2880 × 2880)
    return GptOssConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"],
        tie_word_embeddings=False,
    )


CAUSAL = "AutoModelForCausalLM"
CASES: dict[str, dict] = {
    # DoRA + modules_to_save on a classifier (peft adds "score" for SEQ_CLS by itself)
    "seqcls_dora": dict(
        model=("AutoModelForSequenceClassification", lambda: _llama(num_labels=3)),
        lora=dict(
            task_type="SEQ_CLS",
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            use_dora=True,
        ),
    ),
    "tokcls": dict(
        model=("AutoModelForTokenClassification", lambda: _llama(num_labels=5)),
        lora=dict(task_type="TOKEN_CLS", r=4, lora_alpha=4, target_modules=["q_proj", "o_proj"]),
    ),
    "bias_all": dict(
        model=(CAUSAL, lambda: _llama(attention_bias=True)),
        lora=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="all"),
    ),
    "bias_lora_only": dict(
        model=(CAUSAL, lambda: _llama(attention_bias=True)),
        lora=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="lora_only"),
    ),
    "lora_bias": dict(
        model=(CAUSAL, lambda: _llama(attention_bias=True, mlp_bias=True)),
        lora=dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], lora_bias=True),
    ),
    "dora_llama": dict(
        model=(CAUSAL, _llama),
        lora=dict(
            r=4,
            lora_alpha=8,
            use_dora=True,
            target_modules=["q_proj", "k_proj", "down_proj", "embed_tokens", "lm_head"],
        ),
    ),
    # fan_in_fan_out given wrong on purpose: peft decides it per layer type, Conv1D c_attn and
    # c_proj (square) and the Linear lm_head under one flag
    "dora_gpt2": dict(
        model=(CAUSAL, _gpt2),
        lora=dict(r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn", "c_proj", "lm_head"]),
    ),
    "gpt2_mixed": dict(
        model=(CAUSAL, lambda: _gpt2(tie_word_embeddings=False)),
        lora=dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc", "lm_head"]),
    ),
    "tokens": dict(
        model=(CAUSAL, _llama),
        lora=dict(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=[3, 17, 5]),
    ),
    "moe": dict(
        model=(CAUSAL, _qwen3_moe),
        lora=dict(
            r=2,
            lora_alpha=4,
            target_modules=["q_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        ),
    ),
    "gpt_oss": dict(
        model=(CAUSAL, _gpt_oss),
        lora=dict(
            r=2,
            lora_alpha=4,
            target_modules=[],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        ),
    ),
    # an adapter on lm_head (and embed_tokens) of a model whose lm_head is tied to them
    "tied": dict(
        model=(CAUSAL, lambda: _llama(tie_word_embeddings=True)),
        lora=dict(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head", "embed_tokens"]),
    ),
    # new tokens: trained on the base resized from 96 to 100 tokens, embeddings saved in full
    "resized": dict(
        model=(CAUSAL, _llama),
        lora=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        resize=100,
    ),
}


@dataclass
class KindCase:
    name: str
    base_dir: Path
    adapter_dir: Path
    model_cls: str
    resize: int | None

    def load_base(self, path=None, dtype=torch.float32):
        import transformers

        cls = getattr(transformers, self.model_cls)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls.from_pretrained(path or self.base_dir, dtype=dtype).eval()

    def peft_model(self, dtype=torch.float32):
        """The unmerged PeftModel, loaded as a user would (resized first where needed)."""
        from peft import PeftModel

        base = self.load_base(dtype=dtype)
        if self.resize:
            base.resize_token_embeddings(self.resize)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return PeftModel.from_pretrained(base, self.adapter_dir).eval()


def _perturb(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g).to(p.dtype)
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * noise)  # magnitudes start at the weight norms
            elif "lora_" in n:
                p.mul_(0.5)  # peft's random init (init_lora_weights=False) is large
            else:  # heads, biases, token rows: trained away from the base
                p.add_(0.05 * noise)


def make_kind_case(name: str, root: Path, seed: int = 0) -> KindCase:
    import transformers
    from peft import LoraConfig, get_peft_model

    spec = CASES[name]
    cls_name, make_config = spec["model"]
    cls = getattr(transformers, cls_name)

    def build():
        torch.manual_seed(seed)
        model = cls.from_config(make_config())
        with torch.no_grad():
            for p in model.parameters():  # norms start at 1; make every weight distinct
                p.add_(torch.randn_like(p) * 0.02)
        return model.eval()

    base_dir = root / f"{name}-base"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build().save_pretrained(base_dir)
        model = build()
        if spec.get("resize"):
            model.resize_token_embeddings(spec["resize"])
        torch.manual_seed(seed + 1)
        cfg = LoraConfig(init_lora_weights=False, lora_dropout=0.0, **spec["lora"])
        peft_model = get_peft_model(model, cfg)
        _perturb(peft_model, seed + 2)
        adapter_dir = root / f"{name}-adapter"
        kw = {"save_embedding_layers": True} if spec.get("resize") else {}
        peft_model.save_pretrained(adapter_dir, **kw)
    return KindCase(name, base_dir, adapter_dir, cls_name, spec.get("resize"))
