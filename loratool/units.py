"""Human-readable sizes and counts: one unit system for every number loratool prints.

Sizes are decimal (1 kB = 1000 bytes), as the Hugging Face Hub, ``hf`` and rich's progress
bars (``DownloadColumn``, ``TransferSpeedColumn``) show them: a bar and the summary after it
say the same "953.3 MB". ``human_size`` gives exactly what ``rich.filesize.decimal`` gives
(a test pins it) without importing rich, so the fast paths (``list`` of 10,000 rows, the
model card) can use it too.
"""

from __future__ import annotations

_DECIMAL = ("kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")


def human_size(n: float) -> str:
    """``1234567`` → ``"1.2 MB"``: rich.filesize.decimal's text (powers of 1000)."""
    size = int(n)
    if size < 0:
        return "-" + human_size(-size)
    if size == 1:
        return "1 byte"
    if size < 1000:
        return f"{size:,} bytes"
    unit = 1000
    suffix = _DECIMAL[0]
    for i, suffix in enumerate(_DECIMAL, 2):  # noqa: B007 (rich's loop, kept as it is)
        unit = 1000**i
        if size < unit:
            break
    return f"{1000 * size / unit:,.1f} {suffix}"


def human_count(n: float) -> str:
    n = float(n)
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.0f}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}T"


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 module``, ``2 modules``, ``0 modules`` (``many`` for irregular plurals)."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"


_SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_BINARY_UNITS = {"KI": 1 << 10, "MI": 1 << 20, "GI": 1 << 30, "TI": 1 << 40}


def parse_size(text: str) -> int:
    """``"8G"``, ``"512MB"``, ``"1.5g"``, ``"4096"`` → bytes in decimal units, as sizes are
    printed; ``"512MiB"``, ``"8Gi"`` in binary ones. ValueError if not a size."""
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(?:([KMGT]i?)B?|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 512M, 8G, 2GiB)")
    unit = (m.group(2) or "").upper()
    scale = _BINARY_UNITS[unit] if unit.endswith("I") else _SIZE_UNITS[unit]
    return int(float(m.group(1)) * scale)
