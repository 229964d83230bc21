"""push and pull: adapters on the Hugging Face Hub."""

from __future__ import annotations

import click

from .options import AdapterType, emit_json, home_from, json_option


@click.command()
@click.argument("name", metavar="ADAPTER", type=AdapterType())
@click.option(
    "--repo", required=True, metavar="OWNER/NAME", help="The Hub repository (created when missing)."
)
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option(
    "--revision", metavar="BRANCH", help="Push to this branch (created when missing; default main)."
)
@click.option("--message", help="Commit message.")
@click.option("--task", help="The task the card names (default: the catalog adapter's task).")
@click.option(
    "--base-model",
    metavar="OWNER/NAME",
    help="The base model's Hub id, for the card and the config (default: the adapter's own, "
    "when it is a Hub id).",
)
@click.option(
    "--license",
    "license_",
    metavar="ID",
    help="The card's license (apache-2.0, mit, llama3.2, …; default: the adapter's "
    "--meta license=…, if any).",
)
@json_option
@click.pass_context
def push(ctx, name, repo, private, revision, message, task, base_model, license_, json_):
    """Publish ADAPTER (a catalog name or a path) to the Hub, with a model card, in one commit.

    A language-model adapter goes up in PEFT layout (PeftModel and AutoPeftModel… load it),
    an image-model adapter in diffusers' (pipe.load_lora_weights loads it). The card is
    huggingface_hub's ModelCard: library_name, base_model and the base_model:adapter tag when
    the base is a Hub id, pipeline_tag from the task type, license when known, and code that
    loads the adapter. Nothing of this machine's paths goes up.

    The endpoint comes from HF_ENDPOINT, the token from HF_TOKEN or `hf auth login`; the token
    is never printed or stored. A catalog adapter's pushed commit is recorded in the catalog
    (`show` lists it).

    \b
    Example:
      loratool push summarize --repo alice/llama-summarize-lora --private
      loratool push ./runs/style-lora --repo alice/style-lora --base-model stabilityai/sdxl-base-1.0
    """
    import tempfile
    from pathlib import Path

    from ..hub import parse_repo_spec, push_folder
    from ..publish import build_hub_folder
    from ..sources import open_adapter
    from . import render

    repo_id, rev = parse_repo_spec(repo)
    if rev is not None:
        raise click.UsageError("give the branch with --revision, not REPO@REV")
    if base_model is not None:
        from ..card import hub_base_model

        if hub_base_model(base_model) is None:
            raise click.BadParameter(
                f"{base_model!r} is not a Hub id (OWNER/NAME)", param_hint="--base-model"
            )
    opened = open_adapter(name, home_from(ctx))
    row = _catalog_row(ctx, name)
    label = row["name"] if row else Path(name.rstrip("/")).name.removesuffix(".safetensors")
    task = task or (row or {}).get("task")
    meta = (row or {}).get("meta") or {}
    with tempfile.TemporaryDirectory(prefix="loratool-push-") as tmp:
        with render.progress_count(
            "writing the card", len(opened.adapter.modules), "modules"
        ) as advance:
            pub, warnings = build_hub_folder(
                opened.adapter,
                repo_id,
                Path(tmp),
                name=label,
                task=task,
                tags=(row or {}).get("tags") or [],
                description=(row or {}).get("description"),
                license=license_ or meta.get("license"),
                base_model=base_model or (row or {}).get("base_model"),
                progress=advance,
            )
        for w in warnings:
            render.warn(w)
        size = sum(p.stat().st_size for p in Path(tmp).iterdir())
        with render.status(
            f"uploading {render.plural(len(list(Path(tmp).iterdir())), 'file')}, {render.human_size(size)}, to {repo_id}"
        ):
            result = push_folder(
                Path(tmp),
                repo_id,
                private=private,
                revision=revision,
                message=message
                or f"Upload {label}" + (f" ({task})" if task else "") + " with loratool",
            )
    if row:
        from ..catalog import Catalog

        cat = Catalog(home_from(ctx))
        try:
            cat.add_remote(
                row["name"], repo=repo_id, revision=result["revision"], commit=result["commit"]
            )
        finally:
            cat.close()
    if json_:
        emit_json(
            {
                **result,
                "library_name": "diffusers" if pub.diffusion else "peft",
                "base_model": pub.base_model,
            }
        )
        return
    render.echo(
        f"pushed {label} to {repo_id}@{result['revision']} (commit {result['commit'][:12]})"
    )


def _catalog_row(ctx, spec: str) -> dict | None:
    """The catalog row of ADAPTER when it names one (a path that exists wins)."""
    from pathlib import Path

    if Path(spec).exists():
        return None
    from ..catalog import Catalog

    cat = Catalog(home_from(ctx), read_only_ok=True)
    try:
        return cat.get(spec) if cat.exists(spec) else None
    finally:
        cat.close()


@click.command()
@click.argument("spec", metavar="OWNER/NAME[@REV]")
@click.option("--task", required=True, help="The task to file the adapter under.")
@click.option("--name", help="Catalog name (default: the repository's name).")
@click.option("--replace", is_flag=True, help="Replace an adapter of the same name.")
@click.option(
    "--keep-both",
    is_flag=True,
    help="Add it even though the catalog holds the same weights under another name.",
)
@json_option
@click.pass_context
def pull(ctx, spec, task, name, replace, keep_both, json_):
    """Download an adapter from the Hub into the catalog.

    The repo is checked to hold an adapter before anything is downloaded (a PEFT or mlx-lm
    layout, or one .safetensors file whose header, read by a range request, holds adapter
    tensors). Only the files the adapter needs are fetched (into the Hugging Face cache), from
    the top of the repo; each must match the hash the Hub advertises for it, or it is refused and removed
    from the cache. They are validated like any `add`; the source is recorded as repo@commit.

    \b
    Example:
      loratool pull alice/llama-summarize-lora@main --task summarize
    """
    import tempfile
    from pathlib import Path

    from ..catalog import Catalog, default_name
    from ..formats import load_adapter, weights_identity
    from ..hub import pull_files
    from . import render

    # The files are checked against the Hub's hashes while they are copied into a staging
    # folder, and the adapter is read from there: what is added is what was checked.
    with tempfile.TemporaryDirectory(prefix="loratool-pull-") as staging:
        with render.progress_bytes(f"pulling {spec}", None) as advance:
            folder, info = pull_files(spec, into=Path(staging), progress=advance)
        adapter = load_adapter(folder)
        cat = Catalog(home_from(ctx))
        name = name or default_name(Path(info["repo"].split("/")[-1]))
        row = cat.add_adapter(
            adapter,
            name=name,
            task=task,
            base_model=adapter.meta.base_model,
            meta={"hub_repo": info["repo"], "hub_commit": info["commit"]},
            source=f"{info['repo']}@{info['commit']}",
            replace=replace,
            identity=weights_identity(folder),
            keep_both=keep_both,
        )
    if json_:
        emit_json({"name": row["name"], **info, "sha256": row["sha256"]})
        return
    render.echo(
        f"{row['name']}: pulled {info['repo']}@{info['commit'][:12]}, {render.plural(row['modules'], 'module')}, task {task}"
    )
