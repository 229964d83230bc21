"""kohya / LyCORIS exports whose tensors changed (resize, LyCORIS → LoRA) carry metadata that
describes the tensors written; the training history is kept.

The references: the tensors of the written file read back (ranks = ``lora_down`` rows, alphas =
the ``.alpha`` tensors, split as sd-scripts splits ``network_dim`` from ``conv_dim``: k×k
convolutions apart), sd-scripts' ``resize_lora.py`` for what a resize writes (``ss_network_dim``
/ ``ss_network_alpha`` the new rank and alpha, "Dynamic" for per-module ranks) and its
``addnet_hash_safetensors`` (sha256 of the bytes after the header) for ``sshs_model_hash``,
written out here."""

from __future__ import annotations

import hashlib
import io
import json
import struct

import pytest
import safetensors.torch
import torch
from conftest import FIXTURES
from safetensors.torch import load_file, save_file

from loratool.tensors.header import read_header

LINEAR = ("lora_unet_mid_block_attentions_0_proj_in", "lora_te_text_model_encoder_layers_0_mlp_fc1")
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # 3×3: sd-scripts' conv_dim
HISTORY = {
    "ss_network_module": "networks.lora",
    "ss_steps": "1200",
    "ss_epoch": "3",
    "ss_learning_rate": "0.0001",
    "ss_output_name": "my-style",
    "ss_training_comment": "trained on my cat",
    "ss_tag_frequency": json.dumps({"10_cat": {"cat": 10, "sofa": 2}}),
    "ss_sd_model_name": "v1-5-pruned.safetensors",
    "modelspec.title": "my-style",
    "modelspec.trigger_phrase": "cat",
    "modelspec.architecture": "stable-diffusion-v1/lora",
}
ARGS = {
    "conv_dim": "4",
    "conv_alpha": "2",
    "block_dims": ",".join(["4"] * 25),
    "block_alphas": ",".join(["8"] * 25),
    "dropout": "0.1",  # training history: stays
}


def addnet_hash(data: bytes) -> str:
    """sd-scripts' addnet_hash_safetensors: sha256 of everything after the header."""
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n :]).hexdigest()


