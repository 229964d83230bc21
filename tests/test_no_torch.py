"""The fast commands never import torch (importing it costs ~2 s; they must answer at once)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_catalog import make_peft_dir

from loratool.catalog import Catalog

ROOT = Path(__file__).resolve().parent.parent

# Runs one command through loratool.cli.main, then fails if torch got imported.
SCRIPT = """
import os, sys
os.environ["LORATOOL_NO_FAST_EXIT"] = "1"  # else main() would exit before the check below
from loratool.cli import main
args = sys.argv[1:]
sys.argv = ["loratool", *args]
try:
    main()
    code = 0
except SystemExit as exc:
    code = exc.code or 0
if "torch" in sys.modules:
    sys.stderr.write("TORCH IMPORTED\\n")
    sys.exit(99)
sys.exit(code)
"""

COMMANDS = [
    ["list"],
    ["list", "--json"],
    ["list", "--task", "t", "--tag", "v1"],
    ["list", "--trained", "base_model=tiny/*", "--trigger", "x", "--meta", "k", "--hash", "ab"],
    ["show", "a"],
    ["show", "a", "--json"],
    ["verify"],
    ["verify", "--json"],
    ["--help"],
]
if importlib.util.find_spec("loratool.cli.savings_cmd") is not None:
    COMMANDS += [["savings"], ["savings", "--json"], ["savings", "a"], ["savings", "--csv"]]


@pytest.fixture
def populated(loratool_home, tmp_path):
    with Catalog(loratool_home) as c:
        c.add(make_peft_dir(tmp_path / "a"), task="t", tags=["v1"])
        c.add(make_peft_dir(tmp_path / "b", seed=1), task="u")
    return loratool_home


def run(args, home):
    env = dict(os.environ, LORATOOL_HOME=str(home))
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, *args], env=env, cwd=ROOT, capture_output=True, text=True
    )


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_fast_commands_do_not_import_torch(populated, args):
    r = run(args, populated)
    assert "TORCH IMPORTED" not in r.stderr
    assert r.returncode == 0, r.stderr


def test_verify_of_a_damaged_catalog_does_not_import_torch(populated):
    with Catalog(populated) as c:
        blob = c.blob_path("a")
    blob.write_bytes(blob.read_bytes()[:-1] + b"\x00")
    r = run(["verify"], populated)
    assert "TORCH IMPORTED" not in r.stderr
    assert r.returncode == 1 and str(blob) in r.stdout


def test_importing_the_catalog_does_not_import_torch():
    code = (
        "import sys, loratool.catalog, loratool.cli.catalog_cmds; sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_planning_a_merge_does_not_import_torch(tmp_path):
    """The merge is planned (adapter read, checked, hashed; header computed) without torch, so
    that the engine can start copying while torch is imported."""
    code = f"""
import sys
from loratool.merge import AdapterInput, plan_merge
from loratool.sources import open_adapter
for spec in ("fixtures/adapters/llama-plain", "fixtures/adapters/conv-kohya.safetensors"):
    opened = open_adapter(spec, lazy=True)
    base = "fixtures/llama" if "llama" in spec else "fixtures/conv"
    plan = plan_merge(base, [AdapterInput(opened.adapter, 1.0, spec, opened.sha256)], {str(tmp_path)!r} + "/o", device="cpu")
    assert plan.touched == len(opened.adapter.modules)
sys.exit(99 if "torch" in sys.modules else 0)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_upgrading_an_old_catalog_on_list_does_not_import_torch(loratool_home, tmp_path):
    """0003_training reads the training facts of the adapters already there from their blobs'
    headers: without torch, so the first `list` after an upgrade answers as fast as ever."""
    from test_catalog_training import SS_META, kohya_tensors, old_catalog, save_like_sd_scripts

    f = save_like_sd_scripts(tmp_path / "xl.safetensors", kohya_tensors(), SS_META)
    old_catalog(loratool_home, {"xl": f})
    r = run(["list", "--trained", "steps=1200", "--json"], loratool_home)
    assert "TORCH IMPORTED" not in r.stderr
    assert r.returncode == 0, r.stderr
    assert '"name": "xl"' in r.stdout
