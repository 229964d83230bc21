"""Tiny image-model layouts for the image-base tests: a diffusers pipeline directory, original
single-file checkpoints (SD 1.5, SDXL, Flux BFL) and kohya / LyCORIS LoRA files for them.

The original layouts are written from the diffusers models here with conversions written out
as data, independently of loratool's maps (``loratool/image/maps.py``); the tests convert
them back with diffusers' own single-file converters where those take tiny configs
(``convert_ldm_unet_checkpoint``, ``convert_ldm_clip_checkpoint``,
``convert_open_clip_checkpoint``). diffusers' Flux converter hard-codes Flux-dev's sizes
(inner_dim 3072), so its steps are transcribed below with the sizes as parameters.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from diffusers_models import tiny_clip, tiny_flux, tiny_unet
from safetensors.torch import save_file

# -- SD UNet: diffusers → ldm, written out the way diffusers' convert script lists it ---------------


def unet_to_ldm(sd: dict, layers_per_block: int, down: int, up_attn: list[bool]) -> dict:
    """diffusers UNet state dict → ldm names (scripts/convert_diffusers_to_original_stable_
    diffusion.py's unet_conversion_map*, with its 4 blocks × 2 layers made parameters)."""
    L = layers_per_block
    top = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    resnet = [
        ("in_layers.0", "norm1"),
        ("in_layers.2", "conv1"),
        ("out_layers.0", "norm2"),
        ("out_layers.3", "conv2"),
        ("emb_layers.1", "time_emb_proj"),
        ("skip_connection", "conv_shortcut"),
    ]
    layer = []  # (sd prefix, hf prefix)
    for i in range(down):
        for j in range(L):
            layer.append(
                (f"input_blocks.{(L + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}.")
            )
            layer.append(
                (f"input_blocks.{(L + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}.")
            )
        for j in range(L + 1):
            layer.append((f"output_blocks.{(L + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            layer.append((f"output_blocks.{(L + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < down - 1:
            layer.append(
                (f"input_blocks.{(L + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv.")
            )
            sub = 2 if up_attn[i] else 1
            layer.append(
                (f"output_blocks.{(L + 1) * i + L}.{sub}.", f"up_blocks.{i}.upsamplers.0.")
            )
    layer.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        layer.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    out = {}
    for k, v in sd.items():
        new = k
        for hf, ldm in top.items():
            if k.startswith(hf + "."):
                new = ldm + k[len(hf) :]
        for sd_pre, hf_pre in layer:
            if k.startswith(hf_pre):
                rest = k[len(hf_pre) :]
                if "resnets" in hf_pre:
                    for sd_part, hf_part in resnet:
                        rest = rest.replace(hf_part, sd_part)
                new = sd_pre + rest
        out["model.diffusion_model." + new] = v
    return out


def openclip_from_clip(sd: dict) -> dict:
    """transformers CLIPTextModel → OpenCLIP names (sd-scripts' sdxl_model_util
    convert_sdxl_text_encoder_2_checkpoint, run backwards): q, k, v stacked into in_proj."""
    out = {}
    qkv: dict[str, dict] = {}
    for k, v in sd.items():
        k = k.removeprefix("text_model.")
        m = re.match(r"encoder\.layers\.(\d+)\.(.+)$", k)
        if m:
            n, rest = m.groups()
            p = f"transformer.resblocks.{n}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in (
                "q_proj",
                "k_proj",
                "v_proj",
            ):
                proj, kind = rest.split(".")[1], rest.split(".")[2]
                qkv.setdefault(f"{p}attn.in_proj_{kind}", {})[proj] = v
                continue
            rest = (
                rest.replace("self_attn.out_proj", "attn.out_proj")
                .replace("layer_norm1", "ln_1")
                .replace("layer_norm2", "ln_2")
                .replace("mlp.fc1", "mlp.c_fc")
                .replace("mlp.fc2", "mlp.c_proj")
            )
            out[p + rest] = v
        elif k == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = v
        elif k == "embeddings.position_embedding.weight":
            out["positional_embedding"] = v
        elif k.startswith("final_layer_norm."):
            out["ln_final." + k.split(".")[-1]] = v
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return out


# -- Flux: BFL ↔ diffusers, transcribed from convert_flux_transformer_checkpoint_to_diffusers -------


def _swap(w):
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _flux_pairs(n_double: int, n_single: int) -> dict[str, str]:
    """diffusers → BFL module names that map one to one (from diffusers' converter)."""
    pairs = {
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "context_embedder": "txt_in",
        "x_embedder": "img_in",
        "proj_out": "final_layer.linear",
    }
    for i in range(n_double):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        pairs.update(
            {
                d + "norm1.linear": b + "img_mod.lin",
                d + "norm1_context.linear": b + "txt_mod.lin",
                d + "ff.net.0.proj": b + "img_mlp.0",
                d + "ff.net.2": b + "img_mlp.2",
                d + "ff_context.net.0.proj": b + "txt_mlp.0",
                d + "ff_context.net.2": b + "txt_mlp.2",
                d + "attn.to_out.0": b + "img_attn.proj",
                d + "attn.to_add_out": b + "txt_attn.proj",
                d + "attn.norm_q": b + "img_attn.norm.query_norm",
                d + "attn.norm_k": b + "img_attn.norm.key_norm",
                d + "attn.norm_added_q": b + "txt_attn.norm.query_norm",
                d + "attn.norm_added_k": b + "txt_attn.norm.key_norm",
            }
        )
    for i in range(n_single):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        pairs.update(
            {
                d + "norm.linear": b + "modulation.lin",
                d + "proj_out": b + "linear2",
                d + "attn.norm_q": b + "norm.query_norm",
                d + "attn.norm_k": b + "norm.key_norm",
            }
        )
    return pairs


def _rename(key: str, pairs: dict[str, str]) -> str:
    stem, _, kind = key.rpartition(".")
    new = pairs[stem]
    if new.endswith("_norm"):  # RMSNorm: diffusers' weight is BFL's scale
        kind = "scale" if kind == "weight" else "weight"
    return f"{new}.{kind}"


def flux_to_bfl(sd: dict, n_double: int, n_single: int) -> dict:
    """diffusers FluxTransformer2DModel → BFL names: every step of diffusers' converter run
    backwards (q, k, v concatenated; q, k, v, mlp for linear1; norm_out's halves swapped)."""
    sd = dict(sd)
    out = {}
    for i in range(n_double):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{b}img_attn.qkv.{kind}"] = torch.cat(
                [sd.pop(f"{d}attn.to_{x}.{kind}") for x in "qkv"]
            )
            out[f"{b}txt_attn.qkv.{kind}"] = torch.cat(
                [sd.pop(f"{d}attn.add_{x}_proj.{kind}") for x in "qkv"]
            )
    for i in range(n_single):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for kind in ("weight", "bias"):
            parts = [sd.pop(f"{d}attn.to_{x}.{kind}") for x in "qkv"] + [
                sd.pop(f"{d}proj_mlp.{kind}")
            ]
            out[f"{b}linear1.{kind}"] = torch.cat(parts)
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap(sd.pop(f"norm_out.linear.{kind}"))
    pairs = _flux_pairs(n_double, n_single)
    for k in list(sd):
        out[_rename(k, pairs)] = sd.pop(k)
    return out


def bfl_to_flux(ckpt: dict, n_double: int, n_single: int, inner: int) -> dict:
    """BFL → diffusers, step for step as diffusers' converter does it, sizes as parameters."""
    ckpt = dict(ckpt)
    out = {}
    for i in range(n_double):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            q, k, v = torch.chunk(ckpt.pop(f"{b}img_attn.qkv.{kind}"), 3, dim=0)
            out[f"{d}attn.to_q.{kind}"], out[f"{d}attn.to_k.{kind}"] = q, k
            out[f"{d}attn.to_v.{kind}"] = v
            q, k, v = torch.chunk(ckpt.pop(f"{b}txt_attn.qkv.{kind}"), 3, dim=0)
            out[f"{d}attn.add_q_proj.{kind}"], out[f"{d}attn.add_k_proj.{kind}"] = q, k
            out[f"{d}attn.add_v_proj.{kind}"] = v
    for i in range(n_single):
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            w = ckpt.pop(f"{b}linear1.{kind}")
            q, k, v, mlp = torch.split(w, (inner, inner, inner, w.shape[0] - 3 * inner), dim=0)
            out[f"{d}attn.to_q.{kind}"], out[f"{d}attn.to_k.{kind}"] = q, k
            out[f"{d}attn.to_v.{kind}"], out[f"{d}proj_mlp.{kind}"] = v, mlp
    for kind in ("weight", "bias"):
        out[f"norm_out.linear.{kind}"] = _swap(ckpt.pop(f"final_layer.adaLN_modulation.1.{kind}"))
    back = {v: k for k, v in _flux_pairs(n_double, n_single).items()}
    for k in list(ckpt):
        stem, _, kind = k.rpartition(".")
        new = back[stem]
        if stem.endswith("_norm"):
            kind = "weight" if kind == "scale" else kind
        out[f"{new}.{kind}"] = ckpt.pop(k)
    return out


# -- a pipeline directory -------------------------------------------------------------------------


def tiny_vae():
    """The smallest AutoencoderKL diffusers builds (seed 0): pipelines need one."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(4,),
        latent_channels=4,
        norm_num_groups=2,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        layers_per_block=1,
    )


def save_sd_pipeline(root: Path, unet, clip, *, shard_text_encoder: bool = False) -> Path:
    """A StableDiffusionPipeline saved by diffusers (no tokenizer: offline), optionally its text
    encoder re-saved sharded (a component index)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    vae = tiny_vae()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=clip,
        tokenizer=None,
        unet=unet,
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root, safe_serialization=True)
    if shard_text_encoder:
        (root / "text_encoder" / "model.safetensors").unlink()
        clip.save_pretrained(root / "text_encoder", max_shard_size="4KB")
    return root


def read_component(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        from safetensors.torch import load_file

        out.update(load_file(f))
    return out


# -- adapters -----------------------------------------------------------------------------------


def kohya_lora(modules: dict[str, tuple], *, seed: int = 0, alpha: float = 3.0, rank: int = 2):
    """A kohya LoRA state dict: ``modules`` maps a kohya stem to its base weight's shape
    (2-D linear, 4-D conv); factors seeded, alpha ≠ rank."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for stem, shape in modules.items():
        if len(shape) == 4:
            down = (rank, shape[1], shape[2], shape[3])
            up = (shape[0], rank, 1, 1)
        else:
            down, up = (rank, shape[1]), (shape[0], rank)
        out[f"{stem}.lora_down.weight"] = torch.randn(down, generator=g) / math.sqrt(shape[1])
        out[f"{stem}.lora_up.weight"] = torch.randn(up, generator=g) * 0.5
        out[f"{stem}.alpha"] = torch.tensor(alpha)
    return out


def kohya_delta(tensors: dict, stem: str) -> torch.Tensor:
    """ΔW of one kohya module, the math written out: alpha/r · up·down (sd-scripts' merge)."""
    down = tensors[f"{stem}.lora_down.weight"].float()
    up = tensors[f"{stem}.lora_up.weight"].float()
    r = down.shape[0]
    scale = float(tensors[f"{stem}.alpha"]) / r
    if down.dim() == 4 and down.shape[2:] == (1, 1):
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], down.shape[1], 1, 1) * scale
    if down.dim() == 4:
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * scale
    return (up @ down) * scale


def write(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2))


__all__ = [
    "bfl_to_flux",
    "flux_to_bfl",
    "kohya_delta",
    "kohya_lora",
    "openclip_from_clip",
    "read_component",
    "save_sd_pipeline",
    "tiny_clip",
    "tiny_flux",
    "tiny_unet",
    "unet_to_ldm",
    "write",
]
