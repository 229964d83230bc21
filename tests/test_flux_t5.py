"""Flux's T5 text encoder between sd-scripts' names and a diffusers Flux pipeline.

sd-scripts (``networks/lora_flux.py``) names Flux's CLIP-L modules ``lora_te1_…`` and its T5-XXL
modules ``lora_te3_…`` (``LORA_PREFIX_TEXT_ENCODER_T5 = "lora_te3"``, "make ComfyUI
compatible"; ``lora_sd3.py`` uses the same prefix for SD3's T5), each module named by
``create_modules``: ``prefix + "." + name + "." + child_name`` with dots made underscores, for
every Linear child of a module whose class is a target (``T5Attention``,
``T5DenseGatedActDense``, ``CLIPAttention``, ``CLIPMLP``). A diffusers Flux pipeline holds
that T5 as ``text_encoder_2`` (SD3's pipeline as ``text_encoder_3``).

The names below are made by that procedure, transcribed, on a tiny T5EncoderModel and
CLIPTextModel built from configs; the pipeline is a real ``FluxPipeline.save_pretrained``
directory; the merged weights are checked against the ΔW math and against peft merging the
diffusers export into the T5 itself."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers_models import tiny_clip, tiny_flux
from image_models import kohya_delta, kohya_lora, read_component, write
from safetensors.torch import load_file

pytest.importorskip("diffusers")

ATOL = dict(rtol=0, atol=1e-6)
T5_TARGETS = ("T5Attention", "T5DenseGatedActDense")
CLIP_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


def tiny_t5(seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=64,
        d_model=8,
        d_kv=4,
        d_ff=16,
        num_layers=2,
        num_heads=2,
        feed_forward_proj="gated-gelu",  # T5 v1.1 / T5-XXL, as Flux uses: wi_0, wi_1, wo
    )
    return T5EncoderModel(config).eval()


def sd_scripts_names(prefix: str, model, targets, level: str = "") -> dict[str, str]:
    """sd-scripts' lora_flux ``create_modules`` on ``model``: kohya stem → the tensor it
    changes. ``level``: a module path level sd-scripts' transformers 4 had and 5 dropped
    (CLIPTextModel's ``text_model.``)."""
    out = {}
    for name, module in model.named_modules():
        if module.__class__.__name__ in targets:
            for child_name, child in module.named_modules():
                if child.__class__.__name__ == "Linear":
                    lora_name = prefix + "." + level + name + "." + child_name
                    out[lora_name.replace(".", "_")] = f"{name}.{child_name}.weight"
    return out


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from image_models import tiny_vae

    clip, t5 = tiny_clip(0), tiny_t5(0)
    vae = tiny_vae()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=None,
        text_encoder_2=t5,
        tokenizer_2=None,
        transformer=tiny_flux(0),
    )
    root = tmp_path_factory.mktemp("flux") / "pipe"
    pipe.save_pretrained(root, safe_serialization=True)
    t5_names = sd_scripts_names("lora_te3", t5, T5_TARGETS)
    clip_names = sd_scripts_names("lora_te1", clip, CLIP_TARGETS, level="text_model.")
    assert len(t5_names) == 2 * (4 + 3)  # q k v o, wi_0 wi_1 wo per block
    assert "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0" in t5_names
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in clip_names
    t5_sd, clip_sd = dict(t5.state_dict()), dict(clip.state_dict())
    shapes = {s: tuple(t5_sd[n].shape) for s, n in t5_names.items()}
    shapes |= {s: tuple(clip_sd[n].shape) for s, n in clip_names.items()}
    lora = kohya_lora(shapes, seed=11)
    src = write(
        root.parent / "flux-te.safetensors", lora, {"ss_network_module": "networks.lora_flux"}
    )
    return dict(root=root, src=src, lora=lora, t5=t5_names, clip=clip_names)


