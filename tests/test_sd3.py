"""SD3 / SD3.5 (MMDiT) between SAI's original layout, diffusers' SD3Transformer2DModel and
sd-scripts' names.

sd-scripts' ``networks/lora_sd3.py`` names its modules after the original MMDiT under
``lora_unet_`` (``lora_unet_joint_blocks_0_x_block_attn_qkv``: q, k, v fused; the last block's
pre-only ``context_block``; ``x_embedder_proj``, ``t_embedder_mlp_0``, ``final_layer_linear``…),
diffusers names them ``transformer_blocks.0.attn.to_q`` …, with the last block's context
modulation and the final one in the other order (scale, shift).

References: diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers`` (the single-file
converter: the original layout below is checked to be what it reads), diffusers' own loading
(``SD3LoraLoaderMixin.lora_state_dict`` + ``load_lora_into_transformer``, what
``StableDiffusion3Pipeline.load_lora_weights`` does for the transformer) and fusing, a LoRA saved
by ``StableDiffusion3Pipeline.save_lora_weights``, and the ΔW math written out
(``image_models.kohya_delta``). The tiny transformer: 2 joint blocks, the first an SD3.5
dual-attention block (``attn2``), the last pre-only, a 2×2 patch conv.
"""

from __future__ import annotations

import json

import pytest
import torch
from image_models import kohya_delta, kohya_lora, write
from safetensors.torch import load_file

from loratool.formats import load_adapter

pytest.importorskip("diffusers")

ATOL = dict(rtol=0, atol=1e-6)
PREFIX = "model.diffusion_model."
TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_out.0",
    "to_add_out",
    "norm1_context.linear",
    "norm_out.linear",
    "proj_out",
    "ff_context.net.2",
    "pos_embed.proj",
    "linear_1",
]


def tiny_sd3(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=2,
        joint_attention_dim=8,
        caption_projection_dim=8,
        pooled_projection_dim=8,
        out_channels=4,
        pos_embed_max_size=8,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ).eval()


def _swap(w):
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a])


def sd3_to_original(sd: dict, num_layers: int) -> dict:
    """A diffusers SD3 state dict in SAI's original names (behind ``model.diffusion_model.``),
    written out as the inverse of diffusers' single-file converter."""
    o = {"pos_embed": sd["pos_embed.pos_embed"]}
    top = {
        "pos_embed.proj": "x_embedder.proj",
        "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
        "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
        "context_embedder": "context_embedder",
        "proj_out": "final_layer.linear",
    }
    for d, b in top.items():
        for p in ("weight", "bias"):
            o[f"{b}.{p}"] = sd[f"{d}.{p}"]
    for p in ("weight", "bias"):
        o[f"final_layer.adaLN_modulation.1.{p}"] = _swap(sd[f"norm_out.linear.{p}"])
    for i in range(num_layers):
        d, x, c = (
            f"transformer_blocks.{i}.",
            f"joint_blocks.{i}.x_block.",
            f"joint_blocks.{i}.context_block.",
        )
        last = i == num_layers - 1
        for p in ("weight", "bias"):
            o[f"{x}attn.qkv.{p}"] = torch.cat([sd[f"{d}attn.to_{q}.{p}"] for q in "qkv"])
            o[f"{c}attn.qkv.{p}"] = torch.cat([sd[f"{d}attn.add_{q}_proj.{p}"] for q in "qkv"])
            o[f"{x}attn.proj.{p}"] = sd[f"{d}attn.to_out.0.{p}"]
            o[f"{x}adaLN_modulation.1.{p}"] = sd[f"{d}norm1.linear.{p}"]
            mod = sd[f"{d}norm1_context.linear.{p}"]
            o[f"{c}adaLN_modulation.1.{p}"] = _swap(mod) if last else mod
            o[f"{x}mlp.fc1.{p}"] = sd[f"{d}ff.net.0.proj.{p}"]
            o[f"{x}mlp.fc2.{p}"] = sd[f"{d}ff.net.2.{p}"]
            if not last:
                o[f"{c}attn.proj.{p}"] = sd[f"{d}attn.to_add_out.{p}"]
                o[f"{c}mlp.fc1.{p}"] = sd[f"{d}ff_context.net.0.proj.{p}"]
                o[f"{c}mlp.fc2.{p}"] = sd[f"{d}ff_context.net.2.{p}"]
            if f"{d}attn2.to_q.{p}" in sd:
                o[f"{x}attn2.qkv.{p}"] = torch.cat([sd[f"{d}attn2.to_{q}.{p}"] for q in "qkv"])
                o[f"{x}attn2.proj.{p}"] = sd[f"{d}attn2.to_out.0.{p}"]
        for ours, theirs in (("attn", "attn"), ("attn2", "attn2")):
            for q in "qk":
                if f"{d}{theirs}.norm_{q}.weight" in sd:
                    o[f"{x}{ours}.ln_{q}.weight"] = sd[f"{d}{theirs}.norm_{q}.weight"]
        for q in "qk":
            o[f"{c}attn.ln_{q}.weight"] = sd[f"{d}attn.norm_added_{q}.weight"]
    return {PREFIX + k: v.contiguous() for k, v in o.items()}


