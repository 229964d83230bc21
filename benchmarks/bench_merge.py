"""Merge benchmark: `cp -r` (the floor) vs `loratool merge` vs peft's merge_and_unload path.

Builds a Llama-shaped bfloat16 base of about 2 GB (saved like save_pretrained, with a valid
config.json) and an r=16 float32 adapter on q,k,v,o (as peft saves it), then, alternating the
contenders in every round, measures each as a fresh process followed by `sync`, after its
previous output is deleted, `sync` and a pause (this machine's disk is much faster rewriting
space just freed than fresh space, so every contender gets the same start):

- wall time of the whole process (interpreter start and imports included);
- for loratool, also the engine's own time from its summary (`--json`): once as the CLI runs
  (the engine imports torch while the copy runs, so that time is inside), and once in a
  process that imported torch first (the engine alone, as the issue's goal defines it);
- peak private memory: RssAnon sampled from /proc every 5 ms (maxrss counts the mapped file
  pages of safetensors and misleads);
- maxrss (ru_maxrss from wait4).

Then checks that loratool's output is within 1 ulp of peft's, and merges a base 4× as deep to
show that private memory stays flat.

    .venv/bin/python benchmarks/bench_merge.py [--rounds 5] [--layers 20] [--workdir DIR] [--device cpu]
        [--case lora|dora|moe]

``--case dora``: the same r=16 factors with DoRA magnitudes (peft's ``use_dora``), merged beside
the plain LoRA of the same shape (``loratool merge, plain LoRA``): the goal is DoRA ≤ 1.3× the
plain merge, and the whole process ≥ 2.5× faster than peft's path for the DoRA adapter.
``--case moe``: a Qwen3-MoE-shaped base (experts stored per expert, as transformers 5 saves
them) and an adapter on q,k,v,o plus ``target_parameters`` on the fused experts (peft's layout:
A expert-major, B rank-major).

Prints a markdown table; with --write appends it to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from machine import append_to_benchmarks  # benchmarks/machine.py; scripts run from benchmarks/

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def build_base(
    path: Path,
    layers: int,
    hidden=2048,
    inter=5632,
    vocab=32000,
    heads=32,
    kv_heads=4,
    seed=0,
    reuse=None,
):
    import torch
    from safetensors.torch import save_file

    if (path / "model.safetensors").exists():
        return
    path.mkdir(parents=True, exist_ok=True)
    head_dim = hidden // heads
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    sd = {
        "model.embed_tokens.weight": rnd(vocab, hidden),
        "lm_head.weight": rnd(vocab, hidden),
        "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
    }
    layer0 = None
    for i in range(layers):
        if layer0 is None or reuse is None:
            layer = {
                "self_attn.q_proj.weight": rnd(hidden, hidden),
                "self_attn.k_proj.weight": rnd(kv_heads * head_dim, hidden),
                "self_attn.v_proj.weight": rnd(kv_heads * head_dim, hidden),
                "self_attn.o_proj.weight": rnd(hidden, hidden),
                "mlp.gate_proj.weight": rnd(inter, hidden),
                "mlp.up_proj.weight": rnd(inter, hidden),
                "mlp.down_proj.weight": rnd(hidden, inter),
                "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            }
            layer0 = layer
        for k, v in layer0.items():
            sd[f"model.layers.{i}.{k}"] = v if reuse is None else v.clone()
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
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
    (path / "config.json").write_text(json.dumps(config, indent=2))


def build_moe_base(path: Path, layers: int, hidden=2048, moe_inter=768, experts=16, vocab=32000):
    """A Qwen3-MoE-shaped bfloat16 base in the checkpoint layout (per-expert tensors)."""
    import torch
    from safetensors.torch import save_file

    if (path / "model.safetensors").exists():
        return
    path.mkdir(parents=True, exist_ok=True)
    heads, kv_heads, head_dim = 32, 4, 64
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    sd = {
        "model.embed_tokens.weight": rnd(vocab, hidden),
        "lm_head.weight": rnd(vocab, hidden),
        "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = rnd(heads * head_dim, hidden)
        sd[p + "self_attn.k_proj.weight"] = rnd(kv_heads * head_dim, hidden)
        sd[p + "self_attn.v_proj.weight"] = rnd(kv_heads * head_dim, hidden)
        sd[p + "self_attn.o_proj.weight"] = rnd(hidden, heads * head_dim)
        sd[p + "self_attn.q_norm.weight"] = torch.ones(head_dim, dtype=torch.bfloat16)
        sd[p + "self_attn.k_norm.weight"] = torch.ones(head_dim, dtype=torch.bfloat16)
        sd[p + "mlp.gate.weight"] = rnd(experts, hidden)
        for e in range(experts):
            sd[p + f"mlp.experts.{e}.gate_proj.weight"] = rnd(moe_inter, hidden)
            sd[p + f"mlp.experts.{e}.up_proj.weight"] = rnd(moe_inter, hidden)
            sd[p + f"mlp.experts.{e}.down_proj.weight"] = rnd(hidden, moe_inter)
        sd[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    config = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": hidden,
        "intermediate_size": moe_inter * 4,
        "moe_intermediate_size": moe_inter,
        "num_experts": experts,
        "num_experts_per_tok": 4,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))


def save_peft(path: Path, sd: dict, base: Path, r: int, extra: dict) -> None:
    """A PEFT adapter directory: ``sd`` and the config peft writes for q,k,v,o at alpha 32."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(sd, path / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": r,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
        **extra,
    }
    (path / "adapter_config.json").write_text(json.dumps(config))


