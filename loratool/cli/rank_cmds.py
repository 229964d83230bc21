"""inspect-rank, resize, extract, combine."""

from __future__ import annotations

import os

import click

from .options import (
    AdapterType,
    BaseType,
    check_out,
    device_option,
    emit_json,
    emit_records,
    home_from,
    input_paths,
    json_option,
    open_base_arg,
    output_format,
    parse_weighted,
    table_options,
    weighted_adapters,
)


def _output_options(f):
    f = click.option("-o", "--out", "out", type=click.Path(), help="Write a PEFT directory here.")(
        f
    )
    f = click.option(
        "--as", "as_name", metavar="NAME", help="Add the result to the catalog under NAME."
    )(f)
    f = click.option("--force", is_flag=True, help="Replace an existing -o directory.")(f)
    return f


def _check_output_choice(
    ctx, as_name, out, force, inputs, *, several: bool = False, task: str | None = None
) -> None:
    """Exactly one of --as and -o, and destinations (each input's, with several) that
    overlap no input, the catalog home included: refused before anything is read. --task is
    the catalog task of --as: with -o it would be ignored, so it is a usage error."""
    if (as_name is None) == (out is None):
        raise click.UsageError("give exactly one of --as NAME and -o DEST")
    if out is not None and task is not None:
        raise click.UsageError(
            "-o does not use --task (a PEFT directory holds no catalog task; only --as stores one)"
        )
    labels = inputs if several else inputs[:1]
    if out is not None:
        for dest in {_expand(out, label, several) for label in labels}:
            check_out(ctx, dest, inputs, force)
        return
    for name in {_expand(as_name, label, several) for label in labels}:
        if force and name in inputs and not input_paths(name):
            from ..errors import ValidationError

            raise ValidationError(
                f"--as {name} --force would replace an input of this command",
                hint="choose another name; --force never replaces an input",
            )


def _store(ctx, adapter, *, as_name, out, force, task, source_label, extra_meta=None):
    """Write the result to the catalog or to a PEFT directory; returns where it went. ``task``
    was settled before the work began (:func:`_task_for_as`). A base named by a relative path
    that exists here is written absolute: `AutoPeftModel…` loads the result from anywhere
    (a Hub id stays as it is)."""
    base = adapter.meta.base_model
    if base and not os.path.isabs(base) and os.path.exists(base):
        adapter.meta.base_model = os.path.abspath(base)
        config = adapter.origin.get("peft_config")
        if isinstance(config, dict):
            adapter.origin["peft_config"] = {
                **config,
                "base_model_name_or_path": adapter.meta.base_model,
            }
    if out is not None:
        from ..formats import save_adapter

        save_adapter(adapter, out, "peft", force=force)
        return str(out)
    from ..catalog import Catalog

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

    cat = Catalog(home_from(ctx), read_only_ok=True)
    try:
        return cat.get(spec)["task"] if cat.exists(spec) else None
    finally:
        cat.close()


def _task_for_as(ctx, as_name, task, specs: list[str]) -> str | None:
    """The catalog task of an --as result, before any work: --task, else the one task the
    inputs have in the catalog. When there is none, a usage error that says why."""
    if as_name is None or task:
        return task
    from pathlib import Path

    tasks: dict[str, str | None] = {s: _source_task(ctx, s) for s in specs}
    paths = [s for s in specs if Path(s).exists()]
    known = sorted({t for t in tasks.values() if t})
    if paths and len(specs) == 1:
        why = f"{paths[0]} is a path, not a catalog adapter: it has no task to inherit"
    elif paths:
        why = f"{', '.join(paths)} {'is a path' if len(paths) == 1 else 'are paths'}, with no catalog task"
    elif len(known) > 1:
        why = f"the inputs have different tasks ({', '.join(known)})"
    elif len(known) == 1:
        return known[0]
    else:
        why = "the inputs have no catalog task"
    raise click.UsageError(f"--as needs --task: {why}")


