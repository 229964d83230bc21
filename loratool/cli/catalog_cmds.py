"""Catalog commands: add, list, show, remove, export, verify. They parse and render; the work
is ``loratool.catalog.Catalog``'s. rich (through ``render``) is imported only for human output,
torch only by the library calls that need tensors (add, export)."""

from __future__ import annotations

import click

from ..units import human_count, human_size, plural
from .options import (
    AdapterType,
    emit_json,
    emit_records,
    home_from,
    json_option,
    needs_sanitizing,
    output_format,
    sanitize,
    table_options,
)

# rich lays a table out cell by cell, about 0.5 ms a row: 9 s for 10,000 adapters. Above this
# many rows ``list`` prints the same columns as plain aligned text, which takes milliseconds.
RICH_ROWS = 100


def _catalog(ctx: click.Context, *, read: bool = False):
    """The catalog; ``read``: the command only reads, so a home where nothing can be written
    (read-only, full disk) is opened read-only. What the reader should know (recovery that
    could not run, a write-ahead log that could not be read) is said on stderr."""
    from ..catalog import Catalog

    cat = Catalog(home_from(ctx), read_only_ok=read)
    for note in cat.notes:
        click.echo(f"warning: {sanitize(note)}", err=True)
    return cat


def _parse_meta(values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{v!r} is not KEY=VALUE", param_hint="--meta")
        out[key.strip()] = value
    return out


def _num(x) -> str:
    if isinstance(x, float):
        return f"{x:g}"
    return str(x)


def _created(ts: str | None) -> str:
    return (ts or "")[:16].replace("T", " ")


def _plain_table(columns, rows) -> None:
    """Aligned text without rich; a column given as (name, "right") is right-aligned.

    Kept by hand on purpose: for 10,000 rows it takes 0.16 s where tabulate (sqlite-utils'
    table writer, already installed) takes 0.9 s — its per-cell type detection cannot be
    turned off — and rich's Table about 9 s (measured on this project's 2-core machine).
    ``list`` must answer a big catalog at once; --csv/--tsv/--nl are the machine formats."""
    import sys

    names = [c if isinstance(c, str) else c[0] for c in columns]
    right = [not isinstance(c, str) and c[1] == "right" for c in columns]
    cells = [tuple("" if v is None else str(v) for v in r) for r in rows]
    if needs_sanitizing(" ".join(v for r in cells for v in r), cell=True):  # one scan
        cells = [tuple(sanitize(v, cell=True) for v in r) for r in cells]
    widths = [
        max(len(n), max((len(v) for v in col), default=0))
        for n, col in zip(names, zip(*cells, strict=True), strict=False)
    ]
    fmt = "  ".join(f"{{:{'>' if r else '<'}{w}}}" for r, w in zip(right, widths, strict=True))
    out = [fmt.format(*names).rstrip(), "  ".join("-" * w for w in widths)]
    out.extend(fmt.format(*r).rstrip() for r in cells)
    sys.stdout.write("\n".join(out) + "\n")


# list's columns in --csv/--tsv, in this order (then whatever else a row holds)
LIST_KEYS = [
    "name",
    "task",
    "base_model",
    "rank",
    "alpha",
    "modules",
    "module_count",
    "params",
    "dense_params",
    "bytes",
    "dtype",
    "format",
    "tags",
    "created",
    "sha256",
]


@click.command()
@click.argument("source", type=click.Path(exists=True, path_type=str))
@click.option("--task", required=True, help="What the adapter is for (summarize, sql, …).")
@click.option("--name", help="Catalog name (default: the directory or file name).")
@click.option("--base-model", help="Base model id (default: the one the adapter's config names).")
@click.option("--tag", "tags", multiple=True, help="A tag; repeat for several.")
@click.option(
    "--meta",
    "meta",
    multiple=True,
    metavar="K=V",
    help="A free-form key/value; repeat for several.",
)
@click.option("--description", help="One line about the adapter.")
@click.option(
    "--replace",
    is_flag=True,
    help="Overwrite the adapter that has this name; without --name, the one that has the same "
    "weights (an update of its metadata).",
)
@click.option(
    "--keep-both",
    is_flag=True,
    help="Add it even though the catalog holds the same weights under another name.",
)
@json_option
@click.pass_context
def add(ctx, source, task, name, base_model, tags, meta, description, replace, keep_both, json_):
    """Validate the adapter at SOURCE and import it into the catalog.

    SOURCE is a PEFT directory (adapter_config.json + adapter_model.safetensors), a
    kohya/diffusers/LyCORIS .safetensors file, an mlx-lm directory or a GGUF adapter. The
    adapter is stored once, as a canonical blob named by its sha256, with the training facts
    the file carries (ss_* and modelspec.* keys, the PEFT/mlx config, GGUF keys: `show` lists
    them, `list --trained` filters on them) and the sha256 of the file's tensor bytes, which
    sd-scripts, AUTOMATIC1111 and Civitai name a LoRA by (AutoV3) and which editing only the
    metadata leaves unchanged. The same weights as an adapter already in the catalog are
    refused, naming it: --replace updates it, --keep-both adds this one too. Prints the name and
    a one-line summary.

    \b
    Example:
      loratool add ./runs/summarize-lora --task summarize --tag v1 --meta lr=2e-4
      loratool add ./style-v2.safetensors --task style --replace   # same weights, new metadata
    """
    meta_d = _parse_meta(meta)
    from .render import status

    cat = _catalog(ctx)
    try:
        with status(f"adding {source}"):
            row = cat.add(
                source,
                task=task,
                name=name,
                base_model=base_model,
                tags=tags,
                meta=meta_d,
                description=description,
                replace=replace,
                keep_both=keep_both,
            )
    finally:
        cat.close()
    if json_:
        emit_json(row)
        return
    from .render import echo, human_count, human_size

    if row["same_weights"]:
        click.echo(
            f"note: the same weights as {sanitize(', '.join(row['same_weights']))} (kept both)",
            err=True,
        )
    if row["same_tensors"]:
        click.echo(
            f"warning: the same tensors as {sanitize(', '.join(row['same_tensors']))}, but its "
            "config gives other scales (alpha): added as an adapter of its own",
            err=True,
        )

    echo(row["name"])
    echo(
        f"  task {row['task']}, {plural(row['modules'], 'module')}, rank {row['rank']}, alpha {_num(row['alpha'])}, "
        f"{human_count(row['params'])} params ({human_count(row['dense_params'])} dense), "
        f"{human_size(row['bytes'])} {row['dtype']}, from {row['format']}"
        + (f", base {row['base_model']}" if row["base_model"] else "")
    )


@click.command("list")
@click.option("--task", help="Only adapters for this task.")
@click.option(
    "--base-model",
    help="Only adapters for this base model (the catalog's; the one their training metadata "
    "names: --trained base_model=…).",
)
@click.option(
    "--tag", "tags", multiple=True, help="Only adapters with this tag (repeat: all of them)."
)
@click.option(
    "--trained",
    multiple=True,
    metavar="KEY[=VALUE]",
    help="Only adapters whose training facts (`show` lists them: base_model, steps, "
    "trigger_words, optimizer, …) have KEY, equal to VALUE in any case; VALUE may be a glob "
    "(*, ?). Repeat: all of them.",
)
@click.option("--trigger", metavar="WORD", help="Only adapters whose trigger words contain WORD.")
@click.option(
    "--meta",
    "meta",
    multiple=True,
    metavar="KEY[=VALUE]",
    help="Only adapters with this --meta key/value (as --trained).",
)
@click.option(
    "--hash",
    "hash_",
    metavar="HEX",
    help="Only adapters whose sha256 starts with HEX: the tensor bytes' (AutoV3), the source "
    "file's (AutoV2) or the catalog blob's.",
)
@table_options
@click.pass_context
def list_(ctx, task, base_model, tags, trained, trigger, meta, hash_, json_):
    """List the catalog's adapters, sorted by task then name.

    The filters combine: an adapter is listed when all of them hold.

    --json prints an array of objects (SPEC keys: name, task, base_model, rank, alpha,
    modules — the module count, also as module_count —, params, dense_params, bytes, dtype,
    format, tags, created, sha256…); --nl one object per line; --csv and --tsv a header row
    and a row per adapter, as sqlite-utils prints them.

    \b
    Example:
      loratool list --task summarize
      loratool list --tag v1 --json
      loratool list --trained 'base_model=*sdxl*' --trigger ohwx
      loratool list --trained steps=2000 --trained optimizer=AdamW8bit
      loratool list --hash 2C3F2DA7DE1D        # a Civitai AutoV3 / AUTOMATIC1111 Lora hash
      loratool list --csv > adapters.csv
    """
    from ..catalog.search import parse_pairs
    from ..errors import ValidationError

    try:
        if trigger is not None and not trigger.strip():
            raise ValidationError("--trigger needs a word")
        trained_p = parse_pairs(trained, "--trained")
        meta_p = parse_pairs(meta, "--meta")
        if hash_ is not None:
            from ..catalog.search import normalize_hash

            normalize_hash(hash_)
    except ValidationError as exc:
        raise click.BadParameter(exc.message) from exc
    cat = _catalog(ctx, read=True)
    try:
        rows = cat.list(
            task=task,
            base_model=base_model,
            tag=tags,
            trained=trained_p,
            meta=meta_p,
            trigger=trigger,
            hash_prefix=hash_,
        )
        home = cat.home
    finally:
        cat.close()
    fmt = output_format(ctx)
    if fmt is not None:
        # The library's rows already hold every key SPEC names (and description, source,
        # rslora); written as they are, a 10,000-row listing saves a dict copy per row.
        for r in rows:
            r["module_count"] = r["modules"]
        emit_records(
            rows, fmt, LIST_KEYS + [k for k in (rows[0] if rows else {}) if k not in LIST_KEYS]
        )
        return
    if not rows:
        from .render import echo

        filtered = task or base_model or tags or trained or trigger or meta or hash_
        echo(
            "no adapters match"
            if filtered
            else f"no adapters in {home}; add one with `loratool add DIR --task T`"
        )
        return
    if len(rows) > RICH_ROWS:
        render = _plain_table
    else:
        from .render import table

        def render(columns, rows):
            table(None, columns, rows)

    render(
        [
            "name",
            "task",
            "base model",
            ("rank", "right"),
            ("alpha", "right"),
            ("modules", "right"),
            ("params", "right"),
            ("size", "right"),
            "created",
        ],
        [
            (
                r["name"],
                r["task"],
                r["base_model"] or "",
                r["rank"],
                _num(r["alpha"]),
                r["modules"],
                human_count(r["params"]),
                human_size(r["bytes"]),
                (r["created"] or "")[:10],
            )
            for r in rows
        ],
    )


@click.command()
@click.argument("name", type=AdapterType(catalog_only=True))
@json_option
@click.pass_context
def show(ctx, name, json_):
    """Show everything about one adapter, module by module.

    --json prints list --json's keys (`modules` is the module count, also `module_count`),
    then `module_details` (one object per module), `remotes` and the blob's path.

    \b
    Example:
      loratool show summarize-lora
    """
    cat = _catalog(ctx, read=True)
    try:
        info = cat.info(name)
        blob = str(cat.blobs.path(info["sha256"]))
    finally:
        cat.close()
    from ..tensors.digest import autov2, autov3

    modules = info.pop("modules_detail")
    remotes = info.pop("remotes")
    info["autov2"], info["autov3"] = autov2(info["file_sha256"]), autov3(info["tensor_sha256"])
    if json_:
        emit_json(
            {
                **info,
                "blob": blob,
                # as in list --json: `modules` is the count; the modules are module_details
                "modules": info["modules"],
                "module_count": info["modules"],
                "module_details": modules,
                "remotes": remotes,
            }
        )
        return
    from .render import echo, human_count, human_size, table

    dense, params = info["dense_params"], info["params"]
    fields = [
        ("name", info["name"]),
        ("task", info["task"]),
        ("base model", info["base_model"] or "-"),
        ("description", info["description"] or "-"),
        ("format", info["format"]),
        ("source", info["source"] or "-"),
        ("rank", info["rank"]),
        ("alpha", _num(info["alpha"])),
        ("rslora", "yes" if info["rslora"] else "no"),
        ("modules", info["modules"]),
        ("params", f"{params:,} ({dense:,} dense, {dense / params if params else 0:.1f}× smaller)"),
        ("size", f"{human_size(info['bytes'])} ({info['bytes']:,} bytes, {info['dtype']})"),
        ("created", info["created"]),
        ("sha256", info["sha256"]),
        ("blob", blob),
        ("tags", ", ".join(info["tags"]) or "-"),
        *_source_hashes(info),
    ]
    width = max(len(k) for k, _ in fields)
    for k, v in fields:
        echo(f"{k:<{width}}  {v}")
    for section in ("meta", "training"):
        if info[section]:
            echo(f"{section}:")
            for k, v in info[section].items():
                echo(f"  {k} = {v}")
    table(
        "modules",
        [
            "module",
            "kind",
            "shape",
            ("r", "right"),
            ("alpha", "right"),
            ("scale", "right"),
            ("params", "right"),
        ],
        [
            (
                m["name"],
                m["kind"],
                "×".join(str(s) for s in m["base_shape"]),
                m["rank"],
                _num(m["alpha"]),
                f"{m['scale']:.4g}",
                human_count(m["params"]),
            )
            for m in modules
        ],
    )
    if remotes:
        table(
            "remotes",
            ["repo", "revision", "commit", "pushed"],
            [
                (r["repo"], r["revision"], r["commit"] or "", _created(r["pushed_at"]))
                for r in remotes
            ],
        )


def _source_hashes(info: dict) -> list[tuple[str, str]]:
    """show's lines about the file the adapter was added from: its hashes as sd tools give
    them, and the other adapters with the same weights."""
    if not info["tensor_sha256"]:
        return [
            (
                "source hash",
                "- (not recorded: made here from other adapters, or added before loratool kept it)",
            )
        ]
    out = [
        ("file sha256", f"{info['file_sha256']} (AutoV2 {info['autov2']})"),
        ("tensor sha256", f"{info['tensor_sha256']} (AutoV3 {info['autov3']})"),
    ]
    declared = (info["training"].get("addnet_hash") or "").lower()
    if declared and declared != info["tensor_sha256"]:
        out.append(
            (
                "declared hash",
                f"{declared} (the file's sshs_model_hash, not its tensor bytes' sha256; "
                "AUTOMATIC1111 shows the declared one)",
            )
        )
    if info["same_weights"]:
        out.append(("same weights", ", ".join(info["same_weights"])))
    if info["same_tensors"]:
        out.append(("same tensors", ", ".join(info["same_tensors"]) + " (other scales)"))
    return out


@click.command()
@click.argument("name", type=AdapterType(catalog_only=True))
@click.pass_context
def remove(ctx, name):
    """Forget an adapter; its blob is deleted when no other adapter shares it.

    \b
    Example:
      loratool remove summarize-lora
    """
    cat = _catalog(ctx)
    try:
        cat.remove(name)
    finally:
        cat.close()
    from .render import echo

    echo(f"removed {name}")


FORMAT_NAMES = ["peft", "kohya", "lycoris", "diffusers", "mlx", "gguf", "loratool"]
FORMAT_HELP = (
    "peft: a directory PeftModel.from_pretrained loads; kohya: sd-scripts/ComfyUI names; "
    "lycoris: lycoris-lora's file (keeps LoHa/LoKr as they are); "
    "diffusers: what load_lora_weights reads; mlx: an mlx-lm adapter directory; gguf: a "
    "llama.cpp adapter (needs --base); loratool: the catalog's own file."
)


def conversion_options(f):
    """--base, --component, --rank and --energy, shared by export and convert."""
    f = click.option(
        "--energy",
        type=float,
        help="LyCORIS modules (LoHa, LoKr…) written as LoRA keep the fewest singular values "
        "holding this share of ΔW's energy (Σσ²); default: all of them (exact).",
    )(f)
    f = click.option(
        "--rank",
        type=int,
        help="LyCORIS modules (LoHa, LoKr…) written as LoRA are truncated to this rank by SVD; "
        "the energy kept is reported per module. Default: exact.",
    )(f)
    f = click.option(
        "--component",
        type=click.Choice(
            ["unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"]
        ),
        help="The pipeline component: which one to write for one-model formats (peft, mlx, "
        "gguf), or the one a prefix-less adapter belongs to (diffusers).",
    )(f)
    f = click.option(
        "--base",
        type=click.Path(exists=True, path_type=str),
        help="The model (or diffusers pipeline directory) the adapter is for: names are "
        "resolved against its tensors, and GGUF reads its config.json.",
    )(f)
    return f


# Formats that write one pipeline component (the others write every one: --component unused).
ONE_COMPONENT_FORMATS = ("peft", "diffusers", "mlx", "gguf")


def check_conversion_options(to: str, component, rank, energy, *, flag: str) -> None:
    """Options the target format would ignore are usage errors: --component for a format that
    writes every component, --rank/--energy for one that keeps LyCORIS modules as they are."""
    from ..formats.convert import KEEPS_LYCORIS

    if component is not None and to not in ONE_COMPONENT_FORMATS:
        raise click.UsageError(
            f"{flag} {to} does not use --component (it writes every component; only "
            f"{', '.join(ONE_COMPONENT_FORMATS)} pick one)"
        )
    given = "--rank" if rank is not None else "--energy" if energy is not None else None
    if given and to in KEEPS_LYCORIS:
        raise click.UsageError(
            f"{flag} {to} does not use {given} (it keeps LyCORIS modules as they are)"
        )


def check_rule_used(adapter, to: str, rank, energy, label: str) -> None:
    """--rank/--energy truncate LyCORIS modules written as LoRA: refused (usage) for an
    adapter that has none, where they would change nothing."""
    from ..formats.convert import KEEPS_LYCORIS
    from ..tolora import needs_conversion

    if (rank is not None or energy is not None) and to not in KEEPS_LYCORIS:
        if not needs_conversion(adapter):
            given = "--rank" if rank is not None else "--energy"
            raise click.UsageError(
                f"{label} has no LyCORIS module (LoHa, LoKr, Tucker LoCon) to write as LoRA: "
                f"{given} would change nothing (resize shortens a LoRA)"
            )


def lycoris_rule(rank: int | None, energy: float | None):
    """The rank rule LyCORIS modules are written as LoRA with (None: exact)."""
    if rank is not None and energy is not None:
        raise click.UsageError("give --rank or --energy, not both")
    if rank is None and energy is None:
        return None
    from ..rank import RankRule

    return RankRule("rank", rank) if rank is not None else RankRule("energy", energy)


def echo_conversion(report, json_: bool, what: str) -> None:
    if json_:
        emit_json(report.to_dict())
        return
    import sys

    from .render import echo

    for w in report.warnings:
        sys.stderr.write(f"warning: {w}\n")
    echo(f"{what} to {report.dest} ({report.format}, {plural(report.modules, 'module')})")


def convert_path(ctx, src, dest, to, base, component, rank, energy, force, json_, verb) -> None:
    """`convert SRC`, and `export` of a path: read it, convert, write DEST (checked first)."""
    from ..formats.convert import convert as run
    from ..sources import open_adapter
    from .options import check_out
    from .render import status

    check_out(ctx, dest, [src, base], force)
    with status(f"{verb}ing {src}"):
        adapter = open_adapter(src, home_from(ctx)).adapter
        check_rule_used(adapter, to, rank, energy, src)
        report = run(
            adapter,
            dest,
            to,
            base=base,
            component=component,
            force=force,
            rule=lycoris_rule(rank, energy),
        )
    echo_conversion(report, json_, f"{verb}ed {src}")


@click.command()
@click.argument("name", metavar="ADAPTER", type=AdapterType())
@click.argument("dest", type=click.Path(path_type=str))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMAT_NAMES),
    default="peft",
    show_default=True,
    help=FORMAT_HELP,
)
@conversion_options
@click.option("--force", is_flag=True, help="Replace DEST if it exists.")
@json_option
@click.pass_context
def export(ctx, name, dest, fmt, base, component, rank, energy, force, json_):
    """Write ADAPTER (a catalog name or a path) to DEST in any writable format.

    A catalog adapter's blob is re-hashed first: a corrupt one is refused. A path is read as
    `convert` reads it. What the format cannot carry exactly is named in a warning.

    \b
    Example:
      loratool export summarize-lora ./out/summarize --format peft
      loratool export style-lora ./out/style.safetensors --format kohya
      loratool export ./runs/style/final.safetensors ./out/style-peft --format peft --base ./sd15
    """
    from pathlib import Path

    from .render import status

    check_conversion_options(fmt, component, rank, energy, flag="--format")
    if Path(name).exists():  # a path wins over a catalog name, as everywhere
        convert_path(ctx, name, dest, fmt, base, component, rank, energy, force, json_, "export")
        return
    cat = _catalog(ctx, read=True)
    try:
        with status(f"exporting {name}"):
            if rank is not None or energy is not None:  # (a LoRA-only format: checked above)
                check_rule_used(cat.load(name, lazy=True), fmt, rank, energy, name)
            report = cat.export(
                name,
                dest,
                fmt,
                force=force,
                base=base,
                component=component,
                rule=lycoris_rule(rank, energy),
            )
    finally:
        cat.close()
    echo_conversion(report, json_, f"exported {name}")


