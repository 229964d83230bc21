"""Adapter formats: round trips, ΔW per kind, compatibility with real peft, bad input."""

from __future__ import annotations

import json
import math
import pickle
import struct

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft_models import make_case
from safetensors.torch import load_file, save_file

import loratool
from loratool.adapter import LoraModule
from loratool.errors import FormatError, LoratoolError, ResolutionError, ValidationError
from loratool.formats import detect_format, load_adapter, save_adapter

CASE_NAMES = ["llama", "llama_rslora", "llama_embed", "gpt2"]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmt-cases")
    return {n: make_case(n, root, seed=3) for n in CASE_NAMES}


def same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert (
            a[k].view(torch.uint8).equal(b[k].view(torch.uint8))
            if a[k].dim()
            else torch.equal(a[k], b[k])
        ), k


# -- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASE_NAMES)
def test_peft_round_trip_is_tensor_identical_with_equal_config(cases, name, tmp_path):
    src = cases[name].adapter_dir
    adapter = load_adapter(src)
    save_adapter(adapter, tmp_path / "out", "peft")
    same_tensors(
        load_file(src / "adapter_model.safetensors"),
        load_file(tmp_path / "out" / "adapter_model.safetensors"),
    )
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text()) == json.loads(
        (src / "adapter_config.json").read_text()
    )
    # and through loratool's own single-file format too
    save_adapter(adapter, tmp_path / "a.safetensors", "loratool")
    again = load_adapter(tmp_path / "a.safetensors")
    save_adapter(again, tmp_path / "out2", "peft")
    same_tensors(
        load_file(src / "adapter_model.safetensors"),
        load_file(tmp_path / "out2" / "adapter_model.safetensors"),
    )


