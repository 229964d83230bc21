"""Plotting the spectra of inspect-rank (matplotlib, from the ``plot`` extra)."""

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


def plot_spectra(report: dict, dest: str, *, force: bool = False) -> Path:
    """Plot the spectra to ``dest`` (its suffix names the image format); an existing file is
    replaced only with ``force``, even one that appears while the plot is drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingDependencyError(
            "--plot needs matplotlib", hint="pip install 'loratool[plot]'"
        ) from exc
    fig, ax = plt.subplots(figsize=(8, 5))
    for m in report["modules"]:
        sv = m["singular_values"]
        if sv and sv[0] > 0:
            ax.semilogy(range(1, len(sv) + 1), [max(s, 1e-12) for s in sv], alpha=0.6, lw=1)
    ax.set_xlabel("index i")
    ax.set_ylabel("σᵢ of scale·B·A")
    s = report["summary"]
    ax.set_title(
        f"{report.get('adapter', '')}: {s['modules']} modules, energy rank ≤ {s['energy_rank_max']} at {s['threshold']:g}"
    )
    ax.grid(True, which="both", alpha=0.3)
    dest_path = Path(dest)
    with atomic_file(dest_path, force=force) as tmp:
        fig.savefig(tmp, format=dest_path.suffix.lstrip(".") or "png", dpi=100)
    plt.close(fig)
    return dest_path
