"""Merging into quantized bases, end to end through the CLI, against the references.

ΔW is written out here (scale · B·A from the PEFT file); dequantization and fresh scales come
from the reference libraries (transformers, compressed-tensors, bitsandbytes; MXFP4's encoder
from its definition in test_quant.py). The fixtures are fixtures/quant/* (make_quant.py).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_quant import downcast_to_mxfp4_reference, hf_fp8_quantize, same_bits

from loratool.tensors.header import read_header

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
Q = FIX / "quant"
PLAIN = FIX / "adapters" / "llama-plain"
sys.path.insert(0, str(FIX))


def deltas(adapter: Path = PLAIN, weight: float = 1.0) -> dict[str, torch.Tensor]:
    """weight · alpha/r · B·A per base weight, in float32, from the PEFT files."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    t = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for k, a in t.items():
        if ".lora_A." not in k:
            continue
        b = t[k.replace("lora_A", "lora_B")]
        name = k.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        out[name] = (weight * cfg["lora_alpha"] / cfg["r"]) * (b.float() @ a.float())
    return out


def merged(cli_run, base: Path, out: Path, *extra: str, adapter: Path = PLAIN) -> dict:
    r = cli_run("merge", base, adapter, "-o", out, "--json", *extra)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


# -- requantized merges (the default): the scheme's own rule applied to the exact sum --------


def test_fp8_block_merge_requantizes_the_exact_sum(cli_run, tmp_path):
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    base = load_file(Q / "llama-fp8" / "model.safetensors")
    doc = merged(cli_run, Q / "llama-fp8", tmp_path / "out")
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert set(out) == set(base)
    d = deltas()
    for name, t in base.items():
        if name in d:
            exact = (
                _dequantize_fp8_weight(t, base[name + "_scale_inv"], [32, 32], torch.float32)
                + d[name]
            )
            q, s = hf_fp8_quantize(exact, (32, 32))
            assert same_bits(out[name], q) and same_bits(out[name + "_scale_inv"], s), name
        elif name.removesuffix("_scale_inv") not in d:
            assert same_bits(out[name], t), name  # untouched weights and scales: bit-identical
    entries = {e["name"]: e for e in doc["tensors"]}
    q_entry = entries["model.layers.0.self_attn.q_proj.weight"]
    assert q_entry["op"] == "delta+requantize" and 0 < q_entry["max_rel_error"] < 0.07
    assert 0 < q_entry["rms_rel_error"] < q_entry["max_rel_error"]
    assert (
        doc["quantization"]["mode"] == "requantize"
        and doc["quantization"]["weights_rewritten"] == 4
    )
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [32, 32]


def test_fp8_block_partial_blocks_merge_like_any_other(cli_run, tmp_path):
    """Sides that are not multiples of the block (48: 64 = 48 + 16, 128 = 48 + 48 + 32)."""
    import make_fixtures as mf
    import make_quant as mq
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    base = tmp_path / "fp8-48"
    mf.write_json(base / "config.json", mq.fp8_block_config(mf.llama_config(), (48, 48)))
    mf.save(base / "model.safetensors", mq.fp8_block_tensors(mf.llama_tensors(), (48, 48)))
    src = load_file(base / "model.safetensors")
    assert src["model.layers.0.mlp.up_proj.weight_scale_inv"].shape == (3, 2)
    merged(cli_run, base, tmp_path / "out", "--", adapter=FIX / "adapters" / "llama-rslora")
    out = load_file(tmp_path / "out" / "model.safetensors")
    d = deltas_rslora()
    assert d
    for name, delta in d.items():
        exact = (
            _dequantize_fp8_weight(src[name], src[name + "_scale_inv"], [48, 48], torch.float32)
            + delta
        )
        q, s = hf_fp8_quantize(exact, (48, 48))
        assert same_bits(out[name], q) and same_bits(out[name + "_scale_inv"], s), name


def deltas_rslora() -> dict[str, torch.Tensor]:
    """llama-rslora: per-module rank and alpha (rank_pattern / alpha_pattern), alpha/√r."""
    adapter = FIX / "adapters" / "llama-rslora"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    t = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for k, a in t.items():
        if ".lora_A." not in k:
            continue
        b = t[k.replace("lora_A", "lora_B")]
        mod = k.removeprefix("base_model.model.").replace(".lora_A.weight", "")
        r = a.shape[0]
        alpha = next(
            (v for p, v in cfg["alpha_pattern"].items() if mod.endswith(p) or p in mod),
            cfg["lora_alpha"],
        )
        out[mod + ".weight"] = (alpha / r**0.5) * (b.float() @ a.float())
    return out


