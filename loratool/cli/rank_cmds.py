"""inspect-rank, resize, extract, combine."""

from __future__ import annotations

import click

from .options import device_option, emit_json, home_from, json_option, parse_weighted


def _output_options(f):
    f = click.option("-o", "--out", "out", type=click.Path(), help="Write a PEFT directory here.")(
        f
    )
    f = click.option(
        "--as", "as_name", metavar="NAME", help="Add the result to the catalog under NAME."
    )(f)
    f = click.option("--force", is_flag=True, help="Replace an existing -o directory.")(f)
    return f


def _check_output_choice(as_name, out) -> None:
    if (as_name is None) == (out is None):
        raise click.UsageError("give exactly one of --as NAME and -o DEST")


def _store(ctx, adapter, *, as_name, out, force, task, source_label, extra_meta=None):
    """Write the result to the catalog or to a PEFT directory; returns where it went."""
    if out is not None:
        from ..formats import save_adapter

        save_adapter(adapter, out, "peft", force=force)
        return str(out)
    from ..catalog import Catalog

    if not task:
        raise click.UsageError("--as needs --task (the source has no catalog task to inherit)")
    Catalog(home_from(ctx)).add_adapter(
        adapter,
        name=as_name,
        task=task,
        base_model=adapter.meta.base_model,
        meta=extra_meta or {},
        source=source_label,
        replace=force,
    )
    return f"catalog:{as_name}"


def _source_task(ctx, spec: str) -> str | None:
    from pathlib import Path

    if Path(spec).exists():
        return None
    from ..catalog import Catalog

    cat = Catalog(home_from(ctx))
    return cat.get(spec)["task"] if cat.exists(spec) else None


@click.command("inspect-rank")
@click.argument("adapter")
@click.option(
    "--threshold",
    type=float,
    default=0.99,
    show_default=True,
    help="Energy share for the energy rank.",
)
@click.option(
    "--module",
    "module_glob",
    metavar="GLOB",
    help="Only modules whose name matches, e.g. '*q_proj*'.",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    help="Plot the spectra to FILE.png (needs the plot extra).",
)
@json_option
@click.pass_context
def inspect_rank(ctx, adapter, threshold, module_glob, plot, json_):
    """The singular values of every scale·B·A and the rank they say the task needs.

    Computed from the factors (QR of B and Aᵀ, SVD of the r×r core), never forming the d×k
    product. Per module: numerical rank (σ above float32 noise), energy rank (fewest σ holding
    --threshold of Σσ²), stable rank (‖ΔW‖F²/‖ΔW‖₂²) and entropy effective rank. The summary
    suggests the rank for `loratool resize` that keeps the threshold in every module.

    \b
    Examples:
      loratool inspect-rank my-adapter
      loratool inspect-rank ./adapter --module '*q_proj*' --threshold 0.9 --plot spectra.png
    """
    from ..sources import open_adapter
    from ..transform import inspect

    opened = open_adapter(adapter, home_from(ctx))
    report = inspect(opened.adapter, threshold=threshold, module_glob=module_glob)
    report["adapter"] = opened.label
    if plot:
        from ..plot import plot_spectra

        plot_spectra(report, plot)
    if json_:
        emit_json(report)
        return
    from . import render

    rows = []
    for m in report["modules"]:
        rows.append(
            [
                m["name"],
                "×".join(map(str, m["shape"])),
                m["rank"],
                m["numerical_rank"],
                m["energy_rank"],
                f"{m['stable_rank']:.2f}",
                f"{m['entropy_rank']:.2f}",
                render.sparkline(m["singular_values"]),
            ]
        )
    render.table(
        f"{opened.label}: singular values of each ΔW",
        [
            "module",
            "shape",
            ("r", "right"),
            ("numerical", "right"),
            (f"energy@{threshold:g}", "right"),
            ("stable", "right"),
            ("entropy", "right"),
            "spectrum",
        ],
        rows,
    )
    s = report["summary"]
    kinds = [
        [
            k,
            v["modules"],
            v["rank"],
            v["energy_rank_median"],
            v["energy_rank_max"],
            f"{v['stable_rank_mean']:.2f}",
        ]
        for k, v in s["by_layer_kind"].items()
    ]
    render.table(
        "by layer kind",
        [
            "kind",
            ("modules", "right"),
            ("r", "right"),
            ("energy median", "right"),
            ("energy max", "right"),
            ("stable mean", "right"),
        ],
        kinds,
    )
    render.echo(
        f"{s['modules']} modules; r up to {s['rank']}, numerical rank up to {s['numerical_rank_max']}; "
        f"{threshold:g} of the energy fits in rank {s['energy_rank_max']} everywhere: "
        f"`loratool resize {opened.label} --rank {s['suggested_rank']}` keeps it."
    )
    if plot:
        render.echo(f"spectra plotted to {plot}")


