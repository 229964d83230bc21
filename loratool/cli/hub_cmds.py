"""push and pull: adapters on the Hugging Face Hub."""

from __future__ import annotations

import click

from .options import emit_json, home_from, json_option


@click.command()
@click.argument("name")
@click.option(
    "--repo", required=True, metavar="OWNER/NAME", help="The Hub repository (created when missing)."
)
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option(
    "--revision", metavar="BRANCH", help="Push to this branch (created when missing; default main)."
)
@click.option("--message", help="Commit message.")
@json_option
@click.pass_context
def push(ctx, name, repo, private, revision, message, json_):
    """Publish a catalog adapter to the Hub in PEFT layout, with a model card, in one commit.

    The endpoint comes from HF_ENDPOINT, the token from HF_TOKEN or `hf auth login`; the token
    is never printed or stored. The pushed commit is recorded in the catalog (`show` lists it).

    \b
    Example:
      loratool push summarize --repo alice/llama-summarize-lora --private
    """
    import tempfile
    from pathlib import Path

    from ..catalog import Catalog
    from ..hub import parse_repo_spec, push_folder
    from ..publish import build_hub_folder
    from . import render

    repo_id, rev = parse_repo_spec(repo)
    if rev is not None:
        raise click.UsageError("give the branch with --revision, not REPO@REV")
    cat = Catalog(home_from(ctx))
    row = cat.get(name)
    adapter = cat.load(name)
    with tempfile.TemporaryDirectory(prefix="loratool-push-") as tmp:
        build_hub_folder(adapter, row, repo_id, Path(tmp))
        result = push_folder(
            Path(tmp),
            repo_id,
            private=private,
            revision=revision,
            message=message or f"Upload {name} ({row['task']}) with loratool",
        )
    cat.add_remote(name, repo=repo_id, revision=result["revision"], commit=result["commit"])
    if json_:
        emit_json(result)
        return
    render.echo(f"pushed {name} to {repo_id}@{result['revision']} (commit {result['commit'][:12]})")


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

    Only the files the adapter needs are fetched (into the Hugging Face cache), from the top of
    the repo; each must match the hash the Hub advertises for it, or it is refused and removed
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
        folder, info = pull_files(spec, into=Path(staging))
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
        f"{row['name']}: pulled {info['repo']}@{info['commit'][:12]}, {row['modules']} modules, task {task}"
    )
