"""The command line: a thin layer that parses, calls the library and renders.

Commands live in submodules imported only when used, so ``loratool --help`` and the fast
commands (list, show, savings, verify) start without torch.
"""

from __future__ import annotations

import errno
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
    "convert": "convert_cmd:convert",
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
        from ..redact import scrub
        from .options import sanitize

        text = " ".join(sanitize(scrub(self.message)).split())
        click.echo(f"error: {text}", err=True)


class Interrupted(CLIError):
    """Ctrl-C: the cleanups on the way out have run; one line, exit 130 (128 + SIGINT)."""

    exit_code = 130

    def __init__(self) -> None:
        super().__init__("interrupted")


def debug_enabled(ctx: click.Context | None = None) -> bool:
    if os.environ.get("LORATOOL_DEBUG", "") not in ("", "0"):
        return True
    root = ctx.find_root() if ctx else None
    return bool(root and root.obj and root.obj.get("debug"))


def describe(exc: BaseException) -> str:
    """The one line an exception that reached the CLI is shown as (secrets not yet masked)."""
    import sqlite3

    if isinstance(exc, LoratoolError):
        return str(exc)
    if isinstance(exc, OSError):
        # Disk full, permission denied, file too large: the path and the cause.
        from ..catalog.sqlerrors import oserror_cause

        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        return f"{where}{oserror_cause(exc)}"
    if isinstance(exc, sqlite3.Error):
        return f"the catalog database failed: {exc}"
    if isinstance(exc, MemoryError):
        return "out of memory"
    if isinstance(exc, RecursionError):
        return "input nested too deeply to be processed"
    first = (str(exc).splitlines() or [""])[0][:300]
    return (
        f"internal error: {type(exc).__name__}: {first} "
        "(a bug in loratool: rerun with --debug for the traceback and report it)"
    )


def print_traceback(exc: BaseException) -> None:
    """--debug: the whole traceback, chained exceptions and notes included, secrets masked."""
    import traceback

    from ..redact import scrub, scrub_exception

    scrub_exception(exc)
    text = "".join(traceback.format_exception(exc))
    sys.stderr.write(scrub(text))
    sys.stderr.flush()


class _Scrubbed:
    """A text stream that masks the Hub token in whatever passes through it (loratool's own
    output, a library's warning, a server's words in a JSON document): the last line of
    defence, behind the scrubbing of every error at its source."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self._secrets: set[str] | None = None

    def write(self, text):
        if isinstance(text, str) and text:
            from ..redact import known_secrets, scrub

            if self._secrets is None:
                self._secrets = known_secrets()
            self._stream.write(scrub(text, self._secrets))
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


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

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """click's main, except that Ctrl-C is ``error: interrupted`` and exit 130 wherever it
        lands (click would print "Aborted!" and exit 1)."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except (click.exceptions.Abort, KeyboardInterrupt):
            Interrupted().show()
            sys.exit(Interrupted.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise
            # the reader went away (`| head`): nothing more to say, and nothing more to flush
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError):
                pass
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)

    def invoke(self, ctx):
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Scrubbed(out), _Scrubbed(err)
        try:
            return self._invoke(ctx)
        finally:
            sys.stdout, sys.stderr = out, err

    def _invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise  # click's own flow: usage errors, --help, ctx.exit
        except BrokenPipeError:
            raise  # the reader went away (`| head`): main ends quietly
        except KeyboardInterrupt:
            raise Interrupted() from None
        except Exception as exc:
            # One place for every failure: one line (or, with --debug, the traceback), never a
            # secret, never a raw terminal escape from a file's contents.
            if debug_enabled(ctx):
                print_traceback(exc)
                ctx.exit(1)
            raise CLIError(describe(exc)) from exc


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
    except KeyboardInterrupt:  # after click let go (its teardown): same line, same code
        Interrupted().show()
        _fast_exit(130)
        raise SystemExit(130) from None
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
