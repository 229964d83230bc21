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


def needs_sanitizing(text: str, *, cell: bool = False) -> bool:
    """Whether ``sanitize`` would change ``text`` (one regex scan, for many cells at once)."""
    return (_UNSAFE_CELL if cell else _UNSAFE).search(text) is not None


def weighted_adapters(f):
    """The ADAPTER[=WEIGHT]... arguments of merge, unmerge and combine."""
    return click.argument(
        "adapters",
        nargs=-1,
        required=True,
        metavar="ADAPTER[=WEIGHT]...",
        type=AdapterType(weighted=True),
    )(f)


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


# -- output formats of the listing commands (as sqlite-utils and llm users expect) -----------

FORMATS = ("json", "csv", "tsv", "nl")


def _format_flag(name: str):
    def remember(ctx: click.Context, param: click.Parameter, value: bool):
        if value:
            chosen = ctx.meta.get("loratool.format")
            if chosen not in (None, name):
                raise click.UsageError(
                    f"give one of --json, --csv, --tsv and --nl, not --{chosen} and --{name}"
                )
            ctx.meta["loratool.format"] = name
        return value

    return remember


def table_options(f):
    """``--json`` (one JSON document), ``--csv``, ``--tsv`` (a header row, then one row per
    record) and ``--nl`` (one JSON object per line), as sqlite-utils gives them; read the
    choice with :func:`output_format`. ``json_`` stays the command's parameter."""
    helps = {
        "csv": "Print CSV: a header row, then one row per record (lists as JSON).",
        "tsv": "Print tab-separated values, like --csv.",
        "nl": "Print newline-delimited JSON: one object per line.",
    }
    for name in ("nl", "tsv", "csv"):
        f = click.option(
            f"--{name}",
            f"{name}_",
            is_flag=True,
            expose_value=False,
            callback=_format_flag(name),
            help=helps[name],
        )(f)
    return click.option(
        "--json",
        "json_",
        is_flag=True,
        callback=_format_flag("json"),
        help="Print one JSON document on stdout and nothing else there.",
    )(f)


def output_format(ctx: click.Context) -> str | None:
    """'json', 'csv', 'tsv', 'nl', or None for the human table."""
    return ctx.meta.get("loratool.format")


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return str(value)


def emit_records(records: list[dict], fmt: str, keys: list[str] | None = None) -> None:
    """Records as csv/tsv (``keys`` in order: the header), nl (one object a line) or a JSON
    array. Written as they come, a 10,000-row catalog takes milliseconds."""
    if fmt == "json":
        body = ",\n".join(json.dumps(r, default=str) for r in records)
        sys.stdout.write("[\n" + body + "\n]\n" if records else "[]\n")
        return
    if fmt == "nl":
        sys.stdout.write("".join(json.dumps(r, default=str) + "\n" for r in records))
        return
    import csv

    keys = keys or (list(records[0]) if records else [])
    writer = csv.writer(sys.stdout, delimiter="\t" if fmt == "tsv" else ",", lineterminator="\n")
    writer.writerow(keys)
    writer.writerows([_cell(r.get(k)) for k in keys] for r in records)


# -- argument types: what they complete in the shell ------------------------------------------


def _completion_home(ctx: click.Context):
    from pathlib import Path

    from ..catalog import default_home

    root = ctx.find_root()
    home = (root.params or {}).get("home") if root is not None else None
    return Path(home).expanduser() if home else default_home()


def catalog_names(ctx: click.Context, prefix: str) -> list[str]:
    """The catalog's adapter names starting with ``prefix``, read-only and without torch
    (nothing is recovered or created: completion must never write)."""
    import sqlite3

    from ..catalog.db import DB_NAME

    db = _completion_home(ctx) / DB_NAME
    if not db.is_file():
        return []
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.5)
        try:
            rows = conn.execute(
                "SELECT name FROM adapters WHERE substr(name, 1, ?) = ? ORDER BY name LIMIT 500",
                (len(prefix), prefix),
            ).fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return []
    return [r[0] for r in rows if isinstance(r[0], str)]


class AdapterType(click.ParamType):
    """An ADAPTER: a catalog name or a path (ADAPTER=WEIGHT where ``weighted``). Completes
    catalog names and files."""

    name = "adapter"

    def __init__(self, *, weighted: bool = False, catalog_only: bool = False) -> None:
        self.weighted = weighted
        self.catalog_only = catalog_only

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem

        items = [CompletionItem(n) for n in catalog_names(ctx, incomplete)]
        if not self.catalog_only and "=" not in incomplete:
            items.append(CompletionItem(incomplete, type="file"))
        return items


class BaseType(click.ParamType):
    """A BASE: a model folder, a .safetensors file or a Hub id OWNER/NAME[@REV]. A path that
    exists wins; anything else must look like a Hub id (checked without the network)."""

    name = "base"

    def convert(self, value, param, ctx):
        from ..bases import is_local, looks_like_hub_id

        value = str(value)
        if is_local(value) or looks_like_hub_id(value):
            return value
        self.fail(
            f"{value!r} is neither a file or directory nor a Hub id (OWNER/NAME[@REVISION])",
            param,
            ctx,
        )

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem

        return [CompletionItem(incomplete, type="file")]


def open_base_arg(ctx: click.Context, spec: str, *, need: str, check=None):
    """A BASE argument on this machine (``loratool.bases.BaseSource``): a local path as it is;
    a Hub id described from its headers first (``check(index)`` may refuse there, before any
    weight is downloaded), then the files ``need`` names downloaded into the Hugging Face cache
    under a progress bar."""
    from pathlib import Path

    from ..bases import BaseSource, is_local, remote_base
    from . import render

    if is_local(spec):
        return BaseSource(spec, Path(spec))
    with render.status(f"{spec}: reading the headers on the Hub"):
        remote = remote_base(spec)
    if check is not None:
        check(remote.index)
    total = remote.missing_bytes(need)
    with render.progress_bytes(f"downloading {remote.hub.label}", total) as advance:
        return remote.fetch(need, advance)