def kohya_file(path, *, style="kohya", alpha_dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = 4
    t = {}
    if style == "kohya":
        t["lora_unet_conv_in.lora_down.weight"] = torch.randn(r, 3, 3, 3, generator=g)
        t["lora_unet_conv_in.lora_up.weight"] = torch.randn(8, r, 1, 1, generator=g)
        t["lora_unet_conv_in.alpha"] = torch.tensor(2.0, dtype=alpha_dtype)
        t["lora_unet_down_0_proj.lora_down.weight"] = torch.randn(r, 16, 1, 1, generator=g)
        t["lora_unet_down_0_proj.lora_up.weight"] = torch.randn(16, r, 1, 1, generator=g)
        t["lora_unet_down_0_proj.alpha"] = torch.tensor(8.0, dtype=alpha_dtype)
        t["lora_te_text_model_encoder_layers_0_q_proj.lora_down.weight"] = torch.randn(
            r, 16, generator=g
        )
        t["lora_te_text_model_encoder_layers_0_q_proj.lora_up.weight"] = torch.randn(
            16, r, generator=g
        )
        t["lora_te_text_model_encoder_layers_0_q_proj.alpha"] = torch.tensor(1.0, dtype=alpha_dtype)
    else:
        t["unet.mid.attn.to_q.lora_A.weight"] = torch.randn(r, 16, generator=g)
        t["unet.mid.attn.to_q.lora_B.weight"] = torch.randn(16, r, generator=g)
        t["text_encoder.layers.0.fc1.lora_A.weight"] = torch.randn(r, 16, generator=g)
        t["text_encoder.layers.0.fc1.lora_B.weight"] = torch.randn(32, r, generator=g)
    save_file(
        t,
        path,
        metadata={"ss_network_dim": "4", "ss_network_alpha": "2.0"} if style == "kohya" else None,
    )
    return t


@pytest.mark.parametrize("style", ["kohya", "diffusers"])
def test_kohya_round_trip_is_tensor_identical(tmp_path, style):
    src = tmp_path / "in.safetensors"
    kohya_file(src, style=style)
    adapter = load_adapter(src)
    assert detect_format(src) == style
    save_adapter(adapter, tmp_path / "out.safetensors", style)
    same_tensors(load_file(src), load_file(tmp_path / "out.safetensors"))
    assert (
        loratool.read_header(tmp_path / "out.safetensors").metadata
        == loratool.read_header(src).metadata
    )


def test_kohya_alpha_and_kinds(tmp_path):
    src = tmp_path / "in.safetensors"
    t = kohya_file(src)
    adapter = load_adapter(src)
    conv = adapter.modules["lora_unet_conv_in"]
    assert conv.kind == "conv2d" and conv.alpha == 2.0 and conv.scale == 0.5
    assert conv.base_shape == (8, 3, 3, 3)
    q = adapter.modules["lora_te_text_model_encoder_layers_0_q_proj"]
    assert q.kind == "linear" and q.scale == 0.25
    torch.testing.assert_close(
        q.delta(),
        0.25
        * t["lora_te_text_model_encoder_layers_0_q_proj.lora_up.weight"]
        @ t["lora_te_text_model_encoder_layers_0_q_proj.lora_down.weight"],
    )


def test_kohya_names_resolve_against_base_keys(tmp_path):
    src = tmp_path / "in.safetensors"
    kohya_file(src)
    base = tmp_path / "base.safetensors"
    save_file(
        {
            "conv_in.weight": torch.zeros(8, 3, 3, 3),
            "down.0.proj.weight": torch.zeros(16, 16, 1, 1),
            "down_0.proj.weight": torch.zeros(3, 3),  # flattens alike but the shape differs
            "text_model.encoder.layers.0.q_proj.weight": torch.zeros(16, 16),
        },
        base,
    )
    with pytest.raises(ResolutionError, match="several"):
        loratool.resolve(load_adapter(src), loratool.read_base(base))
    save_file(
        {
            "conv_in.weight": torch.zeros(8, 3, 3, 3),
            "down.0.proj.weight": torch.zeros(16, 16, 1, 1),
            "text_model.encoder.layers.0.q_proj.weight": torch.zeros(16, 16),
        },
        base,
    )
    r = loratool.resolve(load_adapter(src), loratool.read_base(base))
    assert set(r.modules) == {
        "conv_in.weight",
        "down.0.proj.weight",
        "text_model.encoder.layers.0.q_proj.weight",
    }


def test_module_matching_nothing_lists_close_names(cases):
    adapter = load_adapter(cases["llama"].adapter_dir)
    base = loratool.read_base(cases["gpt2"].base_dir)
    with pytest.raises(ResolutionError, match="matches no tensor"):
        loratool.resolve(adapter, base)


def test_peft_export_of_kohya_adapter_resolved_to_base(tmp_path):
    src = tmp_path / "in.safetensors"
    kohya_file(src)
    base = tmp_path / "base.safetensors"
    save_file(
        {
            "conv_in.weight": torch.zeros(8, 3, 3, 3),
            "down.0.proj.weight": torch.zeros(16, 16, 1, 1),
            "text_model.encoder.layers.0.q_proj.weight": torch.zeros(16, 16),
        },
        base,
    )
    r = loratool.resolve(load_adapter(src), loratool.read_base(base))
    save_adapter(r, tmp_path / "peft", "peft")
    back = load_adapter(tmp_path / "peft")
    for name, m in r.modules.items():
        torch.testing.assert_close(back.modules[name].delta(), m.delta(), rtol=0, atol=1e-6)


# -- ΔW per kind against dense math ---------------------------------------------------------


def test_delta_linear_and_rslora():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 10, generator=g), torch.randn(6, 4, generator=g)
    m = LoraModule("w.weight", "linear", A, B, alpha=8)
    torch.testing.assert_close(m.delta(), (8 / 4) * B @ A)
    m = LoraModule("w.weight", "linear", A, B, alpha=8, rslora=True)
    torch.testing.assert_close(m.delta(0.5), 0.5 * (8 / math.sqrt(4)) * B @ A)
    x = torch.randn(3, 10, generator=g)
    # the merged layer computes what base + LoRA computes
    W = torch.randn(6, 10, generator=g)
    torch.testing.assert_close(
        x @ (W + m.delta()).T, x @ W.T + (8 / 2) * (x @ A.T) @ B.T, rtol=1e-5, atol=1e-5
    )


