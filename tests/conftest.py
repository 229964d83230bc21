"""Shared test set-up: every test gets its own catalog home; fixtures are found by path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

try:  # the loopback Hub server's fixture, where it exists
    from conftest_hub import hub  # noqa: F401
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(autouse=True)
def loratool_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("LORATOOL_HOME", str(home))
    monkeypatch.delenv("LORATOOL_DEBUG", raising=False)
    return home


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture
def cli_run():
    """Run the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    from click.testing import CliRunner

    from loratool.cli import cli

    def run(*args: str, input: str | None = None):
        runner = CliRunner()
        return runner.invoke(
            cli, [str(a) for a in args], input=input, catch_exceptions=False, prog_name="loratool"
        )

    return run
