"""What loratool writes is readable by other programs and users: file modes from the umask,
config.json's dtype after --dtype, adapters that AutoPeftModelForCausalLM loads, model cards
the Hub reads, a warning for a double merge, and Ctrl-C that leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"


@contextmanager
def umask(value: int):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """Every path under (and including) ``root`` → its permission bits."""
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    return {str(p.relative_to(root.parent)): stat.S_IMODE(p.stat().st_mode) for p in paths}


def expect(root: Path, mask: int) -> None:
    want_dir, want_file = 0o777 & ~mask, 0o666 & ~mask
    for rel, mode in modes(root).items():
        p = root.parent / rel
        want = want_dir if p.is_dir() else want_file
        assert mode == want, f"{rel}: {oct(mode)}, expected {oct(want)} under umask {oct(mask)}"


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_every_output_gets_the_umask_mode(cli_run, tmp_path, mask, loratool_home):
    out = tmp_path / "out"
    out.mkdir()
    with umask(mask):
        assert (
            cli_run(
                "merge", FIX / "llama", FIX / "adapters/llama-plain", "-o", out / "merged"
            ).exit_code
            == 0
        )
        assert (
            cli_run(
                "merge",
                FIX / "llama" / "model.safetensors",
                FIX / "adapters/llama-plain",
                "-o",
                out / "m.safetensors",
            ).exit_code
            == 0
        )
        assert (
            cli_run(
                "merge", FIX / "llama-sharded", FIX / "adapters/llama-plain", "-o", out / "sharded"
            ).exit_code
            == 0
        )
        assert (
            cli_run("add", FIX / "adapters/llama-plain", "--task", "t", "--name", "p").exit_code
            == 0
        )
        assert cli_run("export", "p", out / "exported").exit_code == 0
        assert cli_run("export", "p", out / "k.safetensors", "--format", "kohya").exit_code == 0
        assert (
            cli_run("convert", FIX / "adapters/llama-plain", out / "conv", "--to", "peft").exit_code
            == 0
        )
        assert cli_run("resize", "p", "--rank", "2", "-o", out / "resized").exit_code == 0
        r = cli_run("unmerge", out / "merged", FIX / "adapters/llama-plain", "-o", out / "restored")
        assert r.exit_code == 0, r.output
    for name in (
        "merged",
        "m.safetensors",
        "sharded",
        "exported",
        "k.safetensors",
        "conv",
        "resized",
        "restored",
    ):
        expect(out / name, mask)
    # the catalog's blobs and folders too (they are copied and served like any output)
    for p in (loratool_home / "blobs").rglob("*"):
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(p.stat().st_mode) == want, p


def test_plot_gets_the_umask_mode(cli_run, tmp_path):
    pytest.importorskip("matplotlib")
    with umask(0o022):
        r = cli_run("inspect-rank", FIX / "adapters/llama-plain", "--plot", tmp_path / "s.png")
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE((tmp_path / "s.png").stat().st_mode) == 0o644


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_merge_dtype_rewrites_config_so_auto_loads_it(cli_run, tmp_path, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    r = cli_run("merge", FIX / "llama", FIX / "adapters/llama-plain", "-o", out, "--dtype", dtype)
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == dtype and cfg["torch_dtype"] == dtype
    # every other key is the base's
    base_cfg = json.loads((FIX / "llama" / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if "dtype" not in k} == {
        k: v for k, v in base_cfg.items() if "dtype" not in k
    }
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == getattr(torch, dtype)
    assert all(p.dtype == getattr(torch, dtype) for p in model.parameters())


def test_merge_same_dtype_copies_config_untouched(cli_run, tmp_path):
    out = tmp_path / "merged"
    assert cli_run("merge", FIX / "llama", FIX / "adapters/llama-plain", "-o", out).exit_code == 0
    assert (out / "config.json").read_bytes() == (FIX / "llama" / "config.json").read_bytes()


def test_dtype_in_sub_configs_is_rewritten(cli_run, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(FIX / "llama", base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["text_config"] = {"model_type": "llama", "dtype": "float32", "hidden_size": 64}
    cfg["vision_config"] = {"hidden_size": 8}  # states no dtype: left alone
    (base / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "merged"
    r = cli_run("merge", base, FIX / "adapters/llama-plain", "-o", out, "--dtype", "bfloat16")
    assert r.exit_code == 0, r.output
    got = json.loads((out / "config.json").read_text())
    assert got["text_config"] == {"model_type": "llama", "dtype": "bfloat16", "hidden_size": 64}
    assert got["vision_config"] == {"hidden_size": 8}


# -- resize, extract and combine: outputs AutoPeftModelForCausalLM loads ----------------------


@pytest.fixture
def source(tmp_path) -> Path:
    """llama-plain naming its base by an absolute path (as extract names a local base)."""
    src = tmp_path / "src"
    shutil.copytree(FIX / "adapters" / "llama-plain", src)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(FIX / "llama")
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    return src


def auto_peft_loads(path: Path):
    """AutoPeftModelForCausalLM.from_pretrained(path): the base found from the adapter's own
    config, its lora weights those of the file."""
    import torch
    from peft import AutoPeftModelForCausalLM, PeftModelForCausalLM
    from safetensors.torch import load_file

    model = AutoPeftModelForCausalLM.from_pretrained(path)
    assert isinstance(model, PeftModelForCausalLM)
    saved = load_file(path / "adapter_model.safetensors")
    state = {k.replace(".default", ""): v for k, v in model.state_dict().items()}
    for k, v in saved.items():
        assert torch.equal(state[k], v), k
    return model


def test_resize_extract_combine_outputs_load_with_auto_peft(cli_run, tmp_path, source):
    cfg_src = json.loads((source / "adapter_config.json").read_text())
    outs = {
        "resize": ["resize", source, "--rank", "2", "-o", tmp_path / "resize"],
        "combine": ["combine", source, source, "--method", "cat", "-o", tmp_path / "combine"],
        "svd": [
            "combine",
            source,
            source,
            "--method",
            "svd",
            "--rank",
            "2",
            "-o",
            tmp_path / "svd",
        ],
    }
    merged = tmp_path / "merged"
    assert cli_run("merge", FIX / "llama", source, "-o", merged).exit_code == 0
    outs["extract"] = ["extract", FIX / "llama", merged, "--rank", "4", "-o", tmp_path / "extract"]
    for name, args in outs.items():
        r = cli_run(*args)
        assert r.exit_code == 0, (name, r.output)
        cfg = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert cfg["task_type"] == "CAUSAL_LM", name
        assert cfg["base_model_name_or_path"] == cfg_src["base_model_name_or_path"], name
        auto_peft_loads(tmp_path / name)


def test_catalog_results_keep_task_type_and_an_absolute_base(cli_run, tmp_path, monkeypatch):
    """A source naming its base by a relative path (as the fixtures do) gets it absolute: the
    result loads from any directory."""
    monkeypatch.chdir(ROOT)
    plain = FIX / "adapters" / "llama-plain"
    assert cli_run("add", plain, "--task", "t", "--name", "p").exit_code == 0
    assert cli_run("resize", "p", "--rank", "2", "--as", "p2").exit_code == 0
    assert cli_run("combine", "p", "p2", "--method", "cat", "--as", "p3").exit_code == 0
    for name in ("p2", "p3"):
        out = tmp_path / name
        assert cli_run("export", name, out).exit_code == 0
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["task_type"] == "CAUSAL_LM"
        assert cfg["base_model_name_or_path"] == str(FIX / "llama")
    monkeypatch.chdir(tmp_path)
    auto_peft_loads(tmp_path / "p3")


def test_combine_of_other_modules_writes_a_config_that_names_them(cli_run, tmp_path, source):
    """The first input's config is not reused for modules it does not name."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    other = tmp_path / "other"
    shutil.copytree(source, other)
    from safetensors.torch import load_file, save_file

    t = load_file(source / "adapter_model.safetensors")
    save_file(
        {
            k.replace("q_proj", "k_proj"): v[:, :] if "lora_A" in k else v[:32]
            for k, v in t.items()
            if "q_proj" in k
        },
        other / "adapter_model.safetensors",
    )
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["target_modules"] = ["k_proj"]
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "both"
    r = cli_run("combine", source, other, "--method", "cat", "-o", out)
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == {"q_proj", "v_proj", "k_proj"}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(FIX / "llama"), out)
    loaded = {k for k in model.state_dict() if "lora_" in k}
    assert len(loaded) == len(load_file(out / "adapter_model.safetensors"))


