"""diffusers' own files read and written as diffusers 0.42 reads and writes them: the alpha in the
safetensors header (``lora_adapter_metadata``), pipeline prefixes, and fuses that agree with
``loratool merge`` on tiny UNet, Flux-transformer and CLIP models built from configs."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers_models import (
    CLIP_TARGETS,
    FLUX_TARGETS,
    UNET_TARGETS,
    add_lora,
    base_state,
    lora_state,
    peft_deltas,
    save_base,
    tiny_clip,
    tiny_flux,
    tiny_unet,
)
from safetensors.torch import load_file

from loratool.formats import load_adapter, save_adapter

pytest.importorskip("diffusers")


def fused_by_diffusers(mixin: str, component: str, model, lora_file):
    """``model`` with ``lora_file`` loaded the way ``<Pipeline>.load_lora_weights`` loads it
    (``lora_state_dict`` with the header metadata, then ``load_lora_into_<component>``) and
    fused with peft's merge, as ``pipe.fuse_lora`` does; returns its weights.

    (``model.load_lora_adapter(path)`` straight on a model would not do: without
    ``use_safetensors=True`` diffusers 0.42 reads the file through its pickle branch, which
    drops the header, and merges at scale 1.)"""
    import diffusers
    from peft.tuners.tuners_utils import BaseTunerLayer

    cls = getattr(diffusers.loaders, mixin)
    if mixin == "FluxLoraLoaderMixin":
        sd, _alphas, meta = cls.lora_state_dict(
            str(lora_file), return_alphas=True, return_lora_metadata=True
        )
        cls.load_lora_into_transformer(
            sd, network_alphas=_alphas, transformer=model, adapter_name="x", metadata=meta
        )
    else:
        sd, alphas, meta = cls.lora_state_dict(str(lora_file), return_lora_metadata=True)
        load = getattr(cls, f"load_lora_into_{component}")
        load(sd, alphas, model, adapter_name="x", metadata=meta)
    n = 0
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=["x"])
            n += 1
    assert n > 0
    return base_state(model)


def assert_same_weights(merged: dict, ref: dict, base: dict, atol=1e-6) -> int:
    """merged == ref within ``atol`` (float32); returns how many tensors the merge changed."""
    assert set(merged) == set(ref)
    changed = 0
    for k in ref:
        torch.testing.assert_close(merged[k].float(), ref[k].float(), rtol=0, atol=atol, msg=k)
        changed += 0 if torch.equal(merged[k], base[k]) else 1
    return changed


@pytest.fixture(scope="module")
def unet_lora(tmp_path_factory):
    """A UNet LoRA saved by diffusers' StableDiffusionPipeline.save_lora_weights: alpha ≠ r, a
    rank_pattern and an alpha_pattern, all of it only in the header."""
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("unet-lora")
    unet = add_lora(
        tiny_unet(),
        UNET_TARGETS,
        r=4,
        alpha=8,
        rank_pattern={"conv1": 2},
        alpha_pattern={"to_k": 3},
    )
    StableDiffusionPipeline.save_lora_weights(
        root / "lora",
        unet_lora_layers=lora_state(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        safe_serialization=True,
    )
    return root / "lora" / "pytorch_lora_weights.safetensors", peft_deltas(unet)


def test_header_alpha_gives_the_scale_peft_trained_with(unet_lora):
    path, deltas = unet_lora
    assert not any(k.endswith(".alpha") for k in load_file(path))  # only the header has it
    adapter = load_adapter(path)
    seen = 0
    for name, ref in deltas.items():
        mod = adapter.modules["unet." + name]
        torch.testing.assert_close(mod.delta(), ref, rtol=0, atol=1e-6, msg=name)
        seen += 1
    assert seen == len(adapter.modules) > 20
    scales = {m.name.rsplit(".", 2)[-2]: m.scale for m in adapter.modules.values()}
    assert scales["to_q"] == 2.0 and scales["to_k"] == 0.75 and scales["conv1"] == 4.0


def test_header_alpha_merge_equals_diffusers_fuse(unet_lora, tmp_path, cli_run):
    path, _ = unet_lora
    base = save_base(tiny_unet(), tmp_path / "unet.safetensors")
    out = tmp_path / "merged"
    r = cli_run("merge", base, path, "-o", out)
    assert r.exit_code == 0, r.output
    merged = load_file(next(out.glob("*.safetensors")) if out.is_dir() else out)
    ref = fused_by_diffusers("StableDiffusionLoraLoaderMixin", "unet", tiny_unet(), path)
    assert assert_same_weights(merged, ref, load_file(base)) > 20


def test_header_alpha_survives_a_round_trip(unet_lora, tmp_path):
    path, _ = unet_lora
    adapter = load_adapter(path)
    save_adapter(adapter, tmp_path / "again.safetensors", "diffusers")
    a, b = load_file(path), load_file(tmp_path / "again.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    again = load_adapter(tmp_path / "again.safetensors")
    assert {n: m.scale for n, m in again.modules.items()} == {
        n: m.scale for n, m in adapter.modules.items()
    }


def test_header_that_contradicts_the_tensors_is_refused(unet_lora, tmp_path):
    from safetensors.torch import save_file

    from loratool.errors import ValidationError
    from loratool.tensors.header import read_header

    path, _ = unet_lora
    meta = json.loads(read_header(path).metadata["lora_adapter_metadata"])
    meta["unet.r"] = 16
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(path), bad, metadata={"lora_adapter_metadata": json.dumps(meta)})
    with pytest.raises(ValidationError, match="says r=16 but the tensors have rank 4"):
        load_adapter(bad)
    meta["unet.r"], meta["unet.use_dora"] = 4, True
    save_file(load_file(path), bad, metadata={"lora_adapter_metadata": json.dumps(meta)})
    with pytest.raises(ValidationError, match="DoRA"):
        load_adapter(bad)


# -- loratool's kohya and diffusers exports, read by diffusers 0.42 ---------------------------

CASES = {
    # name: (builder, targets, diffusers mixin, load_lora_into_<component>, extra LoraConfig)
    "unet": (tiny_unet, UNET_TARGETS, "StableDiffusionLoraLoaderMixin", "unet", {}),
    "flux": (tiny_flux, FLUX_TARGETS, "FluxLoraLoaderMixin", "transformer", {}),
    "clip": (tiny_clip, CLIP_TARGETS, "StableDiffusionLoraLoaderMixin", "text_encoder", {}),
    "unet_rslora": (
        tiny_unet,
        UNET_TARGETS,
        "StableDiffusionLoraLoaderMixin",
        "unet",
        # rank_pattern on proj_in, not on an attention projection: diffusers 0.42 names the
        # alphas of kohya attention modules ``…processor.to_v_lora.down.weight`` and its
        # alpha_pattern then matches nothing (peft warns and uses the common alpha), so a
        # per-module alpha on to_q/k/v/out is lost by diffusers itself (ComfyUI and sd-scripts
        # read it). loratool's own reading of it is checked by the round trip below.
        {"use_rslora": True, "rank_pattern": {"proj_in": 2}, "alpha_pattern": {"conv1": 5}},
    ),
    "unet_attn_patterns": (
        tiny_unet,
        UNET_TARGETS,
        "StableDiffusionLoraLoaderMixin",
        "unet",
        {"use_rslora": True, "rank_pattern": {"to_v": 2}, "alpha_pattern": {"to_k": 5}},
    ),
}


def write_peft_dir(model, folder):
    """The PEFT layout peft's save_pretrained writes: adapter_config.json and the factors
    under base_model.model."""
    from safetensors.torch import save_file

    folder.mkdir()
    cfg = model.peft_config["default"].to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    cfg["peft_type"] = "LORA"
    (folder / "adapter_config.json").write_text(json.dumps(cfg, default=str))
    tensors = {"base_model.model." + k: v for k, v in lora_state(model).items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    out = {}
    for name, (build, targets, mixin, component, extra) in CASES.items():
        root = tmp_path_factory.mktemp(name)
        model = add_lora(build(), targets, r=4, alpha=6, **extra)
        out[name] = dict(
            peft=write_peft_dir(model, root / "peft"),
            base=save_base(build(), root / "base.safetensors"),
            build=build,
            mixin=mixin,
            component=component,
            deltas=peft_deltas(model),
        )
    return out


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_diffusers_fuses_loratool_exports_as_loratool_merges(cases, case, fmt, tmp_path, cli_run):
    if case == "unet_attn_patterns" and fmt == "kohya":
        pytest.skip("diffusers 0.42 drops per-module alphas of kohya attention modules (see CASES)")
    c = cases[case]
    out = tmp_path / f"lora.{fmt}.safetensors"
    r = cli_run("convert", c["peft"], out, "--to", fmt, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    if "rslora" in case and fmt == "kohya":
        assert any("rsLoRA" in w for w in report["warnings"])
    keys = load_file(out)
    if fmt == "kohya":
        prefix = {"unet": "lora_unet_", "flux": "lora_transformer_", "clip": "lora_te_"}[
            case.split("_")[0]
        ]
        assert all(k.startswith(prefix) for k in keys), sorted(keys)[:3]
        assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
        if case == "clip":
            assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    else:
        component = c["component"]
        assert all(k.startswith(component + ".") for k in keys)
    merged_dir = tmp_path / "merged"
    r = cli_run("merge", c["base"], out, "-o", merged_dir)
    assert r.exit_code == 0, r.output
    merged = load_file(
        next(merged_dir.glob("*.safetensors")) if merged_dir.is_dir() else merged_dir
    )
    ref = fused_by_diffusers(c["mixin"], c["component"], c["build"](), out)
    base = load_file(c["base"])
    assert assert_same_weights(merged, ref, base) == len(c["deltas"])
    # and both are the peft-trained ΔW
    for name, d in c["deltas"].items():
        torch.testing.assert_close(merged[name] - base[name], d, rtol=0, atol=2e-6, msg=name)


@pytest.mark.parametrize("case", ["unet", "clip", "unet_rslora", "unet_attn_patterns"])
def test_peft_kohya_peft_round_trip(cases, case, tmp_path, cli_run):
    """PEFT → kohya → PEFT (names resolved against the base): A and B bit-identical, every
    module's scale equal (rsLoRA comes back as the alpha that carries it)."""
    c = cases[case]
    k = tmp_path / "k.safetensors"
    assert cli_run("convert", c["peft"], k, "--to", "kohya").exit_code == 0
    r = cli_run("convert", k, tmp_path / "back", "--to", "peft", "--base", c["base"])
    assert r.exit_code == 0, r.output
    a, b = load_adapter(c["peft"]), load_adapter(tmp_path / "back")
    assert set(a.modules) == set(b.modules)
    for n, m in a.modules.items():
        assert torch.equal(m.A, b.modules[n].A) and torch.equal(m.B, b.modules[n].B), n
        assert m.scale == pytest.approx(b.modules[n].scale, rel=1e-15, abs=0), n


