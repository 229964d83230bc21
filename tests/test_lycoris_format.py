"""LyCORIS files as lycoris-lora writes them, end to end.

Each file is made by the real package: ``lycoris.kohya.create_network`` on a tiny diffusers
UNet and CLIP text encoder (the way sd-scripts trains with ``--network_module lycoris.kohya``),
factors set at random, ``save_weights``. loratool reads it, merges it into the pipeline
directory those models were saved in, and the result must be the base plus the ΔW each lycoris
module applies in its forward pass; unmerge, round trips, inspect-rank, conversion to PEFT and
the refusals of partial or unknown files are checked on the same files.
"""

from __future__ import annotations

import json

import pytest
import torch
from image_models import read_component, save_sd_pipeline, tiny_clip, tiny_unet, write
from safetensors import safe_open
from safetensors.torch import load_file

from loratool.errors import LoratoolError
from loratool.formats import detect_format, load_adapter, save_adapter

pytest.importorskip("diffusers")
pytest.importorskip("lycoris")

ATOL = dict(rtol=0, atol=1e-6)

# lycoris' own "full" preset targets Anima's TimestepEmbedding and, by name, the diffusers
# UNet's time_embedding.linear_1 too: both would create one module (it asserts). This preset is
# "full" without that clash.
PRESET = """
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1"]
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
text_encoder_target_name = []
"""

ALGOS = {
    "loha": dict(algo="loha"),
    "loha-tucker": dict(algo="loha", use_tucker=True),
    "lokr": dict(algo="lokr", factor=2),
    "lokr-tucker": dict(algo="lokr", factor=2, use_tucker=True, decompose_both=True),
    "locon-tucker": dict(algo="locon", use_tucker=True),
}


