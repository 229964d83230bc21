"""inspect-rank benchmark: the whole command on a 7B-shaped adapter vs a module-at-a-time floor.

Builds a PEFT adapter shaped like an r=64 fine-tune of a 7B model on all seven projections:
32 layers × (q, o 4096×4096; k, v 1024×4096; gate, up 11008×4096; down 4096×11008) = 224
modules, bfloat16, about 282 MiB. Then, alternating in every round (medians of ``--rounds``),
each as a fresh process:

- ``loratool inspect-rank ADAPTER --json``: the command as users run it (lazy open: factors are
  read, measured and dropped module by module);
- the floor: a few lines of torch that read one module at a time with safetensors'
  ``safe_open`` and compute its singular values from the factors (QR of B and Aᵀ, svdvals of
  the r×r core) — the least any tool can do for the same figures.

Wall time, peak private memory (RssAnon sampled every 5 ms) and maxrss for both; and the largest
difference between the two sets of singular values (relative to each module's σ₁). Goals (issue
14): inspect-rank within 1.5× of the floor's time and maxrss under 0.7 GB.

    .venv/bin/python benchmarks/bench_inspect.py [--rounds 5] [--write]
    .venv/bin/python benchmarks/bench_inspect.py --layers 2 --rounds 1   # a quick check

Prints a markdown table; with --write appends it to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_merge import run_measured  # benchmarks/ is the script's folder
from machine import append_to_benchmarks, cpu_name

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
WORK = ROOT / "benchmarks" / "_work"
RANK, ALPHA = 64, 128
HIDDEN, KV, INTER = 4096, 1024, 11008

FLOOR = r"""
import json, sys, torch
from safetensors import safe_open
path, scale = sys.argv[1], float(sys.argv[2])
out = {}
with safe_open(path + "/adapter_model.safetensors", "pt") as f:
    keys = sorted(k for k in f.keys() if k.endswith("lora_A.weight"))
    for key in keys:
        A = f.get_tensor(key).float()
        B = f.get_tensor(key.replace("lora_A", "lora_B")).float()
        rb = torch.linalg.qr(B, mode="r").R
        ra = torch.linalg.qr(A.T, mode="r").R
        s = torch.linalg.svdvals((rb.double() @ ra.double().T) * scale)
        out[key[len("base_model.model."):-len(".lora_A.weight")] + ".weight"] = s.tolist()
