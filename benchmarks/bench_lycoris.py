"""LyCORIS merge benchmark: ``loratool merge`` of a LoHa and a LoKr vs lycoris-lora's own merge.

Builds a base shaped like the attention and feed-forward linears of SDXL's UNet transformer
blocks (``--blocks`` blocks × to_q, to_k, to_v, to_out 1280×1280; ff.net.0.proj 10240×1280;
ff.net.2 1280×5120), float16, and two LyCORIS files for it as lycoris-lora saves them: a LoHa
(dim 16) and a LoKr (factor 8: w1 whole, w2 = w2_a·w2_b, dim 16). Then, alternating in every
round (medians of ``--rounds``), each a fresh process:

- ``loratool merge BASE ADAPTER -o OUT``: streamed, ΔW added a block of rows at a time from the
  factors (never formed whole), each tensor read and written once;
- lycoris-lora: the state dict loaded, one ``nn.Linear`` per weight, the module built with
  ``make_module_from_state_dict`` and ``merge_to(1.0)``, the state dict saved with safetensors
  (what a script using the package does; note its merge_to scales LoHa/LoKr twice, see
  loratool/adapter/lycoris.py — the timing is still the work it does).

Wall time, peak private memory (RssAnon sampled every 5 ms) and maxrss.

    .venv/bin/python benchmarks/bench_lycoris.py [--rounds 5] [--write]
    .venv/bin/python benchmarks/bench_lycoris.py --small      # a quick check (2 blocks, 1 round)

Prints a markdown table; with --write appends it to docs/BENCHMARKS.md. Needs lycoris-lora
(the test extra).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_merge import rm, run_measured  # benchmarks/ is the script's folder
from machine import append_to_benchmarks, cpu_name

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
WORK = ROOT / "benchmarks" / "_work"
DIM, HIDDEN = 16, 1280
SHAPES = {
    "attn1.to_q": (HIDDEN, HIDDEN),
    "attn1.to_k": (HIDDEN, HIDDEN),
    "attn1.to_v": (HIDDEN, HIDDEN),
    "attn1.to_out.0": (HIDDEN, HIDDEN),
    "ff.net.0.proj": (8 * HIDDEN, HIDDEN),
    "ff.net.2": (HIDDEN, 4 * HIDDEN),
}

LYCORIS_MERGE = r"""
import sys, torch
from safetensors.torch import load_file, save_file
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
base, adapter, out = sys.argv[1:4]
sd = load_file(base)
lyco = load_file(adapter)
stems = sorted({k.split(".")[0] for k in lyco})
flat = {("lora_unet_" + k.removesuffix(".weight").replace(".", "_")): k for k in sd}
with torch.no_grad():
    for stem in stems:
        name = flat[stem]
        w = sd[name]
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
        lin.weight.copy_(w)
        g = lambda p: lyco.get(f"{stem}.{p}")
        if g("hada_w1_a") is not None:
            m = LohaModule.make_module_from_state_dict(stem, lin, g("hada_w1_a"), g("hada_w1_b"), g("hada_w2_a"), g("hada_w2_b"), None, None, g("alpha"), None)
        else:
            m = LokrModule.make_module_from_state_dict(stem, lin, g("lokr_w1"), g("lokr_w1_a"), g("lokr_w1_b"), g("lokr_w2"), g("lokr_w2_a"), g("lokr_w2_b"), None, None, g("alpha"), None)
        m.merge_to(1.0)
        sd[name] = lin.weight.detach()
