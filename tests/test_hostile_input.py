"""Hostile files and arguments (issue 16, items 7, 9 and 10): every bad input is one line
`error: <file>: <tensor>: <what>`, exit 1, and bounded work; nothing from a file reaches the
terminal raw; Ctrl-C is one line and exit 130 from the first instant."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from loratool.formats.patterns import MAX_KEY, Matcher, PatternError, pattern_value

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
PLAIN = FIXTURES / "adapters" / "llama-plain"
Q = "base_model.model.model.layers.0.self_attn.q_proj"


def one_line(r, *needles: str) -> str:
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def peft_dir(path: Path, config: dict | None = None, tensors: dict | None = None) -> Path:
    """A PEFT adapter for fixtures/llama's q_proj (64×64) at rank 2."""
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors = tensors or {
        f"{Q}.lora_A.weight": torch.randn(2, 64, generator=g),
        f"{Q}.lora_B.weight": torch.randn(64, 2, generator=g),
    }
    save_file(tensors, path / "adapter_model.safetensors")
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, **(config or {})}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def raw_safetensors(path: Path, header: str | bytes, data: bytes = b"") -> Path:
    raw = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


# -- item 7: rank_pattern / alpha_pattern, matched as peft does, in bounded time -------------

# A small regex grammar: literals, classes, anchors, groups, alternation and every quantifier.
_ATOMS = ["a", "b", ".", r"\.", "_", "0", r"\d", r"\w", r"\W", r"\s", "[ab]", "[^a]",
          "[a-c0-9_]", r"\b", r"\B", "^", "$", r"\A", r"\Z", "é"]  # fmt: skip
_QUANTS = ["", "", "", "*", "+", "?", "*?", "+?", "??", "{2}", "{1,3}", "{0,2}?", "{2,}"]


class _ReTooSlow(Exception):
    pass


@contextlib.contextmanager
def _re_budget(seconds: float = 1.0):
    """The reference (``re``, peft's lookup) backtracks exponentially on some generated
    patterns: one example ran 15+ minutes. CPython's sre checks for signals while it matches,
    so an alarm ends such an example; it is skipped (our matcher has already answered, in
    linear time; test_catastrophic_patterns_cost_linear_time pins those answers)."""

    def expired(*_):
        raise _ReTooSlow

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _regex(depth: int = 0):
    atom = st.sampled_from(_ATOMS)
    if depth < 2:
        inner = st.deferred(lambda: _regex(depth + 1))
        atom = st.one_of(
            atom,
            inner.map(lambda r: f"({r})"),
            st.tuples(inner, inner).map(lambda t: f"(?:{t[0]}|{t[1]})"),
        )
    piece = st.tuples(atom, st.sampled_from(_QUANTS)).map(
        lambda t: t[0] if t[0] in ("^", "$", r"\A", r"\Z", r"\b", r"\B") else t[0] + t[1]
    )
    return st.lists(piece, min_size=1, max_size=4).map("".join)


@settings(max_examples=400, deadline=None)
@given(key=_regex(), paths=st.lists(st.text("ab._0é\n ", max_size=10), min_size=1, max_size=6))
def test_the_linear_matcher_agrees_with_re_on_every_pattern(key, paths):
    """The decision is re's: bool(re.match(rf"(.*\\.)?({key})$", path)), for any pattern the
    matcher accepts (the grammar covers every construct it implements)."""
    try:
        m = Matcher(key)
    except PatternError:
        return
    ours = [m(path) for path in paths]
    rx = re.compile(rf"(.*\.)?({key})$")
    try:
        with _re_budget():
            theirs = [bool(rx.match(path)) for path in paths]
    except _ReTooSlow:
        return
    assert ours == theirs, (key, paths)