def build_moe_adapter(path: Path, base: Path, r=16):
    """q,k,v,o LoRA plus target_parameters on the fused experts, laid out as peft saves it."""
    import torch

    if (path / "adapter_model.safetensors").exists():
        return
    cfg = json.loads((base / "config.json").read_text())
    hidden, layers, E = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_experts"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    inter = cfg["moe_intermediate_size"]
    g = torch.Generator().manual_seed(1)
    sd = {}
    for i in range(layers):
        for name, fan_in, out in (
            ("q_proj", hidden, q),
            ("k_proj", hidden, kv),
            ("v_proj", hidden, kv),
            ("o_proj", q, hidden),
        ):
            p = f"base_model.model.model.layers.{i}.self_attn.{name}"
            sd[p + ".lora_A.weight"] = torch.randn(r, fan_in, generator=g) * 0.01
            sd[p + ".lora_B.weight"] = torch.randn(out, r, generator=g) * 0.01
        p = f"base_model.model.model.layers.{i}.mlp.experts"
        # the inner wrapper (gate_up_proj, defined first) is one .base_layer deeper
        sd[p + ".base_layer.lora_A.weight"] = torch.randn(E * r, hidden, generator=g) * 0.01
        sd[p + ".base_layer.lora_B.weight"] = torch.randn(2 * inter, r * E, generator=g) * 0.01
        sd[p + ".lora_A.weight"] = torch.randn(E * r, inter, generator=g) * 0.01
        sd[p + ".lora_B.weight"] = torch.randn(hidden, r * E, generator=g) * 0.01
    extra = {"target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}
    save_peft(path, sd, base, r, extra)


def build_adapter(path: Path, base: Path, r=16, dora=False):
    import torch

    if (path / "adapter_model.safetensors").exists():
        return
    cfg = json.loads((base / "config.json").read_text())
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    g = torch.Generator().manual_seed(1)
    sd = {}
    for i in range(layers):
        for name, out in (("q_proj", hidden), ("k_proj", kv), ("v_proj", kv), ("o_proj", hidden)):
            p = f"base_model.model.model.layers.{i}.self_attn.{name}"
            sd[p + ".lora_A.weight"] = torch.randn(r, hidden, generator=g) * 0.01
            sd[p + ".lora_B.weight"] = torch.randn(out, r, generator=g) * 0.01
            if dora:  # peft starts m at the rows' norms (about 0.02·√hidden here), then trains
                m = 0.02 * hidden**0.5 * (1 + 0.1 * torch.randn(out, generator=g))
                sd[p + ".lora_magnitude_vector"] = m
    save_peft(path, sd, base, r, {"use_dora": dora})


ENGINE_SCRIPT = """
import sys, torch
from loratool.cli import main
sys.argv = ["loratool", *sys.argv[1:]]
main()
"""

PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter)
model = model.merge_and_unload()
model.save_pretrained(out)
"""


def run_measured(cmd: list[str], env=None) -> dict:
    """Run cmd, then sync; sample RssAnon of the child every 5 ms."""
    # Output goes to files, not pipes: a child that writes more than a pipe holds (a merge's
    # --json lists every tensor) would block while we wait for it to exit.
    out_f, err_f = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, env=env)
    peak = [0]
    done = threading.Event()

    def sample():
        status = f"/proc/{proc.pid}/status"
        while not done.is_set():
            try:
                with open(status) as fh:
                    for line in fh:
                        if line.startswith("RssAnon:"):
                            peak[0] = max(peak[0], int(line.split()[1]) * 1024)
                            break
            except OSError:
                break
            time.sleep(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4
    out_f.seek(0)
    err_f.seek(0)
    out, err = out_f.read().decode(), err_f.read().decode()
    out_f.close()
    err_f.close()
    subprocess.run(["sync"], check=True)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{cmd[:3]} failed ({code}):\n{err[-2000:]}")
    return {"wall": wall, "rss_anon": peak[0], "maxrss": usage.ru_maxrss * 1024, "stdout": out}


def rm(p: Path):
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


def gib(n):
    return f"{n / 2**30:.2f} GiB"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--workdir", default=str(ROOT / "benchmarks" / "_work"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pause", type=float, default=2.0, help="seconds of idle disk before each run")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--skip-grow", action="store_true")
    ap.add_argument("--write", action="store_true", help="append the table to docs/BENCHMARKS.md")
    ap.add_argument("--case", choices=("lora", "dora", "moe"), default="lora")
    ap.add_argument("--build", nargs=3, metavar=("DIR", "LAYERS", "REUSE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build:  # runs in a child, so that this process never holds torch or the tensors
        d = Path(args.build[0])
        if args.case == "moe":
            build_moe_base(d / "base", int(args.build[1]))
            build_moe_adapter(d / "adapter", d / "base")
            return
        build_base(d / "base", int(args.build[1]), reuse=True if args.build[2] == "1" else None)
        build_adapter(d / "adapter", d / "base")
        if args.case == "dora":
            build_adapter(d / "adapter-dora", d / "base", dora=True)
        return
    work = Path(args.workdir) / args.case if args.case != "lora" else Path(args.workdir)
    base, adapter = work / "base", work / "adapter"
    plain = adapter
    if args.case == "dora":
        adapter = work / "adapter-dora"
    print("building inputs…", file=sys.stderr)
    # ru_maxrss of a child starts at its parent's RSS when it forked (Linux copies the
    # high-water mark across exec), so the parent must stay small: build in a subprocess.
    subprocess.run(
        [PY, __file__, "--build", str(work), str(args.layers), "0", "--case", args.case],
        check=True,
    )
    size = (base / "model.safetensors").stat().st_size
    tail = ["merge", str(base), str(adapter), "--device", args.device, "--json", "-o"]
    loratool = [PY, "-m", "loratool", *tail]
    # The engine's own time, as its summary line reports it, with torch imported beforehand:
    # as the CLI runs, the engine imports torch while it copies, so its summary includes that.
    preloaded = [PY, "-c", ENGINE_SCRIPT, *tail]
    results = {
        "cp -r": [],
        "loratool merge": [],
        "loratool engine": [],
        "peft merge_and_unload": [],
    }
    if args.case == "dora":
        results["loratool plain"] = []  # the same factors without magnitudes
    engine = []
    engine_cli = []
    engine_plain = []
    for rnd in range(args.rounds):
        order = list(results)
        order = order[rnd % len(order) :] + order[: rnd % len(order)]  # alternate who goes first
        for name in order:
            if name.startswith("peft") and args.skip_peft:
                continue
            out = (
                work / f"out-{name.split()[0]}-{name.split()[1]}"
                if name.startswith("loratool")
                else work / f"out-{name.split()[0]}"
            )
            rm(out)
            # every contender starts alike: its previous output deleted, the disk idle
            subprocess.run(["sync"], check=True)
            time.sleep(args.pause)
            if name == "cp -r":
                m = run_measured(["cp", "-r", str(base), str(out)])
            elif name == "loratool merge":
                m = run_measured(loratool + [str(out)])
                engine_cli.append(json.loads(m["stdout"])["seconds"])
            elif name == "loratool engine":
                m = run_measured(preloaded + [str(out)])
                engine.append(json.loads(m["stdout"])["seconds"])
            elif name == "loratool plain":
                tail_plain = ["merge", str(base), str(plain), "--device", args.device, "--json"]
                m = run_measured([PY, "-c", ENGINE_SCRIPT, *tail_plain, "-o", str(out)])
                engine_plain.append(json.loads(m["stdout"])["seconds"])
            else:
                m = run_measured([PY, "-c", PEFT_SCRIPT, str(base), str(adapter), str(out)])
            results[name].append(m)
            print(
                f"round {rnd} {name}: {m['wall']:.2f} s, RssAnon {gib(m['rss_anon'])}",
                file=sys.stderr,
            )
    grow_line = ""
    if not args.skip_grow and args.case == "lora":
        subprocess.run(
            [PY, __file__, "--build", str(work / "grow"), str(args.layers * 4), "1"], check=True
        )
        big, big_adapter = work / "grow" / "base", work / "grow" / "adapter"
        big_size = (big / "model.safetensors").stat().st_size
        rm(work / "out-4x")
        m = run_measured(
            [
                PY,
                "-m",
                "loratool",
                "merge",
                str(big),
                str(big_adapter),
                "--device",
                args.device,
                "--json",
                "-o",
                str(work / "out-4x"),
            ]
        )
        rm(work / "out-4x")
        grow_line = (
            f"Base 4× as deep ({big_size / 1e9:.1f} GB): loratool merge {m['wall']:.2f} s wall "
            f"(engine {json.loads(m['stdout'])['seconds']:.2f} s), peak RssAnon {gib(m['rss_anon'])}, maxrss {gib(m['maxrss'])}."
        )
        print(grow_line, file=sys.stderr)
    # accuracy against peft's output
    ulp_line = ""
    if not args.skip_peft:
        sys.path.insert(0, str(ROOT))
        import math

        import torch
        from safetensors import safe_open

        from loratool.merge import ulp_distance

        ours = work / "out-loratool-merge" / "model.safetensors"
        theirs_dir = work / "out-peft"
        theirs_files = sorted(theirs_dir.glob("*.safetensors"))
        worst, differing, within, total, at_scale = 0, 0, 0, 0, 0.0
        with safe_open(ours, "pt") as fo:
            for tf in theirs_files:
                with safe_open(tf, "pt") as ft:
                    for k in ft.keys():
                        a = fo.get_tensor(k)
                        b = ft.get_tensor(k).to(a.dtype)
                        d = ulp_distance(a, b)
                        worst = max(worst, int(d.max()))
                        differing += int((d > 0).sum())
                        within += int((d <= 1).sum())
                        total += d.numel()
                        # ulps of an element's own value explode near zero (a sign change
                        # crosses every subnormal): measure at the tensor's scale as well,
                        # as `unmerge --check` does
                        top = float(b.float().abs().max())
                        if top > 0:
                            step = torch.finfo(b.dtype).eps * 2.0 ** (math.frexp(top)[1] - 1)
                            err = float((a.double() - b.double()).abs().max())
                            at_scale = max(at_scale, err / step)
        ulp_line = (
            f"Output vs peft's: {differing} of {total} elements differ, {total - within} by more "
            f"than 1 ulp of their own value (max {worst}, near zero); the largest difference is "
            f"{at_scale:.2f} ulp at its tensor's scale."
        )
        print(ulp_line, file=sys.stderr)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    cp_wall = med([m["wall"] for m in results["cp -r"]])
    lines = [
        f"Base: {'Qwen3-MoE' if args.case == 'moe' else 'Llama'}-shaped, {args.layers} layers, bfloat16, {size / 1e9:.2f} GB in one file; "
        f"adapter r=16 on q,k,v,o{' with DoRA magnitudes' if args.case == 'dora' else ''}"
        f"{' and target_parameters on the fused experts' if args.case == 'moe' else ''}, float32. "
        f"Device: {args.device}. Median of {args.rounds} rounds, alternating order; before each run its previous "
        f"output is deleted, `sync`, {args.pause:g} s pause; each process is followed by `sync`.",
        "",
        "| contender | wall (s) | vs cp | peak RssAnon | maxrss |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, ms in results.items():
        if not ms or name == "loratool engine":
            continue
        w = med([m["wall"] for m in ms])
        lines.append(
            f"| {name} | {w:.2f} | {w / cp_wall:.2f}× | {gib(med([m['rss_anon'] for m in ms]))} | {gib(med([m['maxrss'] for m in ms]))} |"
        )
    if engine:
        lines.append(
            f"| loratool merge, engine only (its summary line, torch imported beforehand) | {med(engine):.2f} | {med(engine) / cp_wall:.2f}× | | |"
        )
    if engine_cli:
        lines.append(
            f"| loratool merge, its summary line as run above (torch imported during the copy) | {med(engine_cli):.2f} | {med(engine_cli) / cp_wall:.2f}× | | |"
        )
    if engine_plain and engine:
        lines.append(
            f"| loratool merge of the same factors as plain LoRA, engine only | {med(engine_plain):.2f} | {med(engine_plain) / cp_wall:.2f}× | | |"
        )
        lines.append("")
        lines.append(
            f"DoRA costs {med(engine) / med(engine_plain):.2f}× the plain LoRA merge (engine, torch "
            "preloaded; goal ≤ 1.3×)."
        )
    if results["peft merge_and_unload"]:
        pw = med([m["wall"] for m in results["peft merge_and_unload"]])
        lw = med([m["wall"] for m in results["loratool merge"]])
        lines.append("")
        lines.append(f"Whole process: loratool is {pw / lw:.1f}× faster than peft's path.")
    for extra in (ulp_line, grow_line):
        if extra:
            lines.append(extra)
    table = "\n".join(lines)
    print(table)
    if args.write:
        cmd = "    " + " ".join(["python", "benchmarks/bench_merge.py", *sys.argv[1:]])
        append_to_benchmarks(
            f"## merge ({time.strftime('%Y-%m-%d')}, {os.uname().machine}, {os.cpu_count()} cores)\n\n{cmd}\n\n{table}\n"
        )
    for name in (
        "out-cp",
        "out-loratool-merge",
        "out-loratool-engine",
        "out-loratool-plain",
        "out-peft",
    ):
        rm(work / name)


if __name__ == "__main__":
    main()
