"""LyCORIS kinds inside loratool: canonical (catalog) round trip, the streaming merge and
unmerge block by block, inspect-rank from the factors and the conversion to LoRA, each checked
against the ΔW lycoris-lora's own modules apply (built here on tiny layers)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import loratool.merge.engine as engine
from loratool.adapter import Adapter, LoraModule, module_class
from loratool.formats.canonical import canonical_bytes, canonical_from_tensors
from loratool.merge import AdapterInput, merge, merge_into
from loratool.rank import RankRule
from loratool.tolora import to_lora
from loratool.transform import inspect

pytest.importorskip("lycoris")
from lycoris.modules.locon import LoConModule  # noqa: E402
from lycoris.modules.loha import LohaModule as LyLoha  # noqa: E402
from lycoris.modules.lokr import LokrModule as LyLokr  # noqa: E402


def layers():
    torch.manual_seed(3)
    return {
        "lin.weight": torch.nn.Linear(64, 48, bias=False),
        "conv.weight": torch.nn.Conv2d(32, 24, 3, padding=1, bias=False),
        "conv2.weight": torch.nn.Conv2d(32, 24, 3, padding=1, bias=False),
        "lin2.weight": torch.nn.Linear(64, 48, bias=False),
    }


def lycoris_modules(ls):
    """name → (lycoris module, our kind); factors random (lycoris zero-initialises some)."""
    made = {
        "lin.weight": (LyLoha("a", ls["lin.weight"], 1.0, lora_dim=3, alpha=2.0), "loha"),
        "conv.weight": (
            LyLokr("b", ls["conv.weight"], 1.0, lora_dim=2, alpha=3.0, use_tucker=True),
            "lokr",
        ),
        "conv2.weight": (
            LoConModule("c", ls["conv2.weight"], 1.0, lora_dim=2, alpha=1.0, use_tucker=True),
            "locon_tucker",
        ),
        "lin2.weight": (
            LyLokr("d", ls["lin2.weight"], 1.0, lora_dim=2, alpha=4.0, decompose_both=True),
            "lokr",
        ),
    }
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for mod, _ in made.values():
            for _, p in sorted(mod.named_parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return made


def reference_delta(lyco, layer):
    """What lycoris' forward adds (LoCon's get_diff_weight scales once; LoHa/LoKr's twice)."""
    with torch.no_grad():
        if isinstance(lyco, LoConModule):
            return lyco.get_diff_weight(1.0)[0].reshape(layer.weight.shape)
        return (lyco.get_weight(lyco.shape) * lyco.scalar).reshape(layer.weight.shape)


@pytest.fixture(scope="module")
def setup():
    ls = layers()
    made = lycoris_modules(ls)
    mods = {}
    for name, (lyco, kind) in made.items():
        sd = {k: v.detach().clone() for k, v in lyco.state_dict().items()}
        alpha = float(sd.pop("alpha"))
        roles = {k.removesuffix(".weight"): v for k, v in sd.items()}
        mods[name] = module_class(kind).from_parts(name, kind, roles, {"alpha": alpha})
    refs = {n: reference_delta(lyco, ls[n]) for n, (lyco, _) in made.items()}
    base = {n: layer.weight.detach().clone() for n, layer in ls.items()}
    return Adapter(mods), refs, base


def test_canonical_round_trip(setup):
    adapter, refs, _ = setup
    data = canonical_bytes(adapter)
    from safetensors.torch import load as st_load

    tensors = st_load(data)
    import json
    import struct

    n = struct.unpack("<Q", data[:8])[0]
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    back = canonical_from_tensors(tensors, meta, source="blob")
    assert meta["loratool"] == "2"
    for name, mod in adapter.modules.items():
        assert back.modules[name].kind == mod.kind
        torch.testing.assert_close(back.modules[name].delta(), mod.delta(), rtol=0, atol=0)
    assert canonical_bytes(back) == data