def test_kohya_without_base_unflattens_known_names(cases, tmp_path, cli_run):
    c = cases["unet"]
    k = tmp_path / "k.safetensors"
    assert cli_run("convert", c["peft"], k, "--to", "kohya").exit_code == 0
    r = cli_run("convert", k, tmp_path / "d.safetensors", "--to", "diffusers")
    assert r.exit_code == 0, r.output
    d = load_file(tmp_path / "d.safetensors")
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in d


def test_module_names_flatten_and_unflatten_for_real_models():
    from peft_models import make_case  # noqa: F401  (the tiny LLMs live there)

    from loratool.formats import naming

    paths = []
    for build in (tiny_unet, tiny_flux, tiny_clip):
        m = build()
        paths += [
            n
            for n, mod in m.named_modules()
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding))
        ]
    paths += ["text_model." + p for p in paths if p.startswith("encoder.layers.")]
    paths += [
        f"model.layers.0.{p}"
        for p in (
            "self_attn.q_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.down_proj",
        )
    ] + ["model.embed_tokens", "lm_head", "transformer.h.0.attn.c_attn"]
    assert len(paths) > 100
    for p in paths:
        assert naming.unflatten(naming.flatten(p)) == p, p
    assert naming.unflatten("down_0_proj") is None  # 'down' alone is no known word