def lycoris_network(unet, clip, preset, seed, **kw):
    from lycoris.kohya import create_network

    net = create_network(
        1.0, 2, 1.5, None, clip, unet, preset=str(preset), conv_dim=2, conv_alpha=1.0, **kw
    )
    net.apply_to(clip, unet, True, True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in sorted(net.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net


def forward_deltas(net, unet, clip) -> dict[str, torch.Tensor]:
    """ΔW per pipeline tensor (``unet.…``, ``text_encoder.…``) as each module's forward adds it."""
    from lycoris.modules.locon import LoConModule

    where = {}
    for comp, model in (("unet", unet), ("text_encoder", clip)):
        for name, mod in model.named_modules():
            where[id(mod)] = f"{comp}.{name}.weight"
    out = {}
    with torch.no_grad():
        for lora in net.loras:
            org = lora.org_module[0]
            if isinstance(lora, LoConModule):
                d = lora.get_diff_weight(1.0)[0]
            else:  # LoHa / LoKr: get_weight holds the scale once (see adapter/lycoris.py)
                d = lora.get_weight(lora.shape) * lora.scalar
            out[where[id(org)]] = d.reshape(org.weight.shape).detach().clone()
    return out


@pytest.fixture(scope="module", params=list(ALGOS))
def made(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    preset = root / "preset.toml"
    preset.write_text(PRESET)
    unet, clip = tiny_unet(0), tiny_clip(0)
    pipe = save_sd_pipeline(root / "pipe", unet, clip)
    net = lycoris_network(unet, clip, preset, seed=21, **ALGOS[request.param])
    path = root / f"{request.param}.safetensors"
    net.save_weights(
        str(path),
        torch.float32,
        {"ss_network_module": "lycoris.kohya", "ss_output_name": request.param},
    )
    deltas = forward_deltas(net, unet, clip)
    for lora in net.loras:
        lora.restore()
    return request.param, path, pipe, deltas


def test_read_merge_unmerge_equal_lycoris_forward(made, tmp_path, cli_run):
    algo, path, pipe, deltas = made
    assert detect_format(path) == "lycoris"
    adapter = load_adapter(path)
    assert len(adapter.modules) == len(deltas)
    kinds = {m.label.split("(")[0].split("+")[0] for m in adapter.modules.values()}
    assert kinds & {"loha", "lokr", "locon_tucker"}, kinds
    out = tmp_path / "merged"
    r = cli_run("merge", pipe, path, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["tensors_changed"] == len(deltas)
    for comp in ("unet", "text_encoder"):
        base, merged = read_component(pipe / comp), read_component(out / comp)
        for k, v in base.items():
            want = v + deltas[f"{comp}.{k}"] if f"{comp}.{k}" in deltas else v
            torch.testing.assert_close(merged[k], want, **ATOL, msg=f"{comp}.{k}")
    back = tmp_path / "back"
    r = cli_run("unmerge", out, path, "-o", back, "--check", pipe, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["max_abs_error"] < 1e-5


def test_round_trip_is_tensor_identical(made, tmp_path):
    _, path, _, _ = made
    again = save_adapter(load_adapter(path), tmp_path / "again.safetensors", "lycoris")
    a, b = load_file(path), load_file(again)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    with safe_open(path, "pt") as f, safe_open(again, "pt") as g:
        assert f.metadata() == g.metadata()


def test_catalog_inspect_and_convert_to_peft(made, tmp_path, cli_run):
    algo, path, pipe, deltas = made
    assert cli_run("add", path, "--task", "style", "--name", "lyco").exit_code == 0
    shown = json.loads(cli_run("show", "lyco", "--json").stdout)
    assert shown["format"] == "lycoris"
    r = cli_run("inspect-rank", path, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert len(report["modules"]) == len(deltas)
    # to PEFT (one component) exactly, then with --rank 1: energy kept per module
    dest = tmp_path / "peft"
    r = cli_run(
        "convert", path, dest, "--to", "peft", "--base", pipe, "--component", "unet", "--json"
    )
    assert r.exit_code == 0, r.output
    conv = json.loads(r.stdout)
    assert conv["converted"] and all(
        v["energy_kept"] > 1 - 1e-6 for v in conv["converted"].values()
    )
    peft = load_adapter(dest)
    for name, mod in peft.modules.items():
        torch.testing.assert_close(mod.delta(), deltas["unet." + name], rtol=0, atol=2e-6, msg=name)
    r = cli_run(
        "export",
        "lyco",
        tmp_path / "r1",
        "--format",
        "peft",
        "--base",
        pipe,
        "--component",
        "unet",
        "--rank",
        "1",
        "--json",
    )
    assert r.exit_code == 0, r.output
    conv = json.loads(r.stdout)
    assert all(v["rank_after"] == 1 for v in conv["converted"].values())
    assert any("truncated" in w for w in conv["warnings"])
    checked = 0
    for name, mod in load_adapter(tmp_path / "r1").modules.items():
        if "unet." + name not in conv["converted"]:
            continue  # a plain LoRA module of a LoCon file: written as it is
        checked += 1
        d = deltas["unet." + name].double().reshape(mod.base_shape[0], -1)
        S = torch.linalg.svdvals(d)
        kept = conv["converted"]["unet." + name]["energy_kept"]
        assert kept == pytest.approx(float(S[0] ** 2 / (S**2).sum()), rel=1e-4)
    assert checked > 0


def test_resize_and_combine_refuse_lycoris_modules_by_name(made, tmp_path, cli_run):
    algo, path, _, _ = made
    if algo.startswith("locon"):
        pytest.skip("a LoCon file's first modules are plain LoRA")
    for args in (
        ("resize", path, "--rank", "1", "-o", tmp_path / "r"),
        ("combine", path, path, "--method", "cat", "-o", tmp_path / "c"),
    ):
        r = cli_run(*args)
        assert r.exit_code == 1, r.output
        assert "works on LoRA B·A modules; this one is lo" in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1


# -- refusals: unknown or partial files ----------------------------------------------------------


def one_line(exc) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


@pytest.mark.parametrize(
    "tensors, message",
    [
        (
            {
                "lora_unet_a.hada_w1_a": torch.ones(4, 2),
                "lora_unet_a.hada_w1_b": torch.ones(2, 3),
                "lora_unet_a.hada_w2_a": torch.ones(4, 2),
                "lora_unet_a.hada_w2_b": torch.ones(2, 3),
            },
            "without alpha",
        ),
        (
            {"lora_unet_a.lokr_w2": torch.ones(2, 2), "lora_unet_a.alpha": torch.tensor(1.0)},
            "neither lokr_w1 nor lokr_w1_a/b",
        ),
        (
            {
                "lora_unet_a.lokr_w1_a": torch.ones(2, 1),
                "lora_unet_a.lokr_w2": torch.ones(2, 2),
                "lora_unet_a.alpha": torch.tensor(1.0),
            },
            "come together",
        ),
        (
            {
                "lora_unet_a.lora_down.weight": torch.ones(2, 3, 1, 1),
                "lora_unet_a.lora_mid.weight": torch.ones(2, 2, 3, 3),
                "lora_unet_a.lora_up.weight": torch.ones(4, 2, 1, 1),
            },
            "LoCon module without alpha",
        ),
        (
            {
                "lora_te_a.hada_w1_a": torch.ones(4, 2),
                "lora_te_a.hada_w1_b": torch.ones(2, 3),
                "lora_te_a.hada_w2_a": torch.ones(4, 2),
                "lora_te_a.hada_w2_b": torch.ones(2, 3),
                "lora_te_a.alpha": torch.tensor(1.0),
                "lora_te1_b.lokr_w1": torch.ones(2, 2),
                "lora_te1_b.lokr_w2": torch.ones(2, 2),
                "lora_te1_b.alpha": torch.tensor(1.0),
            },
            "mixes lora_te_",
        ),
        (
            {
                "lora_unet_a.hada_w1_a": torch.ones(4, 2),
                "lora_unet_a.hada_w1_b": torch.ones(2, 3),
                "lora_unet_a.hada_w2_a": torch.ones(4, 2),
                "lora_unet_a.hada_w2_b": torch.ones(2, 3),
                "lora_unet_a.alpha": torch.tensor(1.0),
                "lora_unet_a.dora_scale": torch.ones(4, 1),
            },
            "dora_scale",
        ),
        (
            {
                "lora_unet_a.hada_w1_a": torch.ones(4, 2),
                "lora_unet_a.hada_w1_b": torch.ones(2, 3),
                "lora_unet_a.hada_w2_a": torch.ones(4, 2),
                "lora_unet_a.hada_w2_b": torch.ones(2, 3),
                "lora_unet_a.alpha": torch.tensor(0.0),
            },
            "alpha is 0",
        ),
        (
            {
                "lora_unet_a.hada_w1_a": torch.ones(4, 2),
                "lora_unet_a.hada_w1_b": torch.ones(2, 3),
                "lora_unet_a.hada_w2_a": torch.ones(4, 2),
                "lora_unet_a.hada_w2_b": torch.ones(2, 3),
                "lora_unet_a.alpha": torch.tensor(1.0),
                "lora_unet_b.oft_blocks": torch.ones(2, 2, 2),
            },
            "OFT",
        ),
        (
            {
                "lora_unet_a.lokr_w1": torch.ones(2, 2),
                "lora_unet_a.lokr_w2": torch.ones(2, 2),
                "lora_unet_a.hada_w1_a": torch.ones(4, 2),
                "lora_unet_a.alpha": torch.tensor(1.0),
            },
            "mixes LyCORIS LoHa and LoKr",
        ),
        (
            {
                "lora_unet_a.lokr_w1": torch.ones(2, 2),
                "lora_unet_a.lokr_w2": torch.ones(2, 2),
                "lora_unet_a.alpha": torch.tensor(1.0),
                "lora_unet_a.lokr_w9": torch.ones(1),
            },
            "not a tensor of any LyCORIS algorithm",
        ),
    ],
    ids=[
        "loha-no-alpha",
        "lokr-no-w1",
        "lokr-half-w1",
        "locon-no-alpha",
        "mixed-te-prefixes",
        "dora",
        "alpha-0",
        "oft",
        "mixed-algos",
        "unknown-key",
    ],
)
def test_unknown_or_partial_files_are_refused_in_one_line(tensors, message, tmp_path, cli_run):
    path = write(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(LoratoolError) as exc:
        load_adapter(path)
    assert message in one_line(exc.value)
    r = cli_run("inspect-rank", path)
    assert r.exit_code == 1 and message in r.stderr and r.stderr.count("\n") == 1


def test_written_prefixes_know_every_component(tmp_path):
    """The LyCORIS writer names text encoders as the kohya writer does, knowing the adapter's
    other components (two encoders: lora_te1_/lora_te2_, never lora_te_ beside lora_te2_), and
    keeps sd-scripts' lora_unet_ for SD3's context_embedder beside MMDiT-named modules."""
    from loratool.adapter import Adapter, LohaModule

    def loha(name, out=4, inp=3):
        g = torch.Generator().manual_seed(len(name))
        w = [torch.randn(s, generator=g) for s in ((out, 2), (2, inp), (out, 2), (2, inp))]
        return LohaModule(name, "linear", *w, alpha=1.0)

    names = [
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "transformer.joint_blocks.0.x_block.attn.proj.weight",
        "transformer.context_embedder.weight",
    ]
    adapter = Adapter({n: loha(n) for n in names})
    out = save_adapter(adapter, tmp_path / "x.safetensors", "lycoris")
    stems = {k.split(".")[0] for k in load_file(out)}
    assert stems == {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_unet_joint_blocks_0_x_block_attn_proj",
        "lora_unet_context_embedder",
    }
