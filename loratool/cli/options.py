"""Options shared by several commands, as decorators (one definition, same help everywhere)."""

from __future__ import annotations

import json
import re
import sys

import click

# C0 controls but tab and newline, DEL, C1 controls (ESC and CSI start terminal sequences), and
# the bidirectional overrides that make text display in another order than it reads.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_UNSAFE_CELL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def sanitize(text: object, *, cell: bool = False) -> str:
    """``text`` safe for a terminal: control characters (an ESC that starts a colour, a
    cursor move or a title change; a carriage return that overwrites the line) and bidi
    overrides shown as escapes (``\\x1b``), never sent raw. ``cell``: newlines and tabs too."""
    text = str(text)
    return (_UNSAFE_CELL if cell else _UNSAFE).sub(_escape, text)


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


def home_path(ctx: click.Context):
    """The catalog home this command uses (it may not exist yet)."""
    from pathlib import Path

    from ..catalog import default_home

    home = home_from(ctx)
    return Path(home).expanduser() if home else default_home()


def parse_weighted(spec: str, ctx: click.Context | None = None) -> tuple[str, float]:
    """``NAME[=WEIGHT]`` → (name, weight), strictly (see ``loratool.weights.split_weighted``):
    the last '=' splits, so paths may hold '='; a weight that is not a finite number is an
    error. With ``ctx``, NAME may be a catalog name as well as a path."""
    from ..weights import split_weighted

    return split_weighted(spec, _is_adapter(ctx) if ctx is not None else None)


def _is_adapter(ctx: click.Context):
    def exists(name: str) -> bool:
        from pathlib import Path

        if Path(name).exists():
            return True
        from ..catalog import Catalog, validate_name
        from ..errors import LoratoolError

        try:
            validate_name(name)
        except LoratoolError:
            return False
        cat = Catalog(home_from(ctx), read_only_ok=True)
        try:
            return cat.exists(name)
        finally:
            cat.close()

    return exists


def input_paths(*specs: str | None) -> list[str]:
    """The arguments that name files or directories (the others are catalog names, whose
    blobs lie in the home)."""
    from pathlib import Path

    return [s for s in specs if s is not None and Path(s).exists()]


def check_out(ctx: click.Context, out, inputs, force: bool) -> None:
    """The one destination check (``loratool.fsutil.check_destination``) against this
    command's inputs and the catalog home, before anything is read or written."""
    from ..fsutil import check_destination

    check_destination(out, inputs=input_paths(*inputs), home=home_path(ctx), force=force)
