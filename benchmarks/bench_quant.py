"""Quantized-base merge benchmark: FP8→FP8 (block-scaled, requantized) vs a bfloat16 merge of
the same model, and private memory as the FP8 base grows 4×.

Builds a Llama-shaped base in block-scaled FP8 (``quant_method: fp8``, 128×128 blocks,
``weight_scale_inv`` float32; embeddings, norms and lm_head bfloat16) of about 2 GB at the
default 40 layers, the same model in bfloat16 (same parameter count), and an r=16 adapter on
q,k,v,o (bench_merge.py's). Alternating the contenders in every round, each a fresh process
with torch imported beforehand (so the time is the engine's, from its ``--json`` summary), its
previous output deleted, ``sync`` and a pause before, ``sync`` after:

- engine time (the ``seconds`` of ``merge --json``) and wall time;
- peak private memory: RssAnon sampled every 5 ms (maxrss counts mapped file pages);
- maxrss.

Goals (issue 12): FP8→FP8 engine time within 2× of the bfloat16 merge; RssAnon under 0.5 GiB
and flat when the FP8 base grows 4× (``--grow``, 4× the layers).

    .venv/bin/python benchmarks/bench_quant.py [--rounds 5] [--layers 40] [--workdir DIR]
    .venv/bin/python benchmarks/bench_quant.py --small      # 2 layers, hidden 256: a check

Prints a markdown table; with --write appends it to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from bench_merge import ENGINE_SCRIPT, build_adapter, build_base, gib, rm, run_measured  # noqa: E402
from machine import append_to_benchmarks  # noqa: E402

PY = sys.executable
SMALL = dict(hidden=256, inter=704, vocab=1024, heads=4, kv_heads=2)
FULL = dict(hidden=2048, inter=5632, vocab=32000, heads=32, kv_heads=4)


def to_fp8(src: Path, dst: Path, block=(128, 128)) -> None:
    """The bfloat16 base quantized to block FP8 the way transformers' Fp8Quantize does (our
    codec, pinned to it in tests/test_quant.py), one tensor at a time."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from loratool.quant.base import LogicalWeight
    from loratool.quant.fp8_block import CODEC
    from loratool.tensors.header import TensorInfo

    if (dst / "model.safetensors").exists():
        return
    dst.mkdir(parents=True, exist_ok=True)
    out = {}
    cache: dict = {}
    with safe_open(src / "model.safetensors", "pt") as f:
        for name in f.keys():
            w = f.get_tensor(name)
            leaf = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
            if w.dim() != 2 or not leaf.endswith("_proj"):
                out[name] = w
                continue
            # layers repeat (build_base reuses layer 0): quantize each distinct tensor once
            key = (leaf, tuple(w.shape), tuple(w.reshape(-1)[:8].view(torch.int16).tolist()))
            if key not in cache:
                grid = (-(-w.shape[0] // block[0]), -(-w.shape[1] // block[1]))
                lw = LogicalWeight(
                    name,
                    tuple(w.shape),
                    {
                        "weight": TensorInfo(name, "F8_E4M3", tuple(w.shape), Path("."), 0, 0),
                        "scale": TensorInfo(name, "F32", grid, Path("."), 0, 0),
                    },
                    "BF16",
                    {"block": block},
                )
                enc = CODEC.encode(lw, w.float())
                cache[key] = (enc["weight"], enc["scale"])
            q, s = cache[key]
            out[name], out[name + "_scale_inv"] = q.clone(), s.clone()
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
    }
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))


