"""merge and unmerge."""

from __future__ import annotations

import click

from .options import (
    BaseType,
    check_out,
    device_option,
    emit_json,
    home_from,
    json_option,
    open_base_arg,
    parse_weighted,
    weighted_adapters,
)

DTYPES = click.Choice(["same", "float16", "bfloat16", "float32"])
dtype_option = click.option(
    "--dtype",
    type=DTYPES,
    default="same",
    show_default=True,
    help="Dtype of the written floating tensors.",
)


def _open_inputs(ctx, weighted, sign: float):
    from ..merge import AdapterInput
    from ..sources import open_adapter

    inputs = []
    for name, weight in weighted:
        opened = open_adapter(name, home_from(ctx), lazy=True)  # torch is imported during the copy
        inputs.append(AdapterInput(opened.adapter, sign * weight, opened.label, opened.sha256))
    return inputs


def _run(
    ctx,
    base,
    specs,
    out,
    sign,
    device,
    dtype,
    force,
    strict,
    json_,
    check_base=None,
    original=None,
    onto=None,
    keep_originals=False,
):
    from ..merge import execute, plan_merge
    from . import render

    weighted = [parse_weighted(spec, ctx) for spec in specs]
    check_out(ctx, out, [base, check_base, onto, original, *(name for name, _ in weighted)], force)
    inputs = _open_inputs(ctx, weighted, sign)
    options = dict(
        dtype=dtype,
        device=device,
        force=force,
        strict=strict,
        onto_dequantized=onto,
        original=original,
        keep_originals=keep_originals,
    )
    # A Hub base: the whole merge is planned from its headers (every adapter resolved, shapes,
    # dtypes, free space checked) before its weights are downloaded.
    source = open_base_arg(
        ctx, base, need="model", check=lambda index: plan_merge(index, inputs, out, **options)
    )
    plan = plan_merge(
        source.path,
        inputs,
        out,
        only_files=source.files if source.hub else None,
        **options,
    )
    for w in plan.warnings:
        render.warn(w)
    verb = "merging" if sign > 0 else "unmerging"
    with render.progress_bytes(verb, plan.total_bytes) as advance:
        result = execute(plan, advance)
    if source.hub is not None:
        result.base_source = {
            "hub": source.hub.repo_id,
            "revision": source.hub.revision,
            "commit": source.hub.commit,
            "path": str(source.path),
            "files": list(source.files),
        }
    if not json_:
        render.echo(summary(result))
        q = result.quantization
        if q and q.get("worst_tensor"):
            kept = q.get("min_delta_kept")
            render.echo(
                f"{q['description']}: {q['weights_rewritten']} of {q['weights']} weights "
                f"{'dequantized' if q['mode'] == 'dequantize' else 'requantized'}; worst vs the "
                f"exact float32 merge: {q['worst_tensor']}, max rel error {q['max_rel_error']:.3g}, "
                f"rms {q['rms_rel_error']:.3g}"
                + (f"; ΔW kept ≥ {kept:.1%}" if kept is not None else "")
            )
    return result


def _ops_summary(tensors: list[dict]) -> str:
    """' (12 delta, 1 replace)': how the changed tensors were made, when not all by ΔW."""
    from collections import Counter

    counts = Counter(t["op"] for t in tensors)
    if set(counts) <= {"delta"}:
        return ""
    return " (" + ", ".join(f"{n} {op}" for op, n in sorted(counts.items())) + ")"


@click.command()
@click.argument("base", type=BaseType())
@weighted_adapters
@click.option(
    "-o", "--out", required=True, type=click.Path(), help="Where to write the merged model."
)
@device_option
@dtype_option
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option(
    "--strict",
    is_flag=True,
    help="Refuse, rather than warn about, an adapter made for another base or a file of BASE "
    "that is a link to outside it, or an adapter that changes a tied embedding (default: "
    "write an untied lm_head and say so).",
)
@click.option(
    "--keep-originals",
    is_flag=True,
    help="Write the tensors the adapters replace (heads, biases, embeddings) to "
    "loratool-originals.safetensors beside the merged shards, so that unmerge can restore them.",
)
@click.option(
    "--onto-dequantized",
    "onto",
    type=click.Path(exists=True),
    metavar="Q4BASE",
    help="Merge into the dequantized weights of Q4BASE (the 4-bit base a QLoRA adapter was "
    "trained on, a quantization of BASE), written in BASE's 16-bit dtype.",
)
@json_option
@click.pass_context
def merge(ctx, base, adapters, out, device, dtype, force, strict, onto, keep_originals, json_):
    """Merge adapters into BASE: W ← W + Σ weight·ΔW, written as a new model at OUT.

    BASE is a .safetensors file, a directory with model.safetensors, or a sharded directory
    (its layout and other files are kept), or a Hub id OWNER/NAME[@REV]: read headers first
    (the merge is planned and checked before a weight is downloaded), then only its
    safetensors weights and small model files (config, tokenizer…) are downloaded, through the
    Hugging Face cache. A path that exists wins over a Hub id. Each ADAPTER is a catalog name or a path, with an
    optional weight; a negative weight subtracts. The merge streams one tensor at a time:
    untouched tensors are copied byte for byte, touched ones are summed in float32 and rounded
    once. Provenance is recorded in the output's safetensors metadata.

    A quantized BASE (block FP8, compressed-tensors FP8, MXFP4, bitsandbytes 4-bit, named by
    config.json's quantization_config) is merged weight by weight: the values and scales are
    decoded exactly as the scheme defines, ΔW is added in float32, and the result is either
    requantized with fresh scales (the default: the output keeps the scheme) or, with
    --dtype, every weight is written dequantized and the output is an ordinary model. The
    error each rewritten weight carries against the exact float32 merge is reported.

    \b
    Examples:
      loratool merge ./llama ./my-adapter -o ./llama-merged
      loratool merge meta-llama/Llama-3.2-1B ./my-adapter -o ./llama-merged
      loratool merge ./llama summarize=0.7 translate=0.3 -o ./mixed --dtype bfloat16
      loratool merge ./llama-merged summarize=-1 translate=1 -o ./llama-translate   # swap tasks
      loratool merge ./qwen3-fp8 ./my-adapter -o ./qwen3-fp8-merged      # stays FP8
      loratool merge ./llama ./qlora-adapter --onto-dequantized ./llama-bnb-4bit -o ./merged
    """
    result = _run(
        ctx,
        base,
        adapters,
        out,
        1.0,
        device,
        dtype,
        force,
        strict,
        json_,
        keep_originals=keep_originals,
        onto=onto,
    )
    if json_:
        emit_json(result.as_dict())