@settings(max_examples=150, deadline=None)
@given(
    keys=st.lists(_regex(), min_size=1, max_size=3, unique=True),
    path=st.text("ab._0", min_size=1, max_size=12),
)
def test_pattern_value_is_peft_get_pattern_key(keys, path):
    """peft's own lookup: rank_pattern.get(get_pattern_key(keys, path), r) — including its
    fallback to the path itself as a key when no pattern matches."""
    from peft.utils.other import get_pattern_key

    patterns = {k: i + 100 for i, k in enumerate(keys)}
    patterns.setdefault(path, 7)  # the literal path as a key
    try:
        ours = pattern_value(patterns, path, 8)
    except Exception:
        return  # refused (an unsupported construct): nothing to compare
    try:
        with _re_budget():
            theirs = patterns.get(get_pattern_key(patterns.keys(), path), 8)
    except _ReTooSlow:
        return
    assert ours == theirs


def test_the_reference_budget_ends_a_catastrophic_re_match():
    with pytest.raises(_ReTooSlow), _re_budget(0.2):
        re.match(r"(a+)+b", "a" * 40)  # hours without the budget


def test_catastrophic_patterns_cost_linear_time():
    path = "model." + "a" * 5000 + ".q_proj"
    # each of these takes hours with re on this path; the matcher answers like re would
    for key in ("(a+)+b", "(a|a)*b", "(a*)*c", ".*.*.*.*.*x"):
        assert Matcher(key)(path) is False
    assert Matcher("(a+)+\\.q_proj")(path) is True


@pytest.mark.parametrize(
    ("key", "why"),
    [
        (r"(a)\1", "backreferences"),
        (r"(?=q)q_proj", "lookahead"),
        (r"q_proj(?<!k)", "lookahead and lookbehind"),
        (r"a*+", "possessive"),
        (r"(?>a)", "atomic"),
        (r"(?i)Q_PROJ", "flags"),
        ("(", "not a valid regular expression"),
        ("x" * (MAX_KEY + 1), "longer than"),
        ("(?:a{1000}){1000}", "states"),
    ],
)
def test_unsupported_keys_are_one_line(cli_run, tmp_path, key, why):
    src = peft_dir(tmp_path / "a", {"rank_pattern": {key: 2}})
    one_line(cli_run("add", src, "--task", "t"), "adapter_config.json", "rank_pattern key", why)