# -- the model card push writes ------------------------------------------------------------------


@pytest.fixture
def alice(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub.alice)
    return hub


def pushed(repo_id: str) -> tuple[Path, object]:
    from huggingface_hub import ModelCard, snapshot_download

    snap = Path(snapshot_download(repo_id))
    return snap, ModelCard.load(snap / "README.md")


def no_local_paths(text: str, *roots: Path) -> None:
    for root in (*roots, ROOT, Path.home()):
        assert str(root) not in text, root
    assert "/tmp/" not in text and "fixtures/" not in text


def python_blocks(text: str) -> list[str]:
    import re

    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_pushed_card_of_a_language_model_adapter(alice, cli_run, tmp_path):
    import ast

    plain = FIX / "adapters" / "llama-plain"
    r = cli_run(
        "add", plain, "--task", "summarize", "--name", "s", "--base-model",
        "meta-llama/Llama-3.2-1B", "--meta", "license=llama3.2", "--tag", "v1",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    r = cli_run("push", "s", "--repo", "alice/s-lora", "--json")
    assert r.exit_code == 0, r.output
    snap, card = pushed("alice/s-lora")
    card.validate()  # the Hub's own YAML check (the loopback Hub's validate-yaml route)
    d = card.data
    assert d.library_name == "peft"
    assert d.base_model == "meta-llama/Llama-3.2-1B"
    assert "base_model:adapter:meta-llama/Llama-3.2-1B" in d.tags
    assert {"lora", "loratool", "summarize", "v1"} <= set(d.tags)
    assert d.pipeline_tag == "text-generation" and d.license == "llama3.2"
    (code,) = python_blocks(card.text)
    ast.parse(code)
    assert "AutoModelForCausalLM.from_pretrained('meta-llama/Llama-3.2-1B')" in code
    assert "PeftModel.from_pretrained(model, 'alice/s-lora')" in code
    cfg = json.loads((snap / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "meta-llama/Llama-3.2-1B"
    assert cfg["task_type"] == "CAUSAL_LM"
    no_local_paths((snap / "README.md").read_text() + json.dumps(cfg), tmp_path)


def test_pushed_card_of_a_path_with_a_local_base_names_no_base(alice, cli_run, tmp_path, source):
    r = cli_run("push", source, "--repo", "alice/local-lora", "--task", "chat")
    assert r.exit_code == 0, r.output
    assert "not a Hub id" in r.stderr  # said, not silently dropped
    snap, card = pushed("alice/local-lora")
    card.validate()
    assert card.data.base_model is None
    assert not any(t.startswith("base_model:") for t in card.data.tags)
    cfg = json.loads((snap / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] is None
    no_local_paths((snap / "README.md").read_text() + json.dumps(cfg), tmp_path, source)
    # --base-model names it
    r = cli_run(
        "push", source, "--repo", "alice/local-lora2", "--base-model", "meta-llama/Llama-3.2-1B"
    )
    assert r.exit_code == 0, r.output
    assert pushed("alice/local-lora2")[1].data.base_model == "meta-llama/Llama-3.2-1B"
    r = cli_run("push", source, "--repo", "alice/x", "--base-model", str(FIX / "llama"))
    assert r.exit_code == 2 and "not a Hub id" in r.stderr


def test_pushed_card_of_a_diffusion_adapter_uses_diffusers(alice, cli_run, tmp_path):
    kohya = FIX / "adapters" / "conv-kohya.safetensors"
    r = cli_run("push", kohya, "--repo", "alice/style", "--task", "style", "--base-model",
                "stabilityai/stable-diffusion-xl-base-1.0")  # fmt: skip
    assert r.exit_code == 0, r.output
    snap, card = pushed("alice/style")
    card.validate()
    d = card.data
    assert d.library_name == "diffusers" and d.pipeline_tag == "text-to-image"
    assert "base_model:adapter:stabilityai/stable-diffusion-xl-base-1.0" in d.tags
    (code,) = python_blocks(card.text)
    assert "DiffusionPipeline.from_pretrained('stabilityai/stable-diffusion-xl-base-1.0'" in code
    assert "load_lora_weights('alice/style'" in code and "AutoModel" not in card.text
    files = {p.name for p in snap.iterdir()}
    assert "adapter_config.json" not in files and files - {"README.md", ".gitattributes"}
    # the weights file the card names is the one uploaded, and reads back as this adapter
    import re

    weight = re.search(r"weight_name='([^']+)'", code)
    name = weight.group(1) if weight else "pytorch_lora_weights.safetensors"
    assert name in files
    r = cli_run("inspect-rank", snap / name, "--json")
    assert r.exit_code == 0, r.output


# -- a double merge warns ----------------------------------------------------------------------


def test_merging_an_adapter_already_merged_warns(cli_run, tmp_path):
    plain = FIX / "adapters" / "llama-plain"
    once = tmp_path / "once"
    assert cli_run("merge", FIX / "llama", plain, "-o", once).exit_code == 0
    r = cli_run("merge", once, plain, "-o", tmp_path / "twice")
    assert r.exit_code == 0, r.output
    assert "already merged" in r.stderr and "adds it twice" in r.stderr
    r = cli_run("merge", once, plain, "-o", tmp_path / "j", "--json")
    assert any("already merged" in w for w in json.loads(r.stdout)["warnings"])
    # a different adapter, or the swap (-1 then +1 of another), does not warn
    r = cli_run(
        "merge", once, f"{plain}=-1", FIX / "adapters" / "llama-rslora", "-o", tmp_path / "s"
    )
    assert r.exit_code == 0 and "already merged" not in r.stderr


# -- Ctrl-C: exit 130, nothing left behind ----------------------------------------------------------


def _interrupt_at_hang(
    args: list, env: dict, point: str = "output-written"
) -> subprocess.CompletedProcess:
    p = subprocess.Popen(
        [sys.executable, "-m", "loratool", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **env, "LORATOOL_TEST_HANG": point},
        text=True,
        cwd=ROOT,
    )
    err = []
    for line in p.stderr:
        err.append(line)
        if line.startswith(f"loratool-test-hang {point}"):
            break
    else:
        p.wait()
        raise AssertionError(f"never reached {point}: {''.join(err)}")
    p.send_signal(signal.SIGINT)
    out, rest = p.communicate(timeout=120)
    return subprocess.CompletedProcess(args, p.returncode, out, "".join(err) + rest)


@pytest.mark.parametrize(
    "command",
    [
        ["merge", FIX / "llama", FIX / "adapters/llama-plain", "-o", "{out}"],
        ["merge", FIX / "llama/model.safetensors", FIX / "adapters/llama-plain", "-o", "{out}"],
        ["resize", FIX / "adapters/llama-plain", "--rank", "2", "-o", "{out}"],
        [
            "combine",
            FIX / "adapters/llama-plain",
            FIX / "adapters/llama-plain",
            "--method",
            "cat",
            "-o",
            "{out}",
        ],
        ["convert", FIX / "adapters/llama-plain", "{out}", "--to", "kohya"],
        ["export", FIX / "adapters/llama-plain", "{out}", "--format", "peft"],
        ["inspect-rank", FIX / "adapters/llama-plain", "--plot", "{out}.png"],
    ],
    ids=lambda c: (
        c[0]
        if c[0] != "merge"
        else f"merge-{'file' if 'model.safetensors' in str(c[1]) else 'dir'}"
    ),
)
def test_sigint_exits_130_and_leaves_nothing_behind(command, tmp_path):
    if command[0] == "inspect-rank":
        pytest.importorskip("matplotlib")
    outs = tmp_path / "outs"
    outs.mkdir()
    out = outs / "out"
    args = [str(a).replace("{out}", str(out)) for a in command]
    env = {"LORATOOL_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    r = _interrupt_at_hang(args, env)
    assert r.returncode == 130, r.stderr
    assert r.stderr.splitlines()[-1] == "error: interrupted", r.stderr
    assert "Traceback" not in r.stderr
    assert list(outs.iterdir()) == []  # no output, no temporary (hidden ones included)


def test_sigint_during_add_keeps_the_catalog_sound(cli_run, tmp_path, loratool_home):
    env = {"LORATOOL_HOME": str(loratool_home), "HF_HUB_OFFLINE": "1"}
    r = _interrupt_at_hang(
        ["add", FIX / "adapters/llama-plain", "--task", "t"], env, point="blob-temp-written"
    )
    assert r.returncode == 130 and r.stderr.splitlines()[-1] == "error: interrupted"
    r = cli_run("verify", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["adapters"] == 0
    assert [p.name for p in (loratool_home / "blobs").rglob("*") if p.is_file()] == []
