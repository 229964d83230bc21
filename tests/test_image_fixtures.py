"""The image fixtures (fixtures/make_image.py) merged with the CLI, checked against the math
written out here: no diffusers or lycoris-lora needed. The original-layout names are the
fixture script's own tables (written from diffusers' and sd-scripts' converters), not
loratool's maps, so these check the maps too."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file

sys.path.insert(0, str(FIXTURES))
import make_image  # noqa: E402

ATOL = dict(rtol=0, atol=1e-6)
IMG = FIXTURES / "image"


def lora_delta(lora: dict, stem: str, shape) -> torch.Tensor:
    down = lora[f"{stem}.lora_down.weight"].double()
    up = lora[f"{stem}.lora_up.weight"].double()
    scale = float(lora[f"{stem}.alpha"]) / down.shape[0]
    return ((up.flatten(1) @ down.flatten(1)) * scale).reshape(shape).float()


# -- LyCORIS on conv/ ------------------------------------------------------------------------------


def loha_delta(t: dict, stem: str, shape) -> torch.Tensor:
    """lycoris' LoHa: scale · (w1a·w1b) ⊙ (w2a·w2b), Tucker halves einsum'd; scale = alpha/r."""
    g = {k.split(".", 1)[1]: v.double() for k, v in t.items() if k.startswith(stem + ".")}
    r = g["hada_w1_b"].shape[0]
    scale = float(g["alpha"]) / r
    if "hada_t1" in g:
        h1 = torch.einsum("ijhw,jr,ip->prhw", g["hada_t1"], g["hada_w1_b"], g["hada_w1_a"])
        h2 = torch.einsum("ijhw,jr,ip->prhw", g["hada_t2"], g["hada_w2_b"], g["hada_w2_a"])
        return (h1 * h2 * scale).reshape(shape).float()
    d = (g["hada_w1_a"] @ g["hada_w1_b"]) * (g["hada_w2_a"] @ g["hada_w2_b"]) * scale
    return d.reshape(shape).float()


def lokr_delta(t: dict, stem: str, shape) -> torch.Tensor:
    """lycoris' LoKr: scale · kron(w1, w2), the factored side's rank r in scale = alpha/r."""
    g = {k.split(".", 1)[1]: v.double() for k, v in t.items() if k.startswith(stem + ".")}
    w1 = g["lokr_w1"] if "lokr_w1" in g else g["lokr_w1_a"] @ g["lokr_w1_b"]
    if "lokr_w2" in g:
        w2 = g["lokr_w2"]
    elif "lokr_t2" in g:
        w2 = torch.einsum("ijhw,ip,jr->prhw", g["lokr_t2"], g["lokr_w2_a"], g["lokr_w2_b"])
    else:
        w2 = g["lokr_w2_a"] @ g["lokr_w2_b"]
    if "lokr_w1_a" in g:
        r = g["lokr_w1_a"].shape[1]
    elif "lokr_t2" in g:
        r = g["lokr_t2"].shape[0]
    elif "lokr_w2_a" in g:
        r = g["lokr_w2_a"].shape[1]
    else:
        r = None
    scale = 1.0 if r is None else float(g["alpha"]) / r
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    return (torch.kron(w1, w2) * scale).reshape(shape).float()


def locon_delta(t: dict, stem: str, shape) -> torch.Tensor:
    g = {k.split(".", 1)[1]: v.double() for k, v in t.items() if k.startswith(stem + ".")}
    if "lora_mid.weight" not in g:
        return lora_delta(t, stem, shape)
    down, mid, up = g["lora_down.weight"], g["lora_mid.weight"], g["lora_up.weight"]
    scale = float(g["alpha"]) / down.shape[0]
    d = torch.einsum("mnhw,im,nj->ijhw", mid, up.flatten(1), down.flatten(1)) * scale
    return d.reshape(shape).float()


CONV_NAMES = {
    "lora_unet_conv_in": "conv_in.weight",
    "lora_unet_down_0_conv": "down.0.conv.weight",
    "lora_unet_down_0_proj": "down.0.proj.weight",
    "lora_unet_mid_attn_to_q": "mid.attn.to_q.weight",
}


@pytest.mark.parametrize(
    "algo, delta", [("loha", loha_delta), ("lokr", lokr_delta), ("locon", locon_delta)]
)
def test_lycoris_fixtures_merge_to_the_math(algo, delta, tmp_path, cli_run):
    adapter = FIXTURES / "adapters" / f"conv-{algo}.safetensors"
    base = load_file(FIXTURES / "conv" / "model.safetensors")
    t = load_file(adapter)
    out = tmp_path / "merged"
    r = cli_run("merge", FIXTURES / "conv", adapter, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    stems = {k.split(".")[0] for k in t}
    assert json.loads(r.stdout)["tensors_changed"] == len(stems)
    merged = load_file(out / "model.safetensors")
    for stem in stems:
        name = CONV_NAMES[stem]
        want = base[name] + delta(t, stem, base[name].shape)
        torch.testing.assert_close(merged[name], want, **ATOL, msg=name)
    r = cli_run("inspect-rank", adapter, "--json")
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)["modules"]) == len(stems)


# -- SD 1.x: the pipeline directory and the original file give the same merge ----------------------


def test_sd_fixtures_pipeline_and_original_file_merge_alike(tmp_path, cli_run):
    lora = load_file(IMG / "sd-kohya.safetensors")
    shapes = {d: s for d, _, s in make_image.SD_UNET} | dict(make_image.SD_CLIP)
    to_original = {d: "model.diffusion_model." + o for d, o, _ in make_image.SD_UNET}
    to_original.update(
        {k: "cond_stage_model.transformer.text_model." + k for k, _ in make_image.SD_CLIP}
    )
    r = cli_run(
        "merge",
        IMG / "sd15-tiny.safetensors",
        IMG / "sd-kohya.safetensors",
        "-o",
        tmp_path / "o.safetensors",
    )
    assert r.exit_code == 0, r.output
    orig, orig_base = (
        load_file(tmp_path / "o.safetensors"),
        load_file(IMG / "sd15-tiny.safetensors"),
    )
    r = cli_run(
        "merge", IMG / "sd-pipeline", IMG / "sd-kohya.safetensors", "-o", tmp_path / "p", "--json"
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["tensors_changed"] == len(make_image.SD_LORA)
    pipe = load_file(tmp_path / "p" / "unet" / "diffusion_pytorch_model.safetensors")
    for f in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        pipe.update(load_file(tmp_path / "p" / "text_encoder" / f))
    changed = {name: stem for stem, name in make_image.SD_LORA}
    for name, key in to_original.items():
        want = orig_base[key] + (
            lora_delta(lora, changed[name], shapes[name]) if name in changed else 0
        )
        torch.testing.assert_close(orig[key], want, **ATOL, msg=key)
        assert torch.equal(pipe[name], orig[key]), name
    for rel in (
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/model.safetensors.index.json",
    ):
        assert (tmp_path / "p" / rel).is_file()


def test_flux_fixture_slices(tmp_path, cli_run):
    lora = load_file(IMG / "flux-lora.safetensors")
    base = load_file(IMG / "flux-bfl-tiny.safetensors")
    r = cli_run(
        "merge",
        IMG / "flux-bfl-tiny.safetensors",
        IMG / "flux-lora.safetensors",
        "-o",
        tmp_path / "m.safetensors",
        "--json",
    )
    assert r.exit_code == 0, r.output
    merged = load_file(tmp_path / "m.safetensors")

    def d(name):
        A = lora[f"transformer.{name}.lora_A.weight"].double()
        B = lora[f"transformer.{name}.lora_B.weight"].double()
        return (B @ A * float(lora[f"transformer.{name}.alpha"]) / A.shape[0]).float()

    H = make_image.HIDDEN
    want = {k: v.clone() for k, v in base.items()}
    qkv = "double_blocks.0.img_attn.qkv.weight"
    for i, p in enumerate("qkv"):
        want[qkv][i * H : (i + 1) * H] += d(f"transformer_blocks.0.attn.to_{p}")
    want["double_blocks.0.txt_attn.qkv.weight"][2 * H :] += d(
        "transformer_blocks.0.attn.add_v_proj"
    )
    want["double_blocks.0.img_attn.proj.weight"] += d("transformer_blocks.0.attn.to_out.0")
    want["single_blocks.0.linear1.weight"][:H] += d("single_transformer_blocks.0.attn.to_q")
    want["single_blocks.0.linear1.weight"][3 * H :] += d("single_transformer_blocks.0.proj_mlp")
    scale_shift = d("norm_out.linear")  # diffusers: scale, shift; BFL: shift, scale
    want["final_layer.adaLN_modulation.1.weight"][H:] += scale_shift[:H]
    want["final_layer.adaLN_modulation.1.weight"][:H] += scale_shift[H:]
    for k in base:
        torch.testing.assert_close(merged[k], want[k], **ATOL, msg=k)