@click.command("inspect-rank")
@click.argument("adapter", type=AdapterType())
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
    help="Draw cumulative energy against rank, per module and layer kind, to FILE.png (or "
    ".svg, .pdf…; needs the plot extra).",
)
@click.option("--force", is_flag=True, help="Replace an existing --plot file.")
@click.option(
    "--base",
    type=click.Path(exists=True),
    help="The base model: for DoRA modules, how far the magnitudes moved from its norms.",
)
@table_options
@click.pass_context
def inspect_rank(ctx, adapter, threshold, module_glob, plot, force, base, json_):
    """The singular values of every scale·B·A and the rank they say the task needs.

    Computed from the factors (QR of B and Aᵀ, SVD of the r×r core), never forming the d×k
    product. Per module: numerical rank (σ above float32 noise), energy rank (fewest σ holding
    --threshold of Σσ²), stable rank (‖ΔW‖F²/‖ΔW‖₂²) and entropy effective rank. The summary
    gives the smallest rank that keeps the threshold in every module, and the `loratool
    resize` that would apply it when it is below the adapter's own rank. Expert-stacked
    modules are measured expert by expert; DoRA modules report their magnitudes, and with
    --base how far they moved from the base's norms. --csv, --tsv and --nl print one row per
    module.

    \b
    Examples:
      loratool inspect-rank my-adapter
      loratool inspect-rank ./adapter --module '*q_proj*' --threshold 0.9 --plot spectra.png
      loratool inspect-rank my-adapter --csv > spectra.csv
    """
    from ..sources import open_adapter
    from ..transform import inspect
    from . import render

    fmt = output_format(ctx)
    # Lazily: headers now, each module's factors when it is measured (memory ≈ one module).
    if plot:
        from ..plot import check_plot_dest

        check_out(ctx, plot, [adapter], force)
        check_plot_dest(plot)
    opened = open_adapter(adapter, home_from(ctx), lazy=True)
    with render.progress_count("measuring", len(opened.adapter.modules), "modules") as advance:
        report = inspect(
            opened.adapter,
            threshold=threshold,
            module_glob=module_glob,
            progress=advance,
            base=base,
        )
    report["adapter"] = opened.label
    if plot:
        from ..plot import plot_spectra

        with render.status(f"drawing {plot}"):
            plot_spectra(report, plot, force=force)
    if fmt == "json":
        emit_json(report)
        return
    if fmt is not None:
        keys = ["name", "kind", "shape", "rank", "numerical_rank", "energy_rank"]
        keys += ["stable_rank", "entropy_rank", "singular_values"]
        emit_records(report["modules"], fmt, keys)
        return
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
    render.echo(rank_advice(s, opened.label, threshold))
    if plot:
        render.echo(f"spectra plotted to {plot}")


def rank_advice(s: dict, label: str, threshold: float) -> str:
    """The summary line: what the spectra say, and a resize only when it would shrink the
    adapter (never `--rank r` for an adapter already at rank r)."""
    from .render import plural

    line = (
        f"{plural(s['modules'], 'module')}; r up to {s['rank']}, numerical rank up to "
        f"{s['numerical_rank_max']}; {threshold:g} of the energy fits in rank "
        f"{s['energy_rank_max']} everywhere"
    )
    suggested = s["suggested_rank"]
    if suggested < s["rank"]:
        return line + f": `loratool resize {label} --rank {suggested}` keeps it."
    if s["energy_rank_median"] < s["rank"]:
        return line + (
            f", which is the adapter's own rank; `loratool resize {label} --energy "
            f"{threshold:g}` shortens each module that needs less."
        )
    return line + f": every module uses its full rank {s['rank']}; nothing to shrink."