@click.command()
@click.argument("merged", type=BaseType())
@weighted_adapters
@click.option(
    "-o", "--out", required=True, type=click.Path(), help="Where to write the restored model."
)
@click.option(
    "--check",
    "check_base",
    type=BaseType(),
    metavar="BASE",
    help="Original base (a path or a Hub id): report the round-trip error against it.",
)
@click.option(
    "--base",
    "original",
    type=click.Path(exists=True),
    help="The base before the merge: where the tensors an adapter replaced are restored from "
    "(else the sidecar of merge --keep-originals).",
)
@device_option
@dtype_option
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@json_option
@click.pass_context
def unmerge(ctx, merged, adapters, out, check_base, original, device, dtype, force, json_):
    """Take adapters out of MERGED by subtraction: W ← W − Σ weight·ΔW.

    What subtraction cannot undo is undone from what the merge recorded: DoRA's norms and
    replaced token rows (in MERGED's metadata), replaced tensors (heads, biases, embeddings)
    from --base ORIGINAL or the sidecar of merge --keep-originals, checked against the
    sha256 the merge recorded; without them the unmerge is refused, naming the tensors.
    Warns when MERGED's provenance does not record the adapter. With --check BASE, compares
    the result with the original base: max abs error, max error in ulps of the dtype, tensors
    checked and tensors bit-exact. In bfloat16 a merge→unmerge round trip cannot return every
    weight exactly (each step rounds); the check says by how much.

    \b
    Example:
      loratool unmerge ./llama-merged my-adapter -o ./llama-restored --check ./llama
    """
    # the original base first (a Hub id is downloaded now, so the check cannot fail late)
    reference = open_base_arg(ctx, check_base, need="weights").path if check_base else None
    result = _run(
        ctx,
        merged,
        adapters,
        out,
        -1.0,
        device,
        dtype,
        force,
        False,
        json_,
        reference,
        original=original,
    )
    doc = result.as_dict()
    if check_base:
        from ..merge import compare_bases
        from . import render

        with render.progress_bytes("checking", _check_bytes(out, reference)) as advance:
            check = compare_bases(out, reference, progress=advance)
        doc["check"] = check
        doc.update(
            {
                k: check[k]
                for k in ("max_abs_error", "max_ulp_error", "tensors_checked", "tensors_exact")
            }
        )
        if not json_ and "scheme" in check:
            render.echo(
                f"check against {check_base} ({check['scheme']}): {check['tensors_exact']}/"
                f"{check['tensors_checked']} tensors bit-exact, max abs error {check['max_abs_error']:.3g}"
                + (f" (worst: {check['worst_tensor']})" if check["worst_tensor"] else "")
                + f", max {check['max_error_in_steps']:.3g} of the scheme's steps "
                "(the gap between neighbouring representable values at that element's scale)"
            )
        elif not json_:
            render.echo(
                f"check against {check_base}: {check['tensors_exact']}/{check['tensors_checked']} tensors bit-exact, "
                f"max abs error {check['max_abs_error']:.3g}"
                + (f" (worst: {check['worst_tensor']})" if check["worst_tensor"] else "")
                + f"; max {check['max_ulp_error']} ulp of the element's own value, "
                f"{check['max_error_in_ulps_at_tensor_scale']:.3g} ulp at its tensor's largest magnitude; "
                f"{check['elements_within_1_ulp'] / max(1, check['elements_checked']):.4%} of elements within 1 ulp"
            )
    if json_:
        emit_json(doc)


def summary(result) -> str:
    """One line: where, what changed, how much was written and how long it took. The speed
    only when there was enough to write for it to mean something (a tiny model's time is
    starting Python and torch)."""
    from .render import human_size, plural

    line = (
        f"{result.out}: {plural(result.tensors_changed, 'tensor')} changed"
        + _ops_summary(result.tensors)
        + f", {result.tensors_copied:,} copied, {human_size(result.bytes_written)} in "
        f"{result.seconds:.1f} s"
    )
    if result.seconds >= 1 and result.bytes_written >= 100_000_000:
        line += f" ({human_size(result.bytes_written / result.seconds)}/s)"
    return line + f" on {result.device}"


def _check_bytes(out, reference) -> int:
    from ..tensors.header import read_base

    return read_base(out).total_bytes + read_base(reference).total_bytes
