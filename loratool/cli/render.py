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
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from ..units import human_count, human_size, plural  # noqa: F401  (re-exported for commands)
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


def progress_enabled() -> bool:
    """Whether bars are drawn: when stderr (where they go) is a terminal, whatever stdout is,
    so `loratool merge … > log` still shows one. LORATOOL_PROGRESS=0 turns them off, =1 on."""
    forced = os.environ.get("LORATOOL_PROGRESS", "")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


def _progress(*columns) -> Progress:
    return Progress(
        TextColumn("{task.description}", markup=False),
        *columns,
        console=err_console(),
        transient=True,
    )


@contextlib.contextmanager
def _bar(prog: Progress, description: str, total: int | None) -> Iterator:
    with prog:
        task = prog.add_task(sanitize(description, cell=True), total=total)

        def advance(n: int = 1, label: str | None = None, total: int | None = None) -> None:
            extra = {"total": total} if total is not None else {}
            prog.update(
                task, advance=n, description=sanitize(label or description, cell=True), **extra
            )

        yield advance


def _quiet(n: int = 1, label: str | None = None, total: int | None = None) -> None:
    pass


@contextlib.contextmanager
def progress_bytes(description: str, total: int | None) -> Iterator:
    """A byte bar with speed and time left, on stderr when it is a terminal (sizes in the
    decimal units of ``human_size``). Yields ``advance(nbytes, label=None, total=None)``
    (``total`` sets the size once it is known, for a bar started with None)."""
    if not progress_enabled():
        yield _quiet
        return
    bar = _progress(BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with _bar(bar, description, total) as advance:
        yield advance


@contextlib.contextmanager
def progress_count(description: str, total: int, unit: str = "") -> Iterator:
    """A bar over a count of items (modules, tensors, blobs). Yields ``advance(n=1, label=None)``."""
    if not progress_enabled():
        yield _quiet
        return
    shown = f"{{task.completed}}/{{task.total}}{' ' + unit if unit else ''}"
    bar = _progress(BarColumn(), TextColumn(shown), TimeRemainingColumn())
    with _bar(bar, description, total) as advance:
        yield advance


@contextlib.contextmanager
def status(description: str) -> Iterator:
    """A spinner with the time elapsed, for work whose length is not known in advance (an
    upload, a conversion). Yields ``update(label)``."""
    if not progress_enabled():
        yield lambda label=None: None
        return
    bar = _progress(SpinnerColumn(), TimeElapsedColumn())
    with _bar(bar, description, None) as advance:
        yield lambda label=None: advance(0, label)


def sparkline(values: Sequence[float]) -> str:
    bars = "▁▂▃▄▅▆▇█"
    vals = list(values)
    if not vals:
        return ""
    top = max(vals) or 1.0
    return "".join(bars[min(len(bars) - 1, int(v / top * (len(bars) - 1) + 0.5))] for v in vals)
