"""Name maps between the layouts image models ship in, as data, and the one small engine that
applies them (``Renamer``).

The tables were read from the converters that define them: diffusers
``loaders/single_file_utils.py`` (``DIFFUSERS_TO_LDM_MAPPING``, ``convert_ldm_unet_checkpoint``,
``convert_open_clip_checkpoint``, ``convert_flux_transformer_checkpoint_to_diffusers``) and
sd-scripts ``library/model_util.py`` / ``sdxl_model_util.py`` (the same UNet and OpenCLIP
renames), ``networks/flux_merge_lora.py`` (the Flux q/k/v slices), and for SD3 diffusers'
``convert_sd3_transformer_checkpoint_to_diffusers`` (sd-scripts' ``lora_sd3.py`` names its
modules after the original MMDiT, ``lora_unet_joint_blocks_0_x_block_attn_qkv``). Tests check
them against diffusers' own converters on tiny models.

Every rule is ``(diffusers / transformers name, original name, rows)``: ``rows`` is None for a
whole tensor, or says which rows of the original tensor the diffusers one is: ``("part", i, n)``
the i-th of n equal parts (q, k, v inside a fused qkv), ``("lin1", i)`` the i-th of q, k, v
(hidden rows each) and the MLP (the rest) in Flux's ``linear1``, ``("swap",)`` the two halves
exchanged (BFL's final modulation is shift, scale; diffusers' is scale, shift).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# -- SD / SDXL UNet: original (ldm / sgm) ↔ diffusers -------------------------------------------

# whole-name renames outside the blocks: (diffusers, ldm)
UNET_TOP = (
    ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("add_embedding.linear_1", "label_emb.0.0"),
    ("add_embedding.linear_2", "label_emb.0.2"),
    ("conv_in", "input_blocks.0.0"),
    ("conv_norm_out", "out.0"),
    ("conv_out", "out.2"),
)
# inside a resnet block: (diffusers, ldm)
UNET_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)


@dataclass(frozen=True)
class UnetShape:
    """What the block prefixes depend on: D down blocks of L layers; which up blocks hold
    attentions (their upsampler is sub-block 2, else 1); whether the mid block has one."""

    down: int
    layers: int
    up_attn: tuple[bool, ...]
    mid_attn: bool = True


def unet_prefixes(s: UnetShape) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, ldm prefix, is a resnet) for every block of the UNet: the layout
    ``convert_ldm_unet_checkpoint`` walks, generated for any D and L."""
    D, L = s.down, s.layers
    out: list[tuple[str, str, bool]] = []
    for i in range(D):
        for j in range(L):
            n = i * (L + 1) + j + 1
            out.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{n}.0.", True))
            out.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{n}.1.", False))
        if i < D - 1:
            n = (i + 1) * (L + 1)
            out.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{n}.0.op.", False))
        for j in range(L + 1):
            n = i * (L + 1) + j
            out.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{n}.0.", True))
            if s.up_attn[i]:  # else sub-block 1 of the last one is the upsampler
                out.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{n}.1.", False))
        if i < D - 1:
            n = i * (L + 1) + L
            sub = 2 if s.up_attn[i] else 1
            out.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{n}.{sub}.", False))
    out.append(("mid_block.resnets.0.", "middle_block.0.", True))
    if s.mid_attn:
        out.append(("mid_block.attentions.0.", "middle_block.1.", False))
        out.append(("mid_block.resnets.1.", "middle_block.2.", True))
    else:
        out.append(("mid_block.resnets.1.", "middle_block.1.", True))
    return out


def unet_shape_from_ldm(keys) -> UnetShape | None:
    """The UNet's shape from its original keys (prefix removed), as diffusers counts them."""
    ins = {int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.", k))}
    if not ins:
        return None
    ops = sorted(
        int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k))
    )
    step = ops[0] if ops else max(ins) + 1  # L + 1
    down = (max(ins) + 1) // step
    # an up block holds attentions when a sub-block 1 of its outputs is not the upsampler conv
    attn_outputs = {
        int(m.group(1)) for k in keys if (m := re.match(r"output_blocks\.(\d+)\.1\.(?!conv\.)", k))
    }
    up_attn = [any(n in attn_outputs for n in range(i * step, (i + 1) * step)) for i in range(down)]
    mid_attn = any(k.startswith("middle_block.2.") for k in keys)
    return UnetShape(down, step - 1, tuple(up_attn), mid_attn)


def unet_shape_from_diffusers(keys) -> UnetShape | None:
    downs = {int(m.group(1)) for k in keys if (m := re.match(r"down_blocks\.(\d+)\.", k))}
    if not downs:
        return None
    layers = {
        int(m.group(1)) for k in keys if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))
    }
    D = max(downs) + 1
    up_attn = tuple(any(k.startswith(f"up_blocks.{i}.attentions.") for k in keys) for i in range(D))
    mid_attn = any(k.startswith("mid_block.attentions.") for k in keys)
    return UnetShape(D, max(layers) + 1 if layers else 1, up_attn, mid_attn)


