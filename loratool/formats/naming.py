"""Module names across formats, as data: pipeline components, kohya prefixes, and the words that
tell a flattened kohya stem's dots from its underscores.

An adapter's modules are named in one of three ways (see ``parse``):

- ``<component>.<path>.weight``: diffusers' pipeline layout (``unet.``, ``text_encoder.``,
  ``text_encoder_2.``, ``text_encoder_3.``, ``transformer.``), the prefixes diffusers'
  ``save_lora_weights`` puts on its keys;
- ``<path>.weight``: one model (PEFT, MLX, a bare diffusers ``save_lora_adapter`` file);
- ``lora_<prefix>_<flat path>``: kohya / sd-scripts, dots flattened to underscores, kept as read
  until a base (or the word table below) says where the dots were.

kohya prefixes, from sd-scripts ``networks/lora.py`` (``LORA_PREFIX_UNET = "lora_unet"``,
``LORA_PREFIX_TEXT_ENCODER = "lora_te"``, SDXL ``lora_te1`` / ``lora_te2``), ``lora_flux.py``
(Flux in its original BFL names under ``lora_unet``, CLIP-L ``lora_te1``, T5 ``lora_te3``) and
ComfyUI's ``comfy/lora.py`` key maps (diffusers-named Flux / SD3 transformers under
``lora_transformer_``, OneTrainer's layout, which diffusers 0.42 also reads). CLIP text encoders
are named as transformers 4 named them, ``text_model.encoder.layers.N…``
(``lora_te_text_model_encoder_layers_0_self_attn_q_proj``); transformers 5 drops the
``text_model.`` level, so it is put back for kohya and diffusers keys and left out of PEFT
patterns (which match by suffix).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")

# kohya prefix → component, longest first (lora_te1_ before lora_te_).
KOHYA_PREFIX_COMPONENT = {
    "lora_unet_": "unet",
    "lora_transformer_": "transformer",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3",
    "lora_te_": "text_encoder",
}

# First path components that say which component a bare module path belongs to.
ROOTS = {
    "unet": (
        "down_blocks",
        "up_blocks",
        "mid_block",
        "conv_in",
        "conv_out",
        "time_embedding",
        "add_embedding",
        "conv_norm_out",
        "class_embedding",
        "encoder_hid_proj",
        # the original (SAI / sgm) UNet layout
        "input_blocks",
        "middle_block",
        "output_blocks",
        "time_embed",
        "label_emb",
    ),
    "transformer": (
        "transformer_blocks",
        "single_transformer_blocks",
        "x_embedder",
        "context_embedder",
        "time_text_embed",
        "norm_out",
        "proj_out",
        "pos_embed",
        # the original (BFL) Flux layout
        "double_blocks",
        "single_blocks",
        "img_in",
        "txt_in",
        "time_in",
        "vector_in",
        "guidance_in",
        "final_layer",
        # the original SD3 (SAI MMDiT) layout
        "joint_blocks",
        "t_embedder",
        "y_embedder",
    ),
    "text_encoder": ("text_model",),
}
# Transformer modules named as diffusers names them go under lora_transformer_; original-layout
# (BFL / MMDiT) names under lora_unet_, as sd-scripts writes them.
DIFFUSERS_TRANSFORMER_ROOTS = (
    "transformer_blocks",
    "single_transformer_blocks",
    "x_embedder",
    "context_embedder",
    "time_text_embed",
    "norm_out",
    "proj_out",
    "pos_embed",
)
# roots both namings of a transformer have (diffusers Flux's x_embedder / context_embedder;
# the original SD3 MMDiT's x_embedder.proj / context_embedder): the adapter's other modules
# tell which naming it uses (``original_transformer``)
SHARED_TRANSFORMER_ROOTS = ("x_embedder", "context_embedder")
_CLIP_FLAT = re.compile(r"^encoder\.layers\.\d+\.")
_T5_PATH = re.compile(r"^(encoder\.)?block\.\d+\.layer\.\d+\.")

# Words of real module paths that contain an underscore (diffusers UNet / Flux / SD3, the
# original SAI and BFL layouts, CLIP, T5, Llama-like and GPT-2 models). A flattened stem is
# unflattened only when it splits entirely into these and the single words below.
COMPOUNDS = frozenset(
    """
    down_blocks up_blocks mid_block transformer_blocks single_transformer_blocks to_q to_k to_v
    to_out proj_in proj_out time_emb_proj conv_shortcut conv_in conv_out time_embedding
    linear_1 linear_2 add_embedding conv_norm_out class_embedding encoder_hid_proj
    add_q_proj add_k_proj add_v_proj to_add_out ff_context norm1_context proj_mlp x_embedder
    context_embedder time_text_embed timestep_embedder guidance_embedder text_embedder norm_out
    pos_embed norm_added_q norm_added_k input_blocks middle_block output_blocks in_layers
    out_layers emb_layers skip_connection time_embed label_emb double_blocks single_blocks
    img_attn txt_attn img_mlp txt_mlp img_mod txt_mod img_in txt_in time_in vector_in
    guidance_in in_layer out_layer final_layer adaLN_modulation text_model self_attn q_proj
    k_proj v_proj out_proj o_proj final_layer_norm token_embedding position_embedding
    text_projection gate_proj up_proj down_proj embed_tokens lm_head c_attn c_proj c_fc
    gate_up_proj qkv_proj wi_0 wi_1 relative_attention_bias query_key_value dense_h_to_4h
    dense_4h_to_h joint_blocks x_block context_block t_embedder y_embedder
    """.split()
)
WORDS = frozenset(
    """
    attn attn1 attn2 ff net proj conv conv1 conv2 norm norm1 norm2 norm3 norm_q resnets
    attentions downsamplers upsamplers op encoder decoder layers layer block mlp fc1 fc2 model
    embeddings linear linear1 linear2 modulation lin qkv transformer h wte wpe SelfAttention
    EncDecAttention DenseReluDense q k v o wi wo shared emb out skip emb lin1 lin2 context
    mod attention dense
    """.split()
)


@dataclass(frozen=True)
class ModuleId:
    """Where one module lives: its pipeline component (None: a single model or unknown), its
    dotted path inside that component (None while only the flattened form is known) and the
    flattened path (without any kohya prefix)."""

    component: str | None
    path: str | None
    flat: str
    kohya_prefix: str | None = None  # as read, for kohya-named modules
    explicit: bool = False  # the component was named (a prefix), not inferred from the path


def flatten(path: str) -> str:
    return path.replace(".", "_")


def unflatten(flat: str) -> str | None:
    """The dotted path of a flattened kohya path, when every piece is a known word or a number
    (longest compound first); None when some piece is unknown."""
    tokens = flat.split("_")
    out: list[str] = []
    i = 0
    while i < len(tokens):
        for j in range(min(len(tokens), i + 4), i + 1, -1):
            word = "_".join(tokens[i:j])
            if word in COMPOUNDS:
                out.append(word)
                i = j
                break
        else:
            tok = tokens[i]
            if not (tok.isdigit() or tok in WORDS):
                return None
            out.append(tok)
            i += 1
    return ".".join(out)


def infer_component(path: str) -> str | None:
    head = path.split(".", 1)[0]
    for component, roots in ROOTS.items():
        if head in roots:
            return component
    if _CLIP_FLAT.match(path) and re.search(r"\.(self_attn|mlp)\.", path):
        return "text_encoder"
    return None


def parse(name: str) -> ModuleId:
    """The component and path of an adapter's module name (see the module docstring)."""
    if name.startswith("lora_") and "." not in name:
        for prefix, component in KOHYA_PREFIX_COMPONENT.items():
            if name.startswith(prefix):
                flat = name[len(prefix) :]
                return ModuleId(component, unflatten(flat), flat, prefix, True)
        flat = name.removeprefix("lora_")
        return ModuleId(None, unflatten(flat), flat, None)
    path = name.removesuffix(".weight")
    head, _, rest = path.partition(".")
    # GPT-2's own root is "transformer." too: a diffusers transformer prefix is only taken as
    # one when what follows is a diffusers transformer path.
    if (
        head in COMPONENTS
        and rest
        and (head != "transformer" or rest.split(".", 1)[0] in ROOTS["transformer"])
    ):
        return ModuleId(head, rest, flatten(rest), None, True)
    return ModuleId(infer_component(path), path, flatten(path))