def _rule_options(f):
    """--rank | --energy | --sv-ratio | --sv-fro | --sv-cumulative | --sv-epsilon, --max-rank."""
    opts = [
        click.option("--rank", type=int, help="Keep this many singular values per module."),
        click.option(
            "--energy", type=float, help="Keep the fewest σ holding this share of Σσ² (0–1]."
        ),
        click.option(
            "--sv-ratio",
            type=float,
            help="sd-scripts' sv_ratio: keep every σ > σ₁ / RATIO.",
        ),
        click.option(
            "--sv-fro",
            type=float,
            help="sd-scripts' sv_fro: the fewest σ whose √Σσ² reaches this share of ‖ΔW‖_F.",
        ),
        click.option(
            "--sv-cumulative",
            type=float,
            help="sd-scripts' sv_cumulative: the fewest σ whose Σσ reaches this share of Σσ.",
        ),
        click.option(
            "--sv-epsilon",
            type=float,
            help="mergekit's --sv-epsilon: keep every σ > EPS (absolute).",
        ),
        click.option(
            "--max-rank", type=int, help="Cap on the rank any rule keeps (sd-scripts' --new_rank)."
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _rule(kwargs: dict):
    """The RankRule the rule options name; pops them from kwargs."""
    from ..rank import RankRule

    given = {
        k: kwargs.pop(k)
        for k in ("rank", "energy", "sv_ratio", "sv_fro", "sv_cumulative", "sv_epsilon")
    }
    max_rank = kwargs.pop("max_rank")
    chosen = {k: v for k, v in given.items() if v is not None}
    if len(chosen) != 1:
        raise click.UsageError(
            "give exactly one of --rank, --energy, --sv-ratio, --sv-fro, --sv-cumulative, --sv-epsilon"
        )
    ((method, value),) = chosen.items()
    return RankRule(method, value, max_rank)


def _expand(template: str | None, label: str, several: bool) -> str | None:
    """--as / -o for one of several adapters: '{name}' in the template becomes its name."""
    if template is None:
        return None
    if "{name}" in template:
        from pathlib import Path

        stem = Path(label.rstrip("/")).name.removesuffix(".safetensors")
        return template.replace("{name}", stem)
    if several:
        raise click.UsageError("with several adapters, --as and -o need '{name}' in them")
    return template


@click.command()
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER...", type=AdapterType())
@_rule_options
@click.option(
    "--common-rank",
    is_flag=True,
    help="Bring every module of every ADAPTER to one rank (truncate above, pad with zeros below).",
)
@click.option("--task", help="Task for --as (default: the source's catalog task).")
@_output_options
@json_option
@click.pass_context
def resize(ctx, adapters, common_rank, task, as_name, out, force, json_, **rule_opts):
    """Change each module's rank by SVD of its factors and report the energy kept.

    The rank comes from one rule, per module: --rank R, --energy E (share of Σσ²), or the
    dynamic rules of sd-scripts' resize_lora.py (--sv-ratio, --sv-fro, --sv-cumulative) or
    mergekit's --sv-epsilon, each capped by --max-rank. Computed from the factors (QR of B and
    Aᵀ, SVD of the r×r core), never the d×k ΔW. The new factors are U√S and √S·Vᵀ, with alpha
    rescaled so each module's scale is kept; a module the rule does not shorten is unchanged.

    --common-rank brings every module of every ADAPTER to one rank R — --rank, or the largest
    rank the rule picks over all of them — for servers that pad each adapter to their largest
    rank (vLLM's --max-lora-rank): modules above R are truncated by SVD (lossy, reported),
    modules below R are padded with zero rank-columns (exact), and each adapter is written with
    one r and one lora_alpha, no rank or alpha patterns. With several ADAPTERs, --as and -o
    take '{name}', replaced by each adapter's name.

    \b
    Examples:
      loratool resize my-adapter --rank 8 --as my-adapter-r8
      loratool resize ./adapter --sv-fro 0.9 --max-rank 32 -o ./adapter-small
      loratool resize a b c --energy 0.95 --common-rank -o 'served/{name}'
    """
    from ..sources import open_adapter
    from ..transform import common_rank_for
    from ..transform import resize as do_resize
    from . import render

    rule = _rule(rule_opts)
    several = len(adapters) > 1
    _check_output_choice(ctx, as_name, out, force, list(adapters), several=several, task=task)
    tasks = {a: _task_for_as(ctx, as_name, task, [a]) for a in adapters}
    opened = [open_adapter(a, home_from(ctx), lazy=True) for a in adapters]
    R = None
    if common_rank:
        n = sum(len(o.adapter.modules) for o in opened)
        with render.progress_count("measuring", n, "modules") as advance:
            R = common_rank_for([o.adapter for o in opened], rule, progress=advance)
    docs = []
    for spec, o in zip(adapters, opened, strict=True):
        label = f"resizing {o.label}" if several else "resizing"
        with render.progress_count(label, len(o.adapter.modules), "modules") as advance:
            result, report = do_resize(o.adapter, rule, common_rank=R, progress=advance)
        where = _store(
            ctx,
            result,
            as_name=_expand(as_name, o.label, several),
            out=_expand(out, o.label, several),
            force=force,
            task=tasks[spec],
            source_label=f"resize {o.label}",
            extra_meta={"resized_from": o.label},
        )
        docs.append(
            {
                "source": o.label,
                "written": where,
                "rule": rule.describe(),
                "common_rank": R,
                "params_before": o.adapter.params,
                "params_after": result.params,
                "modules": report,
                "module_count": len(report),
                "min_energy_kept": min(m["energy_kept"] for m in report.values()),
            }
        )
    if json_:
        emit_json(docs[0] if not several else {"common_rank": R, "adapters": docs})
        return
    for doc in docs:
        ranks = sorted({m["rank_after"] for m in doc["modules"].values()})
        shown = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
        render.echo(
            f"{doc['written']}: {render.plural(len(doc['modules']), 'module')} at rank {shown}, params "
            f"{render.human_count(doc['params_before'])} → {render.human_count(doc['params_after'])}, "
            f"energy kept ≥ {doc['min_energy_kept']:.4f} in every module"
        )


@click.command()
@click.argument("base", type=BaseType())
@click.argument("finetuned", type=BaseType())
@_rule_options
@click.option(
    "--task", help="The task the fine-tuned model was trained for (the catalog task of --as)."
)
@click.option(
    "--exact",
    is_flag=True,
    help="Full SVD of every ΔW (optimal, slow at 7B sizes) instead of the randomized one.",
)
@click.option(
    "--embed-lora/--embed-full",
    "embed_lora",
    default=True,
    show_default=True,
    help="Embeddings and lm_head as LoRA, or kept whole as PEFT modules_to_save.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16", "same"]),
    default="float32",
    show_default=True,
    help="Dtype of the factors (same: the fine-tuned model's).",
)
@click.option(
    "--base-model",
    metavar="ID",
    help="The base's name for the adapter config (default: found from the base, see above).",
)
@click.option(
    "--task-type",
    type=click.Choice(
        [
            "auto",
            "CAUSAL_LM",
            "SEQ_2_SEQ_LM",
            "SEQ_CLS",
            "TOKEN_CLS",
            "QUESTION_ANS",
            "FEATURE_EXTRACTION",
        ]
    ),
    default="auto",
    show_default=True,
    help="PEFT task_type (auto: from the fine-tuned config's architectures).",
)
@click.option(
    "--oversample", type=int, default=10, show_default=True, help="Randomized SVD: spare columns."
)
@click.option(
    "--niter", type=int, default=2, show_default=True, help="Randomized SVD: power iterations."
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Randomized SVD: test-matrix seed."
)
@device_option
@_output_options
@json_option
@click.pass_context
def extract(
    ctx,
    base,
    finetuned,
    task,
    exact,
    embed_lora,
    dtype,
    base_model,
    task_type,
    oversample,
    niter,
    seed,
    device,
    as_name,
    out,
    force,
    json_,
    **rule_opts,
):
    """A LoRA from the difference of two full models: ΔW = W_finetuned − W_base.

    Streams tensor pair by tensor pair (a reader thread fetches the next pair while the
    current one is factored), on the GPU when there is one. Each 2-D (or conv) pair that
    differs is factored by a randomized SVD (seeded: the same output every run) or, with
    --exact, the full SVD; the rank comes from --rank, --energy, sd-scripts' --sv-ratio /
    --sv-fro / --sv-cumulative or mergekit's --sv-epsilon, capped by --max-rank. Each
    module's relative Frobenius error ‖ΔW − B·A‖/‖ΔW‖ is measured and reported.

    BASE and FINETUNED are model folders or files, or Hub ids OWNER/NAME[@REV] (their
    safetensors weights are downloaded through the Hugging Face cache; a path that exists
    wins). The adapter config names the base as --base-model, else its Hub id (given, or of a
    Hugging Face cache snapshot), else config.json's _name_or_path, else the base folder's
    absolute path;
    task_type comes from the fine-tuned model's architectures (or --task-type), so
    AutoPeftModelForCausalLM loads the result. Changed 1-D tensors (norms, biases) cannot be
    a LoRA and are listed.

    \b
    Examples:
      loratool extract ./llama ./llama-finetuned --rank 16 --task chat --as chat-r16
      loratool extract ./base ./ft --sv-fro 0.9 --max-rank 64 -o ./chat-lora
      loratool extract Qwen/Qwen3-0.6B-Base Qwen/Qwen3-0.6B --rank 32 -o ./instruct-lora
    """
    from ..transform import extract as do_extract
    from . import render

    rule = _rule(rule_opts)
    _check_svd_options(ctx, exact, rule)
    _check_output_choice(ctx, as_name, out, force, [base, finetuned], task=task)
    if as_name is not None and not task:
        raise click.UsageError("--as needs --task: a model has no catalog task to inherit")
    from ..tensors.header import read_base

    # Hub ids: the safetensors weights of each (and config.json, for task_type and the
    # base's name) through the Hugging Face cache
    base_path = open_base_arg(ctx, base, need="weights").path
    ft_path = open_base_arg(ctx, finetuned, need="weights").path
    n = len(read_base(base_path).tensors)
    with render.progress_count("extracting", n, "tensors") as advance:
        res = do_extract(
            base_path,
            ft_path,
            rule,
            progress=advance,
            exact=exact,
            oversample=oversample,
            niter=niter,
            seed=seed,
            device=device,
            dtype=dtype,
            embed="lora" if embed_lora else "full",
            base_model=base_model,
            task_type=task_type,
        )
    adapter = res.adapter
    adapter.meta.task = task
    with render.status("writing"):
        where = _store(
            ctx,
            adapter,
            as_name=as_name,
            out=out,
            force=force,
            task=task,
            source_label=f"extract {finetuned}",
        )
    errors = [m["relative_error"] for m in res.modules.values()]
    cfg = adapter.origin["peft_config"]
    doc = {
        "written": where,
        "rule": rule.describe(),
        "base_model": cfg["base_model_name_or_path"],
        "task_type": cfg["task_type"],
        "device": res.device,
        "seconds": res.seconds,
        "modules": res.modules,
        "module_count": len(res.modules),
        "full": res.full,
        "mean_relative_error": sum(errors) / len(errors),
        "max_relative_error": max(errors),
        "params": adapter.params,
        "not_extracted": res.not_extracted,
    }
    if json_:
        emit_json(doc)
        return
    ranks = sorted({m["rank"] for m in res.modules.values()})
    shown = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
    render.echo(
        f"{where}: {render.plural(len(errors), 'module')} at rank {shown}, {render.human_count(adapter.params)} params, "
        f"relative error mean {doc['mean_relative_error']:.3g}, max {doc['max_relative_error']:.3g} "
        f"({res.seconds:.1f} s on {res.device}); base {doc['base_model']}"
        + (f"; kept whole (modules_to_save): {', '.join(res.full)}" if res.full else "")
    )
    if res.not_extracted:
        names = ", ".join(x["name"] for x in res.not_extracted[:5])
        render.warn(
            f"{render.plural(len(res.not_extracted), 'changed tensor')} cannot be expressed as LoRA "
            f"and {'is' if len(res.not_extracted) == 1 else 'are'} not in the adapter: {names}"
        )


