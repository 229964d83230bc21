"""The command line: a thin layer that parses, calls the library and renders.

Commands live in submodules imported only when used, so ``loratool --help`` and the fast
commands (list, show, savings, verify) start without torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import click

from .. import __version__
from ..errors import LoratoolError

# name -> "module:function", in the order --help lists them.
COMMANDS = {
    "add": "catalog_cmds:add",
    "list": "catalog_cmds:list_",
    "show": "catalog_cmds:show",
    "remove": "catalog_cmds:remove",
    "export": "catalog_cmds:export",
    "verify": "catalog_cmds:verify",
    "savings": "savings_cmd:savings",
    "merge": "merge_cmds:merge",
    "unmerge": "merge_cmds:unmerge",
    "inspect-rank": "rank_cmds:inspect_rank",
    "resize": "rank_cmds:resize",
    "extract": "rank_cmds:extract",
    "combine": "rank_cmds:combine",
    "push": "hub_cmds:push",
    "pull": "hub_cmds:pull",
}


class CLIError(click.ClickException):
    """A library error shown as one line, exit 1."""

    exit_code = 1

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


def debug_enabled(ctx: click.Context | None = None) -> bool:
    if os.environ.get("LORATOOL_DEBUG", "") not in ("", "0"):
        return True
    root = ctx.find_root() if ctx else None
    return bool(root and root.obj and root.obj.get("debug"))


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [name for name in COMMANDS if self._available(name)]

    def _available(self, name: str) -> bool:
        module = COMMANDS[name].split(":")[0]
        return importlib.util.find_spec(f"{__name__}.{module}") is not None

    def get_command(self, ctx, name):
        spec = COMMANDS.get(name)
        if spec is None or not self._available(name):
            return None
        module, attr = spec.split(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LoratoolError as exc:
            if debug_enabled(ctx):
                raise
            raise CLIError(str(exc)) from exc
        except OSError as exc:
            # Disk full, permission denied, … : one line naming the file, not a traceback.
            if debug_enabled(ctx):
                raise
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            raise CLIError(f"{where}{exc.strerror or exc}") from exc


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    type=click.Path(file_okay=False),
    default=None,
    help="Catalog directory (default: $LORATOOL_HOME, else ~/.loratool).",
)
@click.option("--debug", is_flag=True, help="Show tracebacks (also LORATOOL_DEBUG=1).")
@click.version_option(__version__, prog_name="loratool")
@click.pass_context
def cli(ctx: click.Context, home: str | None, debug: bool) -> None:
    """Manage LoRA adapters: catalog them, measure their savings, merge them into base
    weights and take them out again, inspect their rank, publish them to the Hub.

    \b
    Quick start:
      loratool add ./my-peft-adapter --task summarize
      loratool list
      loratool merge ./base-model my-adapter -o ./merged
      loratool unmerge ./merged my-adapter -o ./restored --check ./base-model
    """
    ctx.ensure_object(dict)
    ctx.obj["home"] = home
    ctx.obj["debug"] = debug


def main() -> None:
    try:
        cli(prog_name="loratool")
    except SystemExit as exc:
        _fast_exit(exc.code)
        raise
    _fast_exit(0)


def _fast_exit(code) -> None:
    """Skip the interpreter's teardown once torch is loaded: unloading it takes a third of a
    second and has nothing to save. Every output is complete and fsynced by then, and nothing
    of ours waits on atexit; streams are flushed here."""
    if "torch" not in sys.modules or os.environ.get("LORATOOL_NO_FAST_EXIT"):
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        sys.stderr.flush()
        code = 1
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