def build(work: Path, layers: int, small: bool, reuse: bool) -> None:
    shape = SMALL if small else FULL
    build_base(work / "bf16", layers, reuse=True if reuse else None, **shape)
    build_adapter(work / "adapter", work / "bf16")
    to_fp8(work / "bf16", work / "fp8")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--small", action="store_true", help="a tiny model, to check the script")
    ap.add_argument("--workdir", default=str(ROOT / "benchmarks" / "_work" / "quant"))
    ap.add_argument("--pause", type=float, default=2.0)
    ap.add_argument("--skip-grow", action="store_true")
    ap.add_argument("--write", action="store_true", help="append the table to docs/BENCHMARKS.md")
    ap.add_argument(
        "--build", nargs=4, metavar=("DIR", "LAYERS", "SMALL", "REUSE"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.build:  # in a child: this process stays small (ru_maxrss is inherited at fork)
        d, layers, small, reuse = args.build
        build(Path(d), int(layers), small == "1", reuse == "1")
        return
    layers = 2 if args.small and args.layers == 40 else args.layers
    work = Path(args.workdir) / ("small" if args.small else "full")
    print("building inputs…", file=sys.stderr)
    subprocess.run(
        [PY, __file__, "--build", str(work), str(layers), str(int(args.small)), "1"], check=True
    )
    fp8_size = (work / "fp8" / "model.safetensors").stat().st_size
    bf16_size = (work / "bf16" / "model.safetensors").stat().st_size

    def cmd(base: Path, out: Path) -> list[str]:
        tail = [
            "merge",
            str(base),
            str(work / "adapter"),
            "--device",
            "cpu",
            "--json",
            "-o",
            str(out),
        ]
        return [PY, "-c", ENGINE_SCRIPT, *tail]

    contenders = {"fp8 → fp8 (requantized)": work / "fp8", "bf16 → bf16": work / "bf16"}
    results: dict[str, list[dict]] = {k: [] for k in contenders}
    quant_summary = None
    for rnd in range(args.rounds):
        order = list(contenders)
        order = order[rnd % 2 :] + order[: rnd % 2]
        for name in order:
            out = work / f"out-{name.split()[0]}"
            rm(out)
            subprocess.run(["sync"], check=True)
            time.sleep(args.pause)
            m = run_measured(cmd(contenders[name], out))
            doc = json.loads(m["stdout"])
            m["engine"] = doc["seconds"]
            if doc.get("quantization"):
                quant_summary = doc["quantization"]
            results[name].append(m)
            print(
                f"round {rnd} {name}: engine {m['engine']:.2f} s, wall {m['wall']:.2f} s, "
                f"RssAnon {gib(m['rss_anon'])}",
                file=sys.stderr,
            )
            rm(out)
    grow_line = ""
    if not args.skip_grow:
        gwork = work / "grow"
        subprocess.run(
            [PY, __file__, "--build", str(gwork), str(layers * 4), str(int(args.small)), "1"],
            check=True,
        )
        rm(gwork / "bf16")  # only the FP8 base is merged
        big = (gwork / "fp8" / "model.safetensors").stat().st_size
        rm(gwork / "out")
        subprocess.run(["sync"], check=True)
        time.sleep(args.pause)
        m = run_measured(
            [
                PY,
                "-c",
                ENGINE_SCRIPT,
                "merge",
                str(gwork / "fp8"),
                str(gwork / "adapter"),
                "--device",
                "cpu",
                "--json",
                "-o",
                str(gwork / "out"),
            ]
        )
        rm(gwork / "out")
        grow_line = (
            f"FP8 base 4× as deep ({big / 1e9:.2f} GB): engine {json.loads(m['stdout'])['seconds']:.2f} s, "
            f"peak RssAnon {gib(m['rss_anon'])}, maxrss {gib(m['maxrss'])}."
        )
        print(grow_line, file=sys.stderr)
    med = statistics.median
    fp8_engine = med(m["engine"] for m in results["fp8 → fp8 (requantized)"])
    bf16_engine = med(m["engine"] for m in results["bf16 → bf16"])
    lines = [
        f"Base: Llama-shaped, {layers} layers{' (small check size)' if args.small else ''}: block FP8 "
        f"(128×128, float32 scales; embeddings, norms and lm_head bfloat16) {fp8_size / 1e9:.2f} GB, "
        f"the same model in bfloat16 {bf16_size / 1e9:.2f} GB; adapter r=16 on q,k,v,o. CPU, torch "
        f"imported before the engine starts. Median of {args.rounds} rounds, alternating order; before "
        f"each run `sync` and a {args.pause:g} s pause, after it `sync`.",
        "",
        "| merge | engine (s) | wall (s) | peak RssAnon | maxrss |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, ms in results.items():
        lines.append(
            f"| {name} | {med(m['engine'] for m in ms):.2f} | {med(m['wall'] for m in ms):.2f} | "
            f"{gib(med(m['rss_anon'] for m in ms))} | {gib(med(m['maxrss'] for m in ms))} |"
        )
    lines += [
        "",
        f"FP8→FP8 engine time is {fp8_engine / bf16_engine:.2f}× the bfloat16 merge's (goal ≤ 2×).",
    ]
    if quant_summary:
        lines.append(
            f"Worst rewritten weight vs the exact float32 merge: {quant_summary['worst_tensor']}, max rel "
            f"error {quant_summary['max_rel_error']:.3g}, rms {quant_summary['rms_rel_error']:.3g}; "
            f"ΔW kept ≥ {quant_summary['min_delta_kept']:.3f}."
        )
    if grow_line:
        lines.append(grow_line)
    table = "\n".join(lines)
    print(table)
    if args.write:
        cmd_line = "    " + " ".join(["python", "benchmarks/bench_quant.py", *sys.argv[1:]])
        append_to_benchmarks(
            f"## merge into a quantized base ({time.strftime('%Y-%m-%d')}, {os.uname().machine}, "
            f"{os.cpu_count()} cores)\n\n{cmd_line}\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