@click.command()
@weighted_adapters
@click.option(
    "--method",
    type=click.Choice(["linear", "cat", "svd", "ties", "dare"]),
    required=True,
    help="How to combine.",
)
@click.option("--rank", type=int, help="Rank of the result (svd, ties, dare; required there).")
@click.option(
    "--density",
    type=float,
    default=0.5,
    show_default=True,
    help="Share of entries kept (ties, dare).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (dare).")
@click.option(
    "--max-memory",
    metavar="SIZE",
    help="Most memory ties/dare may use for one module's dense update (512M, 8G; default "
    "$LORATOOL_MAX_MEMORY, else half of this machine's).",
)
@click.option("--task", help="Task for --as (default: the inputs' common catalog task).")
@_output_options
@json_option
@click.pass_context
def combine(
    ctx, adapters, method, rank, density, seed, max_memory, task, as_name, out, force, json_
):
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

    _check_method_options(ctx, method)
    weighted = [parse_weighted(spec, ctx) for spec in adapters]
    _check_output_choice(ctx, as_name, out, force, [name for name, _ in weighted], task=task)
    task = _task_for_as(ctx, as_name, task, [name for name, _ in weighted])
    limit = None
    if max_memory is not None:
        from ..units import parse_size

        try:
            limit = parse_size(max_memory)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--max-memory") from None
    inputs, labels = [], []
    for name, weight in weighted:
        opened = open_adapter(name, home_from(ctx))
        inputs.append((opened.adapter, weight))
        labels.append(f"{opened.label}={weight:g}")
    names = {n for a, _ in inputs for n in a.modules}
    with render.progress_count(f"combining ({method})", len(names), "modules") as advance:
        result, errors = do_combine(
            inputs,
            method,
            rank=rank,
            density=density,
            seed=seed,
            max_memory=limit,
            progress=advance,
        )
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
        "modules": {
            n: {"rank": m.rank, "relative_error": errors.get(n, 0.0)}
            for n, m in result.modules.items()
        },
        "module_count": len(result.modules),
        "max_relative_error": max(errors.values(), default=0.0),
    }
    if json_:
        emit_json(doc)
        return
    render.echo(
        f"{where}: {render.plural(doc['module_count'], 'module')}, rank up to {doc['rank']}, {render.human_count(doc['params'])} params"
        + (
            f", relative error ≤ {doc['max_relative_error']:.3g}"
            if method in ("svd", "ties", "dare")
            else " (exact)"
        )
    )


