"""`make demo`: the main jobs of loratool on the bundled fixtures, narrated.

Uses a demo catalog inside the checkout (.demo-home/, ignored by git) and writes merged models
under .demo-out/. Run from a checkout: ``python -m loratool.demo``.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
HOME = ROOT / ".demo-home"
OUT = ROOT / ".demo-out"


def rel(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def step(title: str, *args: object, optional: bool = False) -> int:
    from click.testing import CliRunner  # noqa: F401  (click is a dependency anyway)

    from .cli import COMMANDS, cli

    argv = [str(a) for a in args]
    if argv[0] in COMMANDS and cli.get_command(None, argv[0]) is None:
        print(f"\n── {title}: `{argv[0]}` is not available in this version yet")
        return 0
    print(
        f"\n── {title}\n$ loratool {' '.join(shlex.quote(rel(Path(a)) if '/' in a else a) for a in argv)}",
        flush=True,
    )
    try:
        cli.main(["--home", str(HOME), *argv], prog_name="loratool", standalone_mode=False)
    except SystemExit as exc:  # click's own exits
        return int(exc.code or 0)
    except Exception as exc:  # noqa: BLE001 - a demo narrates failures instead of dying
        from .errors import LoratoolError

        if isinstance(exc, LoratoolError) or hasattr(exc, "show"):
            print(f"error: {exc}")
            if optional:
                return 1
        raise
    return 0


def main() -> None:
    if not FIX.exists():
        sys.exit("error: the demo runs from a checkout: fixtures/ is not next to the package")
    shutil.rmtree(HOME, ignore_errors=True)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    print("loratool demo: one frozen base model, many small task adapters.")
    adapters = [
        ("llama-plain", "summarize"),
        ("llama-rslora", "translate"),
        ("llama-embed", "new-tokens"),
        ("gpt2-lora", "classify"),
    ]
    for name, task in adapters:
        step(
            f"catalog the {name} adapter",
            "add",
            FIX / "adapters" / name,
            "--task",
            task,
            "--name",
            name,
        )
    step(
        "catalog a kohya-style conv adapter",
        "add",
        FIX / "adapters" / "conv-kohya.safetensors",
        "--task",
        "style",
        "--name",
        "conv-kohya",
        "--base-model",
        "fixtures/conv",
    )
    step(
        "catalog the rank-1 example (a LoRA learned on data from θ+1)",
        "add",
        FIX / "rank1" / "adapter",
        "--task",
        "shift",
        "--name",
        "rank1",
    )
    step("what is in the catalog", "list")
    step("one adapter, module by module", "show", "llama-rslora")
    step(
        "storage: adapters against full fine-tuned copies of the base",
        "savings",
        "--base",
        FIX / "llama",
    )
    step(
        "storage for a hypothetical r=8 adapter on q,v of a RoBERTa-base-shaped model",
        "savings",
        "--config",
        FIX / "configs" / "roberta-base.json",
        "--rank",
        "8",
        "--targets",
        "query,value",
    )
    merged = OUT / "llama-summarize"
    step(
        "merge an adapter into the base (streaming, one tensor at a time)",
        "merge",
        FIX / "llama",
        "llama-plain",
        "-o",
        merged,
        "--device",
        "cpu",
    )
    swapped = OUT / "llama-translate"
    step(
        "swap tasks in one pass: take summarize out, put translate in",
        "merge",
        merged,
        "llama-plain=-1",
        "llama-rslora=1",
        "-o",
        swapped,
        "--device",
        "cpu",
    )
    step(
        "take it out again and check the round trip against the original base",
        "unmerge",
        swapped,
        "llama-rslora",
        "-o",
        OUT / "llama-restored",
        "--check",
        FIX / "llama",
        "--device",
        "cpu",
    )
    step("the rank the rank-1 example really uses", "inspect-rank", "rank1")
    step(
        "how much rank the rsLoRA adapter's modules use",
        "inspect-rank",
        "llama-rslora",
        "--threshold",
        "0.9",
    )
    step("every blob re-hashed, every row matched", "verify")
    print(f"\nDone. The demo catalog is in {rel(HOME)}, merged models in {rel(OUT)}.")


if __name__ == "__main__":
    main()
