"""extract benchmark: `loratool extract` vs `mergekit-extract-lora` at the same rank.

Builds two pairs of bfloat16 models (saved like save_pretrained, with a valid config.json):

- a Llama-shaped pair: hidden 1024, 4 layers (intermediate 2816, 16 heads, 8 KV heads,
  vocab 32000); the fine-tuned side adds to every projection (q, k, v, o, gate, up, down) a
  rank-64 update U·diag(σ)·Vᵀ with a decaying spectrum σᵢ = exp(−i/19) (rank 16 keeps ~82%
  of its energy: the Eckart–Young floor at rank 16 is a relative error ≈ 0.43);
- a 7B-shaped single layer (hidden 4096, intermediate 11008, 32 heads, vocab 1000) with the
  same kind of update: the SVD cost at real size.

Then, alternating the contenders in every round (medians over ``--rounds``), each as a fresh
process: wall time, peak private memory (RssAnon sampled from /proc every 5 ms) and maxrss;
loratool's engine time from its own summary too. Both skip the (unchanged) embeddings and
lm_head and the norms: mergekit with ``-e embed_tokens -e lm_head --skip-undecomposable``,
loratool because identical tensors are skipped. Both run on the CPU.

Finally, the error of each tool's output against the Eckart–Young optimum at that rank (the
optimum from the exact singular values of every ΔW, computed once): the mean and the max
relative Frobenius error ‖ΔW − scale·B·A‖/‖ΔW‖ over the modules, and the worst excess over the
optimum. Goals (issue 14): loratool ≥ 10× faster than mergekit, mean error within 1% of the
optimum and no module more than 2% above it, private memory at most mergekit's.

mergekit runs from its own virtualenv (it pins its own transformers, click, …), made by
`make bench-venv`; this script installs nothing.

    .venv/bin/python benchmarks/bench_extract.py [--rounds 3] [--rank 16] [--skip-7b] [--write]
    .venv/bin/python benchmarks/bench_extract.py --small --rounds 1   # a quick check of the script

Prints a markdown table; with --write appends it to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
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
MERGEKIT = WORK / "mergekit-venv" / "bin" / "mergekit-extract-lora"

SHAPES = {
    # name: hidden, intermediate, layers, heads, kv heads, vocab
    "llama-1024x4": (1024, 2816, 4, 16, 8, 32000),
    "7b-layer": (4096, 11008, 1, 32, 32, 1000),
}
SMALL = {
    "llama-256x2": (256, 704, 2, 4, 2, 512),
    "layer-1024": (1024, 2816, 1, 8, 8, 256),
}
UPDATE_RANK = 64
DECAY = 19.0
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# -- inputs (built in a child process, so that this one stays small: ru_maxrss of a child
# starts at its parent's high-water mark) -------------------------------------------------------


def build_pair(folder: Path, shape: tuple, seed: int = 0) -> None:
    import torch
    from safetensors.torch import save_file

    if (folder / "ft" / "model.safetensors").exists():
        return
    hidden, inter, layers, heads, kv_heads, vocab = shape
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)

    def update(d, k):
        r = min(UPDATE_RANK, d, k)
        U = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64)).Q
        V = torch.linalg.qr(torch.randn(k, r, generator=g, dtype=torch.float64)).Q
        sigma = torch.exp(-torch.arange(r, dtype=torch.float64) / DECAY)
        return ((U * sigma) @ V.T).float()

    base = {
        "model.embed_tokens.weight": rnd(vocab, hidden),
        "lm_head.weight": rnd(vocab, hidden),
        "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
    }
    ft = dict(base)
    outs = {"q_proj": hidden, "k_proj": kv, "v_proj": kv, "o_proj": hidden}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm"):
            base[p + n + ".weight"] = ft[p + n + ".weight"] = torch.ones(
                hidden, dtype=torch.bfloat16
            )
        for proj in PROJECTIONS:
            if proj in outs:
                shape_ = (outs[proj], hidden)
                key = f"{p}self_attn.{proj}.weight"
            else:
                shape_ = (hidden, inter) if proj == "down_proj" else (inter, hidden)
                key = f"{p}mlp.{proj}.weight"
            w = rnd(*shape_)
            base[key] = w
            ft[key] = (w.float() + update(*shape_)).to(torch.bfloat16)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    for name, sd in (("base", base), ("ft", ft)):
        d = folder / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(config, indent=2))
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


def deltas(folder: Path):
    """(name, ΔW float32) for every projection that differs: what both tools factor."""
    from safetensors import safe_open

    with (
        safe_open(folder / "base" / "model.safetensors", "pt") as b,
        safe_open(folder / "ft" / "model.safetensors", "pt") as f,
    ):
        for name in sorted(b.keys()):
            if name.endswith("_proj.weight"):
                yield name, f.get_tensor(name).float() - b.get_tensor(name).float()


def optimum(folder: Path, rank: int) -> dict[str, float]:
    """Eckart–Young: the least relative error of any rank-``rank`` approximation, per module."""
    import torch

    out = {}
    for name, D in deltas(folder):
        # float32 values are accurate to ~1e-7·σ₁, far below the floors measured here (~0.4);
        # a float64 SVD of each 4096×11008 ΔW would take minutes on two cores.
        S = torch.linalg.svdvals(D).double()
        out[name] = float(S[rank:].square().sum().sqrt() / S.square().sum().sqrt())
    return out


def adapter_errors(folder: Path, adapter: Path) -> dict[str, float]:
    """‖ΔW − scale·B·A‖_F / ‖ΔW‖_F per module of a PEFT adapter directory (either tool's)."""
    import re

    from safetensors.torch import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    w = load_file(adapter / "adapter_model.safetensors")

    def pattern(patterns, path, default):  # peft's get_pattern_key
        for key in patterns or {}:
            if re.match(rf"(.*\.)?({key})$", path):
                return patterns[key]
        return default

    out = {}
    for name, D in deltas(folder):
        path = name.removesuffix(".weight")
        key = f"base_model.model.{path}.lora_A.weight"
        if key not in w:
            out[name] = 1.0  # not extracted: all of ΔW is error
            continue
        A, B = w[key].double(), w[key.replace("lora_A", "lora_B")].double()
        r = pattern(cfg.get("rank_pattern"), path, cfg["r"])
        alpha = pattern(cfg.get("alpha_pattern"), path, cfg["lora_alpha"])
        assert A.shape[0] == r, (name, A.shape, r)
        scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        D = D.double()
        out[name] = float((D - scale * (B @ A)).norm() / D.norm())
    return out


# -- runs ------------------------------------------------------------------------------------


def contenders(folder: Path, out: Path, rank: int, device: str) -> dict[str, list[str]]:
    base, ft = str(folder / "base"), str(folder / "ft")
    return {
        "loratool extract": [
            PY, "-m", "loratool", "extract", base, ft, "--rank", str(rank),
            "--device", device, "--json", "--force", "-o", str(out / "loratool"),
        ],
        "mergekit-extract-lora": [
            str(MERGEKIT), "--model", ft, "--base-model", base, "--out-path", str(out / "mergekit"),
            "--max-rank", str(rank), "-e", "embed_tokens", "-e", "lm_head",
            "--skip-undecomposable",
        ] + (["--device", device] if device != "cpu" else []),
    }  # fmt: skip


def child(argv: list[str]) -> dict:
    """Run this script's helper mode in a child and return its JSON."""
    p = subprocess.run([PY, __file__, *argv], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(p.stderr[-3000:])
    return json.loads(p.stdout)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--small", action="store_true", help="tiny shapes: checks the script only")
    ap.add_argument("--skip-7b", action="store_true", help="only the Llama-shaped pair")
    ap.add_argument("--workdir", default=str(WORK / "extract"))
    ap.add_argument("--write", action="store_true", help="append the table to docs/BENCHMARKS.md")
    ap.add_argument("--helper", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.helper:  # child-process work: build, optimum, errors
        what, folder = args.helper[0], Path(args.helper[1])
        if what == "build":
            build_pair(folder, tuple(json.loads(args.helper[2])))
            print("{}")
        elif what == "optimum":
            print(json.dumps(optimum(folder, int(args.helper[2]))))
        else:
            print(json.dumps(adapter_errors(folder, Path(args.helper[2]))))
        return
    if not MERGEKIT.exists():
        raise SystemExit(
            f"{MERGEKIT} is missing: run `make bench-venv` first (mergekit's own venv)"
        )
    shapes = SMALL if args.small else SHAPES
    if args.skip_7b:
        shapes = dict(list(shapes.items())[:1])
    work = Path(args.workdir) / ("small" if args.small else "full")
    results = {}
    for label, shape in shapes.items():
        folder = work / label
        print(f"{label}: building inputs…", file=sys.stderr)
        child(["--helper", "build", str(folder), json.dumps(shape)])
        floor = child(["--helper", "optimum", str(folder), str(args.rank)])
        out = folder / "out"
        runs = {name: [] for name in contenders(folder, out, args.rank, args.device)}
        engine = []
        for rnd in range(args.rounds):
            order = list(runs)
            order = (
                order[rnd % len(order) :] + order[: rnd % len(order)]
            )  # alternate who goes first
            for name in order:
                cmd = contenders(folder, out, args.rank, args.device)[name]
                shutil.rmtree(out / name.split()[0].split("-")[0], ignore_errors=True)
                subprocess.run(["sync"], check=True)
                time.sleep(1.0)
                m = run_measured(cmd)
                runs[name].append(m)
                if name.startswith("loratool"):
                    engine.append(json.loads(m["stdout"])["seconds"])
                print(
                    f"  round {rnd} {name}: {m['wall']:.2f} s, RssAnon {gib(m['rss_anon'])}, "
                    f"maxrss {gib(m['maxrss'])}",
                    file=sys.stderr,
                )
        errors = {
            name: child(
                ["--helper", "errors", str(folder), str(out / name.split()[0].split("-")[0])]
            )
            for name in runs
        }
        results[label] = (shape, floor, runs, engine, errors)
    table = report(args, results)
    print(table)
    if args.write:
        append_to_benchmarks(table)


def report(args, results) -> str:
    import torch

    cmd = "`.venv/bin/python benchmarks/bench_extract.py" + (
        f" --rounds {args.rounds} --rank {args.rank}"
        + (" --small" if args.small else "")
        + (" --skip-7b" if args.skip_7b else "")
        + "`"
    )
    lines = [
        f"## extract: loratool vs mergekit ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"{cmd} — bfloat16 pairs whose fine-tuned side has a rank-{UPDATE_RANK} update "
        f"σᵢ = exp(−i/{DECAY:g}) on every projection; extraction at rank {args.rank} on "
        f"{args.device}; medians of {args.rounds} alternating rounds, each a fresh process "
        f"followed by `sync`. torch {torch.__version__}, Python {platform.python_version()}, "
        f"{cpu_name()}, {os.cpu_count()} CPUs. Private memory = peak RssAnon (sampled every "
        "5 ms); errors are ‖ΔW − scale·B·A‖_F/‖ΔW‖_F per module against the Eckart–Young "
        "optimum at that rank (exact singular values of each ΔW).",
        "",
        "| pair | contender | wall (s) | engine (s) | speed-up | peak RssAnon | maxrss | mean error | optimum | mean excess | max excess |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    verdicts = []
    for label, (_shape, floor, runs, engine, errors) in results.items():
        opt_mean = statistics.fmean(floor.values())
        walls = {n: statistics.median(m["wall"] for m in ms) for n, ms in runs.items()}
        mk = walls["mergekit-extract-lora"]
        for name, ms in runs.items():
            errs = errors[name]
            mean = statistics.fmean(errs.values())
            excess = [errs[k] / floor[k] - 1 for k in floor]
            rss = statistics.median(m["rss_anon"] for m in ms)
            maxrss = statistics.median(m["maxrss"] for m in ms)
            eng = f"{statistics.median(engine):.2f}" if name.startswith("loratool") else "—"
            lines.append(
                f"| {label} | {name} | {walls[name]:.2f} | {eng} | {mk / walls[name]:.1f}× | "
                f"{gib(rss)} | {gib(maxrss)} | {mean:.5f} | {opt_mean:.5f} | "
                f"{statistics.fmean(excess):+.3%} | {max(excess):+.3%} |"
            )
        lt = runs["loratool extract"]
        mean_excess = statistics.fmean(errors["loratool extract"][k] / floor[k] - 1 for k in floor)
        max_excess = max(errors["loratool extract"][k] / floor[k] - 1 for k in floor)
        rss_ok = statistics.median(m["rss_anon"] for m in lt) <= statistics.median(
            m["rss_anon"] for m in runs["mergekit-extract-lora"]
        )
        verdicts.append(
            f"{label} ({len(floor)} modules): loratool {mk / walls['loratool extract']:.1f}× faster "
            f"(goal ≥ 10×), mean error {mean_excess:+.3%} over the optimum (goal ≤ 1%), worst "
            f"module {max_excess:+.3%} (goal ≤ 2%), private memory "
            f"{'at most' if rss_ok else 'ABOVE'} mergekit's."
        )
    lines += ["", *verdicts, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
