"""JSON from files, parsed strictly: every way it can be bad is one FormatError naming the file.

Python's ``json`` raises RecursionError on deeply nested input (``[[[[…]]]]`` a few thousand
deep), accepts ``NaN`` and ``Infinity`` (not JSON), and keeps the last of two equal keys
without a word. Here the first two are refused, and duplicate keys optionally (a safetensors
header with a tensor named twice is read differently by different readers).
"""

from __future__ import annotations

import json
from typing import Any

from .errors import FormatError


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


class _Duplicate(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def loads(text: str | bytes, *, file: object, what: str = "JSON", unique_keys: bool = False) -> Any:
    """Parse ``text`` (from ``file``, described as ``what``): a FormatError if it is not
    valid JSON, is nested too deeply, holds NaN/Infinity or (``unique_keys``) a key twice."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(
            text,
            parse_constant=_no_constant,
            object_pairs_hook=_unique if unique_keys else None,
        )
    except _Duplicate as exc:
        raise FormatError(
            f"{what} names {exc.key!r} twice: readers disagree on which one counts", file=file
        ) from None
    except RecursionError:
        raise FormatError(f"{what} is nested too deeply to be read", file=file) from None
    except UnicodeDecodeError as exc:
        raise FormatError(f"{what} is not UTF-8 text ({exc.reason})", file=file) from None
    except ValueError as exc:  # JSONDecodeError, and the constants refused above
        raise FormatError(f"{what} is not valid JSON: {exc}", file=file) from None
