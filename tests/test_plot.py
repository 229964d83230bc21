"""inspect-rank --plot: cumulative energy against rank, a curve per module coloured by layer
kind with a legend, the threshold line and the rank that keeps it, labelled axes; the rank
each module needs, by kind. Checked on the figure's own artists, against energies computed
here from the singular values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent
RS = ROOT / "fixtures" / "adapters" / "llama-rslora"


@pytest.fixture
def report(cli_run):
    r = cli_run("inspect-rank", RS, "--threshold", "0.9", "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_the_figure_says_what_rank_to_choose(report):
    from matplotlib.colors import to_hex

    from loratool.plot import spectra_figure
    from loratool.transform import layer_kind

    fig = spectra_figure(report)
    ax, ax2 = fig.axes[:2]
    curves = [line for line in ax.get_lines() if len(line.get_xdata()) > 2]
    assert len(curves) == len(report["modules"])
    # each curve is 0, e₁, …, e_r: the energy the first k singular values hold
    for m in report["modules"]:
        sq = [s * s for s in m["singular_values"]]
        want = [sum(sq[:k]) / sum(sq) for k in range(len(sq) + 1)]
        assert any(
            len(c.get_ydata()) == len(want)
            and max(abs(a - b) for a, b in zip(c.get_ydata(), want, strict=True)) < 1e-6
            for c in curves
        ), m["name"]
    # one colour per layer kind, named in the legend with its module count
    kinds = {layer_kind(m["name"]) for m in report["modules"]}
    colours = {to_hex(c.get_color()) for c in curves}
    assert len(colours) == len(kinds)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    for k in kinds:
        n = sum(1 for m in report["modules"] if layer_kind(m["name"]) == k)
        assert f"{k} ({n})" in labels
    # the threshold line and the rank that keeps it in every module
    s = report["summary"]
    flat = [line for line in ax.get_lines() if len(set(line.get_ydata())) == 1]
    assert any(line.get_ydata()[0] == pytest.approx(0.9) for line in flat)
    upright = [line for line in ax.get_lines() if len(set(line.get_xdata())) == 1]
    assert any(line.get_xdata()[0] == s["suggested_rank"] for line in upright)
    assert any("threshold 0.9" in t for t in labels)
    assert "rank" in ax.get_xlabel() and "energy" in ax.get_ylabel()
    # right: each module's energy rank, on its kind's row
    points = sorted(int(x) for c in ax2.collections for x, _ in c.get_offsets())
    assert points == sorted(m["energy_rank"] for m in report["modules"])
    assert sorted(t.get_text() for t in ax2.get_yticklabels()) == sorted(kinds)
    assert ax2.get_xlabel()


def test_the_plot_is_written_and_a_bad_suffix_is_one_line(cli_run, tmp_path):
    out = tmp_path / "s.png"
    r = cli_run("inspect-rank", RS, "--plot", out)
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = cli_run("inspect-rank", RS, "--plot", out)
    assert r.exit_code == 1 and "already exists" in r.stderr
    svg = tmp_path / "s.svg"
    assert cli_run("inspect-rank", RS, "--plot", svg).exit_code == 0
    assert svg.read_text().lstrip().startswith("<?xml")
    r = cli_run("inspect-rank", RS, "--plot", tmp_path / "s.txt")
    assert r.exit_code == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert ".txt names no image format" in r.stderr
    assert not (tmp_path / "s.txt").exists()