class Renamer:
    """Renames by prefix tables, in either direction: the longest matching prefix wins; inside a
    resnet the inner renames apply to the rest of the name."""

    def __init__(self, pairs: list[tuple[str, str, bool]], top, inner):
        self.pairs = pairs
        self.top = top
        self.inner = inner

    def _one(self, name: str, frm: int) -> str | None:
        to = 1 - frm
        for pair in self.top:
            a, b = pair[frm], pair[to]
            if name == a or name.startswith(a + "."):
                return b + name[len(a) :]
        best = None
        for pair in self.pairs:
            if name.startswith(pair[frm]) and (best is None or len(pair[frm]) > len(best[frm])):
                best = pair
        if best is None:
            return None
        rest = name[len(best[frm]) :]
        if best[2]:
            for inner in self.inner:
                a, b = inner[frm], inner[to]
                if rest == a or rest.startswith(a + "."):
                    rest = b + rest[len(a) :]
                    break
        return best[to] + rest

    def to_original(self, diffusers_name: str) -> str | None:
        return self._one(diffusers_name, 0)

    def to_diffusers(self, original_name: str) -> str | None:
        return self._one(original_name, 1)


def unet_renamer(shape: UnetShape) -> Renamer:
    return Renamer(unet_prefixes(shape), UNET_TOP, UNET_RESNET)


# -- OpenCLIP text encoders (SD 2, SDXL's second): original ↔ transformers CLIPTextModel ----------

OPENCLIP_LAYER = (
    # (transformers, open_clip) inside text_model.encoder.layers.N ↔ transformer.resblocks.N
    ("self_attn.q_proj", "attn.in_proj_weight", ("part", 0, 3)),
    ("self_attn.k_proj", "attn.in_proj_weight", ("part", 1, 3)),
    ("self_attn.v_proj", "attn.in_proj_weight", ("part", 2, 3)),
    ("self_attn.out_proj", "attn.out_proj", None),
    ("mlp.fc1", "mlp.c_fc", None),
    ("mlp.fc2", "mlp.c_proj", None),
    ("layer_norm1", "ln_1", None),
    ("layer_norm2", "ln_2", None),
)

# -- Flux: BFL (original) ↔ diffusers FluxTransformer2DModel ----------------------------------------

FLUX_DOUBLE = (  # {i}: double block
    ("transformer_blocks.{i}.attn.to_q", "double_blocks.{i}.img_attn.qkv", ("part", 0, 3)),
    ("transformer_blocks.{i}.attn.to_k", "double_blocks.{i}.img_attn.qkv", ("part", 1, 3)),
    ("transformer_blocks.{i}.attn.to_v", "double_blocks.{i}.img_attn.qkv", ("part", 2, 3)),
    ("transformer_blocks.{i}.attn.add_q_proj", "double_blocks.{i}.txt_attn.qkv", ("part", 0, 3)),
    ("transformer_blocks.{i}.attn.add_k_proj", "double_blocks.{i}.txt_attn.qkv", ("part", 1, 3)),
    ("transformer_blocks.{i}.attn.add_v_proj", "double_blocks.{i}.txt_attn.qkv", ("part", 2, 3)),
    ("transformer_blocks.{i}.attn.to_out.0", "double_blocks.{i}.img_attn.proj", None),
    ("transformer_blocks.{i}.attn.to_add_out", "double_blocks.{i}.txt_attn.proj", None),
    ("transformer_blocks.{i}.ff.net.0.proj", "double_blocks.{i}.img_mlp.0", None),
    ("transformer_blocks.{i}.ff.net.2", "double_blocks.{i}.img_mlp.2", None),
    ("transformer_blocks.{i}.ff_context.net.0.proj", "double_blocks.{i}.txt_mlp.0", None),
    ("transformer_blocks.{i}.ff_context.net.2", "double_blocks.{i}.txt_mlp.2", None),
    ("transformer_blocks.{i}.norm1.linear", "double_blocks.{i}.img_mod.lin", None),
    ("transformer_blocks.{i}.norm1_context.linear", "double_blocks.{i}.txt_mod.lin", None),
)
FLUX_SINGLE = (  # {i}: single block
    ("single_transformer_blocks.{i}.attn.to_q", "single_blocks.{i}.linear1", ("lin1", 0)),
    ("single_transformer_blocks.{i}.attn.to_k", "single_blocks.{i}.linear1", ("lin1", 1)),
    ("single_transformer_blocks.{i}.attn.to_v", "single_blocks.{i}.linear1", ("lin1", 2)),
    ("single_transformer_blocks.{i}.proj_mlp", "single_blocks.{i}.linear1", ("lin1", 3)),
    ("single_transformer_blocks.{i}.proj_out", "single_blocks.{i}.linear2", None),
    ("single_transformer_blocks.{i}.norm.linear", "single_blocks.{i}.modulation.lin", None),
)
FLUX_TOP = (
    ("x_embedder", "img_in", None),
    ("context_embedder", "txt_in", None),
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer", None),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer", None),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer", None),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer", None),
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer", None),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer", None),
    ("proj_out", "final_layer.linear", None),
    ("norm_out.linear", "final_layer.adaLN_modulation.1", ("swap",)),
)


