"""The CLI as a whole: every command documented, README in step with it, errors one line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from loratool.cli import COMMANDS, cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_help_with_an_example(cli_run, name):
    r = cli_run(name, "--help")
    assert r.exit_code == 0, r.output
    assert "Example" in r.stdout, f"{name} --help shows no example"
    assert f"loratool {name}" in r.stdout


def test_readme_lists_exactly_the_cli_commands():
    readme = (ROOT / "README.md").read_text()
    listed = re.findall(r"^\| `loratool ([a-z-]+)", readme, flags=re.M)
    assert sorted(listed) == sorted(COMMANDS)
    assert sorted(cli.list_commands(None)) == sorted(COMMANDS)


def test_version_and_usage_errors(cli_run):
    r = cli_run("--version")
    assert r.exit_code == 0 and "loratool, version" in r.stdout
    r = cli_run("merge")
    assert r.exit_code == 2  # click's usage error
    r = cli_run("no-such-command")
    assert r.exit_code == 2


def test_help_does_not_import_torch():
    code = "import sys\nfrom loratool.cli import main\nsys.argv=['loratool','--help']\ntry:\n    main()\nexcept SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch imported'\n"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_missing_adapter_is_one_line_error(cli_run, tmp_path):
    r = cli_run("inspect-rank", "no-such-adapter")
    assert r.exit_code == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: no-such-adapter: ")
