"""``convert --base`` on image models resolves names as ``merge`` does, whatever the base's
layout (a pipeline directory or an original SD / Flux BFL single file), and names the modules
as diffusers does.

References: the fixture script's own ldm↔diffusers table (fixtures/make_image.py, written from
diffusers' and sd-scripts' converters), diffusers' Flux converter transcribed with tiny sizes
(tests/image_models.bfl_to_flux), diffusers 0.42 loading and fusing the converted file, and the
ΔW math written out (tests/image_models.kohya_delta)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import FIXTURES
from image_models import (
    bfl_to_flux,
    kohya_delta,
    kohya_lora,
    save_sd_pipeline,
    tiny_clip,
    tiny_unet,
    unet_to_ldm,
    write,
)
from safetensors.torch import load_file

from loratool.formats import load_adapter

sys.path.insert(0, str(FIXTURES))
import make_image  # noqa: E402

IMG = FIXTURES / "image"
ATOL = dict(rtol=0, atol=1e-6)


def run_convert(cli_run, src, dest, to, base):
    r = cli_run("convert", src, dest, "--to", to, "--base", base, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def same_file(a, b) -> None:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    from loratool.tensors.header import read_header

    assert read_header(a).metadata == read_header(b).metadata


# -- SD 1.x fixtures: the original single file and the pipeline directory agree -------------------


@pytest.mark.parametrize("to", ["diffusers", "kohya"])
def test_sd_kohya_converts_the_same_against_either_layout(cli_run, tmp_path, to):
    """Before: against the ldm file a kohya LoRA in diffusers names matched no tensor."""
    src = IMG / "sd-kohya.safetensors"
    single = tmp_path / "single.safetensors"
    pipe = tmp_path / "pipe.safetensors"
    run_convert(cli_run, src, single, to, IMG / "sd15-tiny.safetensors")
    run_convert(cli_run, src, pipe, to, IMG / "sd-pipeline")
    same_file(single, pipe)
    lora, out = load_file(src), load_file(single)
    if to == "kohya":
        assert out.keys() == lora.keys()  # sd-scripts' names are diffusers' flattened
        for k in lora:
            assert torch.equal(out[k], lora[k]), k
        return
    # every module under its diffusers name, its ΔW the kohya module's
    names = dict(make_image.SD_LORA)
    got = load_adapter(single)
    assert len(got.modules) == len(names)
    for stem, name in names.items():
        # diffusers' keys for CLIP carry transformers 4's text_model. level
        comp = "unet." if stem.startswith("lora_unet_") else "text_encoder.text_model."
        mod = got.modules[comp + name]
        torch.testing.assert_close(
            mod.delta().flatten(1), kohya_delta(lora, stem).flatten(1), **ATOL
        )


def test_ldm_named_kohya_converts_to_diffusers_names(cli_run, tmp_path):
    """A kohya LoRA in the original checkpoint's names (``lora_unet_input_blocks_1_1_…``, as
    ComfyUI reads them): renamed with the fixture script's own table, it converts to the same
    file as the diffusers-named one, against either layout."""
    to_ldm = {
        d.removesuffix(".weight"): o.removesuffix(".weight") for d, o, _ in make_image.SD_UNET
    }
    lora = load_file(IMG / "sd-kohya.safetensors")
    renamed = {}
    for k, v in lora.items():
        stem, _, kind = k.partition(".")
        if stem.startswith("lora_unet_"):
            diff = dict(make_image.SD_LORA)[stem].removesuffix(".weight")
            stem = "lora_unet_" + to_ldm[diff].replace(".", "_")
        renamed[f"{stem}.{kind}"] = v
    assert any(k.startswith("lora_unet_input_blocks_1_1_proj_in") for k in renamed)
    ldm = write(tmp_path / "ldm-kohya.safetensors", renamed)
    want = tmp_path / "want.safetensors"
    run_convert(cli_run, IMG / "sd-kohya.safetensors", want, "diffusers", IMG / "sd-pipeline")
    for i, base in enumerate((IMG / "sd15-tiny.safetensors", IMG / "sd-pipeline")):
        out = tmp_path / f"out{i}.safetensors"
        run_convert(cli_run, ldm, out, "diffusers", base)
        ta, tb = load_file(out), load_file(want)
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta)
        # a kohya file keeps the naming the adapter uses (ComfyUI reads ldm-named keys)
        k = tmp_path / f"k{i}.safetensors"
        run_convert(cli_run, ldm, k, "kohya", base)
        tk = load_file(k)
        assert tk.keys() == renamed.keys()
        assert all(torch.equal(tk[n], renamed[n]) for n in tk)


def test_a_component_the_base_lacks_is_refused_not_dropped(cli_run, tmp_path):
    """The UNet alone (the pipeline's unet folder) holds no text encoder: convert refuses in
    one line instead of writing a file without the text-encoder modules."""
    out = tmp_path / "o.safetensors"
    r = cli_run(
        "convert", IMG / "sd-kohya.safetensors", out, "--to", "diffusers",
        "--base", IMG / "sd-pipeline" / "unet",
    )  # fmt: skip
    assert r.exit_code == 1
    assert "modules of text_encoder" in r.stderr and "\n" not in r.stderr.strip()
    assert not out.exists()


# -- a real diffusers pipeline reads what convert wrote against the original file ---------------

UNET = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    ),
    "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_0_proj": (
        "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj.weight"
    ),
    "lora_unet_mid_block_attentions_0_proj_in": "mid_block.attentions.0.proj_in.weight",
    "lora_unet_down_blocks_1_resnets_0_conv1": "down_blocks.1.resnets.0.conv1.weight",
    "lora_unet_up_blocks_0_upsamplers_0_conv": "up_blocks.0.upsamplers.0.conv.weight",
}
TE = {
    "lora_te_text_model_encoder_layers_0_mlp_fc1": "encoder.layers.0.mlp.fc1.weight",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": "encoder.layers.0.self_attn.q_proj.weight",
}


def test_diffusers_fuses_the_file_converted_against_an_sd15_checkpoint(cli_run, tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import StableDiffusionPipeline

    unet, clip = tiny_unet(0), tiny_clip(0)
    u, c = dict(unet.state_dict()), dict(clip.state_dict())
    ckpt = unet_to_ldm(u, layers_per_block=1, down=2, up_attn=[False, True])
    ckpt.update({"cond_stage_model.transformer.text_model." + k: v for k, v in c.items()})
    sd15 = write(tmp_path / "sd15.safetensors", ckpt)
    shapes = {s: tuple(u[n].shape) for s, n in UNET.items()} | {
        s: tuple(c[n].shape) for s, n in TE.items()
    }
    lora = kohya_lora(shapes, seed=5)
    src = write(tmp_path / "kohya.safetensors", lora, {"ss_network_dim": "2"})
    out = tmp_path / "diffusers.safetensors"
    run_convert(cli_run, src, out, "diffusers", sd15)
    pipe_dir = save_sd_pipeline(tmp_path / "pipe", unet, clip)
    again = tmp_path / "again.safetensors"
    run_convert(cli_run, src, again, "diffusers", pipe_dir)
    same_file(out, again)

    pipe = StableDiffusionPipeline.from_pretrained(
        pipe_dir, safety_checker=None, tokenizer=None, feature_extractor=None, image_encoder=None
    )
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused_u, fused_c = pipe.unet.state_dict(), pipe.text_encoder.state_dict()
    for stem, name in UNET.items():
        want = u[name] + kohya_delta(lora, stem).reshape(u[name].shape)
        torch.testing.assert_close(fused_u[name], want, **ATOL, msg=name)
    for stem, name in TE.items():
        torch.testing.assert_close(fused_c[name], c[name] + kohya_delta(lora, stem), **ATOL)
    changed = [k for k in fused_u if not torch.equal(fused_u[k], u[k])]
    assert sorted(changed) == sorted(UNET.values())


# -- Flux: BFL names split into diffusers' ---------------------------------------------------------

H, MLP = make_image.HIDDEN, make_image.MLP
BFL_MODULES = {  # sd-scripts' lora_flux names (BFL's) → the BFL tensor's shape
    "lora_unet_double_blocks_0_img_attn_qkv": (3 * H, H),
    "lora_unet_double_blocks_0_txt_attn_qkv": (3 * H, H),
    "lora_unet_double_blocks_0_img_attn_proj": (H, H),
    "lora_unet_single_blocks_0_linear1": (3 * H + MLP, H),
    "lora_unet_final_layer_adaLN_modulation_1": (2 * H, H),
}


def test_bfl_named_flux_lora_converts_to_diffusers_modules(cli_run, tmp_path):
    """Each BFL module becomes diffusers' modules with its ΔW rows (q, k, v out of ``qkv``;
    q, k, v, MLP out of ``linear1``; the final modulation's halves swapped), as diffusers'
    Flux converter lays the weights out."""
    lora = kohya_lora(BFL_MODULES, seed=9)
    src = write(tmp_path / "bfl.safetensors", lora)
    out = tmp_path / "d.safetensors"
    run_convert(cli_run, src, out, "diffusers", IMG / "flux-bfl-tiny.safetensors")
    got = load_adapter(out)
    # the reference: diffusers' converter on a checkpoint holding the ΔW of each BFL tensor
    delta = {}
    for stem, shape in BFL_MODULES.items():
        name = stem.removeprefix("lora_unet_")
        for a, b in (
            ("double_blocks_0_", "double_blocks.0."),
            ("single_blocks_0_", "single_blocks.0."),
        ):
            name = name.replace(a, b)
        name = name.replace("img_attn_", "img_attn.").replace("txt_attn_", "txt_attn.")
        name = name.replace("final_layer_adaLN_modulation_1", "final_layer.adaLN_modulation.1")
        delta[name + ".weight"] = kohya_delta(lora, stem)
        delta[name + ".bias"] = torch.zeros(shape[0])
    ref = bfl_to_flux(delta, 1, 1, H)
    ref = {k: v for k, v in ref.items() if k.endswith(".weight")}
    assert {n.removeprefix("transformer.") for n in got.modules} == set(ref)
    for name, want in ref.items():
        torch.testing.assert_close(got.modules["transformer." + name].delta(), want, **ATOL)
    assert len(got.modules) == 3 + 3 + 1 + 4 + 1
    # A LoRA split by rows keeps its A: q, k, v of one qkv share it
    q, k = (
        got.modules["transformer.transformer_blocks.0.attn.to_q.weight"],
        got.modules["transformer.transformer_blocks.0.attn.to_k.weight"],
    )
    assert torch.equal(q.A, k.A)


def test_bfl_named_flux_lora_keeps_sd_scripts_names_as_kohya(cli_run, tmp_path):
    """sd-scripts names Flux modules after BFL's tensors (``lora_unet_double_blocks_0_…``): a
    kohya file converted against either layout keeps them, tensor for tensor."""
    lora = kohya_lora(BFL_MODULES, seed=9)
    src = write(tmp_path / "bfl.safetensors", lora)
    out = tmp_path / "k.safetensors"
    run_convert(cli_run, src, out, "kohya", IMG / "flux-bfl-tiny.safetensors")
    got = load_file(out)
    assert got.keys() == lora.keys()
    assert all(torch.equal(got[k], lora[k]) for k in got)


def test_diffusers_flux_lora_keeps_its_names_against_a_bfl_file(cli_run, tmp_path):
    src = IMG / "flux-lora.safetensors"
    out = tmp_path / "d.safetensors"
    run_convert(cli_run, src, out, "diffusers", IMG / "flux-bfl-tiny.safetensors")
    a, b = load_file(src), load_file(out)
    lora_keys = {k for k in a if not k.endswith(".alpha")}
    assert {k for k in b if not k.endswith(".alpha")} == lora_keys
    for k in lora_keys:
        assert torch.equal(a[k], b[k]), k
