"""What ``list`` filters on beyond task, base model and tag: training facts, key/values,
trigger words and hashes. Each filter is one SQL condition on ``adapters a``; several are all
required. No torch, nothing but strings.

A VALUE is matched case-insensitively: exactly, or as a glob when it holds ``*``, ``?`` or
``[`` (SQLite's GLOB: ``*`` any run of characters, ``?`` one, ``[abc]`` one of them).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import ValidationError

MAX_VALUE = 2000  # characters kept of one training fact (a trainer's comment can be a page)
TRIGGER_KEYS = ("trigger_words", "top_tags")
_HEX = re.compile(r"^[0-9a-f]{1,64}$")
_GLOB = re.compile(r"[*?\[]")
# the hash columns ``--hash`` looks in: the blob's, the source file's, its tensor bytes'
HASH_COLUMNS = ("sha256", "file_sha256", "tensor_sha256")


def clean_training(facts: Mapping[str, Any] | None) -> dict[str, str]:
    """Training facts as the catalog stores them: non-empty keys, string values without
    surrounding space, each at most MAX_VALUE characters (longer ones end in "…")."""
    out: dict[str, str] = {}
    for k, v in (facts or {}).items():
        if not isinstance(k, str) or not k.strip():
            raise ValidationError(f"training fact key {k!r} is not a non-empty string")
        if not isinstance(v, str):
            raise ValidationError(f"training fact {k!r} must be a string, got {v!r}")
        v = v.strip()
        if not v:
            continue
        out[k.strip()] = v if len(v) <= MAX_VALUE else v[: MAX_VALUE - 1] + "…"
    return out


def parse_pairs(specs: Iterable[str], what: str) -> list[tuple[str, str | None]]:
    """``KEY=VALUE`` (VALUE may be a glob) or ``KEY`` alone (the key is present)."""
    out = []
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not key.strip():
            raise ValidationError(f"{what} {spec!r} is not KEY=VALUE or KEY")
        out.append((key.strip(), value if sep else None))
    return out


def normalize_hash(text: str) -> str:
    """A hash prefix as users paste it: any case, an optional ``0x`` (modelspec writes one)."""
    h = text.strip().lower()
    h = h[2:] if h.startswith("0x") else h
    if not _HEX.match(h):
        raise ValidationError(
            f"{text!r} is not a hash prefix (hex digits, e.g. AutoV2 / AutoV3 or a sha256)"
        )
    return h


def _value_condition(column: str, pattern: str) -> tuple[str, list[Any]]:
    if _GLOB.search(pattern):
        return f"lower({column}) glob lower(?)", [pattern]
    return f"lower({column}) = lower(?)", [pattern]


# "a.name in (select adapter …)" scans the facts once; "exists (… x.adapter = a.name …)" looks
# them up per adapter: 3× slower on 10,000 adapters (benchmarks/bench_catalog.py's catalog).
def _pair_condition(table: str, key: str, pattern: str | None) -> tuple[str, list[Any]]:
    sql = f"a.name in (select x.adapter from {table} x where x.key = ?"
    params: list[Any] = [key]
    if pattern is not None:
        cond, p = _value_condition("x.value", pattern)
        sql += " and " + cond
        params += p
    return sql + ")", params


def conditions(
    *,
    trained: Iterable[tuple[str, str | None]] = (),
    meta: Iterable[tuple[str, str | None]] = (),
    trigger: str | None = None,
    hash_prefix: str | None = None,
) -> tuple[list[str], list[Any]]:
    """SQL conditions (and their parameters) for the filters given."""
    where: list[str] = []
    params: list[Any] = []
    for table, pairs in (("training", trained), ("meta", meta)):
        for key, pattern in pairs:
            sql, p = _pair_condition(table, key, pattern)
            where.append(sql)
            params += p
    if trigger is not None:
        if not trigger.strip():
            raise ValidationError("the trigger word to look for is empty")
        keys = ", ".join("?" * len(TRIGGER_KEYS))
        where.append(
            f"a.name in (select x.adapter from training x where x.key in ({keys}) "
            "and instr(lower(x.value), lower(?)) > 0)"
        )
        params += [*TRIGGER_KEYS, trigger.strip()]
    if hash_prefix is not None:
        h = normalize_hash(hash_prefix)
        where.append(
            "(" + " or ".join(f"substr(a.{c}, 1, {len(h)}) = ?" for c in HASH_COLUMNS) + ")"
        )
        params += [h] * len(HASH_COLUMNS)
    return where, params
