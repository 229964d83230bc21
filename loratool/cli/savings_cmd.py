"""savings: storage arithmetic for the catalog and for hypothetical adapters."""

from __future__ import annotations

import click

from .options import (
    AdapterType,
    BaseType,
    emit_json,
    emit_records,
    home_from,
    output_format,
    table_options,
)

# --csv/--tsv/--nl columns: one row per adapter (share_of_base with --base), or the one
# hypothetical adapter.
ADAPTER_KEYS = ["name", "task", "base_model", "params", "dense_params", "compression", "bytes"]
HYPOTHETICAL_KEYS = ["rank", "targets", "dtype", "modules", "params", "dense_params"]
HYPOTHETICAL_KEYS += ["compression", "bytes", "base_params", "base_bytes"]


@click.command()
@click.argument("names", nargs=-1, metavar="[NAME]...", type=AdapterType(catalog_only=True))
@click.option(
    "--base",
    "base_path",
    type=BaseType(),
    metavar="BASE",
    help="The base model (a path, or a Hub id OWNER/NAME[@REV] read by range requests, "
    "nothing downloaded but config.json): exact params and bytes from its headers.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False),
    help="A Hugging Face config.json for a hypothetical adapter.",
)
@click.option("--rank", type=int, help="Rank of the hypothetical adapter.")
@click.option(
    "--targets", help="Comma-separated module names, as PEFT's target_modules (q_proj,v_proj)."
)
@click.option(
    "--dtype",
    default="float16",
    show_default=True,
    type=click.Choice(["float32", "float16", "bfloat16", "float8"]),
    help="Storage dtype of the hypothetical adapter and base.",
)
@table_options
@click.pass_context
def savings(ctx, names, base_path, config_path, rank, targets, dtype, json_):
    """How many parameters and bytes adapters save against full fine-tuned copies.

    With NAMEs (default: the whole catalog): each adapter's params (A and B elements), the
    dense params of the ΔW they stand for, the compression between the two and its bytes.
    With --base, the catalog view for that base: n task-specific copies would need n × base
    bytes; the base plus the adapters needs base + Σ adapter bytes. The base is described from
    its safetensors headers only, so a 100 GB sharded model answers instantly.

    With --rank and --targets, a hypothetical adapter instead, its shapes from --config (a
    Hugging Face config.json: llama, mistral, qwen2, gemma, gpt2, gpt_neox, bert, roberta,
    deberta-v2, …) or from --base.

    \b
    Examples:
      loratool savings --base ./llama
      loratool savings --base meta-llama/Llama-3.2-1B       # headers read on the Hub
      loratool savings --config roberta-base/config.json --rank 8 --targets query,value
      loratool savings --base ./llama --rank 16 --targets q_proj,k_proj,v_proj,o_proj --json
      loratool savings --base ./llama --csv > savings.csv

    --json prints the whole report as one document; --csv, --tsv and --nl print its rows: one
    per adapter (name, task, base_model, params, dense_params, compression, bytes, and
    share_of_base with --base), or the one hypothetical adapter.
    """
    from . import render

    fmt = output_format(ctx)

    shown_base = base_path
    if base_path is not None:
        from ..bases import is_local, read_any

        if not is_local(base_path):  # a Hub id: its headers, by range requests
            with render.status(f"{base_path}: reading the headers on the Hub"):
                base_path = read_any(base_path)
    if rank is not None or targets is not None or config_path is not None:
        if rank is None or targets is None or (config_path is None and base_path is None):
            raise click.UsageError(
                "a hypothetical adapter needs --rank, --targets and one of --config / --base"
            )
        if names:
            raise click.UsageError("give adapter NAMEs or a hypothetical adapter, not both")
        target_list = [t.strip() for t in targets.split(",") if t.strip()]
        if rank < 1:
            raise click.UsageError("--rank must be at least 1")
        if config_path is not None:
            from pathlib import Path

            from ..jsonutil import loads
            from ..savings_config import hypothetical_adapter

            config = loads(Path(config_path).read_bytes(), file=config_path, what="config")
            doc = hypothetical_adapter(config, rank, target_list, dtype=dtype, source=config_path)
            doc.update(
                {"rank": rank, "targets": target_list, "dtype": dtype, "config": config_path}
            )
        else:
            from ..savings import hypothetical_from_base

            doc = hypothetical_from_base(base_path, rank, target_list, dtype)
        if fmt == "json":
            emit_json(doc)
            return
        if fmt is not None:
            keys = HYPOTHETICAL_KEYS + (["config"] if "config" in doc else [])
            emit_records([{k: doc.get(k) for k in keys}], fmt, keys)
            return
        render.table(
            f"hypothetical r={rank} adapter on {', '.join(target_list)} ({dtype})",
            ["", ("params", "right"), ("bytes", "right")],
            [
                ["adapter", f"{doc['params']:,}", render.human_size(doc["bytes"])],
                ["ΔW it stands for", f"{doc['dense_params']:,}", ""],
                ["base model", f"{doc['base_params']:,}", render.human_size(doc["base_bytes"])],
            ],
        )
        render.echo(
            f"{render.plural(doc['modules'], 'module')}; compression {doc['compression']:.1f}×; the adapter is "
            f"{100 * doc['bytes'] / doc['base_bytes']:.3f}% of the base"
        )
        return

    from ..catalog import Catalog
    from ..errors import NotFoundError
    from ..savings import report

    cat = Catalog(home_from(ctx), read_only_ok=True)
    if names:
        rows = []
        for n in names:
            if not cat.exists(n):
                raise NotFoundError(
                    f"no adapter named {n!r} in the catalog", hint="`loratool list` shows them"
                )
            rows.append(cat.get(n))
        others = []
    elif base_path is not None:
        # The catalog view of one base: the adapters whose every module fits it.
        from ..savings import fits_base
        from ..tensors.header import read_base

        base_index = base_path if not isinstance(base_path, str) else read_base(base_path)
        rows, others = [], []
        for r in cat.list():
            (rows if fits_base(cat.modules(r["name"]), base_index) else others).append(r)
    else:
        rows, others = cat.list(), []
    doc = report(rows, base_path)
    if base_path is not None and not names:
        doc["other_adapters"] = [r["name"] for r in others]
    if fmt == "json":
        emit_json(doc)
        return
    if fmt is not None:
        keys = ADAPTER_KEYS + (["share_of_base"] if base_path is not None else [])
        emit_records(doc["adapters"], fmt, keys)
        return
    if not doc["adapters"]:
        if doc.get("other_adapters"):
            render.echo(
                f"no catalog adapter fits {shown_base}; others: {', '.join(doc['other_adapters'])}"
            )
        else:
            render.echo("the catalog is empty: `loratool add SOURCE --task T` adds an adapter")
        return
    base = doc.get("base")
    rows_out = []
    for a in doc["adapters"]:
        row = [
            a["name"],
            a["task"],
            f"{a['params']:,}",
            f"{a['dense_params']:,}",
            f"{a['compression']:.1f}×",
            render.human_size(a["bytes"]),
        ]
        if base:
            share = a["bytes"] / base["bytes"] if base["bytes"] else 0
            row.append(_bar(share) + f" {100 * share:.2f}%")
        rows_out.append(row)
    cols = [
        "adapter",
        "task",
        ("params", "right"),
        ("ΔW params", "right"),
        ("compression", "right"),
        ("size", "right"),
    ]
    if base:
        cols.append("size vs base")
    render.table("adapters against the ΔW they stand for", cols, rows_out)
    if base:
        c = doc["catalog"]
        render.echo(
            f"base {base['path']}: {base['params']:,} params, {render.human_size(base['bytes'])}\n"
            f"{c['n_adapters']} fine-tuned copies would take {render.human_size(c['full_copies_bytes'])}; "
            f"the base plus {c['n_adapters']} adapters takes {render.human_size(c['lora_bytes'])}: "
            f"{render.human_size(c['saved_bytes'])} saved ({c['ratio']:.1f}× less)"
        )
        if doc.get("other_adapters"):
            render.echo(f"not for this base (left out): {', '.join(doc['other_adapters'])}")
    else:
        for bm, g in doc["by_base_model"].items():
            render.echo(
                f"{bm}: {len(g['adapters'])} adapters, {render.human_size(g['bytes'])} ({g['params']:,} params for {g['dense_params']:,} dense)"
            )
        render.echo("give --base PATH to compare against full copies of that base")


def _bar(share: float, width: int = 20) -> str:
    # at least one cell so that tiny adapters are still visible
    n = max(1, round(share * width)) if share > 0 else 0
    return "█" * min(n, width) + "·" * (width - min(n, width))