def test_compressed_tensors_merge_requantizes_by_its_rule(cli_run, tmp_path):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(
        num_bits=8, type="float", strategy="channel", symmetric=True, dynamic=False
    )
    base = load_file(Q / "llama-fp8-ct" / "model.safetensors")
    merged(cli_run, Q / "llama-fp8-ct", tmp_path / "out")
    out = load_file(tmp_path / "out" / "model.safetensors")
    d = deltas()
    for name, delta in d.items():
        sname = name[: -len("weight")] + "weight_scale"
        exact = dequantize(base[name], base[sname], None, args).float() + delta
        s, _ = calculate_qparams(exact.amin(1, keepdim=True), exact.amax(1, keepdim=True), args)
        s = s.to(base[sname].dtype)
        assert same_bits(out[sname], s), name
        assert same_bits(out[name], quantize(exact, s, None, args, dtype=torch.float8_e4m3fn)), name
    for name, t in base.items():
        if name not in d and name.removesuffix("_scale") not in d:
            assert same_bits(out[name], t), name


def test_nf4_merge_requantizes_by_bitsandbytes(cli_run, tmp_path):
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    from loratool.quant.bnb4 import table

    base = load_file(Q / "llama-nf4" / "model.safetensors")
    merged(cli_run, Q / "llama-nf4", tmp_path / "out")
    out = load_file(tmp_path / "out" / "model.safetensors")
    for name, delta in deltas().items():
        w = _dequantize_4bit_compute(
            base[name].reshape(-1),
            base[name + ".absmax"],
            table("nf4"),
            64,
            delta.shape,
            torch.float32,
        )
        q, st = F.quantize_4bit(w + delta, blocksize=64, quant_type="nf4")
        assert same_bits(out[name], q) and same_bits(out[name + ".absmax"], st.absmax), name
        for part in (".quant_map", ".quant_state.bitsandbytes__nf4"):
            assert same_bits(out[name + part], base[name + part])


# -- dequantized merges (--dtype): reference dequant + ΔW in float32, rounded once -----------