@click.command()
@table_options
@click.pass_context
def verify(ctx, json_):
    """Re-hash every blob and match rows to blobs; exit 1 listing every problem.

    First undoes what a command killed mid-write left (as every command does; on a home that
    cannot be written it says that recovery is pending). Then finds damaged database pages,
    schema drift, malformed rows, corrupt blobs, rows whose blob is missing, blobs no row
    refers to and temp files of dead processes, and lists them all. Repairs nothing else. --csv,
    --tsv and --nl print one row per problem (kind, subject, message).

    \b
    Example:
      loratool verify
      loratool verify --tsv | cut -f1 | sort | uniq -c
    """
    cat = _catalog(ctx, read=True)  # recovers first (best effort where it cannot write)
    try:
        from .render import status

        with status("verifying the catalog"):
            report = cat.verify()
        home = cat.home
    finally:
        cat.close()
    fmt = output_format(ctx)
    if fmt == "json":
        emit_json({"home": str(home), **report.to_dict()})
    elif fmt is not None:
        emit_records(report.to_dict()["problems"], fmt, ["kind", "subject", "message"])
    else:
        from .render import echo

        for p in report.problems:
            echo(str(p))
        if report.ok:
            echo(
                f"ok: {plural(report.adapters, 'adapter')}, {plural(report.blobs, 'blob')}, no problems in {home}"
            )
        else:
            echo(f"{plural(len(report.problems), 'problem')} in {home}")
    if not report.ok:
        ctx.exit(1)
