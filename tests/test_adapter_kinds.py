"""The adapter model's kinds and operations: serialization (canonical v1/v2), the catalog's
rows, and the merge engine's steps against the math written out here.

Real peft adapters of each kind are tested in test_peft_kinds.py; here the modules are built
by hand so that each step is pinned to its definition.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import loratool
from loratool.adapter import (
    Adapter,
    AddToTensor,
    ExpertLoraModule,
    LoraModule,
    ReplaceRows,
    ReplaceTensor,
)
from loratool.catalog.db import adapter_from_blob
from loratool.errors import LoratoolError
from loratool.formats.canonical import canonical_bytes, canonical_parts
from loratool.merge import AdapterInput, merge, merge_into
from loratool.sources import canonical_sha256

g = torch.Generator().manual_seed(7)


def rnd(*shape, std=0.1):
    return torch.randn(*shape, generator=g) * std


# -- a tiny base holding every layout ------------------------------------------------------

E = 3  # experts


@pytest.fixture(scope="module")
def base_sd():
    return {
        "lin.weight": rnd(12, 10, std=0.5),
        "lin.bias": rnd(12),
        "fifo.weight": rnd(10, 12, std=0.5),  # Conv1D: in × out
        "conv.weight": rnd(8, 4, 3, 3, std=0.5),
        "emb.weight": rnd(20, 6, std=0.5),
        "head.weight": rnd(5, 6, std=0.5),
        "qkv.weight": rnd(3 * 8, 10, std=0.5),  # q, k, v fused along rows
        "experts.gate_up": rnd(E, 14, 10, std=0.5),  # (E, out, in): F.linear(x, W[e])
        "experts.down_t": rnd(E, 10, 7, std=0.5),  # (E, in, out): x @ W[e] (gpt-oss)
        "untouched.weight": rnd(4, 4),
    }


@pytest.fixture
def base_dir(tmp_path, base_sd):
    d = tmp_path / "base"
    d.mkdir()
    save_file(base_sd, d / "model.safetensors", metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({"model_type": "toy", "vocab_size": 20}))
    return d


def lora(name, kind, r, fan_in, fan_out, *, alpha=8.0, magnitude=None, rows=None, conv=None):
    if conv:
        A, B = rnd(r, *conv), rnd(fan_out, r, 1, 1)
    else:
        A, B = rnd(r, fan_in), rnd(fan_out, r)
    return LoraModule(name, kind, A, B, alpha, False, magnitude, rows)


def experts(name, r, fan_in, fan_out, *, transposed=False, alpha=4.0):
    return ExpertLoraModule(
        name, "experts", rnd(E * r, fan_in), rnd(fan_out, r * E), alpha, E, False, transposed
    )


def every_kind() -> Adapter:
    mods = [
        lora("lin.weight", "linear", 3, 10, 12, magnitude=rnd(12).abs() + 1),
        lora("fifo.weight", "linear_fifo", 2, 10, 12, magnitude=rnd(12).abs() + 1),
        lora("conv.weight", "conv2d", 2, 0, 8, conv=(4, 3, 3), magnitude=rnd(1, 8, 1, 1).abs() + 1),
        lora("emb.weight", "embedding", 2, 20, 6, magnitude=rnd(6).abs() + 1),
        lora("qkv.weight", "linear", 2, 10, 8, rows=(8, 16)),
        experts("experts.gate_up", 2, 10, 14),
        experts("experts.down_t", 2, 10, 7, transposed=True),
    ]
    ops = [
        ReplaceTensor("head.weight", rnd(7, 6), "embedding", resize=True),
        AddToTensor("lin.bias", rnd(12), scale=2.5),
    ]
    return Adapter({m.name: m for m in mods}, ops={o.target: o for o in ops})


# -- the math, written out -----------------------------------------------------------------


def expected_state(base_sd, adapter: Adapter) -> dict:
    out = {k: v.clone() for k, v in base_sd.items()}
    for name, m in adapter.modules.items():
        W = out[name].double()
        if isinstance(m, ExpertLoraModule):
            r = m.rank
            for e in range(E):
                A_e = m.A[e * r : (e + 1) * r].double()  # expert-major rows
                B_e = m.B[:, [k * E + e for k in range(r)]].double()  # rank-major columns
                d = B_e @ A_e * m.scale
                W[e] += d.T if m.transposed else d
            out[name] = W.float()
            continue
        A, B = m.A.double().flatten(1), m.B.double().flatten(1)
        d = (B @ A * m.scale).reshape(-1, *m.A.shape[1:]) if m.kind == "conv2d" else B @ A * m.scale
        if m.kind in ("linear_fifo", "embedding"):
            d = d.T
        if m.target_rows:
            lo, hi = m.target_rows
            W[lo:hi] += d
        else:
            W = W + d
        if m.magnitude is not None:
            mag = m.magnitude.double().reshape(-1)
            if m.kind in ("linear_fifo", "embedding"):  # one norm per column, as stored
                W = W * (mag / torch.linalg.norm(W, dim=0))
            else:  # one norm per output row (over in·kh·kw for a conv)
                n = torch.linalg.norm(W.flatten(1), dim=1)
                W = W * (mag / n).reshape(-1, *([1] * (W.dim() - 1)))
        out[name] = W.float()
    for t, o in adapter.ops.items():
        if isinstance(o, ReplaceTensor):
            out[t] = o.value.clone()
        elif isinstance(o, AddToTensor):
            out[t] = (out[t].double() + o.scale * o.value.double()).float()
        elif isinstance(o, ReplaceRows):
            out[t][o.indices] = o.values
    return out


def inp(adapter, weight=1.0, label="adapter"):
    return AdapterInput(adapter, weight, label, canonical_sha256(adapter))


# -- serialization -------------------------------------------------------------------------

# The sha256 of the fixtures' canonical blobs as the version-1 code wrote them (main at
# da05ac3): existing catalogs name their blobs by these, so plain LoRA must keep its bytes.
V1_SHA256 = {
    "llama-plain": "d8cd6b869cbe9d5b149141fe27b57147afe2b449ffbc584871bd4fc499d782ad",
    "llama-rslora": "f2d062bf51bf0a8d8f1185186bde828eb6b7b22a069409a04fdda6f5a08d2a6d",
    "gpt2-lora": "2f7ca07ed852b8bf44f4da93014a29f35436eaf21df88bfccd53acd90b83a804",
}


@pytest.mark.parametrize("name", sorted(V1_SHA256))
def test_plain_lora_keeps_its_version_1_blob(fixtures, name):
    adapter = loratool.load_adapter(fixtures / "adapters" / name)
    _, metadata = canonical_parts(adapter)
    assert metadata["loratool"] == "1"
    assert hashlib.sha256(canonical_bytes(adapter)).hexdigest() == V1_SHA256[name]


def _same(a: Adapter, b: Adapter):
    assert set(a.modules) == set(b.modules) and set(a.ops) == set(b.ops)
    for name, m in a.modules.items():
        n = b.modules[name]
        assert type(m) is type(n) and m.kind == n.kind and m.facts() == n.facts(), name
        assert m.tensors().keys() == n.tensors().keys(), name
        for role, t in m.tensors().items():
            assert torch.equal(t, n.tensors()[role]), (name, role)
    for t, o in a.ops.items():
        p = b.ops[t]
        assert type(o) is type(p) and o.facts() == p.facts(), t
        for role, x in o.tensors().items():
            assert torch.equal(x, p.tensors()[role]), (t, role)


def test_every_kind_round_trips_through_a_version_2_blob(tmp_path):
    adapter = every_kind()
    data = canonical_bytes(adapter)
    _, metadata = canonical_parts(adapter)
    assert metadata["loratool"] == "2"
    back = adapter_from_blob(data, source="blob")
    _same(adapter, back)
    assert canonical_bytes(back) == data  # deterministic
    # lazily, from a file: the same adapter, tensors read on demand
    path = tmp_path / "a.safetensors"
    path.write_bytes(data)
    lazy = loratool.load_adapter(path, lazy=True)
    assert all(m.lazy for m in lazy.modules.values())
    _same(adapter, loratool.load_adapter(path))


def test_version_2_blob_errors_name_the_tensor(tmp_path):
    tensors, metadata = canonical_parts(every_kind())
    path = tmp_path / "x.safetensors"

    def write(t, m):
        from loratool.tensors.io import serialize

        path.write_bytes(serialize(t, m))

    stray = dict(tensors, **{"stray.lora_A": torch.zeros(1)})
    write(stray, metadata)
    with pytest.raises(LoratoolError, match="stray.lora_A: tensor not described"):
        loratool.load_adapter(path)
    missing = {k: v for k, v in tensors.items() if k != "lin.weight.magnitude"}
    write(missing, metadata)
    with pytest.raises(LoratoolError, match="lin.weight.magnitude: metadata names a module"):
        loratool.load_adapter(path)
    mods = json.loads(metadata["loratool.modules"])
    mods["lin.weight"]["kind"] = "hyperlora"
    write(tensors, dict(metadata, **{"loratool.modules": json.dumps(mods)}))
    with pytest.raises(LoratoolError, match="unknown module kind 'hyperlora'"):
        loratool.load_adapter(path)


def test_bad_magnitude_and_expert_counts_are_refused():
    with pytest.raises(LoratoolError, match="DoRA magnitude has shape \\[5\\]"):
        lora("x.weight", "linear", 2, 10, 12, magnitude=torch.ones(5))
    with pytest.raises(LoratoolError, match="do not hold rank·4 experts"):
        ExpertLoraModule("e", "experts", rnd(6, 5), rnd(4, 6), 1.0, 4)
    with pytest.raises(LoratoolError, match="2 token indices but values of shape"):
        ReplaceRows("emb.weight", [1, 2], rnd(3, 6))


def test_catalog_rows_count_every_stored_tensor(tmp_path):
    from loratool.catalog import Catalog

    adapter = every_kind()
    with Catalog() as cat:
        row = cat.add_adapter(adapter, name="all-kinds", task="t")
        rows = {m["name"]: m for m in cat.modules("all-kinds")}
        loaded = cat.load("all-kinds")
        assert cat.verify().ok
    stored = sum(t.numel() for p in adapter.parts for t in p.tensors().values())
    assert row["params"] == stored == adapter.params
    assert row["modules"] == len(adapter.modules) + len(adapter.ops)
    assert rows["lin.weight"]["kind"] == "linear+dora"
    assert rows["experts.down_t"]["kind"] == "experts×3ᵀ"
    assert rows["experts.gate_up"]["base_shape"] == [E, 14, 10]
    assert rows["head.weight"]["kind"] == "replace"
    assert rows["lin.bias"]["kind"] == "add"
    _same(adapter, loaded)


# -- merging -------------------------------------------------------------------------------


def test_every_kind_merges_as_the_math_says(base_dir, base_sd, tmp_path):
    adapter = every_kind()
    res = merge(base_dir, [inp(adapter)], tmp_path / "out", device="cpu")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    want = expected_state(base_sd, adapter)
    assert set(ours) == set(want)
    for k in want:
        torch.testing.assert_close(ours[k], want[k], rtol=0, atol=2e-6, msg=k)
    assert (
        ours["untouched.weight"]
        .view(torch.uint8)
        .equal(base_sd["untouched.weight"].view(torch.uint8))
    )
    ops = {t["name"]: t["op"] for t in res.tensors}
    assert ops == {
        "lin.weight": "dora",
        "fifo.weight": "dora",
        "conv.weight": "dora",
        "emb.weight": "dora",
        "qkv.weight": "slice",
        "experts.gate_up": "delta",
        "experts.down_t": "delta",
        "head.weight": "replace",
        "lin.bias": "add",
    }
    assert res.tensors_changed == len(ops)
    assert list(ours["head.weight"].shape) == [7, 6]  # resized


def test_many_small_blocks_give_the_same_result(base_dir, base_sd, tmp_path, monkeypatch):
    import loratool.merge.engine as engine

    adapter = every_kind()
    merge(base_dir, [inp(adapter)], tmp_path / "one", device="cpu")
    monkeypatch.setattr(engine, "_BLOCK_ELEMS", 25)  # a few rows, or one expert, per block
    merge(base_dir, [inp(adapter)], tmp_path / "many", device="cpu")
    a = load_file(tmp_path / "one" / "model.safetensors")
    b = load_file(tmp_path / "many" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_bf16_base_is_the_float32_result_rounded_once(base_sd, tmp_path):
    bf = {k: v.to(torch.bfloat16) for k, v in base_sd.items()}
    d = tmp_path / "bf"
    d.mkdir()
    save_file(bf, d / "model.safetensors", metadata={"format": "pt"})
    adapter = every_kind()
    merge(d, [inp(adapter)], tmp_path / "out", device="cpu")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    want = expected_state({k: v.float() for k, v in bf.items()}, adapter)
    for k, v in want.items():
        assert ours[k].dtype == torch.bfloat16
        ulps = loratool.merge.ulp_distance(ours[k], v.to(torch.bfloat16))
        # the reference is float64 rounded to float32 then bf16: a double rounding may
        # differ by one unit from our one rounding of the float32 sum
        assert int(ulps.max()) <= 1, k


def test_rows_replace_only_their_rows(base_dir, base_sd, tmp_path):
    op = ReplaceRows("emb.weight", [3, 19, 0], rnd(3, 6))
    adapter = Adapter({}, ops={op.target: op})
    res = merge(base_dir, [inp(adapter)], tmp_path / "out", device="cpu")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    want = base_sd["emb.weight"].clone()
    want[[3, 19, 0]] = op.values
    assert torch.equal(ours["emb.weight"], want)
    assert res.tensors == [
        {
            "name": "emb.weight",
            "op": "rows",
            "steps": [{"op": "rows", "adapter": "adapter", "rows": 3}],
        }
    ]


def test_steps_that_do_not_commute_are_refused_before_writing(base_dir, tmp_path):
    head = ReplaceTensor("head.weight", rnd(5, 6))
    a = Adapter({}, ops={head.target: head})
    b = Adapter({"head.weight": lora("head.weight", "linear", 2, 6, 5)})
    with pytest.raises(LoratoolError, match="'replace', which does not combine with b"):
        merge(base_dir, [inp(a, label="a"), inp(b, label="b")], tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
    # two additive updates combine in any order
    c = Adapter({"head.weight": lora("head.weight", "linear", 2, 6, 5)})
    merge(base_dir, [inp(b, label="b"), inp(c, label="c")], tmp_path / "ok", device="cpu")


def test_weights_that_mean_nothing_are_refused(base_dir, tmp_path):
    dora = Adapter(
        {"lin.weight": lora("lin.weight", "linear", 2, 10, 12, magnitude=torch.ones(12))}
    )
    with pytest.raises(LoratoolError, match="DoRA module merges at weight 1 only"):
        merge(base_dir, [inp(dora, 0.5)], tmp_path / "out", device="cpu")
    head = ReplaceTensor("head.weight", rnd(5, 6))
    with pytest.raises(
        LoratoolError, match="head.weight: weight 0.5 for a tensor the adapter replaces"
    ):
        merge(
            base_dir, [inp(Adapter({}, ops={head.target: head}), 0.5)], tmp_path / "o", device="cpu"
        )
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_misfits_are_refused_naming_the_tensor(base_dir, tmp_path):
    wrong = ReplaceTensor("head.weight", rnd(7, 6))  # not marked as a resize
    with pytest.raises(
        LoratoolError, match="head.weight: modules_to_save tensor has shape \\[7, 6\\]"
    ):
        merge(base_dir, [inp(Adapter({}, ops={wrong.target: wrong}))], tmp_path / "o", device="cpu")
    moe = experts("experts.gate_up", 2, 10, 14)
    moe4 = ExpertLoraModule("experts.gate_up", "experts", rnd(8, 10), rnd(14, 8), 1.0, 4)
    with pytest.raises(LoratoolError, match="the adapter has 4 experts but the base tensor"):
        merge(base_dir, [inp(Adapter({moe4.name: moe4}))], tmp_path / "o", device="cpu")
    merge(base_dir, [inp(Adapter({moe.name: moe}))], tmp_path / "o", device="cpu")
    outside = lora("qkv.weight", "linear", 2, 10, 8, rows=(20, 28))
    with pytest.raises(LoratoolError, match="rows 20:28 lie outside"):
        merge(base_dir, [inp(Adapter({outside.name: outside}))], tmp_path / "p", device="cpu")


def test_in_memory_merge_equals_the_file_merge(base_dir, base_sd, tmp_path):
    adapter = every_kind()
    adapter.ops.pop("head.weight")  # a resize cannot happen in place
    merge(base_dir, [inp(adapter)], tmp_path / "out", device="cpu")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    state = {k: v.clone() for k, v in base_sd.items()}
    changed = merge_into(state, adapter)
    assert sorted(changed) == sorted([*adapter.modules, *adapter.ops])
    for k in state:
        assert torch.equal(state[k], ours[k]), k