def _given(ctx: click.Context, name: str) -> bool:
    """Whether the option was given (on the command line or by the environment), not left at
    its default."""
    from click.core import ParameterSource

    return ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)


def _check_svd_options(ctx: click.Context, exact: bool, rule) -> None:
    """--oversample, --niter and --seed tune the randomized SVD: with --exact, or a rule that
    needs every singular value (--sv-cumulative, which runs the exact SVD), they would be
    ignored, so they are a usage error."""
    if not (exact or rule.needs_full_spectrum):
        return
    why = "--exact" if exact else "--sv-cumulative (it runs the exact SVD)"
    for name in ("oversample", "niter", "seed"):
        if _given(ctx, name):
            raise click.UsageError(f"{why} does not use --{name} (only the randomized SVD does)")


# Which options each combine method reads; giving one the method ignores is a usage error.
_METHOD_OPTIONS = {
    "rank": ("svd", "ties", "dare"),
    "density": ("ties", "dare"),
    "seed": ("dare",),
    "max_memory": ("ties", "dare"),
}


def _check_method_options(ctx: click.Context, method: str) -> None:
    from click.core import ParameterSource

    for name, methods in _METHOD_OPTIONS.items():
        given = ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)
        if given and method not in methods:
            flag = "--" + name.replace("_", "-")
            raise click.UsageError(
                f"--method {method} does not use {flag} (only {', '.join(methods)} do{'es' if len(methods) == 1 else ''})"
            )
    if method in _METHOD_OPTIONS["rank"] and ctx.params.get("rank") is None:
        raise click.UsageError(f"--method {method} needs --rank (the rank of the result)")
