"""The weights of ``ADAPTER=WEIGHT`` arguments: numbers, finite, and small enough that every
product the math forms with them stays finite in float32.

A weight of NaN would merge as if it were 1 (``addmm_`` with alpha=NaN on the CPU ignores it),
and one of 1e39 cannot even be handed to float32 kernels: both are refused here, once, for
every command that takes weights (merge, unmerge, combine) and for the library's callers.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import ValidationError

FLOAT32_MAX = 3.4028234663852886e38
# A plain decimal number: no "nan", "inf", "0x…", "1_000" or surrounding spaces, which
# Python's float() would all accept.
_NUMBER = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$")


def finite32(x: float) -> bool:
    """Whether ``x`` is finite and survives rounding to float32."""
    # float32's largest finite value; above it (by more than half an ulp) it rounds to Inf.
    return math.isfinite(x) and abs(x) <= FLOAT32_MAX


def parse_weight(text: str, *, spec: str | None = None) -> float:
    """A weight from its text, strictly: a decimal number, finite in float32."""
    label = spec if spec is not None else text
    if not _NUMBER.match(text):
        raise ValidationError(
            f"weight {text!r} is not a number",
            file=label,
            hint="write ADAPTER=WEIGHT with a decimal weight such as 0.5 or -1",
        )
    value = float(text)
    if not finite32(value):
        raise ValidationError(
            f"weight {text} does not fit in float32 (|w| ≤ 3.4e38)",
            file=label,
        )
    return value


def split_weighted(spec: str, is_adapter: Callable[[str], bool] | None = None) -> tuple[str, float]:
    """``ADAPTER[=WEIGHT]`` → (adapter, weight).

    The last '=' splits, so paths may hold '='. When the part after it is a number the spec is
    weighted, unless the whole spec is an existing path and the part before is not an adapter
    (``is_adapter``: an existing path or catalog name; default: an existing path). When it is
    not a number the whole spec must be an existing path: otherwise it is an error, never a
    silent weight of 1.
    """
    if "=" not in spec:
        return spec, 1.0
    exists = is_adapter or (lambda name: Path(name).exists())
    name, _, text = spec.rpartition("=")
    whole_is_path = os.path.lexists(spec)
    if _NUMBER.match(text):
        if whole_is_path and not exists(name):
            return spec, 1.0
        if not name:
            raise ValidationError("no adapter before '='", file=spec)
        return name, parse_weight(text, spec=spec)
    if whole_is_path:
        return spec, 1.0
    parse_weight(text, spec=spec)  # raises: not a number
    raise AssertionError("unreachable")  # pragma: no cover


def check_weight(weight: float, scales: Iterable[tuple[str, float]], *, label: str) -> None:
    """Refuse a weight that is not finite in float32, or whose product with a module's scale
    is not (``scales``: (module name, scale) pairs)."""
    if not finite32(weight):
        raise ValidationError(f"weight {weight} is not a finite float32 number", file=label)
    for name, scale in scales:
        if not finite32(weight * scale):
            raise ValidationError(
                f"weight {weight:g} × scale {scale:g} overflows float32",
                file=label,
                tensor=name,
                hint="use a smaller weight",
            )