def test_a_pathological_pattern_on_a_long_path_does_not_hang_add(cli_run, tmp_path):
    long = "base_model.model." + "a" * 3000
    g = torch.Generator().manual_seed(1)
    tensors = {
        f"{long}.lora_A.weight": torch.randn(2, 8, generator=g),
        f"{long}.lora_B.weight": torch.randn(8, 2, generator=g),
    }
    src = peft_dir(tmp_path / "a", {"rank_pattern": {"(a+)+b": 4}}, tensors)
    r = cli_run("add", src, "--task", "t", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["rank"] == 2  # (a+)+b does not match: r applies


def test_rank_and_alpha_patterns_as_peft_applies_them(cli_run, tmp_path):
    """A pattern peft would match sets that module's rank; one that only matches a suffix
    not at a dot boundary does not (peft's (.*\\.)? prefix)."""
    g = torch.Generator().manual_seed(2)
    q, v = (
        "base_model.model.model.layers.0.self_attn.q_proj",
        "base_model.model.model.layers.0.self_attn.v_proj",
    )
    tensors = {
        f"{q}.lora_A.weight": torch.randn(4, 64, generator=g),
        f"{q}.lora_B.weight": torch.randn(64, 4, generator=g),
        f"{v}.lora_A.weight": torch.randn(2, 64, generator=g),
        f"{v}.lora_B.weight": torch.randn(32, 2, generator=g),
    }
    src = peft_dir(
        tmp_path / "a",
        {
            "rank_pattern": {r"layers\.\d+\.self_attn\.q_proj": 4, "roj": 9},
            "alpha_pattern": {"v_proj": 6},
        },
        tensors,
    )
    r = cli_run("add", src, "--task", "t", "--name", "p")
    assert r.exit_code == 0, r.output
    mods = {
        m["name"]: m for m in json.loads(cli_run("show", "p", "--json").stdout)["module_details"]
    }
    assert mods["model.layers.0.self_attn.q_proj.weight"]["rank"] == 4
    assert mods["model.layers.0.self_attn.v_proj.weight"]["alpha"] == 6
    assert mods["model.layers.0.self_attn.q_proj.weight"]["alpha"] == 4


# -- item 7: other bounds ----------------------------------------------------------------------


def test_savings_config_with_absurd_layer_count(cli_run, tmp_path):
    cfg = json.loads((FIXTURES / "configs" / "llama-2-7b.json").read_text())
    cfg["num_hidden_layers"] = 1e12
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    one_line(
        cli_run("savings", "--config", p, "--rank", "8", "--targets", "q_proj"),
        str(p),
        "num_hidden_layers",
        "1000000000000",
    )


def _wide_adapter(path: Path, width: int = 200_000) -> Path:
    g = torch.Generator().manual_seed(3)
    tensors = {
        "base_model.model.wide.lora_A.weight": torch.randn(1, width, generator=g) * 0.01,
        "base_model.model.wide.lora_B.weight": torch.randn(width, 1, generator=g) * 0.01,
    }
    return peft_dir(path, {"r": 1, "lora_alpha": 1}, tensors)


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_dense_combination_past_the_memory_limit_is_refused(cli_run, tmp_path, method):
    src = _wide_adapter(tmp_path / "wide")
    out = tmp_path / "out"
    args = ["combine", src, src, "--method", method, "--rank", "1", "-o", out]
    err = one_line(cli_run(*args), "wide.weight", "200000×200000", "--max-memory")
    assert "TB" in err
    assert not out.exists()


def test_the_memory_limit_is_an_option_and_an_env_var(cli_run, tmp_path, monkeypatch):
    src = _wide_adapter(tmp_path / "narrow", width=64)  # 64×64: 16 kB per dense buffer
    args = ["combine", src, src, "--method", "ties", "--rank", "1"]
    one_line(
        cli_run(*args, "-o", tmp_path / "a", "--max-memory", "64K"), "above the limit of 64.0 kB"
    )
    assert cli_run(*args, "-o", tmp_path / "b", "--max-memory", "1M").exit_code == 0
    monkeypatch.setenv("LORATOOL_MAX_MEMORY", "32K")
    one_line(cli_run(*args, "-o", tmp_path / "c"), "above the limit of 32.0 kB")


def test_dense_bytes_counts_what_ties_holds():
    from loratool.combine import dense_bytes

    # 2 parts: their task vectors and trimmed copies (4) + sum, sign, mix, divisor, masks and
    # the SVD's input and factors (8), float32
    assert dense_bytes("ties", 2, (100, 300)) == 12 * 100 * 300 * 4
    assert dense_bytes("dare", 3, (10, 10), itemsize=8) == 10 * 100 * 8


# -- item 9: strict parsing --------------------------------------------------------------------


def _entry(dtype="F32", shape=(1,), offsets=(0, 4)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    ("header", "data", "why"),
    [
        (f'{{"a": {json.dumps(_entry())}, "a": {json.dumps(_entry(offsets=(4, 8)))}}}',
         b"\0" * 8, "names 'a' twice"),
        (json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [False, True]}}),
         b"\0", "bad data_offsets"),
        (json.dumps({"a": _entry(shape=(2**70, 0), offsets=(0, 0))}), b"", "bad shape"),
        (json.dumps({"a": _entry(shape=(True, 1))}), b"\0" * 4, "bad shape"),
        ("[" * 50_000 + "]" * 50_000, b"", "nested too deeply"),
        (json.dumps({"a": _entry(dtype=["F32"])}), b"\0" * 4, "unknown dtype"),
        ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, NaN]}}', b"\0" * 4,
         "not valid JSON"),
    ],
    ids=["duplicate-key", "bool-offsets", "2**70", "bool-dim", "deep", "list-dtype", "nan"],
)  # fmt: skip
def test_lying_headers_are_one_line(cli_run, tmp_path, header, data, why):
    f = raw_safetensors(tmp_path / "x.safetensors", header, data)
    one_line(cli_run("add", f, "--task", "t"), str(f), why)
    one_line(cli_run("inspect-rank", f), str(f), why)


def test_deeply_nested_adapter_config(cli_run, tmp_path):
    src = peft_dir(tmp_path / "a")
    (src / "adapter_config.json").write_text('{"r": ' + "[" * 100_000 + "]" * 100_000 + "}")
    one_line(cli_run("add", src, "--task", "t"), "adapter_config.json", "nested too deeply")