def test_sd_scripts_te3_merges_into_the_pipelines_text_encoder_2(flux, tmp_path, cli_run):
    out = tmp_path / "merged"
    r = cli_run("merge", flux["root"], flux["src"], "-o", out, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["tensors_changed"] == len(flux["t5"]) + len(flux["clip"])
    assert report["warnings"] == []
    lora = flux["lora"]
    for comp, names in (("text_encoder_2", flux["t5"]), ("text_encoder", flux["clip"])):
        base, merged = read_component(flux["root"] / comp), read_component(out / comp)
        for stem, name in names.items():
            want = base[name] + kohya_delta(lora, stem)
            torch.testing.assert_close(merged[name], want, **ATOL, msg=name)
        untouched = set(base) - set(names.values())
        assert untouched and all(torch.equal(merged[k], base[k]) for k in untouched)
    tr = read_component(flux["root"] / "transformer")
    assert all(torch.equal(read_component(out / "transformer")[k], v) for k, v in tr.items())


def test_te3_converts_to_text_encoder_2_and_back(flux, tmp_path, cli_run):
    """kohya → diffusers (against the pipeline: the T5 is its text_encoder_2) → kohya again:
    sd-scripts' names and tensors come back exactly."""
    d = tmp_path / "d.safetensors"
    r = cli_run("convert", flux["src"], d, "--to", "diffusers", "--base", flux["root"])
    assert r.exit_code == 0, r.output
    keys = load_file(d)
    t5_keys = {k for k in keys if k.startswith("text_encoder_2.")}
    assert {k.removesuffix(".lora_A.weight") for k in t5_keys if k.endswith(".lora_A.weight")} == {
        "text_encoder_2." + n.removesuffix(".weight") for n in flux["t5"].values()
    }
    assert not any(k.startswith("text_encoder_3.") for k in keys)
    for base in (None, flux["root"]):
        k = tmp_path / f"k-{base is None}.safetensors"
        args = ["convert", d, k, "--to", "kohya"] + ([] if base is None else ["--base", base])
        r = cli_run(*args)
        assert r.exit_code == 0, r.output
        back, lora = load_file(k), flux["lora"]
        assert back.keys() == lora.keys()
        for key in lora:
            assert torch.equal(back[key], lora[key]), key


def test_peft_merges_the_t5_part_of_the_diffusers_export_as_loratool_does(flux, tmp_path, cli_run):
    """The diffusers export's text_encoder_2 keys and LoraConfig, loaded by peft into the T5
    itself and merged (merge_and_unload), give loratool's merged text_encoder_2."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from loratool.tensors.header import read_header

    d = tmp_path / "d.safetensors"
    assert (
        cli_run("convert", flux["src"], d, "--to", "diffusers", "--base", flux["root"]).exit_code
        == 0
    )
    meta = json.loads(read_header(d).metadata["lora_adapter_metadata"])
    cfg = {k.split(".", 1)[1]: v for k, v in meta.items() if k.startswith("text_encoder_2.")}
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 3
    t5 = tiny_t5(0)
    model = get_peft_model(t5, LoraConfig(**{k: v for k, v in cfg.items() if k != "peft_type"}))
    sd = {  # the keys peft's save_pretrained writes for this model
        "base_model.model." + k.removeprefix("text_encoder_2."): v
        for k, v in load_file(d).items()
        if k.startswith("text_encoder_2.")
    }
    result = set_peft_model_state_dict(model, sd)
    assert not result.unexpected_keys
    fused = model.merge_and_unload().state_dict()
    out = tmp_path / "merged"
    assert cli_run("merge", flux["root"], flux["src"], "-o", out).exit_code == 0
    merged = read_component(out / "text_encoder_2")
    changed = 0
    for name, t in merged.items():
        if name in fused:
            torch.testing.assert_close(t, fused[name], **ATOL, msg=name)
            changed += not torch.equal(t, read_component(flux["root"] / "text_encoder_2")[name])
    assert changed == len(flux["t5"])


def test_kohya_prefixes_of_sd3_and_sdxl_text_encoders(tmp_path, cli_run):
    """SD3's pipeline holds T5 as text_encoder_3 (``lora_te3_`` in sd-scripts' lora_sd3.py) and
    CLIP-G as text_encoder_2 (``lora_te2_``, as SDXL's): the T5 prefix follows the encoder, not
    the pipeline slot."""
    g = torch.Generator().manual_seed(0)
    keys = {
        "text_encoder_3.encoder.block.0.layer.0.SelfAttention.q": (8, 8),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj": (8, 8),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1": (16, 8),
    }
    tensors = {}
    for k, (o, i) in keys.items():
        tensors[k + ".lora_A.weight"] = torch.randn(2, i, generator=g)
        tensors[k + ".lora_B.weight"] = torch.randn(o, 2, generator=g)
    src = write(tmp_path / "sd3.safetensors", tensors)
    out = tmp_path / "k.safetensors"
    r = cli_run("convert", src, out, "--to", "kohya")
    assert r.exit_code == 0, r.output
    stems = {k.split(".")[0] for k in load_file(out)}
    assert stems == {
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q",
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te1_text_model_encoder_layers_0_mlp_fc1",
    }
