"""Tiny transformers models built from configs (offline) and real peft adapters on them.

Every model is made with a fixed seed; adapters use init_lora_weights=False so that B is not
zero and merges are not trivial.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention: k/v project to 32
        head_dim=16,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=96, n_positions=32, n_embd=48, n_layer=2, n_head=4)


def build(config, seed: int = 0, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():  # norms start at 1; make every weight distinct
            p.add_(torch.randn_like(p) * 0.02)
    return model.to(dtype).eval()


CASES = {
    "llama": dict(
        config=llama_config,
        lora=dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    ),
    "llama_rslora": dict(
        config=llama_config,
        lora=dict(
            r=8,
            lora_alpha=16,
            use_rslora=True,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"down_proj": 2, "model.layers.1.self_attn.q_proj": 4},
            alpha_pattern={"v_proj": 4},
        ),
    ),
    "llama_embed": dict(
        config=llama_config,
        lora=dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "lm_head"]),
    ),
    "gpt2": dict(
        config=gpt2_config,
        lora=dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    ),
}


@dataclass
class PeftCase:
    name: str
    base_dir: Path
    adapter_dir: Path
    peft_model: object  # PeftModel, adapters not merged

    def fresh_base(self, dtype=torch.float32):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.base_dir, dtype=dtype).eval()


def make_case(name: str, root: Path, seed: int = 0, dtype=torch.float32) -> PeftCase:
    """Save a base (save_pretrained layout) and a peft adapter trained-looking on it."""
    from peft import LoraConfig, get_peft_model

    spec = CASES[name]
    base = build(spec["config"](), seed, dtype)
    base_dir = root / f"{name}-base"
    base.save_pretrained(base_dir)
    torch.manual_seed(seed + 1)
    cfg = LoraConfig(init_lora_weights=False, lora_dropout=0.0, **spec["lora"])
    model = get_peft_model(build(spec["config"](), seed, dtype), cfg)
    with torch.no_grad():  # peft's random init of B is large; keep deltas modest but nonzero
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.mul_(0.5)
    adapter_dir = root / f"{name}-adapter"
    model.save_pretrained(adapter_dir)
    return PeftCase(name, base_dir, adapter_dir, model.eval())
