"""Progress that tells the truth: bars go to stderr when stderr is a terminal, whatever stdout
is; never into stdout; one unit system (decimal, as rich's bars); summaries without noise."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
PLAIN = FIX / "adapters" / "llama-plain"


def run_with_tty_stderr(args: list, env: dict, timeout: float = 300) -> tuple[int, str, str]:
    """Run ``python -m loratool ARGS`` with stderr on a pseudo-terminal and stdout on a pipe;
    returns (exit code, stdout, what the terminal received)."""
    master, slave = pty.openpty()
    env = {**os.environ, **env, "TERM": "xterm-256color", "COLUMNS": "120"}
    env.pop("LORATOOL_PROGRESS", None)
    p = subprocess.Popen(
        [sys.executable, "-m", "loratool", *map(str, args)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        env=env,
        cwd=ROOT,
    )
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], timeout)
        if not ready:
            p.kill()
            raise AssertionError("no output from the terminal side")
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    out = p.stdout.read().decode()
    p.wait(timeout)
    os.close(master)
    return p.returncode, out, b"".join(chunks).decode("utf-8", "replace")


@pytest.fixture
def home(tmp_path):
    return {"LORATOOL_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize(
    "command, bar",
    [
        (["merge", FIX / "llama", PLAIN, "-o", "{tmp}/m", "--device", "cpu"], "merging"),
        (["inspect-rank", PLAIN, "--json"], "measuring"),
        (["resize", PLAIN, "--rank", "2", "-o", "{tmp}/r"], "resizing"),
        (["combine", PLAIN, PLAIN, "--method", "cat", "-o", "{tmp}/c"], "combining"),
        (["convert", PLAIN, "{tmp}/k.safetensors", "--to", "kohya"], "converting"),
        (["add", PLAIN, "--task", "t"], "adding"),
        (["verify"], "verifying"),
    ],
)
def test_a_bar_is_drawn_when_stderr_alone_is_a_terminal(command, bar, home, tmp_path):
    args = [str(a).replace("{tmp}", str(tmp_path)) for a in command]
    rc, out, tty = run_with_tty_stderr(args, home)
    assert rc == 0, (out, tty)
    assert bar in tty, tty  # the bar was drawn on the terminal…
    assert bar not in out and "\x1b" not in out  # …and nothing of it went to stdout
    if "--json" in args:
        json.loads(out)  # stdout stays one JSON document


def test_unmerge_check_and_extract_draw_their_bars(home, tmp_path):
    merged = tmp_path / "m"
    rc, _, _ = run_with_tty_stderr(["merge", FIX / "llama", PLAIN, "-o", merged], home)
    assert rc == 0
    rc, out, tty = run_with_tty_stderr(
        ["extract", FIX / "llama", merged, "--rank", "2", "-o", tmp_path / "e"], home
    )
    assert rc == 0, tty
    assert "extracting" in tty and "extracting" not in out
    rc, out, tty = run_with_tty_stderr(
        ["unmerge", merged, PLAIN, "-o", tmp_path / "u", "--check", FIX / "llama"], home
    )
    assert rc == 0, tty
    assert "unmerging" in tty and "checking" in tty
    assert "check against" in out


def test_push_and_pull_draw_theirs(hub, tmp_path, monkeypatch):
    """Against the loopback Hub (its fixture set HF_ENDPOINT and HF_HOME for child processes)."""
    monkeypatch.setenv("HF_TOKEN", hub.alice)
    env = {"LORATOOL_HOME": str(tmp_path / "home")}
    rc, out, tty = run_with_tty_stderr(["push", PLAIN, "--repo", "alice/p-lora"], env)
    assert rc == 0, tty
    assert "uploading 3 files" in tty and "pushed" in out
    env = {"LORATOOL_HOME": str(tmp_path / "home2")}
    rc, out, tty = run_with_tty_stderr(["pull", "alice/p-lora", "--task", "t"], env)
    assert rc == 0, tty
    assert "pulling alice/p-lora" in tty and "pulled" in out


def test_no_bar_when_stderr_is_not_a_terminal(tmp_path, home):
    p = subprocess.run(
        [sys.executable, "-m", "loratool", "merge", FIX / "llama", PLAIN, "-o", tmp_path / "m"],
        capture_output=True,
        text=True,
        env={**os.environ, **home},
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr
    assert p.stderr == "" and "merging" not in p.stdout


def test_the_summary_line_has_no_noise(cli_run, tmp_path):
    r = cli_run("merge", FIX / "llama", PLAIN, "-o", tmp_path / "m")
    assert r.exit_code == 0
    line = r.stdout.strip()
    # a tiny model: no speed (it would measure Python's start), no remark about torch
    assert "/s" not in line and "torch" not in line and "GB/s" not in line
    assert " kB in " in line  # the same decimal units as the bars


def test_sizes_are_printed_as_rich_prints_them():
    """One unit system: human_size is rich.filesize.decimal (what DownloadColumn and
    TransferSpeedColumn show), without importing rich."""
    import random

    from rich.filesize import decimal

    from loratool.units import human_size, parse_size

    rng = random.Random(0)
    sizes = [0, 1, 2, 999, 1000, 1023, 1024, 999_999, 10**6, 953_300_000, 10**18]
    sizes += [int(10 ** rng.uniform(0, 19)) for _ in range(2000)]
    for n in sizes:
        assert human_size(n) == decimal(n), n
    # sizes given back are decimal too, binary only when spelled so
    assert parse_size("64K") == 64_000 and parse_size("1.5G") == 1_500_000_000
    assert parse_size("512MiB") == 512 << 20 and parse_size("8Gi") == 8 << 30
