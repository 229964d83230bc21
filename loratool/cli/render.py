"""Terminal rendering: the only module that imports rich.

Everything printed here may hold text that came from a file (names, tasks, config values), so
it is printed as plain text, never parsed as rich markup (``summarize[v2]`` stays as written),
and with control characters escaped (``options.sanitize``): no terminal escape from an
adapter's config reaches the terminal raw."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from ..units import human_count, human_size  # noqa: F401  (re-exported for commands)
from .options import sanitize

_console: Console | None = None
_err: Console | None = None


def _width() -> int | None:
    # Piped output has no terminal width; rich would wrap tables at 80 columns. Let them be as
    # wide as their content (up to $COLUMNS or 200) so that logs and `| less -S` stay readable.
    if sys.stdout.isatty():
        return None
    try:
        return int(os.environ.get("COLUMNS", "200"))
    except ValueError:
        return 200


def console() -> Console:
    global _console
    if _console is None:
        _console = Console(highlight=False, emoji=False, width=_width())
    return _console


def err_console() -> Console:
    global _err
    if _err is None:
        _err = Console(stderr=True, highlight=False, emoji=False)
    return _err


def warn(message: str) -> None:
    err_console().print(
        f"[yellow]warning:[/yellow] {escape(sanitize(message))}",
        markup=True,
        highlight=False,
        soft_wrap=True,
    )


def table(
    title: str | None, columns: Sequence[str | tuple[str, str]], rows: Sequence[Sequence[object]]
) -> None:
    """Print a table; a column given as (name, "right") is right-aligned."""
    t = Table(title=title, show_lines=False, header_style="bold")
    for col in columns:
        name, justify = (col, "left") if isinstance(col, str) else col
        t.add_column(name, justify=justify, overflow="fold")
    for row in rows:
        # Text cells: never parsed as markup, whatever a name holds
        t.add_row(*(Text("" if v is None else sanitize(v, cell=True)) for v in row))
    console().print(t)


def echo(text: str = "", **kw) -> None:
    """Plain text (no markup unless ``markup=True`` is asked for), control characters escaped."""
    console().print(
        sanitize(text),
        highlight=False,
        markup=kw.pop("markup", False),
        soft_wrap=kw.pop("soft_wrap", True),
        **kw,
    )


class _QuietBar:
    def update(self, *a, **k) -> None:
        pass

    def advance(self, n: float) -> None:
        pass


@contextlib.contextmanager
def progress_bytes(description: str, total: int) -> Iterator:
    """A byte progress bar with speed on a terminal; nothing when stdout is not a terminal.

    Yields a callable ``advance(nbytes, label=None)``.
    """
    if not sys.stdout.isatty():
        yield lambda n, label=None: None
        return
    prog = Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console(),
        transient=True,
    )
    with prog:
        task = prog.add_task(sanitize(description, cell=True), total=total)

        def advance(n: int, label: str | None = None) -> None:
            prog.update(task, advance=n, description=sanitize(label or description, cell=True))

        yield advance


@contextlib.contextmanager
def progress_count(description: str, total: int) -> Iterator:
    """Like progress_bytes for a count of items (modules, files)."""
    if not sys.stdout.isatty():
        yield lambda n=1, label=None: None
        return
    prog = Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
        console=err_console(),
        transient=True,
    )
    with prog:
        task = prog.add_task(sanitize(description, cell=True), total=total)

        def advance(n: int = 1, label: str | None = None) -> None:
            prog.update(task, advance=n, description=sanitize(label or description, cell=True))

        yield advance


def sparkline(values: Sequence[float]) -> str:
    bars = "▁▂▃▄▅▆▇█"
    vals = list(values)
    if not vals:
        return ""
    top = max(vals) or 1.0
    return "".join(bars[min(len(bars) - 1, int(v / top * (len(bars) - 1) + 0.5))] for v in vals)
