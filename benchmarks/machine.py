"""What the benchmarks say about the machine they ran on, and where they write it."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"


def append_to_benchmarks(text: str) -> Path:
    """Append ``text`` as a new section of docs/BENCHMARKS.md, after one blank line (the file's
    title first if it is new). Append, never rewrite: each benchmark owns its own sections."""
    path = BENCHMARKS_MD
    path.parent.mkdir(exist_ok=True)
    old = path.read_text() if path.exists() else ""
    if not old:
        lead = "# Benchmarks\n\n"
    else:
        trailing = len(old) - len(old.rstrip("\n"))
        lead = "\n" * max(0, 2 - trailing)
    with path.open("a") as f:
        f.write(lead + text.lstrip("\n"))
    return path
