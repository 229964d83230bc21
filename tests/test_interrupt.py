"""Randomized interruptions: SIGKILL and SIGINT at random moments over every command that
writes, asserting after each one that no partial output lies under a final name and that the
catalog verifies.

Each command runs once to completion first: that run is the reference output and measures
how long the command takes; the interrupted runs are then signalled at a uniformly random
moment of that span (a little beyond it too, so some complete). After every interruption:

- an output path holds nothing, or exactly the reference output (with ``--force`` it may be
  the previous complete output, which is the reference too);
- ``loratool verify`` passes at once (it runs recovery first), and every listed adapter loads;
- at the end, one more write into the output directory leaves no temporaries there.

The commands run in a fork server (tests/zygote.py) so that an interruption costs
milliseconds, not a torch import. The default run is a few seeded iterations; the long one is
``pytest -m slow tests/test_interrupt.py`` (``make test-slow``), with LORATOOL_INTERRUPTS=N
iterations (default 150) and LORATOOL_INTERRUPT_SEED.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
from zygote import Zygote

from loratool.fsutil import TMP_MARK

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


def tree(root: Path) -> dict[str, bytes] | None:
    if not os.path.lexists(root):
        return None
    if root.is_file():
        return {".": root.read_bytes()}
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


class Bench:
    """The work directory, the commands and their reference outputs."""

    def __init__(self, tmp_path: Path, home: Path, cli_run, hub=None) -> None:
        self.tmp = tmp_path
        self.home = home
        self.cli_run = cli_run
        w = self.work = tmp_path / "work"
        shutil.copytree(FIXTURES / "llama", w / "llama")
        shutil.copytree(FIXTURES / "adapters" / "llama-plain", w / "adapter")
        (w / "out").mkdir()
        (tmp_path / "ref").mkdir()
        (tmp_path / "logs").mkdir()
        assert cli_run("add", w / "adapter", "--task", "t", "--name", "a").exit_code == 0
        r = cli_run("merge", w / "llama", w / "adapter", "-o", w / "ft", "--device", "cpu")
        assert r.exit_code == 0, r.output
        self.hub = hub
        if hub is not None:
            os.environ["HF_TOKEN"] = hub.alice
            try:
                r = cli_run("push", "a", "--repo", "alice/a-lora")
                assert r.exit_code == 0, r.output
            finally:
                del os.environ["HF_TOKEN"]
        self.env = dict(os.environ, LORATOOL_HOME=str(home))
        self.env.pop("LORATOOL_DEBUG", None)
        self.zygote = Zygote(self.env)
        self.refs: dict[str, tuple[dict | None, float]] = {}
        self.n = 0

    # name → (argv with {out} for the output path, output basename or None, catalog name or None)
    def commands(self) -> dict[str, tuple[list, str | None]]:
        w = self.work
        cmds = {
            "add": (
                [
                    "add",
                    w / "adapter",
                    "--task",
                    "t",
                    "--name",
                    "added",
                    "--replace",
                    "--keep-both",
                ],
                None,
            ),
            "remove": (["remove", "added"], None),
            "merge": (["merge", w / "llama", w / "adapter", "-o", "{out}", "--device", "cpu"], "m"),
            "merge-file": (
                ["merge", w / "llama" / "model.safetensors", "a=0.5", "-o", "{out}"],
                "m.safetensors",
            ),
            "unmerge": (["unmerge", w / "ft", "a", "-o", "{out}", "--device", "cpu"], "u"),
            "resize": (["resize", "a", "--rank", "2", "-o", "{out}"], "r"),
            "resize-as": (["resize", "a", "--rank", "2", "--as", "r2", "--task", "t"], None),
            "combine": (
                ["combine", f"{w / 'adapter'}=0.5", "a", "--method", "cat", "-o", "{out}"],
                "c",
            ),
            "combine-as": (["combine", "a=0.5", "a", "--method", "cat", "--as", "c2"], None),
            "extract": (
                ["extract", w / "llama", w / "ft", "--rank", "2", "-o", "{out}"],
                "x",
            ),
            "export": (["export", "a", "{out}"], "e"),
            "export-kohya": (["export", "a", "{out}", "--format", "kohya"], "k.safetensors"),
        }
        if self.hub is not None:
            cmds["pull"] = (
                [
                    "pull",
                    "alice/a-lora",
                    "--task",
                    "t",
                    "--name",
                    "pulled",
                    "--replace",
                    "--keep-both",
                ],
                None,
            )
        return cmds

    def argv(self, name: str, out: Path | None, force: bool) -> list:
        argv, _ = self.commands()[name]
        argv = [out if a == "{out}" else a for a in argv]
        if force and out is not None:
            argv.append("--force")
        if force and name.endswith("-as"):
            argv.append("--force")
        return argv

    def run(self, argv, *, sig: int | None = None, delay: float = 0.0) -> tuple[int, float]:
        self.n += 1
        log = self.tmp / "logs" / f"{self.n:04d}"
        t0 = time.perf_counter()
        pid = self.zygote.start(argv, env=self.env, cwd=self.work, log=log)
        if sig is not None:
            time.sleep(delay)
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass  # it had finished
        rc = self.zygote.wait()
        self.last_log = log
        return rc, time.perf_counter() - t0

    def reference(self, name: str) -> tuple[dict | None, float]:
        """The complete output of ``name`` and how long it takes (run once, uninterrupted)."""
        if name not in self.refs:
            _, out = self.commands()[name]
            dest = self.tmp / "ref" / name / out if out else None
            if dest is not None:
                dest.parent.mkdir()
            self.prepare(name)
            rc, took = self.run(self.argv(name, dest, force=True))
            err = self.last_log.with_suffix(".err").read_text()
            assert rc == 0, (name, rc, err)
            self.refs[name] = (tree(dest) if dest else None, took)
        return self.refs[name]

    def prepare(self, name: str) -> None:
        """What a command needs beforehand: `remove` something to remove."""
        if name == "remove":
            r = self.cli_run(
                "add",
                self.work / "adapter",
                "--task",
                "t",
                "--name",
                "added",
                "--replace",
                "--keep-both",
            )
            assert r.exit_code == 0, r.output

    def check_catalog(self, context: str) -> None:
        """`verify` passes at once, and every adapter loads (its blob re-hashed)."""
        r = self.cli_run("verify", "--json")
        assert r.exit_code == 0 and json.loads(r.stdout)["ok"], (context, r.output)
        r = self.cli_run("list", "--json")
        names = [row["name"] for row in json.loads(r.stdout)]
        from loratool.catalog import Catalog

        cat = Catalog(self.home)
        try:
            for n in names:
                cat.load(n)
        finally:
            cat.close()
        assert "a" in names, context


def interrupt(bench: Bench, iterations: int, seed: int, *, cover_all: bool) -> None:
    rng = random.Random(seed)
    names = list(bench.commands())
    order = names[:] if cover_all else []
    rng.shuffle(order)
    while len(order) < iterations:
        order.append(rng.choice(names))
    outs = bench.work / "out"
    for i, name in enumerate(order):
        ref, took = bench.reference(name)
        _, base = bench.commands()[name]
        dest = outs / base if base else None
        force = rng.random() < 0.5
        if dest is not None and os.path.lexists(dest) and not force:
            if os.path.isdir(dest):
                shutil.rmtree(dest)
            else:
                dest.unlink()
        bench.prepare(name)
        sig = rng.choice([signal.SIGKILL, signal.SIGINT])
        delay = rng.uniform(0, took * 1.2)
        context = f"#{i} {name} {sig.name} at {delay * 1000:.0f} ms (force={force}, seed={seed})"
        rc, _ = bench.run(bench.argv(name, dest, force), sig=sig, delay=delay)
        print(f"{context}: exit {rc}")
        err = bench.last_log.with_suffix(".err").read_text()
        assert "Traceback" not in err, (context, err)
        if dest is not None:
            got = tree(dest)
            assert got is None or got == ref, f"{context}: partial output under {dest}"
            if rc == 0:
                assert got == ref, context
            leftovers = [p.name for p in dest.parent.iterdir() if not p.name.startswith(".")]
            assert set(leftovers) <= {b for _, b in bench.commands().values() if b}, context
        bench.check_catalog(context)
    # one more write beside every output cleans what the killed ones left
    r = bench.cli_run("export", "a", outs / "final", "--force")
    assert r.exit_code == 0, r.output
    assert [p.name for p in outs.iterdir() if p.name.startswith(TMP_MARK)] == []


@pytest.fixture
def bench(tmp_path, loratool_home, cli_run, request):
    hub = None
    try:
        hub = request.getfixturevalue("hub")
    except pytest.FixtureLookupError:  # pragma: no cover - no loopback Hub here
        pass
    b = Bench(tmp_path, loratool_home, cli_run, hub)
    try:
        yield b
    finally:
        b.zygote.close()


def test_interruptions_leave_no_partial_output_and_a_catalog_that_verifies(bench):
    """Every command once, interrupted at a random moment (seeded)."""
    interrupt(bench, len(bench.commands()), seed=16, cover_all=True)


@pytest.mark.slow
def test_many_random_interruptions(bench):
    n = int(os.environ.get("LORATOOL_INTERRUPTS", "150"))
    seed = int(os.environ.get("LORATOOL_INTERRUPT_SEED", str(int(time.time()) % 100000)))
    print(f"LORATOOL_INTERRUPT_SEED={seed}")
    interrupt(bench, n, seed=seed, cover_all=True)
