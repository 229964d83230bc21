"""The merge engine on a CUDA device, against the CPU engine. Skipped where there is no GPU
(this project's CI machine has none; run these where one is at hand)."""

from __future__ import annotations

import pytest
import torch
from peft_models import make_case
from safetensors.torch import load_file

import loratool
from loratool.merge import AdapterInput, merge, merge_into, ulp_distance, unmerge_from
from loratool.sources import canonical_sha256

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda-cases")
    return {n: make_case(n, root) for n in ("llama", "gpt2", "llama_embed")}


def _inp(path, weight=1.0):
    a = loratool.load_adapter(path, lazy=True)
    return AdapterInput(a, weight, str(path), canonical_sha256(a))


@pytest.mark.parametrize("name", ["llama", "gpt2", "llama_embed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_merge_agrees_with_cpu(cases, tmp_path, name, dtype):
    case = cases[name]
    src = tmp_path / "base"
    case.fresh_base(dtype).save_pretrained(src)
    cpu = merge(src, [_inp(case.adapter_dir, 0.7)], tmp_path / "cpu", device="cpu")
    gpu = merge(src, [_inp(case.adapter_dir, 0.7)], tmp_path / "gpu", device="auto")
    assert cpu.device == "cpu" and gpu.device.startswith("cuda")
    a = load_file(tmp_path / "cpu" / "model.safetensors")
    b = load_file(tmp_path / "gpu" / "model.safetensors")
    for k in a:
        if dtype == torch.float32:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
        else:  # the float32 sums may differ in the last place; one rounding each
            assert int(ulp_distance(a[k], b[k]).max()) <= 1, k


def test_in_memory_merge_on_the_gpu(cases):
    case = cases["gpt2"]
    adapter = loratool.load_adapter(case.adapter_dir)
    on_cpu = case.fresh_base()
    on_gpu = case.fresh_base().to("cuda")
    before = {k: v.clone() for k, v in on_gpu.state_dict().items()}
    merge_into(on_cpu, adapter)
    merge_into(on_gpu, adapter)
    ref = on_cpu.state_dict()
    for k, v in on_gpu.state_dict().items():
        assert v.device.type == "cuda"
        torch.testing.assert_close(v.cpu(), ref[k], rtol=0, atol=1e-5, msg=k)
    unmerge_from(on_gpu, adapter)
    for k, v in on_gpu.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6, msg=k)


def test_cuda_buffers_are_pinned_once(cases, tmp_path):
    from loratool.merge import plan_merge
    from loratool.merge.engine import _Engine

    case = cases["llama"]
    plan = plan_merge(case.base_dir, [_inp(case.adapter_dir)], tmp_path / "o", device="cuda")
    engine = _Engine(plan)
    engine.ready()
    bufs = [engine.read.get_nowait() for _ in range(engine.read.qsize())]
    assert bufs and all(b.is_pinned() for b in bufs)
