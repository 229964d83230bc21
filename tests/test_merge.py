"""The streaming merge against real peft merge_and_unload and against dense math."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from peft_models import make_case
from safetensors.torch import load_file, save_file

import loratool
from loratool.merge import (
    AdapterInput,
    compare_bases,
    merge,
    merge_into,
    ulp_distance,
    unmerge_from,
)
from loratool.sources import canonical_sha256

CASE_NAMES = ["llama", "llama_rslora", "llama_embed", "gpt2"]


@pytest.fixture(scope="session")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft-cases")
    return {n: make_case(n, root) for n in CASE_NAMES}


def inp(path, weight=1.0):
    a = loratool.load_adapter(path)
    return AdapterInput(a, weight, str(path), canonical_sha256(a))


def peft_merged_state(case, dtype=torch.float32):
    from peft import PeftModel

    model = PeftModel.from_pretrained(case.fresh_base(dtype), case.adapter_dir)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("name", CASE_NAMES)
def test_merge_matches_peft_float32(cases, name, tmp_path):
    case = cases[name]
    res = merge(case.base_dir, [inp(case.adapter_dir)], tmp_path / "out", device="cpu")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    theirs = peft_merged_state(case)
    base = load_file(case.base_dir / "model.safetensors")
    changed = 0
    for k, v in ours.items():
        torch.testing.assert_close(v, theirs[k], rtol=0, atol=1e-5, msg=k)
        if not torch.equal(v, base[k]):
            changed += 1
        else:  # untouched tensors are byte-identical copies
            assert v.view(torch.uint8).equal(base[k].view(torch.uint8))
    adapter = loratool.load_adapter(case.adapter_dir)
    assert changed == len(adapter.modules) == res.tensors_changed
    assert res.tensors_copied == len(ours) - changed
    # the base directory's other files come along
    assert (tmp_path / "out" / "config.json").read_bytes() == (
        case.base_dir / "config.json"
    ).read_bytes()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_bf16_merge_rounds_once_and_is_within_one_ulp_of_peft(cases, name, tmp_path):
    case = cases[name]
    bf_dir = tmp_path / "bf16-base"
    case.fresh_base(torch.bfloat16).save_pretrained(bf_dir)
    merge(bf_dir, [inp(case.adapter_dir)], tmp_path / "out", device="cpu")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    base = load_file(bf_dir / "model.safetensors")
    adapter = loratool.resolve(loratool.load_adapter(case.adapter_dir), loratool.read_base(bf_dir))
    for k, mod in adapter.modules.items():
        # the float32 merge, written out here, rounded once
        d = (mod.B.float() @ mod.A.float()) * mod.scale
        if mod.kind == "linear_fifo":  # Conv1D stores W as in×out
            d = d.T
        ref = (base[k].float() + d).to(torch.bfloat16)
        assert torch.equal(ours[k], ref), k
    from peft import PeftModel

    # peft (CPU) keeps the fp32 adapter as saved and adds in place: also one rounding
    peft_model = PeftModel.from_pretrained(
        __import__("transformers").AutoModelForCausalLM.from_pretrained(
            bf_dir, dtype=torch.bfloat16
        ),
        case.adapter_dir,
    )
    theirs = peft_model.merge_and_unload().state_dict()
    for k in adapter.modules:
        assert int(ulp_distance(ours[k], theirs[k].contiguous()).max()) <= 1, k


def _dense_deltas(base_dir, adapter_dir):
    """ΔW per base tensor, in float32, written out from the factors here."""
    adapter = loratool.resolve(loratool.load_adapter(adapter_dir), loratool.read_base(base_dir))
    out = {}
    for k, mod in adapter.modules.items():
        d = (mod.B.float() @ mod.A.float()) * mod.scale
        out[k] = d.T if mod.kind in ("linear_fifo", "embedding") else d
    return out


@pytest.mark.parametrize(
    ("stored", "option", "written"),
    [
        (torch.bfloat16, "float32", torch.float32),  # wider than stored: no rounding at all
        (torch.float32, "bfloat16", torch.bfloat16),  # narrower: the float32 sum rounded once
        (torch.float32, "float16", torch.float16),
    ],
)
def test_dtype_option_converts_every_float_tensor_and_rounds_once(
    cases, tmp_path, stored, option, written
):
    case = cases["llama_embed"]
    src = tmp_path / "base"
    case.fresh_base(stored).save_pretrained(src)
    merge(src, [inp(case.adapter_dir)], tmp_path / "out", device="cpu", dtype=option)
    ours = load_file(tmp_path / "out" / "model.safetensors")
    base = load_file(src / "model.safetensors")
    deltas = _dense_deltas(src, case.adapter_dir)
    assert deltas
    # peft saved the embedding layers it adapts in full (save_embedding_layers): they are
    # loaded into the base layer, as peft does, before the update is added
    saved = load_file(case.adapter_dir / "adapter_model.safetensors")
    for k, w in base.items():
        assert ours[k].dtype == written, k
        w = saved.get("base_model.model." + k.replace(".weight", ".base_layer.weight"), w)
        expected = (w.float() + deltas[k]) if k in deltas else w.float()
        assert torch.equal(ours[k], expected.to(written)), k


def test_blockwise_merge_across_many_blocks_equals_dense(cases, tmp_path, monkeypatch):
    """Blocks of a few rows (with a remainder) give the dense result; in bf16 exactly the
    float32 sum rounded once, however the rows are split."""
    import loratool.merge.engine as engine

    case = cases["gpt2"]
    src = tmp_path / "base"
    case.fresh_base(torch.bfloat16).save_pretrained(src)
    monkeypatch.setattr(engine, "_BLOCK_ELEMS", 3 * 64 + 5)  # 3 rows of a 64-wide weight per block
    merge(src, [inp(case.adapter_dir)], tmp_path / "out", device="cpu")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    base = load_file(src / "model.safetensors")
    for k, d in _dense_deltas(src, case.adapter_dir).items():
        assert torch.equal(ours[k], (base[k].float() + d).to(torch.bfloat16)), k


def test_sharded_base_keeps_its_layout(cases, tmp_path):
    case = cases["llama"]
    sharded = tmp_path / "sharded"
    case.fresh_base().save_pretrained(sharded, max_shard_size="60KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    merge(sharded, [inp(case.adapter_dir)], tmp_path / "out", device="cpu")
    out_index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert out_index["weight_map"] == index["weight_map"]
    whole = {}
    for s in shards:
        part = load_file(tmp_path / "out" / s)
        assert set(part) == {k for k, v in index["weight_map"].items() if v == s}
        whole.update(part)
    single = tmp_path / "single"
    merge(case.base_dir, [inp(case.adapter_dir)], single, device="cpu")
    ref = load_file(single / "model.safetensors")
    assert set(whole) == set(ref)
    for k in ref:
        assert torch.equal(whole[k], ref[k]), k


def test_weighted_multi_adapter_merge_equals_dense_sum(cases, tmp_path):
    a, b = cases["llama"], cases["llama_rslora"]
    merge(
        a.base_dir,
        [inp(a.adapter_dir, 0.7), inp(b.adapter_dir, -1.3)],
        tmp_path / "out",
        device="cpu",
    )
    ours = load_file(tmp_path / "out" / "model.safetensors")
    base = load_file(a.base_dir / "model.safetensors")
    expected = {k: v.clone() for k, v in base.items()}
    for path, w, rslora in ((a.adapter_dir, 0.7, False), (b.adapter_dir, -1.3, True)):
        cfg = json.loads((path / "adapter_config.json").read_text())
        sd = load_file(path / "adapter_model.safetensors")
        for key, A in sd.items():
            if ".lora_A." not in key:
                continue
            mod_path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            B = sd[key.replace("lora_A", "lora_B")]
            r = A.shape[0]
            alpha = cfg["lora_alpha"]
            for pat, val in cfg.get("alpha_pattern", {}).items():
                if mod_path.endswith(pat):
                    alpha = val
            scale = alpha / math.sqrt(r) if rslora else alpha / r
            expected[mod_path + ".weight"] += w * scale * (B @ A)
    for k in base:
        torch.testing.assert_close(ours[k], expected[k], rtol=0, atol=1e-5, msg=k)


def test_unmerge_of_a_merge_returns_the_base(cases, tmp_path, cli_run):
    case = cases["llama_rslora"]
    merged, restored = tmp_path / "merged", tmp_path / "restored"
    merge(case.base_dir, [inp(case.adapter_dir)], merged, device="cpu")
    merge(merged, [inp(case.adapter_dir, -1.0)], restored, device="cpu")
    report = compare_bases(restored, case.base_dir)
    assert report["tensors_checked"] == len(load_file(case.base_dir / "model.safetensors"))
    assert report["max_abs_error"] <= 1e-6
    # the CLI reports the same figures
    r = cli_run(
        "unmerge",
        merged,
        case.adapter_dir,
        "-o",
        tmp_path / "r2",
        "--check",
        case.base_dir,
        "--json",
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["check"]["max_abs_error"] == pytest.approx(report["max_abs_error"])
    assert data["check"]["tensors_exact"] == report["tensors_exact"]


def test_swap_tasks_in_one_pass(cases, tmp_path):
    a, b = cases["llama"], cases["llama_rslora"]
    with_a = tmp_path / "a"
    merge(a.base_dir, [inp(a.adapter_dir)], with_a, device="cpu")
    merge(with_a, [inp(a.adapter_dir, -1), inp(b.adapter_dir, 1)], tmp_path / "b", device="cpu")
    merge(a.base_dir, [inp(b.adapter_dir)], tmp_path / "b_direct", device="cpu")
    rep = compare_bases(tmp_path / "b", tmp_path / "b_direct")
    assert rep["max_abs_error"] < 1e-6


def test_in_memory_merge_and_unmerge_switch_tasks(cases):
    case = cases["gpt2"]
    from peft import PeftModel

    model = case.fresh_base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = loratool.load_adapter(case.adapter_dir)
    changed = merge_into(model, adapter)
    reference = (
        PeftModel.from_pretrained(case.fresh_base(), case.adapter_dir)
        .merge_and_unload()
        .state_dict()
    )
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, reference[k], rtol=0, atol=1e-5)
    assert len(changed) == len(adapter.modules)
    unmerge_from(model, adapter)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6)
    # a plain state dict works too
    sd = {k: v.clone() for k, v in before.items()}
    merge_into(sd, adapter)
    for k in changed:
        torch.testing.assert_close(sd[k], reference[k], rtol=0, atol=1e-5)


def test_ulp_distance_counts_representable_values():
    one = torch.tensor([1.0, -1.0, 0.0], dtype=torch.bfloat16)
    nxt = torch.tensor([1.0078125, -1.0078125, -0.0], dtype=torch.bfloat16)  # 1 + 2^-7
    assert ulp_distance(one, nxt).tolist() == [1, 1, 0]
    a = torch.tensor([1.0], dtype=torch.float32)
    b = torch.nextafter(torch.nextafter(a, torch.tensor(2.0)), torch.tensor(2.0))
    assert ulp_distance(a, b).item() == 2


# -- safety ---------------------------------------------------------------------------------


def test_existing_output_is_refused_without_force(cases, tmp_path, cli_run):
    case = cases["llama"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    r = cli_run("merge", case.base_dir, case.adapter_dir, "-o", out)
    assert r.exit_code == 1
    assert r.stderr.startswith("error: ") and "--force" in r.stderr
    assert (out / "keep").read_text() == "x"
    r = cli_run("merge", case.base_dir, case.adapter_dir, "-o", out, "--force")
    assert r.exit_code == 0, r.output
    assert not (out / "keep").exists() and (out / "model.safetensors").exists()


def test_misshapen_adapter_is_refused_and_nothing_written(cases, tmp_path, cli_run):
    case = cases["llama"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((case.adapter_dir / "adapter_config.json").read_text())
    sd = load_file(case.adapter_dir / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"
    sd[key] = torch.randn(64, sd[key].shape[1])  # k_proj is 32×64 under GQA
    save_file(sd, bad / "adapter_model.safetensors")
    r = cli_run("merge", case.base_dir, bad, "-o", tmp_path / "out")
    assert r.exit_code == 1
    assert "model.layers.0.self_attn.k_proj.weight" in r.stderr and "[64, 64]" in r.stderr
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "bad"] == []


def test_nan_in_result_is_refused(cases, tmp_path, cli_run):
    case = cases["llama"]
    adapter = loratool.load_adapter(case.adapter_dir)
    mod = next(iter(adapter.modules.values()))
    mod.B.fill_(1e30)
    mod.A.fill_(1e30)  # finite factors whose product overflows float32
    with pytest.raises(loratool.LoratoolError, match="NaN or Inf"):
        merge(case.base_dir, [AdapterInput(adapter, 1.0, "x", "0")], tmp_path / "out", device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_adapter_for_another_base_warns_or_refuses_with_strict(cases, tmp_path, cli_run):
    case = cases["llama"]
    other = tmp_path / "other"
    other.mkdir()
    cfg = json.loads((case.adapter_dir / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-3-70B"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    (other / "adapter_model.safetensors").write_bytes(
        (case.adapter_dir / "adapter_model.safetensors").read_bytes()
    )
    r = cli_run("merge", case.base_dir, other, "-o", tmp_path / "out")
    assert r.exit_code == 0 and "Llama-3-70B" in r.stderr
    r = cli_run("merge", case.base_dir, other, "-o", tmp_path / "out2", "--strict")
    assert r.exit_code == 1 and "Llama-3-70B" in r.stderr
    assert not (tmp_path / "out2").exists()


def test_unmerge_warns_when_adapter_not_recorded(cases, tmp_path, cli_run):
    case = cases["llama"]
    r = cli_run("unmerge", case.base_dir, case.adapter_dir, "-o", tmp_path / "out")
    assert r.exit_code == 0
    assert "not recorded as merged" in r.stderr
    merge(case.base_dir, [inp(case.adapter_dir)], tmp_path / "m", device="cpu")
    r = cli_run("unmerge", tmp_path / "m", case.adapter_dir, "-o", tmp_path / "out2")
    assert r.exit_code == 0 and "not recorded" not in r.stderr


def test_provenance_in_output_metadata(cases, tmp_path):
    case = cases["llama"]
    merge(case.base_dir, [inp(case.adapter_dir, 0.5)], tmp_path / "out", device="cpu")
    meta = loratool.read_header(tmp_path / "out" / "model.safetensors").metadata
    hist = json.loads(meta["loratool.merges"])
    assert hist[-1]["weight"] == 0.5 and len(hist[-1]["sha256"]) == 64
    assert meta["loratool.version"] == loratool.__version__
    assert meta["format"] == "pt"


def test_merge_killed_leaves_no_output(cases, tmp_path):
    """SIGKILL in the middle of a merge: no OUT, no partial file under OUT's name."""
    case = cases["llama"]
    big = tmp_path / "big"
    big.mkdir()
    # a base big enough that the merge takes a moment: the llama tensors plus padding tensors
    sd = load_file(case.base_dir / "model.safetensors")
    for i in range(40):
        sd[f"pad.{i}.weight"] = torch.randn(1024, 1024)
    save_file(sd, big / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    code = (
        "import sys, time, loratool.merge.engine as m\n"
        "orig = m._copy_range\n"
        "def slow(*a):\n"
        "    print('copying', flush=True); time.sleep(0.2); orig(*a)\n"
        "m._copy_range = slow\n"
        "from loratool.cli import main\n"
        f"sys.argv = ['loratool', 'merge', {str(big)!r}, {str(case.adapter_dir)!r}, '-o', {str(out)!r}, '--device', 'cpu']\n"
        "main()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=tmp_path)
    assert proc.stdout.readline().strip() == b"copying"
    time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith("out")]
    assert leftovers == []


def test_merge_that_cannot_fit_is_refused_before_writing(cases, tmp_path, cli_run, monkeypatch):
    case = cases["llama"]
    real = os.statvfs

    class Full:
        def __init__(self, st):
            self.f_frsize, self.f_bavail = st.f_frsize, 10  # ten blocks left

    monkeypatch.setattr(os, "statvfs", lambda p: Full(real(p)))
    r = cli_run("merge", case.base_dir, case.adapter_dir, "-o", tmp_path / "out")
    assert r.exit_code == 1
    assert (
        r.stderr.startswith("error: ") and "free" in r.stderr and str(tmp_path / "out") in r.stderr
    )
    assert list(tmp_path.iterdir()) == []


def test_cli_process_exit_codes_and_nan_factor_found_during_the_copy(cases, tmp_path):
    """Through the real entry point (which skips torch's teardown): exit 0 with complete JSON;
    a NaN in a factor, found only once the engine reads the factors, exits 1 with one error
    line naming the file and tensor, and leaves nothing."""
    case = cases["llama"]

    def run(*a):
        return subprocess.run(
            [sys.executable, "-m", "loratool", *map(str, a)], capture_output=True, text=True
        )

    ok = run(
        "merge", case.base_dir, case.adapter_dir, "-o", tmp_path / "ok", "--device", "cpu", "--json"
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["tensors_changed"] == len(
        loratool.load_adapter(case.adapter_dir).modules
    )
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((case.adapter_dir / "adapter_config.json").read_text())
    sd = load_file(case.adapter_dir / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    sd[key][0, 0] = float("nan")
    save_file(sd, bad / "adapter_model.safetensors")
    r = run("merge", case.base_dir, bad, "-o", tmp_path / "out", "--device", "cpu")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert (
        "adapter_model.safetensors" in lines[0]
        and "model.layers.1.self_attn.v_proj.weight" in lines[0]
    )
    assert "lora_A contains NaN" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "ok"]


def test_compare_bases_measures_ulps_per_element_and_at_tensor_scale(tmp_path):
    """1 + 2⁻²³ is one float32 ulp from 1; 1e-9 + 1e-12 is ~8000 ulps of its own value away
    but a tiny fraction of an ulp at the tensor's scale (that of 3.0, 2⁻²²)."""
    ref = torch.tensor([1.0, 1e-9, -3.0], dtype=torch.float32)
    res = ref.clone()
    res[0] = 1.0 + 2.0**-23
    res[1] = torch.tensor(1e-9 + 1e-12, dtype=torch.float32)
    save_file({"w": ref, "same": torch.ones(4)}, tmp_path / "ref.safetensors")
    save_file({"w": res, "same": torch.ones(4)}, tmp_path / "res.safetensors")
    own_ulps = int(ulp_distance(res[1:2], ref[1:2]).item())
    assert own_ulps > 1000
    rep = compare_bases(tmp_path / "res.safetensors", tmp_path / "ref.safetensors")
    assert rep["tensors_checked"] == 2 and rep["tensors_exact"] == 1
    assert rep["elements_checked"] == 7 and rep["elements_within_1_ulp"] == 4 + 2
    assert rep["max_ulp_error"] == own_ulps
    # ulp at the tensor's scale: |w| max is 3.0, whose ulp is 2⁻²²; the worst error is 2⁻²³
    assert rep["max_error_in_ulps_at_tensor_scale"] == 0.5
    assert rep["max_abs_error"] == pytest.approx(2.0**-23)


def test_in_memory_merge_equals_the_file_engine_bit_for_bit(cases, tmp_path):
    """merge_into sums like the file engine (same blocks, one rounding): a bf16 model with an
    embedding adapter merged in memory equals the merged file exactly."""
    case = cases["llama_embed"]
    src = tmp_path / "base"
    model = case.fresh_base(torch.bfloat16)
    model.save_pretrained(src)
    adapter = loratool.load_adapter(case.adapter_dir)
    merge(src, [AdapterInput(adapter, 0.5, "a", "0")], tmp_path / "out", device="cpu")
    on_disk = load_file(tmp_path / "out" / "model.safetensors")
    changed = merge_into(model, adapter, 0.5)
    assert any("embed_tokens" in k for k in changed)
    state = model.state_dict()
    for k in changed:
        assert torch.equal(state[k], on_disk[k]), k


def test_in_memory_merge_changes_nothing_when_a_result_overflows(cases):
    case = cases["llama"]
    model = case.fresh_base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = loratool.load_adapter(case.adapter_dir)
    last = list(adapter.modules.values())[-1]
    last.A.fill_(1e30)
    last.B.fill_(1e30)  # finite factors, infinite product: found on the last module
    with pytest.raises(loratool.LoratoolError, match="NaN or Inf"):
        merge_into(model, adapter)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