@pytest.mark.parametrize("scheme", ["llama-fp8", "llama-fp8-ct", "llama-nf4", "llama-nf4-dq"])
def test_dtype_bfloat16_writes_an_ordinary_model(cli_run, tmp_path, scheme):
    from transformers import AutoModelForCausalLM

    base = load_file(Q / scheme / "model.safetensors")
    doc = merged(cli_run, Q / scheme, tmp_path / "out", "--dtype", "bfloat16")
    out = load_file(tmp_path / "out" / "model.safetensors")
    ref = reference_dequant(scheme, base)
    assert set(out) == set(ref)  # scale tensors dropped, one tensor per weight
    d = deltas()
    for name, w in ref.items():
        want = (w.float() + d[name] if name in d else w.float()).to(torch.bfloat16)
        assert same_bits(out[name], want), name
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    assert (
        doc["quantization"]["mode"] == "dequantize"
        and doc["quantization"]["weights_rewritten"] == 14
    )
    assert all("max_rel_error" in e for e in doc["tensors"] if e["op"].endswith("dequantize"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear"


def reference_dequant(scheme: str, t: dict) -> dict[str, torch.Tensor]:
    """Every logical weight dequantized by the reference library (float32), others as stored."""
    out = {}
    if scheme == "llama-fp8":
        from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

        for n, v in t.items():
            if n.endswith("_scale_inv"):
                continue
            s = t.get(n + "_scale_inv")
            out[n] = v if s is None else _dequantize_fp8_weight(v, s, [32, 32], torch.float32)
    elif scheme == "llama-fp8-ct":
        from compressed_tensors.quantization import QuantizationArgs
        from compressed_tensors.quantization.lifecycle.forward import dequantize

        args = QuantizationArgs(
            num_bits=8, type="float", strategy="channel", symmetric=True, dynamic=False
        )
        for n, v in t.items():
            if n.endswith("_scale"):
                continue
            s = t.get(n[: -len("weight")] + "weight_scale")
            out[n] = v if s is None else dequantize(v, s, None, args).float()
    else:
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

        from loratool.quant.bnb4 import table

        for n, v in t.items():
            if ".weight." in n:
                continue
            key = n + ".quant_state.bitsandbytes__nf4"
            if key not in t:
                out[n] = v
                continue
            shape = json.loads(bytes(t[key].tolist()))["shape"]
            out[n] = _dequantize_4bit_compute(
                v.reshape(-1), bnb_absmax(t, n), table("nf4"), 64, shape, torch.float32
            )
    return out


def bnb_absmax(t: dict, name: str) -> torch.Tensor:
    """A stored weight's float32 block scales as bitsandbytes reads them (QuantState.from_dict;
    with double quant its dequantize_blockwise + offset, as dequantize_4bit computes them)."""
    import bitsandbytes.functional as F
    from bitsandbytes.functional import QuantState

    p = name + "."
    st = QuantState.from_dict({k[len(p) :]: v for k, v in t.items() if k.startswith(p)}, "cpu")
    if not st.nested:
        return st.absmax
    return F.dequantize_blockwise(st.absmax, st.state2) + st.offset


def test_mxfp4_experts_dequantize_and_requantize(cli_run, tmp_path):
    """gpt-oss: the attention LoRA merges as usual; experts are decoded (transformers'
    convert_moe_packed_tensors) when written dequantized, copied raw when the scheme is kept."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    base = load_file(Q / "gptoss-mxfp4" / "model.safetensors")
    merged(cli_run, Q / "gptoss-mxfp4", tmp_path / "deq", "--dtype", "bfloat16")
    out = load_file(tmp_path / "deq" / "model.safetensors")
    p = "model.layers.1.mlp.experts.gate_up_proj"
    want = convert_moe_packed_tensors(base[p + "_blocks"], base[p + "_scales"], dtype=torch.float32)
    assert same_bits(out[p], want.to(torch.bfloat16)) and p + "_blocks" not in out
    merged(cli_run, Q / "gptoss-mxfp4", tmp_path / "keep")
    kept = load_file(tmp_path / "keep" / "model.safetensors")
    assert same_bits(kept[p + "_blocks"], base[p + "_blocks"]) and same_bits(
        kept[p + "_scales"], base[p + "_scales"]
    )
    # requantizing a decoded MXFP4 weight gives back its own codes (the encoder is exact on its grid)
    from loratool.quant import detect_base, read_parts
    from loratool.quant.mxfp4 import CODEC
    from loratool.tensors.header import read_base

    qb = detect_base(read_base(Q / "gptoss-mxfp4"))
    lw = qb.weights[p]
    enc = CODEC.encode(lw, CODEC.decode(lw, read_parts(lw)))
    ref_blocks, ref_scales = downcast_to_mxfp4_reference(want.transpose(1, 2))
    assert same_bits(enc["blocks"], ref_blocks) and same_bits(enc["scales"], ref_scales)


# -- the merged models load, and compute what the exact merge computes ------------------------


def logits(path_or_model, ids):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = (
            path_or_model
            if not isinstance(path_or_model, Path)
            else AutoModelForCausalLM.from_pretrained(path_or_model)
        )
    with torch.no_grad():
        return m(ids).logits.float()


@pytest.mark.parametrize(
    "scheme, tol",
    [("llama-fp8", 0.1), ("llama-fp8-ct", 0.1), ("llama-nf4", 0.35), ("llama-nf4-dq", 0.35)],
)
def test_merged_quantized_model_loads_and_matches_the_exact_merge(cli_run, tmp_path, scheme, tol):
    """transformers loads the requantized output (FP8 dequantized on CPU, NF4 as Linear4bit);
    its logits sit within the scheme's precision of the exact float32 merge, far closer to it
    than the unmerged base's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    merged(cli_run, Q / scheme, tmp_path / "out")
    ref = reference_dequant(scheme, load_file(Q / scheme / "model.safetensors"))
    d = deltas()
    cfg = AutoConfig.from_pretrained(FIX / "llama")
    exact_model = AutoModelForCausalLM.from_config(cfg).float().eval()
    exact_model.load_state_dict({n: (w.float() + d.get(n, 0)) for n, w in ref.items()})
    ids = torch.arange(16).unsqueeze(0) % 128
    exact = logits(exact_model, ids)
    got = logits(tmp_path / "out", ids)
    unmerged = logits(Q / scheme, ids)
    err = float((got - exact).abs().max())
    assert err < tol * float(exact.abs().max())
    assert err < 0.5 * float((unmerged - exact).abs().max())


def test_fixture_tensors_match_the_reference_quantizers():
    """The committed quantized fixtures are what the libraries themselves produce."""
    import bitsandbytes.functional as F
    import make_fixtures as mf

    w = mf.llama_tensors()
    name = "model.layers.1.mlp.down_proj.weight"
    fp8 = load_file(Q / "llama-fp8" / "model.safetensors")
    q, s = hf_fp8_quantize(w[name], (32, 32))
    assert same_bits(fp8[name], q) and same_bits(fp8[name + "_scale_inv"], s)
    nf4 = load_file(Q / "llama-nf4" / "model.safetensors")
    q4, st = F.quantize_4bit(w[name].to(torch.bfloat16), blocksize=64, quant_type="nf4")
    assert same_bits(nf4[name], q4) and same_bits(nf4[name + ".absmax"], st.absmax)
    packed = {k: v for k, v in st.as_dict(packed=True).items()}
    assert same_bits(
        nf4[name + ".quant_state.bitsandbytes__nf4"], packed["quant_state.bitsandbytes__nf4"]
    )
    assert same_bits(nf4[name + ".quant_map"], packed["quant_map"])
    dq = load_file(Q / "llama-nf4-dq" / "model.safetensors")
    q4, st = F.quantize_4bit(
        w[name].to(torch.bfloat16), blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    assert same_bits(dq[name], q4)
    for k, v in st.as_dict(packed=True).items():
        assert same_bits(dq[f"{name}.{k}"], v), k


# -- unmerge, QLoRA, refusals -----------------------------------------------------------------


def test_unmerge_check_reports_in_the_schemes_steps(cli_run, tmp_path):
    merged(cli_run, Q / "llama-fp8", tmp_path / "m", adapter=PLAIN)
    r = cli_run(
        "unmerge", tmp_path / "m", PLAIN, "-o", tmp_path / "u", "--check", Q / "llama-fp8", "--json"
    )
    assert r.exit_code == 0, r.output
    check = json.loads(r.stdout)["check"]
    assert check["scheme"] == "fp8_block"
    assert (
        check["tensors_checked"] == 21 and check["tensors_exact"] == 17
    )  # 4 weights rewritten twice
    assert check["max_ulp_error"] >= check["max_error_in_steps"] > 0
    # a small change comes back within a couple of the scheme's steps
    merged(cli_run, Q / "llama-fp8", tmp_path / "m2", adapter=Path(f"{PLAIN}=0.001"))
    r = cli_run(
        "unmerge",
        tmp_path / "m2",
        f"{PLAIN}=0.001",
        "-o",
        tmp_path / "u2",
        "--check",
        Q / "llama-fp8",
        "--json",
    )
    check = json.loads(r.stdout)["check"]
    assert check["max_error_in_steps"] <= 2.0


def test_qlora_adapter_warns_and_onto_dequantized_merges_into_its_base(cli_run, tmp_path):
    qlora = FIX / "adapters" / "llama-qlora"
    r = cli_run("merge", FIX / "llama", qlora, "-o", tmp_path / "plain")
    assert r.exit_code == 0 and "trained on a 4-bit base" in r.stderr
    r = cli_run(
        "merge",
        FIX / "llama",
        qlora,
        "--onto-dequantized",
        Q / "llama-nf4",
        "-o",
        tmp_path / "onto",
    )
    assert r.exit_code == 0 and "trained on a 4-bit base" not in r.stderr
    out = load_file(tmp_path / "onto" / "model.safetensors")
    ref = reference_dequant("llama-nf4", load_file(Q / "llama-nf4" / "model.safetensors"))
    d = deltas(qlora)
    assert set(out) == set(ref)
    for name, w in ref.items():
        # BASE is float32, so the 16-bit output takes its dtype: dequant(Q4) + ΔW, one rounding
        assert same_bits(out[name], w.float() + d[name] if name in d else w.float()), name
    r = cli_run(
        "merge", FIX / "llama", qlora, "--onto-dequantized", Q / "llama-fp8", "-o", tmp_path / "x"
    )
    assert r.exit_code == 1 and "needs a 4-bit quantized base" in r.stderr
    r = cli_run(
        "merge", FIX / "gpt2", qlora, "--onto-dequantized", Q / "llama-nf4", "-o", tmp_path / "y"
    )
    assert r.exit_code == 1 and "is not a quantization of" in r.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def _copy_base(
    src: Path, dest: Path, tensors: dict | None = None, config: dict | None = None
) -> Path:
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, dest)
    if tensors is not None:
        save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize("case", ["missing", "misshapen", "nan", "overflow", "gptq", "shape"])
def test_bad_quantized_bases_are_refused_in_one_line(cli_run, tmp_path, case):
    t = load_file(Q / "llama-fp8" / "model.safetensors")
    cfg = json.loads((Q / "llama-fp8" / "config.json").read_text())
    layer = "model.layers.0.self_attn.q_proj.weight"
    adapter = PLAIN
    if case == "missing":
        del t[layer + "_scale_inv"]
    elif case == "misshapen":
        t[layer + "_scale_inv"] = torch.ones(2, 3)
    elif case == "nan":
        t[layer + "_scale_inv"][1, 1] = float("nan")
    elif case == "overflow":
        t[layer + "_scale_inv"][0, 0] = 3e38
    elif case == "gptq":
        cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    elif case == "shape":
        adapter = FIX / "adapters" / "gpt2-lora"
    base = _copy_base(Q / "llama-fp8", tmp_path / "base", t, cfg)
    r = cli_run("merge", base, adapter, "-o", tmp_path / "out")
    assert r.exit_code == 1, r.output
    line = r.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line
    if case != "shape":
        assert "model.layers.0.self_attn.q_proj" in line or case == "gptq"
    assert {
        "gptq": "GPTQ",
        "missing": "without its scale",
        "misshapen": "does not fit",
        "nan": "NaN",
        "overflow": "overflows",
    }.get(case, "") in line
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_savings_counts_logical_params_and_stored_bytes(cli_run):
    r = cli_run("savings", "--base", Q / "llama-nf4", "--json")
    base = json.loads(r.stdout)["base"]
    plain = json.loads(cli_run("savings", "--base", FIX / "llama", "--json").stdout)["base"]
    assert base["params"] == plain["params"]  # the same model
    assert base["bytes"] == sum(
        i.nbytes for i in read_header(Q / "llama-nf4" / "model.safetensors").tensors.values()
    )
    assert base["bytes"] < plain["bytes"] / 4 and "NF4" in base["quantization"]


def test_expert_lora_into_mxfp4_matches_peft(cli_run, tmp_path):
    """peft's target_parameters LoRA on gpt-oss experts (and a q_proj LoRA), merged by peft's
    merge_and_unload into the model transformers dequantizes from the MXFP4 fixture, equals
    loratool's --dtype float32 merge; kept as MXFP4, the experts are requantized."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(Q / "gptoss-mxfp4", dtype=torch.float32)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    peft_model = get_peft_model(model, cfg)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    peft_model.save_pretrained(tmp_path / "adapter")
    want = {k: v.detach() for k, v in peft_model.merge_and_unload().state_dict().items()}
    merged(
        cli_run,
        Q / "gptoss-mxfp4",
        tmp_path / "deq",
        "--dtype",
        "float32",
        adapter=tmp_path / "adapter",
    )
    out = load_file(tmp_path / "deq" / "model.safetensors")
    for layer in (0, 1):
        for p in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "self_attn.q_proj.weight"):
            name = f"model.layers.{layer}.{p}"
            assert same_bits(out[name], want[name]), name
    doc = merged(cli_run, Q / "gptoss-mxfp4", tmp_path / "keep", adapter=tmp_path / "adapter")
    entries = {e["name"]: e for e in doc["tensors"]}
    assert entries["model.layers.0.mlp.experts.gate_up_proj"]["op"] == "delta+requantize"
    assert doc["quantization"]["weights_rewritten"] == 4


def test_sharded_fp8_base_with_scales_in_another_shard(cli_run, tmp_path):
    """A weight and its scale in different shards: the group is written where its first part
    was, and the index says so."""
    from safetensors.torch import save_file

    t = load_file(Q / "llama-fp8" / "model.safetensors")
    base = tmp_path / "sharded"
    base.mkdir()
    shutil_copy = (Q / "llama-fp8" / "config.json").read_text()
    (base / "config.json").write_text(shutil_copy)
    first = {k: v for k, v in t.items() if not k.endswith("_scale_inv")}
    second = {k: v for k, v in t.items() if k.endswith("_scale_inv")}
    save_file(first, base / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(second, base / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    wm = {k: "model-00001-of-00002.safetensors" for k in first}
    wm.update({k: "model-00002-of-00002.safetensors" for k in second})
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": wm})
    )
    merged(cli_run, base, tmp_path / "out")
    single = tmp_path / "single"
    merged(cli_run, Q / "llama-fp8", single)
    want = load_file(single / "model.safetensors")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())[
        "weight_map"
    ]
    got = {}
    for shard in sorted(set(index.values())):
        got.update(load_file(tmp_path / "out" / shard))
    assert set(got) == set(want) == set(index)
    for k, v in want.items():
        assert same_bits(got[k], v), k
        assert k in load_file(tmp_path / "out" / index[k])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert index[q + "_scale_inv"] == index[q] == "model-00001-of-00002.safetensors"
    k = "model.layers.0.mlp.up_proj.weight_scale_inv"  # untouched: stays where it was
    assert index[k] == "model-00002-of-00002.safetensors"


def test_double_quant_nf4_merge_requantizes_by_bitsandbytes(cli_run, tmp_path):
    """QLoRA's usual base (NF4 + double quant): every tensor written for a merged weight is what
    bitsandbytes' quantize_4bit(compress_statistics=True) makes of the exact float32 merge (the
    JSON state: its bytes, then spaces to the planned length); bitsandbytes reads the state
    back and dequantizes what it dequantizes from its own; the report measures that."""
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.functional import QuantState

    from loratool.quant.bnb4 import table

    src = Q / "llama-nf4-dq"
    base = load_file(src / "model.safetensors")
    doc = merged(cli_run, src, tmp_path / "out")
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert set(out) == set(base)
    ref = reference_dequant("llama-nf4-dq", base)
    d = deltas()
    entries = {e["name"]: e for e in doc["tensors"]}
    state_key = ".quant_state.bitsandbytes__nf4"

    def dequant(q, st):
        absmax = F.dequantize_blockwise(st.absmax, st.state2) + st.offset
        return _dequantize_4bit_compute(
            q.reshape(-1), absmax, table("nf4"), 64, st.shape, torch.float32
        )

    for name, delta in d.items():
        exact = ref[name] + delta
        q, st = F.quantize_4bit(exact, blocksize=64, compress_statistics=True, quant_type="nf4")
        st.dtype = torch.bfloat16  # the parameter's dtype, kept from the base's state
        want = {"": q, **{"." + k: v for k, v in st.as_dict(packed=True).items()}}
        assert {k for k in out if k.startswith(name + ".") or k == name} == {name + k for k in want}
        for suffix, v in want.items():
            if suffix == state_key:
                got = bytes(out[name + suffix].tolist())
                assert got.rstrip(b" ") == bytes(v.tolist()) and len(got) > v.numel(), name
            else:
                assert same_bits(out[name + suffix], v), name + suffix
        read = QuantState.from_dict({k[1:]: out[name + k] for k in want if k}, device="cpu")
        assert read.offset.item() == st.offset.item() and read.nested
        written = dequant(q, read)
        assert same_bits(written, dequant(q, st))
        e = entries[name]
        assert e["op"] == "delta+requantize"
        assert e["max_rel_error"] == float((written - exact).abs().max()) / float(exact.abs().max())
        rms = float(torch.linalg.norm(written - exact) / torch.linalg.norm(exact))
        assert e["rms_rel_error"] == pytest.approx(rms, rel=1e-5)
        kept = float(((written - ref[name]) * delta).sum() / (delta * delta).sum())
        assert e["delta_kept"] == pytest.approx(kept, rel=1e-4)
    touched = {n for n in d} | {k for k in out for n in d if k.startswith(n + ".")}
    for k, v in base.items():
        if k not in touched:
            assert same_bits(out[k], v), k  # untouched weights and their states: as stored
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_use_double_quant"] is True
    # transformers loads it as Linear4bit with the nested state; bitsandbytes' own
    # dequantize_4bit (its CPU kernel, right on rows of 64) gives the written weight
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    name = "model.layers.0.self_attn.q_proj.weight"
    param = model.get_parameter(name)
    assert type(param).__name__ == "Params4bit" and param.quant_state.nested
    param.quant_state.dtype = torch.float32
    got = F.dequantize_4bit(param.data, param.quant_state)
    assert same_bits(
        got,
        dequant(
            out[name],
            QuantState.from_dict(
                {k[len(name) + 1 :]: v for k, v in out.items() if k.startswith(name + ".")}, "cpu"
            ),
        ).reshape(got.shape),
    )


def test_savings_catalog_view_of_a_quantized_base(cli_run):
    r = cli_run("add", PLAIN, "--task", "t", "--name", "plain")
    assert r.exit_code == 0, r.output
    # NF4 stores q_proj as a (2048, 1) byte column; the adapter fits the 64×64 weight it holds
    for q in ("llama-nf4", "llama-fp8"):
        doc = json.loads(cli_run("savings", "--base", Q / q, "--json").stdout)
        assert [a["name"] for a in doc["adapters"]] == ["plain"], q
