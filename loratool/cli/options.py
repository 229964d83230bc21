"""Options shared by several commands, as decorators (one definition, same help everywhere)."""

from __future__ import annotations

import json
import sys

import click


def json_option(f):
    return click.option(
        "--json",
        "json_",
        is_flag=True,
        help="Print one JSON document on stdout and nothing else there.",
    )(f)


def device_option(f):
    return click.option(
        "--device",
        default="auto",
        show_default=True,
        help="Where to compute: auto (CUDA when available), cpu, cuda or cuda:N.",
    )(f)


def home_from(ctx: click.Context) -> str | None:
    root = ctx.find_root()
    return (root.obj or {}).get("home")


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def parse_weighted(spec: str) -> tuple[str, float]:
    """``NAME[=WEIGHT]`` → (name, weight). The last '=' splits, so paths may hold '='."""
    if "=" in spec:
        name, _, w = spec.rpartition("=")
        try:
            return name, float(w)
        except ValueError:
            pass
    return spec, 1.0
