"""sd-scripts' Flux LoRA trained with ``split_qkv=True`` (``networks/lora_flux.py``).

sd-scripts trains q, k, v of a double block's fused ``qkv`` (and q, k, v, MLP of a single
block's ``linear1``) as separate rank-r LoRAs (``LoRAModule`` with ``split_dims``: ``lora_down``
and ``lora_up`` are ModuleLists), then saves each as ONE module of the fused tensor
(``LoRANetwork.state_dict``): ``lora_down`` = the parts' downs stacked (n·r × in), ``lora_up``
= their ups on the block diagonal (rows of part j × its r columns, zeros elsewhere), the alpha
unchanged. Every loader reads that file as a plain LoRA of rank n·r and scale alpha/(n·r):
sd-scripts' ``create_network_from_weights`` (``split_qkv = False``: "state_dict is qkv
combined"), ``flux_merge_lora.py`` (``scale = alpha / down_weight.size()[0]``),
``convert_flux_lora.py`` and diffusers' ``_convert_kohya_flux_lora_to_diffusers`` (which, when
the up weight is block-diagonal, gives each of to_q, to_k, to_v its own rank-r part).

References: the ΔW written out below from that layout; diffusers 0.42's ``lora_state_dict``
(its conversion of the same file) and ``load_lora_weights`` + ``fuse_lora`` on a tiny
FluxPipeline built from configs. diffusers hard-codes Flux-dev's single-block sizes
(``dims=[3072, 3072, 3072, 12288]``), so the tiny single block's ``linear1`` is checked
against the math only.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import FIXTURES
from image_models import read_component, write
from safetensors.torch import load_file

from loratool.formats import load_adapter

sys.path.insert(0, str(FIXTURES))
import make_image  # noqa: E402

IMG = FIXTURES / "image"
BFL = IMG / "flux-bfl-tiny.safetensors"
H, MLP = make_image.HIDDEN, make_image.MLP
R, ALPHA = 2, 4.0
ATOL = dict(rtol=0, atol=1e-6)
SPLIT_META = {
    "ss_network_module": "networks.lora_flux",
    "ss_network_dim": str(R),
    "ss_network_alpha": str(ALPHA),
    "ss_network_args": json.dumps({"split_qkv": "True"}),
}
# sd-scripts' split modules: kohya stem → (the BFL tensor, split_dims); the tiny model's
# sizes stand in for Flux-dev's 3072 / 12288
SPLIT = {
    "lora_unet_double_blocks_0_img_attn_qkv": ("double_blocks.0.img_attn.qkv.weight", [H] * 3),
    "lora_unet_double_blocks_0_txt_attn_qkv": ("double_blocks.0.txt_attn.qkv.weight", [H] * 3),
    "lora_unet_single_blocks_0_linear1": ("single_blocks.0.linear1.weight", [H] * 3 + [MLP]),
}
PLAIN = {"lora_unet_double_blocks_0_img_attn_proj": ("double_blocks.0.img_attn.proj.weight", H)}


def split_file(stems, *, seed=0, plain=PLAIN):
    """(kohya state dict as sd-scripts' LoRANetwork.state_dict saves it, the parts by stem)."""
    g = torch.Generator().manual_seed(seed)
    sd, parts = {}, {}
    for stem in stems:
        _, dims = SPLIT[stem]
        downs = [torch.randn(R, H, generator=g) / H**0.5 for _ in dims]
        ups = [torch.randn(d, R, generator=g) * 0.5 for d in dims]
        up = torch.zeros(sum(dims), R * len(dims))
        i = 0
        for j, d in enumerate(dims):
            up[i : i + d, j * R : (j + 1) * R] = ups[j]
            i += d
        sd[stem + ".lora_down.weight"] = torch.cat(downs)
        sd[stem + ".lora_up.weight"] = up
        sd[stem + ".alpha"] = torch.tensor(ALPHA)
        parts[stem] = list(zip(downs, ups, strict=True))
    for stem, (_, out) in plain.items():
        sd[stem + ".lora_down.weight"] = torch.randn(R, H, generator=g) / H**0.5
        sd[stem + ".lora_up.weight"] = torch.randn(out, R, generator=g) * 0.5
        sd[stem + ".alpha"] = torch.tensor(ALPHA)
    return sd, parts


def part_delta(down, up, n):
    """One part's ΔW as the loaders apply it: alpha over the saved rank n·r."""
    return ALPHA / (n * R) * (up @ down)


def split_delta(parts):
    """A split module's ΔW: the parts' ΔW stacked by rows (q, k, v[, mlp])."""
    return torch.cat([part_delta(d, u, len(parts)) for d, u in parts])


def plain_delta(sd, stem):
    down, up = sd[stem + ".lora_down.weight"], sd[stem + ".lora_up.weight"]
    return ALPHA / down.shape[0] * (up @ down)


def test_the_layout_is_sd_scripts_state_dict():
    """The written-out layout: zero off the block diagonal, and the stacked ΔW equals the one
    plain product of the saved tensors (what every loader computes)."""
    sd, parts = split_file(SPLIT)
    for stem, p in parts.items():
        dense = plain_delta(sd, stem)
        torch.testing.assert_close(dense, split_delta(p), **ATOL)
        assert sd[stem + ".lora_down.weight"].shape == (len(p) * R, H)


def test_read_as_one_module_of_rank_n_r(tmp_path):
    sd, parts = split_file(SPLIT)
    a = load_adapter(write(tmp_path / "split.safetensors", sd, SPLIT_META))
    for stem, p in parts.items():
        m = a.modules[stem]
        assert m.rank == len(p) * R and m.alpha == ALPHA
        torch.testing.assert_close(m.delta(), split_delta(p), **ATOL)


@pytest.mark.parametrize("meta", [SPLIT_META, None], ids=["split_qkv", "no-metadata"])
def test_merges_into_the_bfl_fixture(tmp_path, cli_run, meta):
    sd, parts = split_file(SPLIT)
    src = write(tmp_path / "split.safetensors", sd, meta)
    out = tmp_path / "merged.safetensors"
    r = cli_run("merge", BFL, src, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    notes = [w for w in report["warnings"] if "split_qkv" in w]
    if meta is None:
        assert notes == []
    else:  # the trainer's scale and the loaders' differ: said once, with the count
        assert len(notes) == 1 and "3 modules" in notes[0] and "alpha/(n·r)" in notes[0]
    base, got = load_file(BFL), load_file(out)
    want = dict(base)
    for stem, p in parts.items():
        name = SPLIT[stem][0]
        want[name] = base[name] + split_delta(p)
    for stem, (name, _) in PLAIN.items():
        want[name] = base[name] + plain_delta(sd, stem)
    assert got.keys() == base.keys()
    for k in base:
        torch.testing.assert_close(got[k], want[k], **ATOL, msg=k)


def test_no_warning_when_split_qkv_is_false(tmp_path, cli_run):
    sd, _ = split_file(SPLIT)
    meta = dict(SPLIT_META, ss_network_args=json.dumps({"split_qkv": "False"}))
    src = write(tmp_path / "split.safetensors", sd, meta)
    r = cli_run("merge", BFL, src, "-o", tmp_path / "m.safetensors", "--json")
    assert r.exit_code == 0, r.output
    assert not [w for w in json.loads(r.stdout)["warnings"] if "split_qkv" in w]


DIFFUSERS_PARTS = {  # kohya stem → diffusers modules of its parts, in row order
    "lora_unet_double_blocks_0_img_attn_qkv": [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.to_k",
        "transformer_blocks.0.attn.to_v",
    ],
    "lora_unet_double_blocks_0_txt_attn_qkv": [
        "transformer_blocks.0.attn.add_q_proj",
        "transformer_blocks.0.attn.add_k_proj",
        "transformer_blocks.0.attn.add_v_proj",
    ],
    "lora_unet_single_blocks_0_linear1": [
        "single_transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.0.attn.to_k",
        "single_transformer_blocks.0.attn.to_v",
        "single_transformer_blocks.0.proj_mlp",
    ],
}


def test_converts_to_diffusers_parts_of_rank_r(tmp_path, cli_run):
    """Each part becomes its own diffusers module with its own rank-r factors (the zero
    blocks of the saved up weight are dropped), as diffusers' converter splits a
    block-diagonal up weight."""
    sd, parts = split_file(SPLIT)
    src = write(tmp_path / "split.safetensors", sd, SPLIT_META)
    out = tmp_path / "d.safetensors"
    r = cli_run("convert", src, out, "--to", "diffusers", "--base", BFL, "--json")
    assert r.exit_code == 0, r.output
    assert any("split_qkv" in w for w in json.loads(r.stdout)["warnings"])
    got = load_adapter(out)
    for stem, names in DIFFUSERS_PARTS.items():
        for name, (down, up) in zip(names, parts[stem], strict=True):
            m = got.modules[f"transformer.{name}.weight"]
            assert m.rank == R
            assert torch.equal(m.A, down) and torch.equal(m.B, up)
            assert m.scale == ALPHA / (len(names) * R)
            torch.testing.assert_close(m.delta(), part_delta(down, up, len(names)), **ATOL)


def test_diffusers_converts_the_same_file_to_the_same_parts(tmp_path, cli_run):
    """diffusers' own reading of the file (its kohya Flux converter) against loratool's
    diffusers export: the same modules, the same rank r, the same ΔW (diffusers folds the
    scale into the factors)."""
    pytest.importorskip("diffusers")
    from diffusers import FluxPipeline

    double = [s for s in SPLIT if "double" in s]
    sd, _ = split_file(double)
    src = write(tmp_path / "split.safetensors", sd, SPLIT_META)
    out = tmp_path / "d.safetensors"
    assert cli_run("convert", src, out, "--to", "diffusers", "--base", BFL).exit_code == 0
    ref = FluxPipeline.lora_state_dict(str(src))
    ref = ref[0] if isinstance(ref, tuple) else ref
    mine = load_adapter(out)
    names = {k.removesuffix(".lora_A.weight") for k in ref if k.endswith(".lora_A.weight")}
    assert names == {n.removesuffix(".weight") for n in mine.modules}
    for name in names:
        A, B = ref[name + ".lora_A.weight"], ref[name + ".lora_B.weight"]
        m = mine.modules[name + ".weight"]
        assert A.shape[0] == m.rank == R, name
        torch.testing.assert_close(m.delta(), B @ A, **ATOL, msg=name)


@pytest.fixture(scope="module")
def flux_pipe(tmp_path_factory):
    pytest.importorskip("diffusers")
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers_models import tiny_clip, tiny_flux
    from image_models import tiny_vae
    from test_flux_t5 import tiny_t5

    vae = tiny_vae()
    transformer = tiny_flux(0)
    assert transformer.config.num_attention_heads * transformer.config.attention_head_dim == H
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=tiny_clip(0),
        tokenizer=None,
        text_encoder_2=tiny_t5(0),
        tokenizer_2=None,
        transformer=transformer,
    )
    root = tmp_path_factory.mktemp("flux-split") / "pipe"
    pipe.save_pretrained(root, safe_serialization=True)
    return root


def test_diffusers_fuses_the_file_as_loratool_merges_it(flux_pipe, tmp_path, cli_run):
    """The double blocks' split modules (and a plain one) into a FluxPipeline directory:
    loratool's merge equals diffusers' load_lora_weights + fuse_lora of the same file."""
    from diffusers import FluxPipeline

    double = [s for s in SPLIT if "double" in s]
    sd, _ = split_file(double)
    src = write(tmp_path / "split.safetensors", sd, SPLIT_META)
    out = tmp_path / "merged"
    r = cli_run("merge", flux_pipe, src, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    ops = {t["name"]: t for t in json.loads(r.stdout)["tensors"]}
    # each part lands in its own tensor at rank r
    assert "transformer.transformer_blocks.0.attn.add_k_proj.weight" in ops

    pipe = FluxPipeline.from_pretrained(flux_pipe, tokenizer=None, tokenizer_2=None)
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(str(src))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = pipe.transformer.state_dict()
    got = read_component(out / "transformer")
    changed = {k for k in base if not torch.equal(fused[k], base[k])}
    assert len(changed) == 7  # q, k, v twice and the plain proj
    assert {k for k in base if not torch.equal(got[k], base[k])} == changed
    for k in base:
        torch.testing.assert_close(got[k], fused[k], **ATOL, msg=k)


def test_linear1_into_the_pipeline_lands_in_q_k_v_and_the_mlp(flux_pipe, tmp_path, cli_run):
    """The single block's split module into the diffusers transformer: q, k, v, proj_mlp each
    get their part's ΔW (diffusers cannot load the tiny linear1: see the module docstring)."""
    stem = "lora_unet_single_blocks_0_linear1"
    sd, parts = split_file([stem], plain={})
    src = write(tmp_path / "split.safetensors", sd, SPLIT_META)
    out = tmp_path / "merged"
    assert cli_run("merge", flux_pipe, src, "-o", out).exit_code == 0
    base, got = read_component(flux_pipe / "transformer"), read_component(out / "transformer")
    want = dict(base)
    for name, (down, up) in zip(DIFFUSERS_PARTS[stem], parts[stem], strict=True):
        want[name + ".weight"] = base[name + ".weight"] + part_delta(down, up, 4)
    for k in base:
        torch.testing.assert_close(got[k], want[k], **ATOL, msg=k)


def test_kohya_export_keeps_the_saved_module(tmp_path, cli_run):
    sd, _ = split_file(SPLIT)
    src = write(tmp_path / "split.safetensors", sd, SPLIT_META)
    for base in ([], ["--base", BFL]):
        out = tmp_path / f"k{len(base)}.safetensors"
        assert cli_run("convert", src, out, "--to", "kohya", *base).exit_code == 0
        got = load_file(out)
        assert got.keys() == sd.keys()
        assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_compact_drops_only_unused_rank_columns():
    from loratool.adapter import build_module
    from loratool.image import compact

    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(3, 5, generator=g), torch.randn(4, 3, generator=g)
    B[:, 1] = 0
    m = build_module("w", "linear", A, B, 4.0)
    c = compact(m)
    assert c.rank == 2 and c.scale == m.scale == 4 / 3 and c.alpha == 8 / 3
    assert torch.equal(c.A, A[[0, 2]]) and torch.equal(c.B, B[:, [0, 2]])
    torch.testing.assert_close(c.delta(), m.delta(), rtol=0, atol=0)
    # rsLoRA: scale alpha/√r; compacted only where some alpha gives that float exactly
    for alpha in (1.0, 2.0, 3.0, 5.0, 7.0):
        m = build_module("w", "linear", A, B, alpha, True)
        c = compact(m)
        assert c is m or (c.rank == 2 and c.scale == m.scale and c.rslora)
        torch.testing.assert_close(c.delta(), m.delta(), rtol=0, atol=0)
    full = build_module("w", "linear", A, torch.randn(4, 3, generator=g), 5.0)
    assert compact(full) is full
    zero = build_module("w", "linear", A, torch.zeros(4, 3), 5.0)
    assert compact(zero) is zero
