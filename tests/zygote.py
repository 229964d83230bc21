"""A fork server for interruption tests: imports torch and loratool once, then runs each CLI
command in a forked child that the test can signal at any moment.

Starting a fresh interpreter costs seconds (torch's import); a fork costs milliseconds, so a
test can interrupt hundreds of commands. The server is single-threaded and has run no torch
kernel when it forks, so the child starts clean. The child is the real CLI (``main()``), with
Python's default SIGINT handling (KeyboardInterrupt), its own environment, working directory,
stdout and stderr files.

Protocol, one JSON line per job on stdin: ``{"argv", "env", "cwd", "stdout", "stderr"}``. The
server answers ``pid N`` once the child exists and ``exit STATUS`` when it is gone (the raw
``waitpid`` status).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _serve() -> None:
    import torch  # noqa: F401  # the cost the fork saves

    import loratool.__main__  # noqa: F401  # the child installs its Ctrl-C handler first thing
    import loratool.cli  # noqa: F401
    import loratool.cli.catalog_cmds  # noqa: F401
    import loratool.cli.hub_cmds  # noqa: F401
    import loratool.cli.merge_cmds  # noqa: F401
    import loratool.cli.rank_cmds  # noqa: F401
    import loratool.formats  # noqa: F401
    import loratool.merge  # noqa: F401
    import loratool.transform  # noqa: F401

    print("ready", flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        for name in ("stdout", "stderr"):  # made here: a child killed at once still leaves them
            os.close(os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
        pid = os.fork()
        if pid == 0:
            _child(job)  # never returns
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {status}", flush=True)


def _child(job: dict) -> None:
    code = 70
    try:
        from loratool.__main__ import install_interrupt_handler

        install_interrupt_handler()  # as the console script does once the CLI is imported
        for name, stream in (("stdout", 1), ("stderr", 2)):
            fd = os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, stream)
            os.close(fd)
        os.environ.clear()
        os.environ.update(job["env"])
        os.chdir(job["cwd"])
        sys.argv = ["loratool", *job["argv"]]
        from loratool.cli import main

        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except KeyboardInterrupt:
            code = 130
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


class Zygote:
    """The server, from the test's side."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=Path(__file__).resolve().parent.parent,
        )
        assert self._line() == "ready"

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server died (rc {self.proc.poll()})")
        return line.strip()

    def start(self, argv, *, env: dict[str, str], cwd: Path, log: Path) -> int:
        job = {
            "argv": [str(a) for a in argv],
            "env": env,
            "cwd": str(cwd),
            "stdout": str(log.with_suffix(".out")),
            "stderr": str(log.with_suffix(".err")),
        }
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        kind, pid = self._line().split()
        assert kind == "pid"
        return int(pid)

    def wait(self) -> int:
        """The exit code of the last child (-N when killed by signal N)."""
        kind, status = self._line().split()
        assert kind == "exit"
        status = int(status)
        if os.WIFSIGNALED(status):
            return -os.WTERMSIG(status)
        return os.WEXITSTATUS(status)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    _serve()