def to_diffusers(original: dict) -> dict:
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    return convert_sd3_transformer_checkpoint_to_diffusers(dict(original))


@pytest.fixture(scope="module")
def sd3():
    model = tiny_sd3(0)
    base = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return base, sd3_to_original(base, 2)


def test_the_original_layout_is_what_diffusers_converts(sd3):
    base, original = sd3
    got = to_diffusers(original)
    assert got.keys() == base.keys()
    for k in base:
        assert torch.equal(got[k], base[k]), k


def fused_by_diffusers(lora_file) -> dict:
    """A fresh tiny SD3 with ``lora_file`` loaded as StableDiffusion3Pipeline.load_lora_weights
    loads the transformer's part, fused with peft's merge (``fuse_lora``)."""
    from diffusers.loaders import SD3LoraLoaderMixin
    from diffusers_models import base_state
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = tiny_sd3(0)
    sd, meta = SD3LoraLoaderMixin.lora_state_dict(str(lora_file), return_lora_metadata=True)
    SD3LoraLoaderMixin.load_lora_into_transformer(
        sd, transformer=model, adapter_name="x", metadata=meta
    )
    n = 0
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=["x"])
            n += 1
    assert n > 0
    return base_state(model)


def test_diffusers_lora_merges_into_the_original_file(sd3, tmp_path, cli_run):
    """A LoRA saved by diffusers (separate q, k, v; the swapped modulations) merged into the
    original file: read back by diffusers' converter it equals diffusers' own fuse."""
    from diffusers import StableDiffusion3Pipeline
    from diffusers_models import add_lora, lora_state

    _, original = sd3
    model = add_lora(tiny_sd3(0), TARGETS, r=2, alpha=3, seed=7)
    StableDiffusion3Pipeline.save_lora_weights(
        tmp_path / "lora",
        transformer_lora_layers=lora_state(model),
        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
        safe_serialization=True,
    )
    lora = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    src = write(tmp_path / "sd3.safetensors", original)
    out = tmp_path / "merged.safetensors"
    r = cli_run("merge", src, lora, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    ops = {t["name"]: t["op"] for t in json.loads(r.stdout)["tensors"]}
    assert ops[PREFIX + "joint_blocks.0.x_block.attn.qkv.weight"] == "slice"
    assert ops[PREFIX + "joint_blocks.0.x_block.attn2.qkv.weight"] == "slice"
    assert ops[PREFIX + "joint_blocks.1.context_block.adaLN_modulation.1.weight"] == "slice"
    assert ops[PREFIX + "final_layer.adaLN_modulation.1.weight"] == "slice"
    assert ops[PREFIX + "joint_blocks.0.context_block.adaLN_modulation.1.weight"] == "delta"
    assert ops[PREFIX + "x_embedder.proj.weight"] == "delta"
    fused = fused_by_diffusers(lora)
    got = to_diffusers(load_file(out))
    base = to_diffusers(original)
    changed = {k for k in base if not torch.equal(fused[k], base[k])}
    assert len(changed) > 20
    assert {k for k in base if not torch.equal(got[k], base[k])} == changed
    for k in base:
        torch.testing.assert_close(got[k], fused[k], **ATOL, msg=k)


def sd_scripts_stems(original: dict) -> dict[str, str]:
    """sd-scripts' lora_sd3 names: every Linear (and the patch conv) of the MMDiT, ``lora_unet``
    + the module path with dots as underscores → the original tensor."""
    out = {}
    for k, v in original.items():
        if k.endswith(".weight") and v.dim() in (2, 4):
            path = k.removeprefix(PREFIX).removesuffix(".weight")
            out["lora_unet_" + path.replace(".", "_")] = k
    return out


@pytest.fixture(scope="module")
def kohya_sd3(sd3, tmp_path_factory):
    _, original = sd3
    stems = sd_scripts_stems(original)
    assert "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1" in stems
    assert "lora_unet_joint_blocks_0_x_block_attn2_qkv" in stems
    assert "lora_unet_x_embedder_proj" in stems and "lora_unet_t_embedder_mlp_0" in stems
    lora = kohya_lora({s: tuple(original[k].shape) for s, k in stems.items()}, seed=13)
    root = tmp_path_factory.mktemp("kohya-sd3")
    src = write(root / "kohya-sd3.safetensors", lora, {"ss_network_module": "networks.lora_sd3"})
    want = dict(original)
    for stem, k in stems.items():
        want[k] = original[k] + kohya_delta(lora, stem).reshape(original[k].shape)
    return dict(src=src, lora=lora, stems=stems, want=want, root=root)


def test_kohya_lora_merges_into_the_original_file(sd3, kohya_sd3, tmp_path, cli_run):
    _, original = sd3
    src = write(tmp_path / "sd3.safetensors", original)
    out = tmp_path / "merged.safetensors"
    r = cli_run("merge", src, kohya_sd3["src"], "-o", out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["tensors_changed"] == len(kohya_sd3["stems"])
    got = load_file(out)
    for k in original:
        torch.testing.assert_close(got[k], kohya_sd3["want"][k], **ATOL, msg=k)


def test_kohya_lora_merges_into_a_diffusers_transformer(sd3, kohya_sd3, tmp_path, cli_run):
    """Into diffusers' names: q, k, v rows of each qkv go to to_q / to_k / to_v (add_*_proj,
    attn2), the pre-only and final modulations' halves swapped; the reference is the merge
    into the original layout, converted by diffusers."""
    base, _ = sd3
    src = write(tmp_path / "sd3-diffusers.safetensors", base)
    out = tmp_path / "merged.safetensors"
    r = cli_run("merge", src, kohya_sd3["src"], "-o", out)
    assert r.exit_code == 0, r.output
    got, want = load_file(out), to_diffusers(kohya_sd3["want"])
    assert got.keys() == base.keys()
    for k in base:
        torch.testing.assert_close(got[k], want[k], **ATOL, msg=k)


def test_kohya_converts_to_what_diffusers_loads(sd3, kohya_sd3, tmp_path, cli_run):
    """convert --to diffusers against either layout gives one file; diffusers loads and fuses
    it to the weights loratool merges."""
    base, original = sd3
    files = []
    for name, weights in (("orig", original), ("diff", base)):
        b = write(tmp_path / f"{name}.safetensors", weights)
        out = tmp_path / f"{name}-lora.safetensors"
        r = cli_run("convert", kohya_sd3["src"], out, "--to", "diffusers", "--base", b)
        assert r.exit_code == 0, r.output
        files.append(out)
    a, b = load_file(files[0]), load_file(files[1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    conv = load_adapter(files[0])
    assert "transformer.transformer_blocks.0.attn2.to_k.weight" in conv.modules
    assert "transformer.norm_out.linear.weight" in conv.modules
    fused, want = fused_by_diffusers(files[0]), to_diffusers(kohya_sd3["want"])
    for k in base:
        torch.testing.assert_close(fused[k], want[k], **ATOL, msg=k)


def test_kohya_export_against_either_layout_keeps_sd_scripts_names(
    sd3, kohya_sd3, tmp_path, cli_run
):
    base, original = sd3
    for name, weights in (("orig", original), ("diff", base)):
        b = write(tmp_path / f"{name}.safetensors", weights)
        out = tmp_path / f"{name}-k.safetensors"
        r = cli_run("convert", kohya_sd3["src"], out, "--to", "kohya", "--base", b)
        assert r.exit_code == 0, r.output
        got, lora = load_file(out), kohya_sd3["lora"]
        assert got.keys() == lora.keys(), name
        assert all(torch.equal(got[k], lora[k]) for k in lora)


def test_split_qkv_joint_blocks_become_rank_r_parts(sd3, tmp_path, cli_run):
    """lora_sd3's split_qkv saves a joint block's q, k, v like lora_flux's (stacked downs,
    block-diagonal up, one alpha): read at alpha/(3r), each diffusers part keeps rank r."""
    base, original = sd3
    g = torch.Generator().manual_seed(5)
    r, alpha, stem = 2, 4.0, "lora_unet_joint_blocks_0_context_block_attn_qkv"
    downs = [torch.randn(r, 8, generator=g) for _ in range(3)]
    ups = [torch.randn(8, r, generator=g) for _ in range(3)]
    up = torch.block_diag(*ups)
    lora = {
        stem + ".lora_down.weight": torch.cat(downs),
        stem + ".lora_up.weight": up,
        stem + ".alpha": torch.tensor(alpha),
    }
    meta = {"ss_network_module": "networks.lora_sd3", "ss_network_args": '{"split_qkv": "True"}'}
    src = write(tmp_path / "split.safetensors", lora, meta)
    out = tmp_path / "d.safetensors"
    b = write(tmp_path / "orig.safetensors", original)
    res = cli_run("convert", src, out, "--to", "diffusers", "--base", b, "--json")
    assert res.exit_code == 0, res.output
    assert any("split_qkv" in w for w in json.loads(res.stdout)["warnings"])
    got = load_adapter(out)
    for q, down, u in zip("qkv", downs, ups, strict=True):
        m = got.modules[f"transformer.transformer_blocks.0.attn.add_{q}_proj.weight"]
        assert m.rank == r and torch.equal(m.A, down) and torch.equal(m.B, u)
        torch.testing.assert_close(m.delta(), alpha / (3 * r) * (u @ down), **ATOL)


def test_the_original_files_text_encoders_take_sd_scripts_te_modules(sd3, tmp_path, cli_run):
    """An SD3 single file with its text encoders (``text_encoders.clip_l/clip_g.transformer.``,
    transformers' names, as diffusers' single-file loader reads them): sd-scripts'
    ``lora_te1_`` (CLIP-L) and ``lora_te2_`` (CLIP-G) modules merge into their own encoder."""
    from diffusers_models import tiny_clip

    _, original = sd3
    ckpt = dict(original)
    encoders = {"clip_l": tiny_clip(1).state_dict(), "clip_g": tiny_clip(2).state_dict()}
    for name, sd in encoders.items():
        for k, v in sd.items():  # transformers 4's names, which the single files keep
            k = k if k.startswith("text_model.") else "text_model." + k
            ckpt[f"text_encoders.{name}.transformer.{k}"] = v
    mods = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": "text_encoders.clip_l.transformer."
        "text_model.encoder.layers.0.self_attn.q_proj.weight",
        "lora_te2_text_model_encoder_layers_0_mlp_fc1": "text_encoders.clip_g.transformer."
        "text_model.encoder.layers.0.mlp.fc1.weight",
        "lora_unet_joint_blocks_1_x_block_attn_qkv": PREFIX
        + "joint_blocks.1.x_block.attn.qkv.weight",
    }
    lora = kohya_lora({s: tuple(ckpt[k].shape) for s, k in mods.items()}, seed=17)
    src = write(tmp_path / "te.safetensors", lora)
    base = write(tmp_path / "sd3-full.safetensors", ckpt)
    out = tmp_path / "merged.safetensors"
    r = cli_run("merge", base, src, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["tensors_changed"] == 3
    got = load_file(out)
    for k in ckpt:
        stem = next((s for s, t in mods.items() if t == k), None)
        want = ckpt[k] if stem is None else ckpt[k] + kohya_delta(lora, stem)
        torch.testing.assert_close(got[k], want, **ATOL, msg=k)