def save_like_sd_scripts(path, tensors: dict, metadata: dict):
    """LoRANetwork.save_weights: hashes precalculated on the tensors with the ss_* metadata
    (train_util.precalculate_safetensors_hashes), then save_file."""
    meta = dict(metadata)
    buf = safetensors.torch.save(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    meta["sshs_model_hash"] = addnet_hash(buf)
    b = io.BytesIO(buf)
    b.seek(0x100000)
    meta["sshs_legacy_hash"] = hashlib.sha256(b.read(0x10000)).hexdigest()[:8]
    meta["modelspec.hash_sha256"] = "0x" + meta["sshs_model_hash"]
    save_file(tensors, str(path), metadata=meta)
    return path


def spectrum_factors(g, out, inn, sigmas, kernel=None):
    """up (out×r), down (r×in[×k×k]) with up·down's singular values ``sigmas``."""
    r = len(sigmas)
    u, _ = torch.linalg.qr(torch.randn(out, r, generator=g))
    flat = inn * (kernel * kernel if kernel else 1)
    v, _ = torch.linalg.qr(torch.randn(flat, r, generator=g))
    up = u * torch.tensor(sigmas).sqrt()
    down = torch.tensor(sigmas).sqrt()[:, None] * v.T
    if kernel:
        return up.reshape(out, r, 1, 1).contiguous(), down.reshape(
            r, inn, kernel, kernel
        ).contiguous()
    return up.contiguous(), down.contiguous()


@pytest.fixture
def source(tmp_path):
    """r = 4 everywhere, alpha 8 (conv alpha 2); the first linear module nearly rank 1, the
    others flat, so an energy rule keeps different ranks."""
    g = torch.Generator().manual_seed(0)
    spectra = {LINEAR[0]: [10.0, 0.05, 0.05, 0.05], LINEAR[1]: [1.0] * 4}
    tensors = {}
    for stem in LINEAR:
        up, down = spectrum_factors(g, 16, 12, spectra[stem])
        tensors |= {f"{stem}.lora_up.weight": up, f"{stem}.lora_down.weight": down}
        tensors[f"{stem}.alpha"] = torch.tensor(8.0)
    up, down = spectrum_factors(g, 8, 6, [1.0] * 4, kernel=3)
    tensors |= {f"{CONV}.lora_up.weight": up, f"{CONV}.lora_down.weight": down}
    tensors[f"{CONV}.alpha"] = torch.tensor(2.0)
    meta = {**HISTORY, "ss_network_dim": "4", "ss_network_alpha": "8.0"}
    meta["ss_network_args"] = json.dumps(ARGS)
    return save_like_sd_scripts(tmp_path / "my-style.safetensors", tensors, meta)


def facts_of(path) -> dict:
    """What sd-scripts would state for these tensors: {dim, alpha, conv_dim, conv_alpha}, each
    a set of the values modules have."""
    t = load_file(path)
    out = {"dim": set(), "alpha": set(), "conv_dim": set(), "conv_alpha": set()}
    for key, down in t.items():
        if not key.endswith(".lora_down.weight"):
            continue
        stem = key.removesuffix(".lora_down.weight")
        conv = down.dim() == 4 and down.shape[2:] != (1, 1)
        out["conv_dim" if conv else "dim"].add(down.shape[0])
        out["conv_alpha" if conv else "alpha"].add(float(t[stem + ".alpha"]))
    return out


def metadata(path) -> dict:
    return read_header(path).metadata


def history_kept(meta: dict) -> None:
    for k, v in HISTORY.items():
        assert meta[k] == v, k


def export(cli_run, name, dest) -> dict:
    r = cli_run("export", name, dest, "--format", "kohya")
    assert r.exit_code == 0, r.output
    return metadata(dest)


def test_an_unchanged_export_keeps_every_field(source, tmp_path, cli_run):
    out = tmp_path / "same.safetensors"
    assert cli_run("convert", source, out, "--to", "kohya").exit_code == 0
    before, after = metadata(source), metadata(out)
    # the tensor bytes are the same (float32, name order): so are their hashes
    assert addnet_hash(out.read_bytes()) == addnet_hash(source.read_bytes())
    before.pop("sshs_legacy_hash")  # of the whole file's bytes at 1 MiB: sd tools recompute it
    assert after == before


def test_resize_to_one_rank_states_the_new_rank_and_alpha(source, tmp_path, cli_run):
    assert cli_run("add", source, "--task", "style", "--name", "s").exit_code == 0
    r = cli_run("resize", "s", "--rank", "2", "--as", "s2")
    assert r.exit_code == 0, r.output
    out = tmp_path / "s2.safetensors"
    meta = export(cli_run, "s2", out)
    facts = facts_of(out)
    # sd-scripts' resize_lora: the new rank, and the alpha that keeps each module's scale
    assert facts == {"dim": {2}, "alpha": {4.0}, "conv_dim": {2}, "conv_alpha": {1.0}}
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("2", "4.0")
    args = json.loads(meta["ss_network_args"])
    assert (args["conv_dim"], args["conv_alpha"]) == ("2", "1.0")
    assert "block_dims" not in args and "block_alphas" not in args  # per-block ranks of the old
    assert args["dropout"] == "0.1"
    history_kept(meta)
    assert meta["sshs_model_hash"] == addnet_hash(out.read_bytes())
    assert meta["sshs_model_hash"] != metadata(source)["sshs_model_hash"]
    assert "sshs_legacy_hash" not in meta and "modelspec.hash_sha256" not in meta
    # the catalog's training facts of the resized adapter agree
    shown = json.loads(cli_run("show", "s2", "--json").stdout)["training"]
    assert (shown["network_dim"], shown["network_alpha"]) == ("2", "4.0")
    assert shown["steps"] == "1200"


def test_resize_by_energy_states_dynamic_ranks(source, tmp_path, cli_run):
    assert cli_run("add", source, "--task", "style", "--name", "s").exit_code == 0
    r = cli_run("resize", "s", "--energy", "0.9", "--as", "se")
    assert r.exit_code == 0, r.output
    out = tmp_path / "se.safetensors"
    meta = export(cli_run, "se", out)
    facts = facts_of(out)
    assert facts["dim"] == {1, 4}  # the near-rank-1 module and the flat one
    assert facts["conv_dim"] == {4} and facts["conv_alpha"] == {2.0}
    # sd-scripts' resize_lora with a dynamic method
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("Dynamic", "Dynamic")
    args = json.loads(meta["ss_network_args"])
    assert (args["conv_dim"], args["conv_alpha"]) == ("4", "2")  # true of the conv module
    assert "block_dims" not in args and "block_alphas" not in args
    history_kept(meta)
    assert meta["sshs_model_hash"] == addnet_hash(out.read_bytes())


def test_a_file_whose_header_lies_is_corrected_on_export(source, tmp_path, cli_run):
    """Without any history of the change (a file edited elsewhere): every module has rank 4
    and alpha 8, the header says 32 and 16: made true of the tensors. (Modules that differ
    among themselves leave the stated default alone: block-wise files state one no module
    need have; tests/test_formats.py's round trip keeps such a header byte for byte.)"""
    t = load_file(source)
    meta = metadata(source) | {"ss_network_dim": "32", "ss_network_alpha": "16.0"}
    lying = tmp_path / "lying.safetensors"
    save_file(t, str(lying), metadata=meta)
    out = tmp_path / "fixed.safetensors"
    assert cli_run("convert", lying, out, "--to", "kohya").exit_code == 0
    got = metadata(out)
    assert (got["ss_network_dim"], got["ss_network_alpha"]) == ("4", "8.0")
    history_kept(got)


def test_loha_to_kohya_states_a_lora_network(tmp_path, cli_run):
    """A LyCORIS LoHa (ss_network_module lycoris.kohya, algo loha) written as kohya LoRA: the
    module and algorithm are sd-scripts' networks.lora, dim/alpha those of the factors."""
    src = FIXTURES / "adapters" / "conv-loha.safetensors"
    out = tmp_path / "k.safetensors"
    r = cli_run("convert", src, out, "--to", "kohya", "--rank", "2")
    assert r.exit_code == 0, r.output
    meta, before = metadata(out), metadata(src)
    assert meta["ss_network_module"] == "networks.lora"
    args = json.loads(meta["ss_network_args"])
    assert "algo" not in args and "use_tucker" not in args
    facts = facts_of(out)
    dims = facts["dim"] | facts["conv_dim"]
    assert dims == {2}
    assert meta["ss_network_dim"] == "2"
    alphas = facts["alpha"]
    assert meta["ss_network_alpha"] == (str(alphas.pop()) if len(alphas) == 1 else "Dynamic")
    for k in ("ss_base_model_version", "ss_output_name"):
        assert meta[k] == before[k]


def test_an_unchanged_lycoris_export_keeps_its_metadata(tmp_path, cli_run):
    src = FIXTURES / "adapters" / "conv-loha.safetensors"
    out = tmp_path / "l.safetensors"
    assert cli_run("convert", src, out, "--to", "lycoris").exit_code == 0
    assert metadata(out) == metadata(src)
