"""diffusers' own files read and written as diffusers 0.42 reads and writes them: the alpha in the
safetensors header (``lora_adapter_metadata``), pipeline prefixes, and fuses that agree with
``loratool merge`` on tiny UNet, Flux-transformer and CLIP models built from configs."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers_models import (
    UNET_TARGETS,
    add_lora,
    base_state,
    lora_state,
    peft_deltas,
    save_base,
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
    sd, alphas, meta = cls.lora_state_dict(str(lora_file), return_lora_metadata=True)
    if component == "text_encoder":
        cls.load_lora_into_text_encoder(sd, alphas, model, adapter_name="x", metadata=meta)
    else:
        getattr(cls, f"load_lora_into_{component}")(
            sd, alphas, model, adapter_name="x", metadata=meta
        )
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
    save_adapter(adapter, tmp_path / "again.safetensors", "kohya")
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
