"""resize from the factors, --common-rank, and inspect-rank module at a time.

References: dense float64 SVD of each module's ΔW (written in the test), real peft loading the
written adapters (logits against the source adapter's), and a torch function mode that sees
every tensor torch produces during a resize.
"""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from peft_models import make_case
from torch.overrides import TorchFunctionMode

import loratool
from loratool import transform as T
from loratool.adapter import Adapter, LoraModule
from loratool.errors import ValidationError
from loratool.formats import save_adapter
from loratool.rank import RankRule

TOKENS = torch.tensor([[1, 5, 9, 33, 2, 70, 11, 4]])


class NoLargeTensors(TorchFunctionMode):
    """Refuses any torch result with more than ``limit`` elements; counts the calls it saw."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.calls, self.largest = limit, 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls += 1
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                if t.numel() > self.limit:
                    raise AssertionError(f"{func} made a tensor of shape {tuple(t.shape)}")
        return out


def adapter_of(d, k, r, n=3, seed=0, alpha=None, rslora=False):
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for i in range(n):
        name = f"layers.{i}.proj.weight"
        B = torch.randn(d, r, generator=g) * 0.1
        A = torch.randn(r, k, generator=g) * 0.1
        mods[name] = LoraModule(name, "linear", A, B, alpha if alpha is not None else 2 * r, rslora)
    return Adapter(mods)


def dense(mod):
    return mod.delta().double()


def best_rank(D, k):
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k], S


def test_resize_never_forms_the_dense_delta():
    d, k, r = 1024, 1536, 16
    adapter = adapter_of(d, k, r)
    guard = NoLargeTensors(limit=(d + k) * r * 2)  # ΔW would be d·k = 1.5M
    with guard, pytest.raises(AssertionError, match="made a tensor"):
        adapter.modules["layers.0.proj.weight"].delta()  # the guard does catch a dense ΔW
    for rule in (RankRule("rank", 4), RankRule("energy", 0.9), RankRule("sv_ratio", 4)):
        guard = NoLargeTensors(limit=(d + k) * r * 2)
        with guard:
            out, report = T.resize(adapter, rule)
        assert guard.calls > 20 and guard.largest >= d * r  # it saw the factor-sized work
    guard = NoLargeTensors(limit=(d + k) * 24 * 2)
    with guard:
        T.resize(adapter, RankRule("rank", 4), common_rank=24)


def test_resize_is_the_best_truncation_with_scale_kept():
    adapter = adapter_of(96, 80, 12, alpha=5.0)
    out, report = T.resize(adapter, RankRule("rank", 5))
    for name, mod in adapter.modules.items():
        new = out.modules[name]
        assert new.rank == 5 and new.scale == pytest.approx(mod.scale)
        want, S = best_rank(dense(mod), 5)
        torch.testing.assert_close(dense(new), want, rtol=0, atol=1e-5 * float(want.abs().max()))
        share = float(S[:5].square().sum() / S.square().sum())
        assert report[name]["energy_kept"] == pytest.approx(share, rel=1e-6)
    # a rule that keeps everything leaves the module as it was, bit for bit
    out, report = T.resize(adapter, RankRule("energy", 1.0))
    for name, mod in adapter.modules.items():
        assert out.modules[name] is mod and report[name]["energy_kept"] == 1.0


def test_common_rank_pads_exactly_and_truncates_optimally():
    low = adapter_of(64, 48, 4, alpha=8.0, seed=1)
    high = adapter_of(64, 48, 12, alpha=3.0, seed=2, rslora=True)
    out_low, rep_low = T.resize(low, RankRule("rank", 8), common_rank=8)
    out_high, rep_high = T.resize(high, RankRule("rank", 8), common_rank=8)
    for name, mod in low.modules.items():
        new = out_low.modules[name]
        assert new.rank == 8 and rep_low[name]["padded"] == 4
        assert rep_low[name]["energy_kept"] == 1.0
        assert torch.equal(new.B[:, :4], mod.B) and torch.equal(new.A[:4], mod.A)
        assert float(new.B[:, 4:].abs().max()) == 0.0 and float(new.A[4:].abs().max()) == 0.0
        assert new.scale == mod.scale
    for name, mod in high.modules.items():
        new = out_high.modules[name]
        assert new.rank == 8 and new.rslora and rep_high[name]["padded"] == 0
        want, _ = best_rank(dense(mod), 8)
        torch.testing.assert_close(dense(new), want, rtol=0, atol=1e-5 * float(want.abs().max()))
    # one r and one lora_alpha: no patterns in the written config
    for ad in (out_low, out_high):
        assert len({(m.rank, m.alpha) for m in ad.modules.values()}) == 1


def test_common_rank_folds_differing_scales_into_one_alpha():
    ad = adapter_of(40, 30, 4, alpha=8.0)
    odd = ad.modules["layers.1.proj.weight"]
    ad.modules["layers.1.proj.weight"] = LoraModule(odd.name, "linear", odd.A, odd.B, 2.0)
    out, _ = T.resize(ad, RankRule("rank", 6), common_rank=6)
    assert len({m.alpha for m in out.modules.values()}) == 1
    for name, mod in ad.modules.items():
        torch.testing.assert_close(dense(out.modules[name]), dense(mod), rtol=1e-6, atol=1e-9)


@pytest.fixture(scope="module")
def peft_cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    return make_case("llama", root, seed=0), make_case("llama_rslora", root, seed=3)


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def test_cli_common_rank_over_two_peft_adapters_loads_in_peft(cli_run, peft_cases, tmp_path):
    from peft import PeftModel

    plain, rs = peft_cases
    out = tmp_path / "served"
    r = cli_run(
        "resize", plain.adapter_dir, rs.adapter_dir, "--rank", "6", "--common-rank",
        "-o", f"{out}/{{name}}", "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["common_rank"] == 6 and len(doc["adapters"]) == 2
    for case in (plain, rs):
        folder = out / case.adapter_dir.name
        cfg = json.loads((folder / "adapter_config.json").read_text())
        assert cfg["r"] == 6 and cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
        model = PeftModel.from_pretrained(case.fresh_base(), folder).eval()
        if case is plain:  # rank 4 → 6: zero padding, the very same function
            torch.testing.assert_close(logits(model), logits(case.peft_model), rtol=0, atol=1e-5)
        else:  # every module at rank ≤ 6 (8 truncated, 2 and 4 padded) still loads and runs
            assert torch.isfinite(logits(model)).all()
    kept = [
        m["energy_kept"]
        for a in doc["adapters"]
        for m in a["modules"].values()
        if m["rank_before"] > 6
    ]
    assert kept and all(0 < k < 1 for k in kept)
    r = cli_run("resize", plain.adapter_dir, rs.adapter_dir, "--rank", "6", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "{name}" in r.stderr


def test_cli_common_rank_from_a_dynamic_rule(cli_run, peft_cases, tmp_path):
    plain, rs = peft_cases
    r = cli_run(
        "resize", plain.adapter_dir, rs.adapter_dir, "--energy", "0.9", "--common-rank",
        "-o", f"{tmp_path}/{{name}}", "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    R = doc["common_rank"]
    # R is the largest energy rank over every module of both adapters
    want = 1
    for case in (plain, rs):
        for mod in loratool.load_adapter(case.adapter_dir).modules.values():
            S = torch.linalg.svdvals(dense(mod))
            share = torch.cumsum(S.square(), 0) / S.square().sum()
            want = max(want, int((share < 0.9).sum()) + 1)
    assert R == want
    assert {m["rank_after"] for a in doc["adapters"] for m in a["modules"].values()} == {R}


def test_cli_resize_keeps_task_type_and_base(cli_run, peft_cases, tmp_path):
    plain, _ = peft_cases
    src = json.loads((plain.adapter_dir / "adapter_config.json").read_text())
    r = cli_run(
        "resize", plain.adapter_dir, "--sv-fro", "0.9", "--max-rank", "3", "-o", tmp_path / "o"
    )
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert cfg["task_type"] == src["task_type"]
    assert cfg["base_model_name_or_path"] == src["base_model_name_or_path"]
    assert max([cfg["r"], *cfg["rank_pattern"].values()]) <= 3


# -- inspect-rank, module at a time -------------------------------------------------------------


def test_inspect_lazy_reads_one_module_at_a_time(peft_cases, monkeypatch):
    from loratool.tensors import io

    plain, _ = peft_cases
    eager = T.inspect(loratool.load_adapter(plain.adapter_dir))
    lazy_adapter = loratool.load_adapter(plain.adapter_dir, lazy=True)
    alive: list = []
    most = [0]
    read = io.read_tensor

    def tracked(info, fh=None):
        t = read(info, fh)
        alive.append(weakref.ref(t))
        most[0] = max(most[0], sum(1 for w in alive if w() is not None))
        return t

    monkeypatch.setattr(io, "read_tensor", tracked)
    lazy = T.inspect(lazy_adapter)
    assert len(alive) == 2 * len(lazy_adapter.modules)  # every factor read once …
    assert most[0] <= 2  # … and never more than one module's A and B alive at once
    assert all(m.lazy for m in lazy_adapter.modules.values())  # nothing kept in the adapter
    assert lazy == eager  # the same figures as an eager read


def test_cli_inspect_rank_same_figures_from_path_and_catalog(cli_run, peft_cases):
    plain, _ = peft_cases
    r1 = cli_run("inspect-rank", plain.adapter_dir, "--json")
    assert r1.exit_code == 0, r1.output
    assert cli_run("add", plain.adapter_dir, "--task", "t", "--name", "p").exit_code == 0
    r2 = cli_run("inspect-rank", "p", "--json")
    a, b = json.loads(r1.stdout), json.loads(r2.stdout)
    assert a["modules"] == b["modules"] and a["summary"] == b["summary"]


def test_resize_from_lazy_source_equals_eager(peft_cases, tmp_path):
    _, rs = peft_cases
    rule = RankRule("sv_ratio", 3, max_rank=6)
    a, ra = T.resize(loratool.load_adapter(rs.adapter_dir), rule)
    b, rb = T.resize(loratool.load_adapter(rs.adapter_dir, lazy=True), rule)
    assert ra == rb
    unchanged = [n for n, m in b.modules.items() if m.lazy]
    assert unchanged and len(unchanged) < len(b.modules)  # some modules kept, some cut
    for name, m in a.modules.items():
        got = b.modules[name].materialized()
        assert torch.equal(m.A, got.A) and torch.equal(m.B, got.B)
    save_adapter(b, tmp_path / "o")  # the unchanged modules are written from their file
    back = loratool.load_adapter(tmp_path / "o")
    for name, m in a.modules.items():
        assert torch.equal(back.modules[name].A, m.A) and torch.equal(back.modules[name].B, m.B)


def test_dora_is_inspected_padded_but_never_truncated():
    ad = adapter_of(40, 30, 4)
    dora = Adapter(
        {
            n: LoraModule(n, "linear", m.A, m.B, m.alpha, magnitude=torch.rand(40) + 0.5)
            for n, m in ad.modules.items()
        }
    )
    rep = T.inspect(dora)
    assert {m["kind"] for m in rep["modules"]} == {"linear+dora"}
    # the spectrum is the low-rank part's; DoRA adds its magnitudes (issue 11)
    assert [{k: v for k, v in m.items() if k != "dora"} for m in rep["modules"]] == [
        {**m, "kind": "linear+dora"} for m in T.inspect(ad)["modules"]
    ]
    assert all("magnitude_max" in m["dora"] for m in rep["modules"])
    with pytest.raises(ValidationError, match="DoRA"):
        T.resize(dora, RankRule("rank", 2))
    out, _ = T.resize(dora, RankRule("rank", 6), common_rank=6)  # padding is exact: allowed
    for name, m in dora.modules.items():
        new = out.modules[name]
        assert new.rank == 6 and torch.equal(new.magnitude, m.magnitude)
        torch.testing.assert_close(new.delta(), m.delta(), rtol=0, atol=1e-7)


def test_resize_carries_modules_to_save_and_task_type(cli_run, tmp_path):
    # peft's TOKEN_CLS adapter saves its classifier ("score") whole, as modules_to_save.
    from peft_kinds import make_kind_case

    case = make_kind_case("tokcls", tmp_path)
    ref = case.peft_model()
    tokens = torch.tensor([[1, 5, 9, 33, 2, 7]])
    r = cli_run("resize", case.adapter_dir, "--rank", "6", "--common-rank", "-o", tmp_path / "pad")
    assert r.exit_code == 0, r.output
    src = json.loads((case.adapter_dir / "adapter_config.json").read_text())
    cfg = json.loads((tmp_path / "pad" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "TOKEN_CLS" and cfg["r"] == 6
    assert cfg["modules_to_save"] == src["modules_to_save"]
    from peft import PeftModel

    padded = PeftModel.from_pretrained(case.load_base(), tmp_path / "pad").eval()
    with torch.no_grad():  # zero padding and the head as it was: the very same function
        torch.testing.assert_close(padded(tokens).logits, ref(tokens).logits, rtol=0, atol=1e-5)
    src_ad = loratool.load_adapter(case.adapter_dir)
    out_ad = loratool.load_adapter(tmp_path / "pad")
    assert set(out_ad.ops) == set(src_ad.ops) and out_ad.ops


def test_resize_keeps_lora_bias_meaning_or_refuses(tmp_path):
    from loratool.adapter import AddToTensor

    ad = adapter_of(40, 30, 4, alpha=8.0)  # scale 2 everywhere
    odd = ad.modules["layers.1.proj.weight"]
    ad.modules[odd.name] = LoraModule(odd.name, "linear", odd.A, odd.B, 2.0)  # scale 0.5
    ad.ops["layers.1.proj.bias"] = AddToTensor("layers.1.proj.bias", torch.ones(40), 0.5)
    out, _ = T.resize(ad, RankRule("rank", 2))  # each module keeps its own scale: fine
    assert out.modules[odd.name].scale == pytest.approx(0.5) and "layers.1.proj.bias" in out.ops
    with pytest.raises(ValidationError, match="lora_bias"):
        T.resize(ad, RankRule("rank", 6), common_rank=6)  # would fold 0.5 into the common 2
