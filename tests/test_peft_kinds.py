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


def cli(*args):
    """The CLI in a fresh process: what unmerge needs must survive a reload."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "loratool", *map(str, args)], capture_output=True, text=True
    )


# what each case needs to be unmerged beyond subtraction (None: nothing)
NEEDS_ORIGINALS = {"seqcls_dora", "tokcls", "bias_all", "bias_lora_only", "resized"}


@pytest.mark.parametrize("name", NAMES)
def test_unmerge_in_a_fresh_process_restores_the_base(kind_cases, name, tmp_path):
    case = kind_cases[name]
    merged, restored = tmp_path / "merged", tmp_path / "restored"
    r = cli("merge", case.base_dir, case.adapter_dir, "-o", merged, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    if name in NEEDS_ORIGINALS:
        # a replaced tensor cannot come back by subtraction: one line naming it, nothing written
        r = cli("unmerge", merged, case.adapter_dir, "-o", restored, "--device", "cpu")
        assert r.returncode == 1
        assert r.stderr.count("\n") == 1 and "--base ORIGINAL" in r.stderr, r.stderr
        assert not restored.exists()
        r = cli(
            "unmerge", merged, case.adapter_dir, "-o", restored, "--base", case.base_dir,
            "--check", case.base_dir, "--json",
        )  # fmt: skip
    else:
        r = cli(
            "unmerge", merged, case.adapter_dir, "-o", restored, "--check", case.base_dir,
            "--json",
        )  # fmt: skip
    assert r.returncode == 0, r.stderr
    check = json.loads(r.stdout)["check"]
    assert check["max_abs_error"] <= 1e-6, check
    config = json.loads((restored / "config.json").read_text())
    assert config == json.loads((case.base_dir / "config.json").read_text())


@pytest.mark.parametrize("name", ["seqcls_dora", "bias_all", "resized"])
def test_keep_originals_lets_unmerge_restore_without_the_base(kind_cases, name, tmp_path):
    case = kind_cases[name]
    merged, restored = tmp_path / "merged", tmp_path / "restored"
    r = cli("merge", case.base_dir, case.adapter_dir, "-o", merged, "--keep-originals")
    assert r.returncode == 0, r.stderr
    assert (merged / "loratool-originals.safetensors").is_file()
    r = cli("unmerge", merged, case.adapter_dir, "-o", restored, "--check", case.base_dir, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["check"]["max_abs_error"] <= 1e-6


def test_unmerge_refuses_an_original_that_is_not_the_one_replaced(kind_cases, tmp_path):
    case = kind_cases["seqcls_dora"]
    other = kind_cases["tokcls"]
    merged = tmp_path / "merged"
    assert cli("merge", case.base_dir, case.adapter_dir, "-o", merged).returncode == 0
    wrong = tmp_path / "wrong"
    sd = load_file(case.base_dir / "model.safetensors")
    sd["score.weight"] = sd["score.weight"] + 1
    wrong.mkdir()
    from safetensors.torch import save_file

    save_file(sd, wrong / "model.safetensors", metadata={"format": "pt"})
    r = cli("unmerge", merged, case.adapter_dir, "-o", tmp_path / "r", "--base", wrong)
    assert r.returncode == 1
    assert "score.weight: is not the tensor the merge replaced" in r.stderr
    assert not (tmp_path / "r").exists()
    assert other  # the session fixture built every case


# -- formats, catalog ------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_peft_export_is_tensor_identical_and_the_catalog_counts_every_tensor(
    kind_cases, name, tmp_path, cli_run
):
    case = kind_cases[name]
    original = load_file(case.adapter_dir / "adapter_model.safetensors")
    r = cli_run("add", case.adapter_dir, "--task", "t", "--name", name)
    assert r.exit_code == 0, r.output
    r = cli_run("export", name, tmp_path / "out")
    assert r.exit_code == 0, r.output
    back = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert set(back) == set(original)
    for k, v in original.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    cfg = json.loads((case.adapter_dir / "adapter_config.json").read_text())
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text()) == cfg
    (row,) = json.loads(cli_run("list", "--json").stdout)
    assert row["params"] == sum(v.numel() for v in original.values())
    assert row["bytes"] == sum(v.numel() * v.element_size() for v in original.values())


def _copy_adapter(case, dest, *, config=None, tensors=None):
    from safetensors.torch import save_file

    dest.mkdir()
    cfg = json.loads((case.adapter_dir / "adapter_config.json").read_text())
    cfg.update(config or {})
    (dest / "adapter_config.json").write_text(json.dumps(cfg))
    sd = load_file(case.adapter_dir / "adapter_model.safetensors")
    sd = tensors(sd) if tensors else sd
    save_file(sd, dest / "adapter_model.safetensors", metadata={"format": "pt"})
    return dest


def test_older_modules_to_save_key_forms_merge_the_same(kind_cases, tmp_path):
    case = kind_cases["seqcls_dora"]
    key = "base_model.model.score.weight"
    merge(case.base_dir, [inp(case.adapter_dir)], tmp_path / "a", device="cpu")
    want = load_file(tmp_path / "a" / "model.safetensors")
    for i, infix in enumerate((".modules_to_save.default", ".modules_to_save")):
        moved = key.replace(".weight", infix + ".weight")
        d = _copy_adapter(
            case,
            tmp_path / f"old{i}",
            tensors=lambda sd, moved=moved: {(moved if k == key else k): v for k, v in sd.items()},
        )
        merge(case.base_dir, [inp(d)], tmp_path / f"b{i}", device="cpu")
        got = load_file(tmp_path / f"b{i}" / "model.safetensors")
        for k in want:
            assert torch.equal(got[k], want[k]), (infix, k)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # a modules_to_save tensor whose shape differs from the base
        (
            lambda sd: {**sd, "base_model.model.score.weight": torch.zeros(4, 64)},
            "score.weight: modules_to_save tensor has shape [4, 64] but the base tensor is [3, 64]",
        ),
        # a DoRA magnitude of the wrong length
        (
            lambda sd: {
                **sd,
                "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(
                    63
                ),
            },
            "q_proj.weight: DoRA magnitude has shape [63] but this linear layer needs 64 values",
        ),
        # a full tensor nothing in the config explains
        (
            lambda sd: {**sd, "base_model.model.model.norm.weight": torch.ones(64)},
            "model.norm.weight: a full tensor that neither modules_to_save, bias nor "
            "save_embedding_layers explains",
        ),
    ],
)
def test_bad_inputs_are_one_line_and_nothing_is_written(kind_cases, tmp_path, edit, message):
    case = kind_cases["seqcls_dora"]
    d = _copy_adapter(case, tmp_path / "bad", tensors=edit)
    r = cli("merge", case.base_dir, d, "-o", tmp_path / "out")
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_an_expert_count_that_differs_from_the_base_is_refused(kind_cases, tmp_path):
    case = kind_cases["moe"]

    def three_experts(sd):
        out = {}
        for k, v in sd.items():
            if "experts" in k and "lora_A" in k:
                v = v[:6]  # r=2 × 3 experts
            elif "experts" in k and "lora_B" in k:
                v = v[:, :6].contiguous()
            out[k] = v
        return out

    d = _copy_adapter(case, tmp_path / "bad", tensors=three_experts)
    r = cli("merge", case.base_dir, d, "-o", tmp_path / "out")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "3 experts but the base holds 4" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa': this adapter is relative"),
        ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights='pissa_niter_4'"),
        ({"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
        ({"init_lora_weights": "corda"}, "init_lora_weights='corda'"),
        ({"init_lora_weights": "loftq"}, "init_lora_weights='loftq'"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication: the adapter's layers"),
        ({"use_qalora": True}, "use_qalora is set"),
        ({"alora_invocation_tokens": [1, 2]}, "alora_invocation_tokens is set"),
    ],
)
def test_config_fields_that_change_the_tensors_meaning_are_refused(
    kind_cases, tmp_path, config, message
):
    case = kind_cases["tokcls"]
    d = _copy_adapter(case, tmp_path / "bad", config=config)
    r = cli("merge", case.base_dir, d, "-o", tmp_path / "out")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_a_real_unconverted_pissa_adapter_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model
    from peft_kinds import _llama
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(_llama())
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(
        AutoModelForCausalLM.from_config(_llama()),
        LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"),
    )
    model.save_pretrained(tmp_path / "pissa")
    r = cli("merge", tmp_path / "base", tmp_path / "pissa", "-o", tmp_path / "out")
    assert r.returncode == 1 and "init_lora_weights='pissa'" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


# -- names: VLM renames ------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["old checkpoint", "old adapter"])
def test_vlm_language_model_names_resolve_as_transformers_renames_them(
    kind_cases, tmp_path, direction
):
    """transformers ≥ 4.52 calls a llava-style VLM's text layers model.language_model.layers…;
    checkpoints in the original layout say language_model.model.layers…"""
    from safetensors.torch import save_file

    case = kind_cases["tokcls"]
    plain = tmp_path / "plain"
    merge(case.base_dir, [inp(case.adapter_dir)], plain, device="cpu")
    want = load_file(plain / "model.safetensors")

    def ckpt(k):  # the original llava checkpoint layout
        return "language_model." + k if k.startswith("model.") else k

    def new(k):  # the model's names since 4.52
        return k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k

    base = tmp_path / "vlm-base"
    base.mkdir()
    sd = load_file(case.base_dir / "model.safetensors")
    rename_base = ckpt if direction == "old checkpoint" else new
    save_file({rename_base(k): v for k, v in sd.items()}, base / "model.safetensors")
    p = "base_model.model."
    rename_adapter = new if direction == "old checkpoint" else ckpt
    d = _copy_adapter(
        case,
        tmp_path / "vlm-adapter",
        tensors=lambda sd: {p + rename_adapter(k.removeprefix(p)): v for k, v in sd.items()},
    )
    merge(base, [inp(d)], tmp_path / "out", device="cpu")
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert set(got) == {rename_base(k) for k in want}
    for k, v in want.items():
        assert torch.equal(got[rename_base(k)], v), k


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("seqcls_dora", "cannot hold a linear+dora module"),
        ("moe", "cannot hold a experts×4 module"),
        ("tokcls", "cannot hold a tensor the adapter replaces (modules_to_save)"),
        ("tokens", "cannot hold a tensor the adapter replaces rows of (trainable_tokens)"),
    ],
)
def test_formats_that_cannot_hold_a_kind_refuse_it_by_name(
    kind_cases, name, message, tmp_path, cli_run
):
    case = kind_cases[name]
    r = cli_run("convert", case.adapter_dir, tmp_path / "out.safetensors", "--to", "kohya")
    assert r.exit_code == 1
    assert message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "out.safetensors").exists()


# -- inspect-rank, resize, combine -------------------------------------------------------------


def test_inspect_rank_measures_each_expert_and_the_dora_magnitudes(kind_cases, cli_run):
    from loratool.rank import factored_svdvals

    moe = kind_cases["moe"]
    r = cli_run("inspect-rank", moe.adapter_dir, "--json")
    assert r.exit_code == 0, r.output
    mods = {m["name"]: m for m in json.loads(r.stdout)["modules"]}
    name = "model.layers.0.mlp.experts.down_proj"
    experts = mods[name]["experts"]
    assert len(experts) == 4
    # expert 2's spectrum, written out from peft's layouts: A rows 2r…3r, B columns k·E + 2
    sd = load_file(moe.adapter_dir / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.mlp.experts.lora_"
    A, B = sd[key + "A.weight"], sd[key + "B.weight"]
    r_, E = 2, 4
    A2, B2 = A[2 * r_ : 3 * r_], B[:, [k * E + 2 for k in range(r_)]]
    want = factored_svdvals(B2, A2, 4 / 2).tolist()
    assert experts[2]["singular_values"] == pytest.approx(want, rel=1e-5)

    dora = kind_cases["seqcls_dora"]
    r = cli_run("inspect-rank", dora.adapter_dir, "--base", dora.base_dir, "--json")
    assert r.exit_code == 0, r.output
    m = {x["name"]: x for x in json.loads(r.stdout)["modules"]}[
        "model.layers.0.self_attn.q_proj.weight"
    ]
    sd = load_file(dora.adapter_dir / "adapter_model.safetensors")
    mag = sd["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"]
    W = load_file(dora.base_dir / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    moved = (mag / torch.linalg.norm(W, dim=1) - 1).abs()
    assert m["dora"]["moved_max"] == pytest.approx(float(moved.max()), rel=1e-5)
    assert m["dora"]["magnitude_max"] == pytest.approx(float(mag.max()))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("seqcls_dora", "a DoRA module (linear+dora) cannot be combined"),
        ("tokcls", "this adapter also replaces a full tensor (modules_to_save)"),
        ("moe", "this one is experts×4"),
    ],
)
def test_combine_refuses_what_it_cannot_combine_by_name(
    kind_cases, name, message, tmp_path, cli_run
):
    case = kind_cases[name]
    r = cli_run(
        "combine", case.adapter_dir, case.adapter_dir, "--method", "cat", "-o", tmp_path / "c"
    )
    assert r.exit_code == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "c").exists()


def test_resize_refuses_dora_truncation_and_expert_stacks(kind_cases, tmp_path, cli_run):
    r = cli_run(
        "resize", kind_cases["seqcls_dora"].adapter_dir, "--rank", "2", "-o", tmp_path / "a"
    )
    assert r.exit_code == 1 and "DoRA module cannot be truncated" in r.stderr, r.stderr
    r = cli_run("resize", kind_cases["moe"].adapter_dir, "--rank", "1", "-o", tmp_path / "b")
    assert r.exit_code == 1 and "experts×4" in r.stderr, r.stderr


# -- the committed fixtures (fixtures/make_peft_kinds.py) --------------------------------------

FIXTURE_ADAPTERS = {
    "seqcls-dora": ("llama-seqcls", "AutoModelForSequenceClassification"),
    "bias-all": ("llama", CAUSAL := "AutoModelForCausalLM"),
    "lora-bias": ("llama", CAUSAL),
    "dora-embed": ("llama", CAUSAL),
    "tokens": ("llama", CAUSAL),
    "gpt2-dora": ("gpt2", CAUSAL),
    "moe": ("qwen3-moe", CAUSAL),
}


@pytest.mark.parametrize("name", sorted(FIXTURE_ADAPTERS))
def test_fixture_adapters_merge_to_the_peft_models_logits(fixtures, name, tmp_path):
    import transformers
    from peft import PeftModel

    base_name, cls_name = FIXTURE_ADAPTERS[name]
    root = fixtures / "peft-kinds"
    base, adapter = root / base_name, root / "adapters" / name
    merge(base, [inp(adapter)], tmp_path / "out", device="cpu")
    cls = getattr(transformers, cls_name)
    x = torch.tensor([[1, 3, 7, 12, 30], [5, 9, 2, 3, 11]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = logits(PeftModel.from_pretrained(cls.from_pretrained(base), adapter).eval(), x)
        ours = logits(cls.from_pretrained(tmp_path / "out").eval(), x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
