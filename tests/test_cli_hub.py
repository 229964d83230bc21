"""push and pull through the real huggingface_hub client against the loopback Hub."""

from __future__ import annotations

import json

import pytest
import torch
from peft_models import make_case
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return make_case("llama_rslora", tmp_path_factory.mktemp("hubcase"), seed=11)


@pytest.fixture
def alice(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub.alice)
    return hub


def test_push_then_pull_round_trip(alice, case, cli_run, tmp_path, monkeypatch):
    assert (
        cli_run(
            "add",
            case.adapter_dir,
            "--task",
            "translate",
            "--name",
            "tr",
            "--tag",
            "v1",
            "--description",
            "French to English",
        ).exit_code
        == 0
    )
    r = cli_run("push", "tr", "--repo", "alice/tr-lora", "--json")
    assert r.exit_code == 0, r.output
    pushed = json.loads(r.stdout)
    assert alice.alice not in r.output  # the token is never printed
    # recorded in the catalog, and show prints it
    r = cli_run("show", "tr", "--json")
    remotes = json.loads(r.stdout)["remotes"]
    assert remotes[0]["repo"] == "alice/tr-lora" and remotes[0]["commit"] == pushed["commit"]
    assert "alice/tr-lora" in cli_run("show", "tr").stdout

    # the repo holds a PEFT layout and a model card
    from huggingface_hub import snapshot_download

    snap = snapshot_download("alice/tr-lora")
    card = open(f"{snap}/README.md").read()
    from huggingface_hub import ModelCard

    data = ModelCard(card).data
    assert data.library_name == "peft"
    assert {"lora", "loratool", "translate", "v1"} <= set(data.tags)
    assert "PeftModel.from_pretrained" in card
    assert "French to English" in card and "Effective rank" in card

    # pull into a fresh home: identical tensors and metadata
    monkeypatch.setenv("LORATOOL_HOME", str(tmp_path / "fresh"))
    r = cli_run("pull", "alice/tr-lora", "--task", "translate", "--json")
    assert r.exit_code == 0, r.output
    pulled = json.loads(r.stdout)
    assert pulled["commit"] == pushed["commit"] and pulled["name"] == "tr-lora"
    row = json.loads(cli_run("show", "tr-lora", "--json").stdout)
    assert row["source"] == f"alice/tr-lora@{pushed['commit']}"
    orig = load_file(case.adapter_dir / "adapter_model.safetensors")
    r = cli_run("export", "tr-lora", tmp_path / "exported")
    assert r.exit_code == 0, r.output
    back = load_file(tmp_path / "exported" / "adapter_model.safetensors")
    assert set(orig) == set(back)
    for k in orig:
        assert torch.equal(orig[k], back[k]), k
    cfg_orig = json.loads((case.adapter_dir / "adapter_config.json").read_text())
    cfg_back = json.loads((tmp_path / "exported" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules"):
        assert cfg_back[key] == cfg_orig[key], key

    # the pulled adapter merges to the same weights as the original
    r1 = cli_run("merge", case.base_dir, "tr-lora", "-o", tmp_path / "m1")
    r2 = cli_run("merge", case.base_dir, case.adapter_dir, "-o", tmp_path / "m2")
    assert r1.exit_code == r2.exit_code == 0
    a, b = (
        load_file(tmp_path / "m1" / "model.safetensors"),
        load_file(tmp_path / "m2" / "model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pushed_files_load_in_peft(alice, case, cli_run):
    from huggingface_hub import snapshot_download
    from peft import PeftModel

    cli_run("add", case.adapter_dir, "--task", "t", "--name", "x")
    assert cli_run("push", "x", "--repo", "alice/x", "--revision", "exp").exit_code == 0
    snap = snapshot_download("alice/x", revision="exp")
    model = PeftModel.from_pretrained(case.fresh_base(), snap)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids).logits, case.peft_model(ids).logits, rtol=1e-5, atol=1e-5
        )
    r = cli_run("pull", "alice/x@exp", "--task", "t", "--name", "x-exp", "--keep-both")
    assert r.exit_code == 0, r.output


def test_failures_are_one_line_and_leave_the_catalog_unchanged(
    hub, case, cli_run, monkeypatch, tmp_path
):
    cli_run("add", case.adapter_dir, "--task", "t", "--name", "x")
    before = cli_run("list", "--json").stdout
    monkeypatch.delenv("HF_TOKEN", raising=False)
    r = cli_run("push", "x", "--repo", "alice/x")  # no token: 401
    assert r.exit_code == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    monkeypatch.setenv("HF_TOKEN", hub.bob)
    r = cli_run("push", "x", "--repo", "alice/x")  # someone else's namespace
    assert r.exit_code == 1 and hub.bob not in r.stderr
    r = cli_run("pull", "alice/does-not-exist", "--task", "t")
    assert r.exit_code == 1 and "alice/does-not-exist" in r.stderr
    monkeypatch.setenv("HF_TOKEN", hub.alice)
    cli_run("push", "x", "--repo", "alice/x")
    r = cli_run("pull", "alice/x@no-such-branch", "--task", "t")
    assert r.exit_code == 1 and "no-such-branch" in r.stderr
    assert cli_run("list", "--json").stdout == before
    assert json.loads(cli_run("show", "x", "--json").stdout)["remotes"][0]["repo"] == "alice/x"