# -- older diffusers layouts, as diffusers itself reads them ---------------------------------


def test_attn_procs_and_lora_down_up_keys_read_as_diffusers_reads_them(cases, tmp_path, cli_run):
    from safetensors.torch import save_file

    c = cases["unet"]
    cur = tmp_path / "cur.safetensors"
    assert cli_run("convert", c["peft"], cur, "--to", "diffusers").exit_code == 0
    old = {}
    for k, v in load_file(cur).items():
        k = k.replace(".lora_A.weight", ".lora.down.weight").replace(
            ".lora_B.weight", ".lora.up.weight"
        )
        for p in ("to_q", "to_k", "to_v"):
            k = k.replace(f".{p}.lora.", f".processor.{p}_lora.")
        k = k.replace(".to_out.0.lora.", ".processor.to_out_lora.")
        old[k] = v
    assert any("processor.to_q_lora.down" in k for k in old)
    assert any(k.endswith("proj_in.lora.down.weight") for k in old)
    path = tmp_path / "old.safetensors"
    save_file(old, str(path))  # older files carry no header: scale 1
    merged_dir = tmp_path / "m"
    assert cli_run("merge", c["base"], path, "-o", merged_dir).exit_code == 0
    merged = load_file(
        next(merged_dir.glob("*.safetensors")) if merged_dir.is_dir() else merged_dir
    )
    ref = fused_by_diffusers("StableDiffusionLoraLoaderMixin", "unet", tiny_unet(), path)
    assert assert_same_weights(merged, ref, load_file(c["base"])) == len(c["deltas"])