save_file(sd, out, metadata={"format": "pt"})
"""


def build(folder: Path, blocks: int) -> None:
    import torch
    from safetensors.torch import save_file

    if (folder / "lokr.safetensors").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    base, loha, lokr = {}, {}, {}
    for b in range(blocks):
        for name, (out, inn) in SHAPES.items():
            key = f"transformer_blocks.{b}.{name}.weight"
            base[key] = (torch.randn(out, inn, generator=g) * 0.02).half()
            stem = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
            for w in ("w1", "w2"):
                loha[f"{stem}.hada_{w}_a"] = (torch.randn(out, DIM, generator=g) * 0.05).half()
                loha[f"{stem}.hada_{w}_b"] = (torch.randn(DIM, inn, generator=g) * 0.05).half()
            loha[f"{stem}.alpha"] = torch.tensor(8.0).half()
            a, c = 8, 8  # factor 8: w1 a×c whole, w2 (out/8)×(in/8) as w2_a·w2_b
            lokr[f"{stem}.lokr_w1"] = (torch.randn(a, c, generator=g) * 0.1).half()
            lokr[f"{stem}.lokr_w2_a"] = (torch.randn(out // a, DIM, generator=g) * 0.05).half()
            lokr[f"{stem}.lokr_w2_b"] = (torch.randn(DIM, inn // c, generator=g) * 0.05).half()
            lokr[f"{stem}.alpha"] = torch.tensor(8.0).half()
    save_file(base, folder / "base.safetensors", metadata={"format": "pt"})
    meta = {"ss_network_module": "lycoris.kohya"}
    save_file(loha, folder / "loha.safetensors", metadata=meta)
    save_file(lokr, folder / "lokr.safetensors", metadata=meta)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--blocks", type=int, default=70)  # SDXL's UNet has 70 transformer blocks
    ap.add_argument("--small", action="store_true", help="2 blocks, 1 round: a quick check")
    ap.add_argument("--workdir", default=str(WORK / "lycoris"))
    ap.add_argument("--write", action="store_true", help="append the table to docs/BENCHMARKS.md")
    ap.add_argument("--build", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.small:
        args.blocks, args.rounds = 2, 1
    folder = Path(args.workdir) / f"{args.blocks}blocks"
    if args.build:
        build(Path(args.build), args.blocks)
        return
    # built in a child: ru_maxrss of later children starts at this process's high-water mark
    subprocess.run([PY, __file__, "--blocks", str(args.blocks), "--build", str(folder)], check=True)
    base = folder / "base.safetensors"
    size = base.stat().st_size
    runs: dict[str, list] = {}
    for algo in ("loha", "lokr"):
        adapter = folder / f"{algo}.safetensors"
        out = folder / f"out-{algo}.safetensors"
        cmds = {
            f"loratool merge ({algo})": [
                PY,
                "-m",
                "loratool",
                "merge",
                str(base),
                str(adapter),
                "-o",
                str(out),
                "--force",
            ],
            f"lycoris-lora merge_to ({algo})": [
                PY,
                "-c",
                LYCORIS_MERGE,
                str(base),
                str(adapter),
                str(out),
            ],
        }
        for name in cmds:
            runs[name] = []
        for rnd in range(args.rounds):
            order = list(cmds)
            order = order[rnd % 2 :] + order[: rnd % 2]
            for name in order:
                rm(out)
                subprocess.run(["sync"], check=True)
                time.sleep(0.5)
                m = run_measured(cmds[name])
                runs[name].append(m)
                print(
                    f"round {rnd} {name}: {m['wall']:.2f} s, RssAnon {gib(m['rss_anon'])}, maxrss {gib(m['maxrss'])}",
                    file=sys.stderr,
                )
        rm(out)
    import torch

    cmd = (
        "`.venv/bin/python benchmarks/bench_lycoris.py"
        + (f" --rounds {args.rounds}" if args.rounds != 5 else "")
        + (f" --blocks {args.blocks}`" if args.blocks != 70 else "`")
    )
    lines = [
        f"## LyCORIS merge: loratool vs lycoris-lora ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"{cmd} — base: {args.blocks} SDXL-shaped transformer blocks × 6 linears, float16, "
        f"{size / 2**30:.2f} GiB; LoHa dim {DIM} and LoKr (factor 8, w2 dim {DIM}) on every "
        f"linear; each contender a fresh process, medians of {args.rounds} alternating rounds. "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, Python "
        f"{platform.python_version()}, {cpu_name()}, {os.cpu_count()} CPUs.",
        "",
        "| contender | wall (s) | peak RssAnon | maxrss |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, ms in runs.items():
        lines.append(
            f"| {name} | {statistics.median(m['wall'] for m in ms):.2f} | "
            f"{gib(statistics.median(m['rss_anon'] for m in ms))} | "
            f"{gib(statistics.median(m['maxrss'] for m in ms))} |"
        )
    lines.append("")
    table = "\n".join(lines)
    print(table)
    if args.write:
        append_to_benchmarks(table)


if __name__ == "__main__":
    main()
