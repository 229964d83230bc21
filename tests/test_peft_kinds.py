"""Every kind of tensor a real peft adapter holds, merged by loratool, against peft itself:
the merged tensors against peft's merge_and_unload, the merged model's logits against the
unmerged PeftModel's."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft_kinds import CASES, make_kind_case
from safetensors.torch import load_file

import loratool
from loratool.merge import AdapterInput, merge
from loratool.sources import canonical_sha256

NAMES = sorted(CASES)


@pytest.fixture(scope="session")
def kind_cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft-kinds")
    return {n: make_kind_case(n, root) for n in NAMES}


def inp(path, weight=1.0):
    a = loratool.load_adapter(path)
    return AdapterInput(a, weight, str(path), canonical_sha256(a))


def peft_merged(case, dtype=torch.float32) -> dict:
    model = case.peft_model(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def ids(case, n=2, length=7):
    g = torch.Generator().manual_seed(3)
    vocab = case.resize or json.loads((case.base_dir / "config.json").read_text())["vocab_size"]
    return torch.randint(1, vocab, (n, length), generator=g)


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("name", NAMES)
def test_merge_equals_peft_merge_and_unload(kind_cases, name, tmp_path):
    case = kind_cases[name]
    res = merge(case.base_dir, [inp(case.adapter_dir)], tmp_path / "out", device="cpu")
    # compared as the models hold them (transformers fuses per-expert checkpoint tensors)
    ours = case.load_base(tmp_path / "out").state_dict()
    theirs = peft_merged(case)
    base = load_file(case.base_dir / "model.safetensors")
    compared = 0
    tied = json.loads((case.base_dir / "config.json").read_text()).get("tie_word_embeddings")
    for k, v in ours.items():
        if tied and k.endswith(("lm_head.weight", "embed_tokens.weight", "wte.weight")):
            continue  # peft's merge changes both through the tie; checked by the logits below
        assert k in theirs, k
        torch.testing.assert_close(v, theirs[k], rtol=0, atol=1e-5, msg=k)
        compared += 1
    assert compared > 0
    changed = {t["name"] for t in res.tensors}
    written = load_file(tmp_path / "out" / "model.safetensors")
    for k in base:
        if k not in changed:  # untouched tensors are byte-identical copies
            assert written[k].view(torch.uint8).equal(base[k].view(torch.uint8)), k


@pytest.mark.parametrize("name", NAMES)
def test_merged_logits_equal_the_unmerged_peft_model(kind_cases, name, tmp_path):
    case = kind_cases[name]
    merge(case.base_dir, [inp(case.adapter_dir)], tmp_path / "out", device="cpu")
    x = ids(case)
    ours = logits(case.load_base(tmp_path / "out"), x)
    theirs = logits(case.peft_model(), x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