def test_deeply_nested_savings_config(cli_run, tmp_path):
    p = tmp_path / "config.json"
    p.write_text("{" + '"a":{' * 100_000 + "}" * 100_001)
    one_line(
        cli_run("savings", "--config", p, "--rank", "8", "--targets", "q_proj"),
        str(p),
        "nested too deeply",
    )


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("lora_alpha", "abc", "lora_alpha must be a finite number, got 'abc'"),
        ("lora_alpha", None, "lora_alpha must be a finite number, got None"),
        ("lora_alpha", [4], "lora_alpha must be a finite number, got [4]"),
        ("lora_alpha", True, "lora_alpha must be a finite number, got True"),
        ("r", "2", "r must be a whole number ≥ 1, got '2'"),
        ("r", 0, "r must be a whole number ≥ 1, got 0"),
        ("r", 2.5, "r must be a whole number ≥ 1, got 2.5"),
        ("use_rslora", "false", "use_rslora must be true or false, got 'false'"),
        ("rank_pattern", ["q_proj"], "rank_pattern must be an object"),
        ("alpha_pattern", {"q_proj": "big"}, "alpha_pattern['q_proj'] must be a finite number"),
        ("rank_pattern", {"q_proj": 0}, "rank_pattern['q_proj'] must be a whole number ≥ 1"),
    ],
)  # fmt: skip
def test_bad_config_values_are_one_line(cli_run, tmp_path, field, value, why):
    src = peft_dir(tmp_path / "a", {field: value})
    one_line(cli_run("add", src, "--task", "t"), "adapter_config.json", why)


def test_float8_factors_are_refused(cli_run, tmp_path):
    g = torch.Generator().manual_seed(4)
    tensors = {
        f"{Q}.lora_A.weight": torch.randn(2, 64, generator=g).to(torch.float8_e4m3fn),
        f"{Q}.lora_B.weight": torch.randn(64, 2, generator=g).to(torch.float8_e4m3fn),
    }
    src = peft_dir(tmp_path / "a", None, tensors)
    one_line(cli_run("add", src, "--task", "t"), "lora_A", "8-bit float")
    out = tmp_path / "merged"
    one_line(cli_run("merge", FIXTURES / "llama", src, "-o", out), "8-bit float")
    assert not out.exists()


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "why"),
    [((0, 64), (64, 0), "rank 0"), ((2, 0), (64, 2), "zero-width"), ((2, 64), (0, 2), "zero-width")],
)  # fmt: skip
def test_rank_zero_and_zero_width_modules_are_refused(cli_run, tmp_path, a_shape, b_shape, why):
    tensors = {
        f"{Q}.lora_A.weight": torch.zeros(a_shape),
        f"{Q}.lora_B.weight": torch.zeros(b_shape),
    }
    src = peft_dir(tmp_path / "a", {"r": max(a_shape[0], 1)}, tensors)
    one_line(cli_run("add", src, "--task", "t"), why)


def test_plot_to_a_file_that_is_not_an_image(cli_run, tmp_path):
    target = tmp_path / "x.txt"
    one_line(cli_run("inspect-rank", PLAIN, "--plot", target), str(target), ".txt names no image")
    assert not target.exists()


def test_plot_formats_are_ones_matplotlib_writes():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from loratool.plot import PLOT_FORMATS

    fig, _ = plt.subplots()
    assert set(PLOT_FORMATS) <= set(fig.canvas.get_supported_filetypes())
    plt.close(fig)


# -- item 9: what came from a file reaches the terminal as text, never as markup or escapes --


ESC_TITLE = "\x1b]0;pwned\x07"
ESC_CLEAR = "\x1b[2J\x1b[H"