@click.command()
@click.argument("adapter")
@click.option("--rank", type=int, help="Keep this many singular values per module.")
@click.option(
    "--energy", type=float, help="Keep the fewest singular values holding this share of Σσ²."
)
@click.option("--task", help="Task for --as (default: the source's catalog task).")
@_output_options
@json_option
@click.pass_context
def resize(ctx, adapter, rank, energy, task, as_name, out, force, json_):
    """Truncate each module's rank by SVD and report the energy kept.

    The new factors are B' = U√S, A' = √S·Vᵀ of each module's ΔW; alpha is rescaled so the
    scale is kept. Resizing to the full rank is lossless.

    \b
    Examples:
      loratool resize my-adapter --rank 8 --as my-adapter-r8
      loratool resize ./adapter --energy 0.95 -o ./adapter-small
    """
    from ..sources import open_adapter
    from ..transform import resize as do_resize
    from . import render

    _check_output_choice(as_name, out)
    opened = open_adapter(adapter, home_from(ctx))
    with render.progress_count("resizing", len(opened.adapter.modules)) as advance:
        result, kept = do_resize(opened.adapter, rank=rank, energy=energy, progress=advance)
    where = _store(
        ctx,
        result,
        as_name=as_name,
        out=out,
        force=force,
        task=task or _source_task(ctx, adapter),
        source_label=f"resize {opened.label}",
        extra_meta={"resized_from": opened.label},
    )
    doc = {
        "source": opened.label,
        "written": where,
        "params_before": opened.adapter.params,
        "params_after": result.params,
        "modules": {
            n: {
                "rank_before": opened.adapter.modules[n].rank,
                "rank_after": m.rank,
                "energy_kept": kept[n],
            }
            for n, m in result.modules.items()
        },
        "min_energy_kept": min(kept.values()),
    }
    if json_:
        emit_json(doc)
        return
    render.echo(
        f"{where}: {len(result.modules)} modules, params {render.human_count(doc['params_before'])} → "
        f"{render.human_count(doc['params_after'])}, energy kept ≥ {doc['min_energy_kept']:.4f} in every module"
    )


