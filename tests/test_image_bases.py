"""Merging into the layouts image models ship in, against their real consumers.

- a diffusers pipeline directory (``save_pretrained``): ``loratool merge`` equals diffusers 0.42's
  ``load_lora_weights`` + ``fuse_lora`` of the same kohya LoRA on the loaded pipeline, component
  by component, the rest of the directory copied;
- a UNet alone: the UNet part merges, the text-encoder part is reported (``--strict`` refuses);
- original single files: SD 1.5 (``model.diffusion_model.…``, ``cond_stage_model.…``), SDXL
  (``conditioner.embedders.0/1``: OpenCLIP's fused ``in_proj_weight``), Flux BFL (fused
  ``qkv`` / ``linear1``, swapped final modulation), read back with diffusers' single-file
  converters (or, for Flux, diffusers' converter transcribed with tiny sizes);
- the reverse: a kohya LoRA in BFL names merged into a diffusers Flux transformer.
"""

from __future__ import annotations

import json

import pytest
import torch
from image_models import (
    bfl_to_flux,
    flux_to_bfl,
    kohya_delta,
    kohya_lora,
    openclip_from_clip,
    read_component,
    save_sd_pipeline,
    tiny_clip,
    tiny_flux,
    tiny_unet,
    unet_to_ldm,
    write,
)
from safetensors.torch import load_file

pytest.importorskip("diffusers")

ATOL = dict(rtol=0, atol=1e-6)

# kohya stems of a tiny SD LoRA (UNet in diffusers names, as sd-scripts' SD 1.x LoRA names it;
# CLIP as transformers 4 named it) → the diffusers / transformers tensor they change
UNET_MODULES = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    ),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    ),
    "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_0_proj": (
        "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj.weight"
    ),
    "lora_unet_mid_block_attentions_0_proj_in": "mid_block.attentions.0.proj_in.weight",
    "lora_unet_down_blocks_1_resnets_0_conv1": "down_blocks.1.resnets.0.conv1.weight",
    "lora_unet_up_blocks_0_resnets_1_time_emb_proj": "up_blocks.0.resnets.1.time_emb_proj.weight",
    "lora_unet_down_blocks_0_downsamplers_0_conv": "down_blocks.0.downsamplers.0.conv.weight",
    "lora_unet_up_blocks_0_upsamplers_0_conv": "up_blocks.0.upsamplers.0.conv.weight",
}
# diffusers 0.42 may route a kohya text-encoder attention module through the old ``to_q_lora``
# keys, which transformers 5's CLIPTextModel reports UNEXPECTED and drops (seen with q_proj
# alone): the MLP modules are compared with its fuse, the attention ones with the math and
# with its fuse wherever it changed the tensor.
TE_MLP = {
    "lora_te_text_model_encoder_layers_0_mlp_fc1": "encoder.layers.0.mlp.fc1.weight",
    "lora_te_text_model_encoder_layers_0_mlp_fc2": "encoder.layers.0.mlp.fc2.weight",
}
TE_ATTN = {
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": "encoder.layers.0.self_attn.q_proj.weight",
    "lora_te_text_model_encoder_layers_0_self_attn_out_proj": (
        "encoder.layers.0.self_attn.out_proj.weight"
    ),
}


def shapes(sd, modules):
    return {stem: tuple(sd[name].shape) for stem, name in modules.items()}


@pytest.fixture(scope="module")
def sd_models():
    unet, clip = tiny_unet(0), tiny_clip(0)
    return unet, clip, dict(unet.state_dict()), dict(clip.state_dict())


@pytest.fixture(scope="module")
def kohya_sd(sd_models, tmp_path_factory):
    _, _, u, c = sd_models
    tensors = kohya_lora(
        {**shapes(u, UNET_MODULES), **shapes(c, TE_MLP), **shapes(c, TE_ATTN)}, seed=3
    )
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "2", "ss_network_alpha": "3.0"}
    return write(tmp_path_factory.mktemp("lora") / "sd-kohya.safetensors", tensors, meta)


@pytest.fixture(scope="module")
def pipeline_dir(sd_models, tmp_path_factory):
    unet, clip, _, _ = sd_models
    root = save_sd_pipeline(
        tmp_path_factory.mktemp("pipe") / "sd", unet, clip, shard_text_encoder=True
    )
    assert (root / "text_encoder" / "model.safetensors.index.json").exists()
    return root


