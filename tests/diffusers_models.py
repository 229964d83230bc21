"""Tiny diffusers / transformers image-model components built from configs (offline, seeded),
and helpers to give them real LoRA adapters through peft and save them as diffusers does."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "time_emb_proj"]
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out", "x_embedder"]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=2,
        attention_head_dim=2,
    ).eval()


def tiny_flux(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=4,
        num_attention_heads=2,
        joint_attention_dim=8,
        pooled_projection_dim=8,
        axes_dims_rope=(0, 2, 2),
    ).eval()


def tiny_clip(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=8,
        intermediate_size=16,
        num_attention_heads=2,
        num_hidden_layers=1,
        vocab_size=50,
        max_position_embeddings=16,
        projection_dim=8,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def add_lora(model, targets, *, r=4, alpha=8, seed=1, **config):
    """Wrap ``model`` with a peft LoRA whose B is random (not peft's zeros), so ΔW ≠ 0."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, **config)
    model = inject_adapter_in_model(cfg, model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.peft_config = {"default": cfg}
    return model


def lora_state(model) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def base_state(model) -> dict[str, torch.Tensor]:
    """The model's own weights (LoRA wrappers' base_layer names unwrapped)."""
    out = {}
    for k, v in model.state_dict().items():
        if "lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v.detach().clone().contiguous()
    return out


def save_base(model, path: Path) -> Path:
    save_file(base_state(model), str(path))
    return path


def peft_deltas(model) -> dict[str, torch.Tensor]:
    """peft's own ΔW per adapted weight (``get_delta_weight``), keyed by base tensor name."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.scaling:
            out[name + ".weight"] = module.get_delta_weight("default").detach().float()
    return out