@click.command()
@click.argument("base", type=click.Path(exists=True))
@click.argument("finetuned", type=click.Path(exists=True))
@click.option("--rank", type=int, help="Rank of every extracted module.")
@click.option(
    "--energy", type=float, help="Per module, the fewest singular values holding this share."
)
@click.option("--task", required=True, help="The task the fine-tuned model was trained for.")
@device_option
@_output_options
@json_option
@click.pass_context
def extract(ctx, base, finetuned, rank, energy, task, device, as_name, out, force, json_):
    """A LoRA from the difference of two full models: ΔW = W_finetuned − W_base.

    Streams tensor pair by tensor pair; each 2-D (or conv) pair that differs is factored by a
    truncated SVD (exact for small matrices, randomized with power iterations for large ones),
    on the GPU when there is one. Reports each module's relative Frobenius error.

    \b
    Example:
      loratool extract ./llama ./llama-finetuned --rank 16 --task chat --as chat-r16
    """
    from pathlib import Path

    from ..tensors.header import read_base
    from ..transform import extract as do_extract
    from . import render

    _check_output_choice(as_name, out)
    n = len(read_base(base).tensors)
    with render.progress_count("extracting", n) as advance:
        adapter, errors = do_extract(
            base, finetuned, rank=rank, energy=energy, device=device, progress=advance
        )
    adapter.meta.task = task
    adapter.meta.base_model = Path(base).resolve().name
    where = _store(
        ctx,
        adapter,
        as_name=as_name,
        out=out,
        force=force,
        task=task,
        source_label=f"extract {finetuned}",
    )
    skipped = adapter.origin.get("extract_skipped_1d", [])
    doc = {
        "written": where,
        "modules": {
            k: {"rank": adapter.modules[k].rank, "relative_error": v} for k, v in errors.items()
        },
        "max_relative_error": max(errors.values()),
        "params": adapter.params,
        "skipped_1d_changed": skipped,
    }
    if json_:
        emit_json(doc)
        return
    render.echo(
        f"{where}: {len(errors)} modules, {render.human_count(adapter.params)} params, "
        f"relative error ≤ {doc['max_relative_error']:.3g}"
    )
    if skipped:
        render.warn(
            f"{len(skipped)} changed 1-D tensors (norms, biases) cannot be expressed as LoRA: {', '.join(skipped[:5])}"
        )


@click.command()
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER[=WEIGHT]...")
@click.option(
    "--method",
    type=click.Choice(["linear", "cat", "svd", "ties", "dare"]),
    required=True,
    help="How to combine.",
)
@click.option("--rank", type=int, help="Rank of the result (svd, ties, dare).")
@click.option(
    "--density",
    type=float,
    default=0.5,
    show_default=True,
    help="Share of entries kept (ties, dare).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (dare).")
@click.option("--task", help="Task for --as (default: the inputs' common catalog task).")
@_output_options
@json_option
@click.pass_context
def combine(ctx, adapters, method, rank, density, seed, task, as_name, out, force, json_):
    """One adapter from several, each adapter's own scale applied exactly once.

    \b
    linear, cat  exact: the factors are concatenated (weights folded into B), rank Σrᵢ
    svd          the exact sum re-factored to --rank by SVD
    ties         trim each ΔW to --density, elect signs, disjoint mean, re-factor to --rank
    dare         drop entries at random (1 − --density), rescale, sum, re-factor to --rank

    Unlike peft's add_weighted_adapter, `linear` has no cross-terms and rsLoRA or alpha ≠ r
    adapters are not rescaled twice.

    \b
    Example:
      loratool combine summarize=0.6 translate=0.4 --method cat --as both --task multi
    """
    from ..sources import open_adapter
    from ..transform import combine as do_combine
    from . import render

    _check_output_choice(as_name, out)
    inputs, labels = [], []
    for spec in adapters:
        name, weight = parse_weighted(spec)
        opened = open_adapter(name, home_from(ctx))
        inputs.append((opened.adapter, weight))
        labels.append(f"{opened.label}={weight:g}")
    result, errors = do_combine(inputs, method, rank=rank, density=density, seed=seed)
    if task is None:
        tasks = {_source_task(ctx, parse_weighted(s)[0]) for s in adapters}
        task = tasks.pop() if len(tasks) == 1 else None
    where = _store(
        ctx,
        result,
        as_name=as_name,
        out=out,
        force=force,
        task=task,
        source_label=f"combine --method {method} " + " ".join(labels),
        extra_meta={"combined_from": " ".join(labels)},
    )
    doc = {
        "written": where,
        "method": method,
        "inputs": labels,
        "rank": result.max_rank,
        "params": result.params,
        "modules": len(result.modules),
        "max_relative_error": max(errors.values(), default=0.0),
    }
    if json_:
        emit_json(doc)
        return
    render.echo(
        f"{where}: {doc['modules']} modules, rank up to {doc['rank']}, {render.human_count(doc['params'])} params"
        + (
            f", relative error ≤ {doc['max_relative_error']:.3g}"
            if method in ("svd", "ties", "dare")
            else " (exact)"
        )
    )
