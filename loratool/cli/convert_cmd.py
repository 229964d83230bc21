"""``loratool convert``: any readable adapter to any writable format."""

from __future__ import annotations

import click

from .catalog_cmds import (
    FORMAT_HELP,
    FORMAT_NAMES,
    check_conversion_options,
    conversion_options,
    convert_path,
)
from .options import AdapterType, json_option


@click.command()
@click.argument("src", type=AdapterType())
@click.argument("dest", type=click.Path(path_type=str))
@click.option("--to", "to", type=click.Choice(FORMAT_NAMES), required=True, help=FORMAT_HELP)
@conversion_options
@click.option("--force", is_flag=True, help="Replace DEST if it exists.")
@json_option
@click.pass_context
def convert(ctx, src, dest, to, base, component, rank, energy, force, json_):
    """Convert the adapter SRC (a path in any readable format, or a catalog name) to DEST.

    Names are resolved against --base where the target needs the model's own names (a kohya
    file to PEFT, diffusers, MLX or GGUF); every scale is carried exactly where the target can
    hold it, and a warning names whatever was approximated.

    \b
    Example:
      loratool convert style.safetensors style-diffusers.safetensors --to diffusers
      loratool convert ./sql-lora sql.gguf --to gguf --base ./Llama-3.2-1B
      loratool convert style-loha.safetensors ./style-peft --to peft --base ./sd15 --energy 0.99
    """
    check_conversion_options(to, component, rank, energy, flag="--to")
    convert_path(ctx, src, dest, to, base, component, rank, energy, force, json_, "convert")
