"""inspect-rank's picture (matplotlib, from the ``plot`` extra): what rank to choose.

Left: each module's cumulative energy (the share of ‖ΔW‖²_F the first k singular values hold)
against the rank k, one curve per module, coloured by layer kind (q_proj, v_proj, …), with the
--threshold line and the rank that keeps it in every module. Right: for each rank k, the share
of modules of each kind that keep the threshold at rank k: read off how much a smaller rank
would cost, kind by kind.
"""

from __future__ import annotations

from pathlib import Path

from .errors import MissingDependencyError
from .fsutil import atomic_file

# The image formats matplotlib's Agg backend writes (fig.canvas.get_supported_filetypes()),
# checked from the suffix before any work is done.
PLOT_FORMATS = (
    "eps", "jpeg", "jpg", "pdf", "pgf", "png", "ps", "raw", "rgba", "svg", "svgz", "tif",
    "tiff", "webp",
)  # fmt: skip


def check_plot_dest(dest: str) -> None:
    """Refuse, before the spectra are computed, a ``--plot`` file whose suffix names no image
    format (``x.txt``): matplotlib would only say so at the end."""
    from .errors import ValidationError

    suffix = Path(dest).suffix.lower().lstrip(".")
    if suffix not in PLOT_FORMATS:
        raise ValidationError(
            f"--plot writes an image, and {'.' + suffix if suffix else 'no suffix'} names no "
            "image format",
            file=dest,
            hint=f"use one of .{', .'.join(PLOT_FORMATS[:6])}, …",
        )


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingDependencyError(
            "--plot needs matplotlib", hint="pip install 'loratool[plot]'"
        ) from exc
    return plt


def _cumulative(m: dict) -> list[float] | None:
    """[0, e₁, …, e_r]: the energy kept at rank 0…r; None for a module with no energy."""
    energy = m.get("energy")
    if energy is None:
        sq = [float(s) ** 2 for s in m.get("singular_values") or []]
        total = sum(sq)
        if total <= 0:
            return None
        acc, energy = 0.0, []
        for v in sq:
            acc += v
            energy.append(acc / total)
    if not energy or not (energy[-1] > 0):
        return None
    return [0.0, *(min(1.0, float(e)) for e in energy)]


def spectra_figure(report: dict):
    """The figure (matplotlib ``Figure``) for an inspect-rank report."""
    from .transform import layer_kind

    plt = _pyplot()
    s = report["summary"]
    threshold = float(s["threshold"])
    curves: dict[str, list[list[float]]] = {}
    for m in report["modules"]:
        c = _cumulative(m)
        if c is not None:
            curves.setdefault(layer_kind(m["name"]), []).append(c)
    kinds = sorted(curves)
    cmap = plt.get_cmap("tab10" if len(kinds) <= 10 else "tab20")
    colour = {k: cmap(i % cmap.N) for i, k in enumerate(kinds)}
    top = max((len(c) - 1 for cs in curves.values() for c in cs), default=1)
    n = sum(len(cs) for cs in curves.values())

    fig, (ax, ax2) = plt.subplots(
        1, 2, figsize=(12, 5.2), gridspec_kw={"width_ratios": [3, 2]}, layout="constrained"
    )
    alpha = 0.9 if n <= 8 else 0.55 if n <= 64 else 0.3
    for k in kinds:
        for i, c in enumerate(curves[k]):
            ax.plot(
                range(len(c)),
                c,
                color=colour[k],
                alpha=alpha,
                lw=1.2,
                label=f"{k} ({len(curves[k])})" if i == 0 else "_nolegend_",
            )
    suggested = int(s.get("suggested_rank") or s.get("energy_rank_max") or 1)
    ax.axhline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.axvline(
        suggested,
        color="crimson",
        ls=":",
        lw=1.5,
        label=f"rank {suggested} keeps {threshold:g} everywhere"
        if suggested < int(s["rank"])
        else f"r = {suggested}: no smaller rank keeps {threshold:g} everywhere",
    )
    ax.set_xlim(0, top)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("rank k (singular values kept)")
    ax.set_ylabel(r"energy kept:  $\Sigma_{i \leq k}\, \sigma_i^2 \;/\; \Sigma_i\, \sigma_i^2$")
    ax.set_title("cumulative energy per module")
    ax.grid(True, alpha=0.3)
    ax.legend(title="layer kind (modules)", loc="lower right", fontsize="small")

    # right: the rank each module needs to keep the threshold, one row per layer kind
    for row, k in enumerate(kinds):
        need = sorted(next(i for i, e in enumerate(c) if e >= threshold - 1e-12) for c in curves[k])
        # modules needing the same rank are spread vertically, so each stays visible
        seen: dict[int, int] = {}
        ys = []
        for r in need:
            j = seen.get(r, 0)
            seen[r] = j + 1
            ys.append(row + (0.12 * ((j + 1) // 2) * (1 if j % 2 else -1) if j else 0.0))
        ax2.scatter(need, ys, color=colour[k], s=28, alpha=0.85, edgecolors="none", zorder=3)
    ax2.axvline(suggested, color="crimson", ls=":", lw=1.5)
    ax2.set_yticks(range(len(kinds)), kinds)
    ax2.set_ylim(-0.6, len(kinds) - 0.4)
    ax2.invert_yaxis()
    ax2.set_xlim(0, top + 0.5)
    ax2.set_xlabel(f"rank that keeps {threshold:g} of the energy")
    ax2.set_title("rank each module needs, by layer kind")
    ax2.grid(True, axis="x", alpha=0.3)
    for a in (ax, ax2):
        a.xaxis.get_major_locator().set_params(integer=True)
    skipped = len(s.get("skipped") or [])
    fig.suptitle(
        f"{report.get('adapter', '')}: {n} module{'s' if n != 1 else ''}, r up to {s['rank']}"
        + (f" ({skipped} without a spectrum left out)" if skipped else "")
    )
    return fig


def plot_spectra(report: dict, dest: str, *, force: bool = False) -> Path:
    """Draw the report to ``dest`` (its suffix names the image format); an existing file is
    replaced only with ``force``, even one that appears while the plot is drawn."""
    check_plot_dest(dest)
    plt = _pyplot()
    fig = spectra_figure(report)
    dest_path = Path(dest)
    fmt = dest_path.suffix.lower().lstrip(".")
    try:
        with atomic_file(dest_path, force=force) as tmp:
            fig.savefig(tmp, format="jpeg" if fmt == "jpg" else fmt, dpi=110)
    finally:
        plt.close(fig)
    return dest_path