def load_pipe(root):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        root, safety_checker=None, tokenizer=None, feature_extractor=None, image_encoder=None
    )


def test_pipeline_merge_equals_diffusers_fuse(pipeline_dir, kohya_sd, tmp_path, cli_run):
    out = tmp_path / "merged"
    r = cli_run("merge", pipeline_dir, kohya_sd, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    n = len(UNET_MODULES) + len(TE_MLP) + len(TE_ATTN)
    assert report["tensors_changed"] == n and report["warnings"] == []
    # the output is a pipeline directory again: every file there, the vae untouched
    made = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    base = {p.relative_to(pipeline_dir).as_posix() for p in pipeline_dir.rglob("*") if p.is_file()}
    assert made == base
    index = json.loads((out / "text_encoder" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(read_component(pipeline_dir / "text_encoder"))
    assert read_component(out / "vae").keys() == read_component(pipeline_dir / "vae").keys()
    for k, v in read_component(pipeline_dir / "vae").items():
        assert torch.equal(read_component(out / "vae")[k], v)
    # diffusers loads the merged pipeline, and its own fuse of the LoRA gives the same weights
    merged = load_pipe(out)
    pipe = load_pipe(pipeline_dir)
    before_te = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    pipe.load_lora_weights(str(kohya_sd))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused_unet, merged_unet = pipe.unet.state_dict(), merged.unet.state_dict()
    for k in fused_unet:
        torch.testing.assert_close(merged_unet[k], fused_unet[k], **ATOL, msg=k)
    assert sum(not torch.equal(fused_unet[k], merged_unet[k]) for k in fused_unet) == 0
    fused_te, merged_te = pipe.text_encoder.state_dict(), merged.text_encoder.state_dict()
    lora = load_file(kohya_sd)
    for name in TE_MLP.values():
        assert not torch.equal(fused_te[name], before_te[name])
        torch.testing.assert_close(merged_te[name], fused_te[name], **ATOL, msg=name)
    for stem, name in TE_ATTN.items():
        want = before_te[name] + kohya_delta(lora, stem)
        torch.testing.assert_close(merged_te[name], want, **ATOL, msg=name)
        if not torch.equal(fused_te[name], before_te[name]):  # see TE_MLP
            torch.testing.assert_close(merged_te[name], fused_te[name], **ATOL, msg=name)


def test_unet_alone_merges_its_part_and_reports_the_rest(sd_models, kohya_sd, tmp_path, cli_run):
    unet, _, u, _ = sd_models
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    out = tmp_path / "merged"
    r = cli_run("merge", tmp_path / "unet", kohya_sd, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["tensors_changed"] == len(UNET_MODULES)
    (warning,) = [w for w in report["warnings"] if "skipped" in w]
    assert "4 modules of text_encoder skipped" in warning and "unet" in warning
    merged = load_file(out / "diffusion_pytorch_model.safetensors")
    lora = load_file(kohya_sd)
    for stem, name in UNET_MODULES.items():
        torch.testing.assert_close(merged[name], u[name] + kohya_delta(lora, stem), **ATOL)
    r = cli_run("merge", tmp_path / "unet", kohya_sd, "-o", tmp_path / "strict", "--strict")
    assert r.exit_code == 1
    assert "4 modules of text_encoder skipped" in r.stderr and "\n" not in r.stderr.strip()
    assert not (tmp_path / "strict").exists()


# -- original single files -----------------------------------------------------------------------


def sd15_checkpoint(u, c):
    """The SD 1.5 layout of the tiny UNet and CLIP (CLIP under transformers 4's names)."""
    ckpt = unet_to_ldm(u, layers_per_block=1, down=2, up_attn=[False, True])
    for k, v in c.items():
        ckpt["cond_stage_model.transformer.text_model." + k] = v
    return ckpt


def test_unet_map_agrees_with_diffusers_single_file_converter(sd_models):
    """The ldm layout written here and loratool's maps (read back through loratool's view) are
    what diffusers' convert_ldm_unet_checkpoint reads."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from loratool.image import detect
    from loratool.tensors.header import read_base

    unet, _, u, c = sd_models
    ckpt = sd15_checkpoint(u, c)
    back = convert_ldm_unet_checkpoint(dict(ckpt), dict(unet.config))
    assert set(back) == set(u)
    assert all(torch.equal(back[k], u[k]) for k in u)
    # every diffusers weight name of the UNet resolves, through loratool's view, to the ldm
    # tensor diffusers' converter takes it from
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = write(Path(d) / "sd15.safetensors", ckpt)
        layout = detect(read_base(path))
        view = layout.views["unet"]
        for name in u:
            if not name.endswith(".weight"):
                continue
            (piece,) = view[name].pieces
            assert torch.equal(ckpt[piece.tensor], u[name]), name


def test_sd15_single_file_merge_equals_diffusers(
    sd_models, kohya_sd, pipeline_dir, tmp_path, cli_run
):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
    )

    unet, _, u, c = sd_models
    path = write(tmp_path / "sd15.safetensors", sd15_checkpoint(u, c))
    out = tmp_path / "merged.safetensors"
    r = cli_run("merge", path, kohya_sd, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["tensors_changed"] == len(UNET_MODULES) + 4
    merged = load_file(out)
    m_unet = convert_ldm_unet_checkpoint(dict(merged), dict(unet.config))
    m_te = convert_ldm_clip_checkpoint(dict(merged))
    # the same as merging into the pipeline directory (checked against diffusers above)
    ref = tmp_path / "ref"
    assert cli_run("merge", pipeline_dir, kohya_sd, "-o", ref).exit_code == 0
    r_unet, r_te = read_component(ref / "unet"), read_component(ref / "text_encoder")
    for k in u:
        torch.testing.assert_close(m_unet[k], r_unet[k], **ATOL, msg=k)
    for k in c:
        torch.testing.assert_close(m_te["text_model." + k], r_te[k], **ATOL, msg=k)


def test_sdxl_second_text_encoder_merges_into_openclip_slices(sd_models, tmp_path, cli_run):
    """SDXL's second text encoder is OpenCLIP: q, k, v are rows of one in_proj_weight. A
    lora_te2_ module on q_proj lands in rows 0:d, k_proj in d:2d, v_proj in 2d:3d."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_open_clip_checkpoint,
    )

    unet, _, u, c1 = sd_models
    te2 = tiny_clip(1)
    c2 = dict(te2.state_dict())
    ckpt = unet_to_ldm(u, layers_per_block=1, down=2, up_attn=[False, True])
    for k, v in c1.items():
        ckpt["conditioner.embedders.0.transformer.text_model." + k] = v
    for k, v in openclip_from_clip(c2).items():
        ckpt["conditioner.embedders.1.model." + k] = v
    path = write(tmp_path / "sdxl.safetensors", ckpt)
    te2_mods = {
        f"lora_te2_text_model_encoder_layers_0_{p.replace('.', '_')}": f"encoder.layers.0.{p}.weight"
        for p in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "mlp.fc1",
        )
    }
    te1_mods = {
        "lora_te1_text_model_encoder_layers_0_self_attn_v_proj": "encoder.layers.0.self_attn.v_proj.weight"
    }
    unet_mods = {
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q": (
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
        )
    }  # sd-scripts' SDXL LoRAs name the UNet in its original layout
    lora = kohya_lora(
        {**shapes(c2, te2_mods), **shapes(c1, te1_mods), **shapes(u, unet_mods)}, seed=5
    )
    lpath = write(tmp_path / "sdxl-lora.safetensors", lora)
    out = tmp_path / "merged.safetensors"
    r = cli_run("merge", path, lpath, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    ops = {t["name"]: t for t in report["tensors"]}
    fused = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    assert ops[fused]["op"] == "slice" and len(ops[fused]["steps"]) == 3
    assert sorted(tuple(s["rows"]) for s in ops[fused]["steps"]) == [(0, 8), (8, 16), (16, 24)]
    merged = load_file(out)
    got2 = convert_open_clip_checkpoint(te2, dict(merged), prefix="conditioner.embedders.1.model.")
    for stem, name in te2_mods.items():
        torch.testing.assert_close(
            got2["text_model." + name], c2[name] + kohya_delta(lora, stem), **ATOL
        )
    got1 = convert_ldm_clip_checkpoint(dict(merged))
    for stem, name in te1_mods.items():
        torch.testing.assert_close(
            got1["text_model." + name], c1[name] + kohya_delta(lora, stem), **ATOL
        )
    ldm = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    stem = next(iter(unet_mods))
    torch.testing.assert_close(merged[ldm], u[unet_mods[stem]] + kohya_delta(lora, stem), **ATOL)


# -- Flux --------------------------------------------------------------------------------------------

FLUX_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "add_k_proj",
    "proj_mlp",
    "to_out.0",
    "norm_out.linear",
    "x_embedder",
]


@pytest.fixture(scope="module")
def flux():
    from diffusers_models import add_lora, base_state, lora_state, peft_deltas

    model = add_lora(tiny_flux(), FLUX_TARGETS, r=2, alpha=3, seed=7)
    return base_state(model), lora_state(model), peft_deltas(model)


def test_flux_diffusers_lora_into_bfl_fused_tensors(flux, tmp_path, cli_run):
    base, lora, deltas = flux
    bfl = write(tmp_path / "flux-bfl.safetensors", flux_to_bfl(base, 1, 1))
    # a diffusers-format Flux LoRA (pipeline prefix, lora_A/B, alpha per module)
    tensors = {}
    for k, v in lora.items():
        tensors["transformer." + k] = v
    for name in deltas:
        tensors["transformer." + name.removesuffix(".weight") + ".alpha"] = torch.tensor(3.0)
    lpath = write(tmp_path / "flux-lora.safetensors", tensors)
    out = tmp_path / "merged.safetensors"
    r = cli_run("merge", bfl, lpath, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    ops = {t["name"]: t["op"] for t in json.loads(r.stdout)["tensors"]}
    assert ops["double_blocks.0.img_attn.qkv.weight"] == "slice"
    assert ops["single_blocks.0.linear1.weight"] == "slice"
    assert ops["final_layer.adaLN_modulation.1.weight"] == "slice"  # halves swapped
    fused = {k: v + deltas[k] if k in deltas else v for k, v in base.items()}
    got = bfl_to_flux(load_file(out), 1, 1, inner=8)
    for k in base:
        torch.testing.assert_close(got[k], fused[k], **ATOL, msg=k)


def test_kohya_bfl_lora_into_diffusers_flux_splits_rows(flux, tmp_path, cli_run):
    """sd-scripts' Flux LoRAs name BFL's fused modules (lora_unet_double_blocks_0_img_attn_qkv):
    into a diffusers transformer, their ΔW rows go to to_q, to_k, to_v."""
    base, _, _ = flux
    bfl = flux_to_bfl(base, 1, 1)
    mods = {
        "lora_unet_double_blocks_0_img_attn_qkv": "double_blocks.0.img_attn.qkv.weight",
        "lora_unet_single_blocks_0_linear1": "single_blocks.0.linear1.weight",
        "lora_unet_final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1.weight",
        "lora_unet_double_blocks_0_txt_mlp_0": "double_blocks.0.txt_mlp.0.weight",
    }
    lora = kohya_lora(shapes(bfl, mods), seed=9)
    lpath = write(tmp_path / "kohya-flux.safetensors", lora)
    dpath = write(tmp_path / "flux.safetensors", base)
    out = tmp_path / "merged.safetensors"
    r = cli_run("merge", dpath, lpath, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    want = dict(bfl)
    for stem, name in mods.items():
        want[name] = bfl[name] + kohya_delta(lora, stem)
    want = bfl_to_flux(want, 1, 1, inner=8)
    got = load_file(out)
    for k in base:
        torch.testing.assert_close(got[k], want[k], **ATOL, msg=k)


def test_lokr_cannot_be_split_across_tensors(flux, tmp_path):
    from loratool.adapter import Adapter, LokrModule
    from loratool.errors import ValidationError
    from loratool.merge import AdapterInput, plan_merge

    base, _, _ = flux
    dpath = write(tmp_path / "flux.safetensors", base)
    m = LokrModule(
        "lora_unet_double_blocks_0_img_attn_qkv",
        "lokr",
        1.0,
        w1=torch.ones(3, 2),
        w2=torch.ones(8, 4),
    )
    with pytest.raises(ValidationError, match="split across tensors"):
        plan_merge(dpath, [AdapterInput(Adapter({m.name: m}), 1.0, "lokr", "x")], tmp_path / "o")


# -- 1×1 conv factors on a Linear weight, and back ---------------------------------------------------


def linear_projection_unet():
    """The tiny UNet with SD 2.x / SDXL's Linear proj_in / proj_out."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**{**dict(tiny_unet(0).config), "use_linear_projection": True})


def test_sd2_single_file_with_sd1_lora_squeezes_1x1_factors(tmp_path, cli_run):
    """An SD 1.x LoRA (proj_in a 1×1 conv: 4-D factors) merged into an SD 2.x original file
    (Linear proj_in, OpenCLIP text encoder under cond_stage_model.model): the factors are
    squeezed as sd-scripts' merge_lora does, q/k/v land in OpenCLIP's in_proj rows."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_open_clip_checkpoint,
    )

    unet, te = linear_projection_unet(), tiny_clip(2)
    u, c = dict(unet.state_dict()), dict(te.state_dict())
    assert u["mid_block.attentions.0.proj_in.weight"].dim() == 2
    ckpt = unet_to_ldm(u, layers_per_block=1, down=2, up_attn=[False, True])
    for k, v in openclip_from_clip(c).items():
        ckpt["cond_stage_model.model." + k] = v
    path = write(tmp_path / "sd2.safetensors", ckpt)
    mods = {
        "lora_unet_mid_block_attentions_0_proj_in": (4 * 2, 4 * 2, 1, 1),  # SD 1.x: a 1×1 conv
        "lora_unet_down_blocks_0_attentions_0_proj_out": (4, 4, 1, 1),
        "lora_te_text_model_encoder_layers_0_self_attn_k_proj": (8, 8),
    }
    lora = kohya_lora(mods, seed=11)
    lpath = write(tmp_path / "sd1-lora.safetensors", lora)
    out = tmp_path / "merged.safetensors"
    r = cli_run("merge", path, lpath, "-o", out)
    assert r.exit_code == 0, r.output
    merged = load_file(out)
    got = convert_ldm_unet_checkpoint(dict(merged), dict(unet.config))
    for stem, name in (
        ("lora_unet_mid_block_attentions_0_proj_in", "mid_block.attentions.0.proj_in.weight"),
        (
            "lora_unet_down_blocks_0_attentions_0_proj_out",
            "down_blocks.0.attentions.0.proj_out.weight",
        ),
    ):
        down = lora[f"{stem}.lora_down.weight"].squeeze(3).squeeze(2)
        up = lora[f"{stem}.lora_up.weight"].squeeze(3).squeeze(2)
        want = u[name] + (up @ down) * (float(lora[f"{stem}.alpha"]) / down.shape[0])
        torch.testing.assert_close(got[name], want, **ATOL, msg=name)
    te_got = convert_open_clip_checkpoint(te, dict(merged), prefix="cond_stage_model.model.")
    stem = "lora_te_text_model_encoder_layers_0_self_attn_k_proj"
    name = "encoder.layers.0.self_attn.k_proj.weight"
    torch.testing.assert_close(
        te_got["text_model." + name], c[name] + kohya_delta(lora, stem), **ATOL
    )


def test_linear_factors_on_a_1x1_conv_get_their_unit_dimensions(sd_models, tmp_path, cli_run):
    _, _, u, _ = sd_models
    name = "mid_block.attentions.0.proj_in.weight"
    assert u[name].shape[2:] == (1, 1)
    stem = "lora_unet_mid_block_attentions_0_proj_in"
    lora = kohya_lora({stem: tuple(u[name].shape[:2])}, seed=12)  # 2-D factors
    path = write(tmp_path / "unet.safetensors", u)
    out = tmp_path / "merged.safetensors"
    r = cli_run("merge", path, write(tmp_path / "l.safetensors", lora), "-o", out)
    assert r.exit_code == 0, r.output
    want = u[name] + kohya_delta(lora, stem).reshape(u[name].shape)
    torch.testing.assert_close(load_file(out)[name], want, **ATOL)