def is_clip_text_path(component: str | None, path: str) -> bool:
    return bool(component and component.startswith("text_encoder") and _CLIP_FLAT.match(path))


def kohya_path(component: str | None, path: str) -> str:
    """The path kohya names a module by: CLIP text encoders with their ``text_model.`` level."""
    return "text_model." + path if is_clip_text_path(component, path) else path


def is_t5_path(path: str | None) -> bool:
    """A T5 encoder's module path (``encoder.block.N.layer.M.…``)."""
    return bool(path and _T5_PATH.match(path))


def original_transformer(paths) -> bool:
    """Whether transformer module paths are in an original layout's names (BFL's
    ``double_blocks``, SD3 MMDiT's ``joint_blocks``…) rather than diffusers'."""
    heads = {p.split(".", 1)[0] for p in paths if p}
    return any(h in ROOTS["transformer"] and h not in DIFFUSERS_TRANSFORMER_ROOTS for h in heads)


def kohya_prefix(
    component: str | None,
    path: str | None,
    components: set[str | None],
    *,
    original: bool = False,
) -> str:
    """The kohya prefix sd-scripts / ComfyUI expect for a module of ``component``, given every
    component the adapter has (SDXL and Flux/SD3 number their text encoders).

    T5 is ``lora_te3_`` wherever a pipeline puts it: sd-scripts' ``lora_flux.py`` and
    ``lora_sd3.py`` both name it ``LORA_PREFIX_TEXT_ENCODER_T5 = "lora_te3"``, while diffusers'
    Flux pipeline holds it as ``text_encoder_2`` (SD3's as ``text_encoder_3``).

    ``original``: the adapter names its transformer modules in the original layout, so the
    roots both layouts share go under ``lora_unet_`` with the rest."""
    if component == "text_encoder":
        numbered = {"text_encoder_2", "text_encoder_3", "transformer"} & components
        return "lora_te1_" if numbered else "lora_te_"
    if component in ("text_encoder_2", "text_encoder_3") and is_t5_path(path):
        return "lora_te3_"
    if component == "text_encoder_2":
        return "lora_te2_"
    if component == "text_encoder_3":
        return "lora_te3_"
    if component == "transformer":
        head = (path or "").split(".", 1)[0]
        if original and head in SHARED_TRANSFORMER_ROOTS:
            return "lora_unet_"  # sd-scripts' lora_sd3: lora_unet_context_embedder
        return "lora_transformer_" if head in DIFFUSERS_TRANSFORMER_ROOTS else "lora_unet_"
    return "lora_unet_"