def test_names_with_brackets_and_escapes_display_as_written(cli_run, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    src = peft_dir(tmp_path / "a", {"base_model_name_or_path": f"evil{ESC_CLEAR}/model[/]"})
    r = cli_run(
        "add", src, "--task", "summarize[v2]", "--name", "n1", "--tag", "[bold]x[/bold]",
        "--meta", f"note=hi{ESC_TITLE}there", "--description", "[red]d[/red]\u202eevil",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    for args in (["list"], ["show", "n1"], ["list", "--task", "summarize[v2]"]):
        out = cli_run(*args)
        assert out.exit_code == 0, out.output
        assert "\x1b" not in out.output and "\x07" not in out.output and "\u202e" not in out.output
        assert "summarize[v2]" in out.stdout
    show = cli_run("show", "n1").stdout
    assert "[bold]x[/bold]" in show and "[red]d[/red]" in show
    assert "\\x1b]0;pwned\\x07" in show and "\\u202e" in show  # visible, not executed
    assert "model[/]" in show
    # JSON keeps the exact value (escaped by JSON itself)
    meta = json.loads(cli_run("show", "n1", "--json").stdout)["meta"]
    assert meta["note"] == f"hi{ESC_TITLE}there"


def test_an_error_naming_a_hostile_tensor_is_escaped(cli_run, tmp_path):
    bad = f"{Q}{ESC_CLEAR}.lora_A.weight"
    tensors = {bad: torch.ones(2, 64)}
    src = peft_dir(tmp_path / "a", None, tensors)
    err = one_line(cli_run("add", src, "--task", "t"))
    assert "\x1b" not in err and "\\x1b[2J" in err


# -- item 9: Ctrl-C from the first instant -----------------------------------------------------


def test_ctrl_c_while_the_cli_is_still_importing(tmp_path):
    """Before the CLI is imported a SIGINT is one line and exit 130, not an import traceback."""
    child = (
        "import builtins, sys, time\n"
        "real = builtins.__import__\n"
        "def slow(name, *a, **k):\n"
        "    if name == 'cli' or name.endswith('.cli'):\n"
        "        print('importing', flush=True); time.sleep(60)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = slow\n"
        "sys.argv = ['loratool', 'list']\n"
        "from loratool.__main__ import run\n"
        "run()\n"
    )
    env = dict(os.environ, LORATOOL_HOME=str(tmp_path / "home"))
    p = subprocess.Popen(
        [sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env,
    )  # fmt: skip
    assert p.stdout.readline().strip() == "importing"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err == "error: interrupted\n"


def test_ctrl_c_during_a_command(tmp_path):
    env = dict(os.environ, LORATOOL_HOME=str(tmp_path / "home"), LORATOOL_TEST_HANG="blob-stored")
    p = subprocess.Popen(
        [sys.executable, "-m", "loratool", "add", str(PLAIN), "--task", "t"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    assert p.stderr.readline().startswith("loratool-test-hang")
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and err == "error: interrupted\n" and out == ""


def test_ctrl_c_in_importlib_is_put_off_until_its_frame_returns():
    """A KeyboardInterrupt raised in importlib's own frames can land in a module lock's weakref
    callback, where CPython prints "Exception ignored … Traceback" and drops it (seen once in
    the interruption test). The handler puts it off until the frame is not importlib's."""
    child = (
        "import signal, time, types\n"
        "from loratool.__main__ import _interrupt, install_interrupt_handler\n"
        "install_interrupt_handler()\n"
        "assert signal.getsignal(signal.SIGINT) is _interrupt\n"
        "frame = types.SimpleNamespace(f_code=types.SimpleNamespace(\n"
        "    co_filename='<frozen importlib._bootstrap>', co_name='cb'))\n"
        "_interrupt(signal.SIGINT, frame)  # returns: put off\n"
        "assert signal.getitimer(signal.ITIMER_REAL)[0] > 0\n"
        "try:\n"
        "    time.sleep(5)\n"
        "except KeyboardInterrupt:\n"
        "    print('raised once out of importlib')\n"
    )
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "raised once out of importlib\n", r.stderr


def test_a_bug_is_one_line_without_debug_and_a_traceback_with_it(cli_run, monkeypatch):
    import loratool.cli.catalog_cmds as cmds

    def broken(*a, **k):
        raise TypeError("unexpected thing")

    monkeypatch.setattr(cmds, "_catalog", broken)
    one_line(cli_run("list"), "internal error: TypeError: unexpected thing", "--debug")
    r = cli_run("--debug", "list")
    assert (
        r.exit_code == 1 and "Traceback" in r.stderr and "TypeError: unexpected thing" in r.stderr
    )