json.dump(out, sys.stdout)
"""


def build(folder: Path, layers: int) -> None:
    import torch
    from safetensors.torch import save_file

    if (folder / "adapter_model.safetensors").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    shapes = {
        "self_attn.q_proj": (HIDDEN, HIDDEN),
        "self_attn.k_proj": (KV, HIDDEN),
        "self_attn.v_proj": (KV, HIDDEN),
        "self_attn.o_proj": (HIDDEN, HIDDEN),
        "mlp.gate_proj": (INTER, HIDDEN),
        "mlp.up_proj": (INTER, HIDDEN),
        "mlp.down_proj": (HIDDEN, INTER),
    }
    sd = {}
    for i in range(layers):
        for name, (d, k) in shapes.items():
            p = f"base_model.model.model.layers.{i}.{name}"
            # a decaying spectrum, as trained adapters have
            decay = torch.exp(-torch.arange(RANK) / 16.0)
            sd[p + ".lora_A.weight"] = (
                torch.randn(RANK, k, generator=g) * 0.01 * decay[:, None]
            ).to(torch.bfloat16)
            sd[p + ".lora_B.weight"] = (torch.randn(d, RANK, generator=g) * 0.01).to(torch.bfloat16)
    save_file(sd, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
                "r": RANK,
                "lora_alpha": ALPHA,
                "target_modules": [n.rsplit(".", 1)[1] for n in shapes],
                "lora_dropout": 0.0,
                "fan_in_fan_out": False,
                "bias": "none",
                "use_rslora": False,
                "rank_pattern": {},
                "alpha_pattern": {},
                "inference_mode": True,
            }
        )
    )


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--workdir", default=str(WORK / "inspect"))
    ap.add_argument("--write", action="store_true", help="append the table to docs/BENCHMARKS.md")
    ap.add_argument("--build", help=argparse.SUPPRESS)
    args = ap.parse_args()
    folder = Path(args.workdir) / f"r{RANK}-{args.layers}layers"
    if args.build:
        build(Path(args.build), args.layers)
        return
    # built in a child: ru_maxrss of later children starts at this process's high-water mark
    subprocess.run([PY, __file__, "--layers", str(args.layers), "--build", str(folder)], check=True)
    size = (folder / "adapter_model.safetensors").stat().st_size
    cmds = {
        "loratool inspect-rank": [PY, "-m", "loratool", "inspect-rank", str(folder), "--json"],
        "floor (module-at-a-time QR)": [PY, "-c", FLOOR, str(folder), str(ALPHA / RANK)],
    }
    runs = {n: [] for n in cmds}
    outputs = {}
    for rnd in range(args.rounds):
        order = list(cmds)
        order = order[rnd % 2 :] + order[: rnd % 2]
        for name in order:
            subprocess.run(["sync"], check=True)
            time.sleep(0.5)
            m = run_measured(cmds[name])
            runs[name].append(m)
            outputs[name] = m["stdout"]
            print(
                f"round {rnd} {name}: {m['wall']:.2f} s, RssAnon {gib(m['rss_anon'])}, maxrss {gib(m['maxrss'])}",
                file=sys.stderr,
            )
    ours = {
        m["name"]: m["singular_values"]
        for m in json.loads(outputs["loratool inspect-rank"])["modules"]
    }
    floor = json.loads(outputs["floor (module-at-a-time QR)"])
    assert set(ours) == set(floor), "the two disagree on the modules"
    worst = max(
        max(abs(a - b) for a, b in zip(ours[k], floor[k], strict=True)) / max(floor[k][0], 1e-30)
        for k in floor
    )
    import torch

    walls = {n: statistics.median(m["wall"] for m in ms) for n, ms in runs.items()}
    t_ours, t_floor = walls["loratool inspect-rank"], walls["floor (module-at-a-time QR)"]
    maxrss = statistics.median(m["maxrss"] for m in runs["loratool inspect-rank"])
    cmd = f"`.venv/bin/python benchmarks/bench_inspect.py --rounds {args.rounds}" + (
        f" --layers {args.layers}`" if args.layers != 32 else "`"
    )
    lines = [
        f"## inspect-rank on a 7B-shaped adapter ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"{cmd} — PEFT adapter, r = {RANK} on q, k, v, o, gate, up, down × {args.layers} layers "
        f"= {7 * args.layers} modules, bfloat16, {size / 2**20:.0f} MiB; each contender a fresh "
        f"process (interpreter and torch import included), medians of {args.rounds} alternating "
        f"rounds. torch {torch.__version__}, {torch.get_num_threads()} threads, Python "
        f"{platform.python_version()}, {cpu_name()}, {os.cpu_count()} CPUs.",
        "",
        "| contender | wall (s) | vs floor | peak RssAnon | maxrss |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, ms in runs.items():
        lines.append(
            f"| {name} | {walls[name]:.2f} | {walls[name] / t_floor:.2f}× | "
            f"{gib(statistics.median(m['rss_anon'] for m in ms))} | "
            f"{gib(statistics.median(m['maxrss'] for m in ms))} |"
        )
    lines += [
        "",
        f"inspect-rank takes {t_ours / t_floor:.2f}× the floor's time (goal ≤ 1.5×) with maxrss "
        f"{maxrss / 1e9:.2f} GB (goal < 0.7 GB); its singular values match the floor's within "
        f"{worst:.1e} of σ₁.",
        "",
    ]
    table = "\n".join(lines)
    print(table)
    if args.write:
        append_to_benchmarks(table)


if __name__ == "__main__":
    main()
