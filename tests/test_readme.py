"""The README says what the code does: every code block runs as written, and the command table
names the CLI's commands, arguments and options."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w+)\n(.*?)^```", README, flags=re.S | re.M)


def test_the_readme_has_code_blocks():
    langs = [lang for lang, _ in BLOCKS]
    assert "python" in langs and "bash" in langs


@pytest.mark.parametrize(
    "code", [c for lang, c in BLOCKS if lang == "python"], ids=lambda c: c.splitlines()[0][:40]
)
def test_python_blocks_run_as_written(code, tmp_path):
    """From the repository's root, as the README says, in a fresh interpreter."""
    env = {**os.environ, "LORATOOL_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr[-3000:]


@pytest.mark.parametrize(
    "code", [c for lang, c in BLOCKS if lang == "bash"], ids=lambda c: c.splitlines()[0][:40]
)
def test_shell_blocks_run_as_written(code, tmp_path):
    """In a fresh directory where `fixtures/` is the bundled one, `loratool` on the PATH and a
    fresh catalog home; every line must succeed."""
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    bindir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
        "LORATOOL_HOME": str(tmp_path / "home"),
        "HF_HUB_OFFLINE": "1",
    }
    p = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    assert "Traceback" not in p.stderr


def _table_rows() -> list[tuple[str, str, str]]:
    """(command, usage after it, the row's description) for each `| `loratool …` | … |` row."""
    rows = []
    for line in README.splitlines():
        m = re.match(r"^\| `loratool ([a-z-]+)([^`]*)` \| (.*) \|$", line)
        if m:
            rows.append((m.group(1), m.group(2).strip(), m.group(3)))
    return rows


def _positionals(usage: str) -> list[str]:
    """The argument words of a usage like `BASE ADAPTER[=W]… -o OUT --task T`."""
    out, skip = [], False
    for tok in usage.split():
        if skip:
            skip = False
            continue
        if tok.startswith("-"):
            skip = not tok.startswith("[")
            continue
        word = re.match(r"\[?([A-Z][A-Z_/]*)", tok)
        if word:
            out.append(word.group(1).split("/")[0])
    return out


def test_the_command_table_matches_the_cli():
    import click

    from loratool.cli import COMMANDS, cli

    rows = _table_rows()
    assert sorted(c for c, _, _ in rows) == sorted(COMMANDS)
    ctx = click.Context(cli, info_name="loratool")
    for name, usage, text in rows:
        cmd = cli.get_command(ctx, name)
        sub = click.Context(cmd, info_name=name, parent=ctx)
        args = [p for p in cmd.params if isinstance(p, click.Argument)]
        metavars = [
            re.match(r"\[?([A-Z][A-Z_/]*)", p.make_metavar(sub)).group(1).split("/")[0]
            for p in args
        ]
        got = _positionals(usage)
        assert got == metavars[: len(got)], (name, got, metavars)
        # the arguments left out of the usage are optional ones
        assert all(not p.required for p in args[len(got) :]), name
        options = {o for p in cmd.params for o in getattr(p, "opts", []) if o.startswith("-")}
        for opt in re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", usage + " " + text):
            assert opt in options, (name, opt)