def test_delta_fan_in_fan_out_conv1d():
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(2, 5, generator=g), torch.randn(7, 2, generator=g)  # in=5, out=7
    m = LoraModule("c_attn.weight", "linear_fifo", A, B, alpha=2)
    assert m.base_shape == (5, 7)
    W = torch.randn(5, 7, generator=g)  # Conv1D: y = x @ W + b
    x = torch.randn(3, 5, generator=g)
    torch.testing.assert_close(x @ (W + m.delta()), x @ W + (x @ A.T) @ B.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_delta_conv2d_equals_composed_convolutions(k):
    g = torch.Generator().manual_seed(2)
    A = torch.randn(3, 4, k, k, generator=g)  # conv in=4 → r=3
    B = torch.randn(5, 3, 1, 1, generator=g)  # 1×1 conv r=3 → out=5
    m = LoraModule("conv.weight", "conv2d", A, B, alpha=6)
    assert m.base_shape == (5, 4, k, k)
    x = torch.randn(2, 4, 9, 9, generator=g)
    lora_out = F.conv2d(F.conv2d(x, A, padding=k // 2), B) * 2.0
    torch.testing.assert_close(
        F.conv2d(x, m.delta(), padding=k // 2), lora_out, rtol=1e-4, atol=1e-4
    )


def test_delta_embedding_equals_lookup():
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(4, 20, generator=g), torch.randn(8, 4, generator=g)  # 20 tokens, dim 8
    m = LoraModule("embed.weight", "embedding", A, B, alpha=4)
    assert m.base_shape == (20, 8)
    ids = torch.tensor([[0, 5, 19]])
    lora = F.embedding(ids, A.T) @ B.T  # peft's Embedding forward, scale 1
    torch.testing.assert_close(F.embedding(ids, m.delta()), lora)


def test_float16_factors_are_multiplied_in_float32():
    A = torch.full((1, 4), 300.0, dtype=torch.float16)
    B = torch.full((4, 1), 300.0, dtype=torch.float16)
    d = LoraModule("w.weight", "linear", A, B, alpha=1).delta()
    assert d.dtype == torch.float32 and d[0, 0].item() == 90000.0  # would be inf in fp16


# -- compatibility with peft ----------------------------------------------------------------


@pytest.mark.parametrize("name", CASE_NAMES)
def test_delta_equals_peft_get_delta_weight(cases, name):
    from peft.tuners.lora import LoraLayer

    case = cases[name]
    adapter = loratool.resolve(load_adapter(case.adapter_dir), loratool.read_base(case.base_dir))
    seen = 0
    for path, module in case.peft_model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.scaling:
            key = path.removeprefix("base_model.model.") + ".weight"
            ref = module.get_delta_weight("default")
            torch.testing.assert_close(
                adapter.modules[key].delta(), ref, rtol=0, atol=1e-6, msg=key
            )
            seen += 1
    assert seen == len(adapter.modules) > 0


# -- bad input ------------------------------------------------------------------------------


def write_bytes(path, data):
    path.write_bytes(data)
    return path


def valid_bytes(tmp_path):
    p = tmp_path / "ok.safetensors"
    save_file({"a.lora_A.weight": torch.ones(2, 3), "a.lora_B.weight": torch.ones(3, 2)}, p)
    return p.read_bytes()


def test_truncated_file(tmp_path):
    data = valid_bytes(tmp_path)
    p = write_bytes(tmp_path / "t.safetensors", data[:-5])
    with pytest.raises(FormatError, match=r"t\.safetensors: a\.lora_B\.weight: .*past the end"):
        load_adapter(p)
    p = write_bytes(tmp_path / "t2.safetensors", data[:4])
    with pytest.raises(FormatError, match="truncated"):
        load_adapter(p)


def test_header_length_larger_than_file(tmp_path):
    data = valid_bytes(tmp_path)
    p = write_bytes(tmp_path / "h.safetensors", struct.pack("<Q", len(data) * 10) + data[8:])
    with pytest.raises(FormatError, match="header length .* larger than the file"):
        load_adapter(p)


def _rewrite_header(data: bytes, fn) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    fn(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def test_header_offsets_past_end_and_overlapping(tmp_path):
    data = valid_bytes(tmp_path)

    def past(h):
        h["a.lora_B.weight"]["data_offsets"][1] += 1000

    with pytest.raises(FormatError, match="a.lora_B.weight: .*past the end|lies"):
        load_adapter(write_bytes(tmp_path / "p.safetensors", _rewrite_header(data, past)))

    def overlap(h):
        h["a.lora_B.weight"]["data_offsets"] = list(h["a.lora_A.weight"]["data_offsets"])

    with pytest.raises(FormatError, match="overlaps|lies"):
        load_adapter(write_bytes(tmp_path / "o.safetensors", _rewrite_header(data, overlap)))

    def wrong_shape(h):
        h["a.lora_A.weight"]["shape"] = [4, 3]

    with pytest.raises(FormatError, match="a.lora_A.weight: .*do not hold shape"):
        load_adapter(write_bytes(tmp_path / "s.safetensors", _rewrite_header(data, wrong_shape)))


@pytest.mark.parametrize(
    "alpha_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64]
)
def test_lazy_read_agrees_with_eager_read(cases, tmp_path, alpha_dtype):
    """Header-only reading (what a merge plans with) gives the same modules and content hash."""
    from loratool.sources import canonical_sha256
    from loratool.tensors.header import HeaderTensor

    src = tmp_path / "k.safetensors"
    kohya_file(src, alpha_dtype=alpha_dtype)
    for path in [src, *(c.adapter_dir for c in cases.values())]:
        eager, lazy = load_adapter(path), load_adapter(path, lazy=True)
        assert set(eager.modules) == set(lazy.modules)
        for name, m in eager.modules.items():
            lm = lazy.modules[name]
            assert isinstance(lm.A, HeaderTensor) and lm.lazy
            assert (lm.kind, lm.alpha, lm.rank, lm.base_shape) == (
                m.kind,
                m.alpha,
                m.rank,
                m.base_shape,
            ), name
            real = lm.materialized()
            assert torch.equal(real.A, m.A) and torch.equal(real.B, m.B), name
        assert canonical_sha256(lazy) == canonical_sha256(eager)


def test_lazy_factors_are_checked_for_nan_when_read(tmp_path):
    p = tmp_path / "n.safetensors"
    B = torch.ones(3, 2)
    B[2, 0] = float("nan")
    save_file({"a.lora_A.weight": torch.ones(2, 3), "a.lora_B.weight": B}, p)
    mod = load_adapter(p, lazy=True).modules["a.weight"]
    with pytest.raises(ValidationError, match=r"n\.safetensors: a\.weight: lora_B contains NaN"):
        mod.materialized()


def test_rank_mismatch(tmp_path):
    p = tmp_path / "r.safetensors"
    save_file({"a.lora_A.weight": torch.ones(2, 3), "a.lora_B.weight": torch.ones(3, 4)}, p)
    with pytest.raises(
        ValidationError, match=r"r\.safetensors: a\.weight: A has rank 2 but B has rank 4"
    ):
        load_adapter(p)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf(tmp_path, bad):
    p = tmp_path / "n.safetensors"
    B = torch.ones(3, 2)
    B[1, 1] = bad
    save_file({"a.lora_A.weight": torch.ones(2, 3), "a.lora_B.weight": B}, p)
    with pytest.raises(
        ValidationError, match=r"n\.safetensors: a\.weight: lora_B contains (NaN|Inf)"
    ):
        load_adapter(p)


def test_pickle_is_refused_without_being_opened(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name in ("adapter_model.bin", "model.pt", "x.ckpt"):
        p = tmp_path / name
        p.write_bytes(pickle.dumps(Evil()))
        with pytest.raises(FormatError, match="never opened"):
            load_adapter(p)
    # a pickle disguised as .safetensors is recognised by its first bytes
    p = tmp_path / "disguised.safetensors"
    p.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(FormatError, match="pickle"):
        load_adapter(p)
    # a PEFT directory holding only adapter_model.bin
    d = tmp_path / "peftdir"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2}')
    (d / "adapter_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(FormatError, match="never opened"):
        load_adapter(d)
    assert not marker.exists()


def test_config_that_lies_about_rank(cases, tmp_path):
    src = cases["llama"].adapter_dir
    d = tmp_path / "lie"
    d.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["r"] = 16
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    (d / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValidationError, match="says r=16 but the tensors have rank 4"):
        load_adapter(d)


def test_bad_inputs_through_the_cli_exit_1_and_write_nothing(cases, tmp_path, cli_run):
    case = cases["llama"]
    bad = tmp_path / "bad.safetensors"
    save_file(
        {
            "model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 64),
            "model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(64, 3),
        },
        bad,
    )
    out = tmp_path / "out"
    r = cli_run("merge", case.base_dir, bad, "-o", out)
    assert r.exit_code == 1
    assert (
        r.stderr.strip()
        == f"error: {bad}: model.layers.0.self_attn.q_proj.weight: A has rank 2 but B has rank 3 (A (2, 64), B (64, 3))"
    )
    assert "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_debug_shows_traceback(cases, tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "x.bin"
    bad.write_bytes(b"\x80\x04junk")
    env = {"LORATOOL_DEBUG": "1", "PATH": "/usr/bin:/bin"}
    argv = [sys.executable, "-m", "loratool", "merge", str(cases["llama"].base_dir), str(bad)]
    argv += ["-o", str(tmp_path / "o")]
    p = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert p.returncode == 1 and "Traceback" in p.stderr
    p = subprocess.run(argv, capture_output=True, text=True)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().startswith(f"error: {bad}: pickle checkpoints are never opened")


# -- fuzz -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_seed_bytes(cases):
    return (cases["llama_rslora"].adapter_dir / "adapter_model.safetensors").read_bytes()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzzed_files_raise_only_our_errors(fuzz_seed_bytes, tmp_path_factory, data):
    raw = bytearray(fuzz_seed_bytes)
    n_header = struct.unpack("<Q", raw[:8])[0] + 8
    op = data.draw(st.sampled_from(["flip", "flip_header", "truncate"]))
    if op == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        hi = n_header if op == "flip_header" else len(raw)
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, hi - 1))
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
    d = tmp_path_factory.mktemp("fuzz")
    p = d / "f.safetensors"
    p.write_bytes(bytes(raw))
    try:
        load_adapter(p)
    except LoratoolError:
        pass