# -- SD3 / SD3.5: SAI's MMDiT (original) ↔ diffusers SD3Transformer2DModel ----------------------------

SD3_JOINT = (  # {i}: joint block
    ("transformer_blocks.{i}.attn.to_q", "joint_blocks.{i}.x_block.attn.qkv", ("part", 0, 3)),
    ("transformer_blocks.{i}.attn.to_k", "joint_blocks.{i}.x_block.attn.qkv", ("part", 1, 3)),
    ("transformer_blocks.{i}.attn.to_v", "joint_blocks.{i}.x_block.attn.qkv", ("part", 2, 3)),
    (
        "transformer_blocks.{i}.attn.add_q_proj",
        "joint_blocks.{i}.context_block.attn.qkv",
        ("part", 0, 3),
    ),
    (
        "transformer_blocks.{i}.attn.add_k_proj",
        "joint_blocks.{i}.context_block.attn.qkv",
        ("part", 1, 3),
    ),
    (
        "transformer_blocks.{i}.attn.add_v_proj",
        "joint_blocks.{i}.context_block.attn.qkv",
        ("part", 2, 3),
    ),
    ("transformer_blocks.{i}.attn.to_out.0", "joint_blocks.{i}.x_block.attn.proj", None),
    ("transformer_blocks.{i}.attn.to_add_out", "joint_blocks.{i}.context_block.attn.proj", None),
    # SD3.5's dual-attention blocks
    ("transformer_blocks.{i}.attn2.to_q", "joint_blocks.{i}.x_block.attn2.qkv", ("part", 0, 3)),
    ("transformer_blocks.{i}.attn2.to_k", "joint_blocks.{i}.x_block.attn2.qkv", ("part", 1, 3)),
    ("transformer_blocks.{i}.attn2.to_v", "joint_blocks.{i}.x_block.attn2.qkv", ("part", 2, 3)),
    ("transformer_blocks.{i}.attn2.to_out.0", "joint_blocks.{i}.x_block.attn2.proj", None),
    ("transformer_blocks.{i}.norm1.linear", "joint_blocks.{i}.x_block.adaLN_modulation.1", None),
    ("transformer_blocks.{i}.ff.net.0.proj", "joint_blocks.{i}.x_block.mlp.fc1", None),
    ("transformer_blocks.{i}.ff.net.2", "joint_blocks.{i}.x_block.mlp.fc2", None),
    (
        "transformer_blocks.{i}.ff_context.net.0.proj",
        "joint_blocks.{i}.context_block.mlp.fc1",
        None,
    ),
    ("transformer_blocks.{i}.ff_context.net.2", "joint_blocks.{i}.context_block.mlp.fc2", None),
)
# the context modulation of a joint block: a full one (6 chunks, same order in both), or the
# last block's pre-only one (2 chunks: the original's shift, scale are diffusers' scale, shift)
SD3_CONTEXT_MOD = (
    "transformer_blocks.{i}.norm1_context.linear",
    "joint_blocks.{i}.context_block.adaLN_modulation.1",
)
SD3_TOP = (
    ("pos_embed.proj", "x_embedder.proj", None),
    ("context_embedder", "context_embedder", None),
    ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0", None),
    ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2", None),
    ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0", None),
    ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2", None),
    ("proj_out", "final_layer.linear", None),
    ("norm_out.linear", "final_layer.adaLN_modulation.1", ("swap",)),
)


def row_pieces(rows, total: int, hidden: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """For a rule's ``rows`` and the original tensor's row count: the (diffusers rows, original
    rows) pairs it maps, each as (start, stop)."""
    kind = rows[0]
    if kind == "part":
        _, i, n = rows
        size = total // n
        return [((0, size), (i * size, (i + 1) * size))]
    if kind == "lin1":
        i = rows[1]
        start = i * hidden
        stop = total if i == 3 else start + hidden
        return [((0, stop - start), (start, stop))]
    if kind == "swap":
        half = total // 2
        return [((0, half), (half, total)), ((half, total), (0, half))]
    raise ValueError(kind)