# -- refusals ---------------------------------------------------------------------------------


def _kohya(tmp_path, tensors, metadata=None):
    from safetensors.torch import save_file

    p = tmp_path / "x.safetensors"
    save_file(tensors, str(p), metadata=metadata)
    return p


@pytest.mark.parametrize(
    "tensors, metadata, message",
    [
        (
            {
                "lora_unet_a.lora_down.weight": torch.ones(2, 4),
                "lora_unet_a.lora_up.weight": torch.ones(4, 2),
            },
            {"ss_network_module": "lycoris.kohya"},
            "LyCORIS file .* without alpha",
        ),
        (
            {
                "lora_unet_a.lora_down.weight": torch.ones(2, 4),
                "lora_unet_a.lora_up.weight": torch.ones(4, 2),
                "lora_unet_a.alpha": torch.tensor(1.0),
                "lora_unet_b.lora_down.weight": torch.ones(2, 4),
                "lora_unet_b.lora_up.weight": torch.ones(4, 2),
            },
            None,
            "lora_unet_b: has no alpha while 1 other modules have one",
        ),
        (
            {
                "lora_te_a.lora_down.weight": torch.ones(2, 4),
                "lora_te_a.lora_up.weight": torch.ones(4, 2),
                "lora_te1_b.lora_down.weight": torch.ones(2, 4),
                "lora_te1_b.lora_up.weight": torch.ones(4, 2),
            },
            None,
            "mixes lora_te_ .* and lora_te1_",
        ),
        (
            {
                "lora_unet_a.lora_down.weight": torch.ones(2, 4),
                "lora_unet_a.lora_up.weight": torch.ones(4, 2),
                "unet.b.lora_A.weight": torch.ones(2, 4),
                "unet.b.lora_B.weight": torch.ones(4, 2),
            },
            None,
            "unet.b.lora_A.weight: not a kohya LoRA tensor",
        ),
        (
            {
                "unet.a.lora_A.weight": torch.ones(2, 4),
                "unet.a.lora_B.weight": torch.ones(4, 2),
                "b.lora_A.weight": torch.ones(2, 4),
                "b.lora_B.weight": torch.ones(4, 2),
            },
            None,
            "mixes component-prefixed keys",
        ),
        (
            {
                "lora_unet_a.lora_down.weight": torch.ones(2, 4),
                "lora_unet_a.lora_up.weight": torch.ones(4, 2),
                "lora_unet_a.alpha": torch.tensor(0.0),
            },
            None,
            "alpha is 0",
        ),
        (
            {
                "lora_unet_a.hada_w1_a": torch.ones(2, 4),
                "lora_unet_a.lora_down.weight": torch.ones(2, 4),
            },
            None,
            "LyCORIS",
        ),
    ],
)
def test_unknown_or_partial_files_are_refused_in_one_line(
    tmp_path, cli_run, tensors, metadata, message
):
    import re

    p = _kohya(tmp_path, tensors, metadata)
    r = cli_run("convert", p, tmp_path / "o", "--to", "peft")
    assert r.exit_code == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert re.search(message, r.stderr), r.stderr
    assert not (tmp_path / "o").exists()