@pytest.mark.parametrize("block", [64, 1 << 18])
def test_file_merge_and_unmerge_match_lycoris(setup, tmp_path, monkeypatch, block):
    """Blocks of 64 elements split every tensor's rows several ways (a Kronecker row block
    starts inside a w1 row)."""
    adapter, refs, base = setup
    monkeypatch.setattr(engine, "_BLOCK_ELEMS", block)
    save_file(base, tmp_path / "base.safetensors")
    res = merge(
        tmp_path / "base.safetensors",
        [AdapterInput(adapter, 1.0, "lyco", "x")],
        tmp_path / "merged.safetensors",
        device="cpu",
    )
    assert res.tensors_changed == 4
    merged = load_file(tmp_path / "merged.safetensors")
    for name in base:
        torch.testing.assert_close(merged[name], base[name] + refs[name], rtol=0, atol=1e-6)
    ops = {t["name"]: t for t in res.tensors}
    assert ops["lin.weight"]["steps"][0]["kind"] == "loha"
    back = merge(
        tmp_path / "merged.safetensors",
        [AdapterInput(adapter, -1.0, "lyco", "x")],
        tmp_path / "back.safetensors",
        device="cpu",
    )
    assert back.tensors_changed == 4
    restored = load_file(tmp_path / "back.safetensors")
    for name in base:
        torch.testing.assert_close(restored[name], base[name], rtol=0, atol=1e-5)


def test_merge_into_state_dict_at_a_weight(setup):
    adapter, refs, base = setup
    sd = {k: v.clone() for k, v in base.items()}
    merge_into(sd, adapter, 0.5)
    for name in base:
        torch.testing.assert_close(sd[name], base[name] + 0.5 * refs[name], rtol=0, atol=1e-6)


def test_inspect_rank_from_factors(setup):
    adapter, refs, _ = setup
    report = inspect(adapter)
    by = {m["name"]: m for m in report["modules"]}
    for name, ref in refs.items():
        S = torch.linalg.svdvals(ref.double().reshape(ref.shape[0], -1))
        got = torch.tensor(by[name]["singular_values"], dtype=torch.float64)
        n = min(len(got), len(S))
        torch.testing.assert_close(got[:n], S[:n], rtol=1e-4, atol=1e-5)
        assert by[name]["numerical_rank"] == int(
            torch.linalg.matrix_rank(ref.reshape(ref.shape[0], -1))
        )
    assert by["lin.weight"]["rank"] == 3 and len(by["lin.weight"]["singular_values"]) <= 9


def test_to_lora_exact_and_truncated(setup):
    adapter, refs, base = setup
    fitted = Adapter({n: m.fit(tuple(base[n].shape)) for n, m in adapter.modules.items()})
    exact, report = to_lora(fitted)
    for name, mod in exact.modules.items():
        assert isinstance(mod, LoraModule)
        assert mod.kind == ("conv2d" if base[name].dim() == 4 else "linear")
        torch.testing.assert_close(mod.delta(), refs[name], rtol=0, atol=2e-6)
        assert report[name]["energy_kept"] == pytest.approx(1.0)
        assert not report[name]["shape_assumed"]
    lossy, report = to_lora(fitted, RankRule("rank", 1))
    for name, mod in lossy.modules.items():
        ref = refs[name].double().reshape(refs[name].shape[0], -1)
        U, S, Vh = torch.linalg.svd(ref, full_matrices=False)
        best = S[0] * torch.outer(U[:, 0], Vh[0])
        torch.testing.assert_close(
            mod.delta().double().reshape(best.shape), best, rtol=1e-4, atol=1e-5
        )
        assert report[name]["energy_kept"] == pytest.approx(
            float(S[0] ** 2 / (S**2).sum()), rel=1e-5
        )
        assert mod.rank == 1


def test_unfitted_conv_is_reported_as_assumed(setup):
    adapter, _, _ = setup
    out, report = to_lora(Adapter({"lin.weight": adapter.modules["lin.weight"]}))
    assert report["lin.weight"]["shape_assumed"]  # a LoHa's factors cannot tell Linear from conv
