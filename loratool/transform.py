"""Adapter-level rank operations: inspect, resize, extract, combine.

The math lives in ``rank.py`` and ``combine.py`` as pure functions on 2-D factors; this module
maps every layer kind onto them and back:

- linear, linear_fifo and embedding keep PEFT's (B, A) layout, B d×r, A r×k; the stored ΔW
  is B·A or its transpose, which has the same singular values, so one path serves all three.
- conv2d flattens A (r×in×kh×kw) to r×(in·kh·kw) and B (out×r×1×1) to out×r, and reshapes
  the results back.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
import statistics
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .adapter import Adapter, AdapterMeta, LoraModule
from .errors import ValidationError


def factors_2d(mod: LoraModule):
    if mod.kind == "conv2d":
        return mod.B.flatten(1).float(), mod.A.flatten(1).float()
    return mod.B.float(), mod.A.float()


def module_from_2d(
    template: LoraModule, B, A, scale: float = 1.0, *, rslora: bool | None = None
) -> LoraModule:
    """A module of ``template``'s kind and shape whose ΔW is scale·B·A (B, A 2-D, float32)."""
    rslora = template.rslora if rslora is None else rslora
    k = A.shape[0]
    if template.kind == "conv2d":
        A = A.reshape(k, *template.A.shape[1:])
        B = B.reshape(B.shape[0], k, 1, 1)
    alpha = scale * (math.sqrt(k) if rslora else k)
    return LoraModule(template.name, template.kind, A.contiguous(), B.contiguous(), alpha, rslora)


def layer_kind(name: str) -> str:
    """The module's role (q_proj, c_attn, …): the path's last component before ``.weight``."""
    return name.removesuffix(".weight").rsplit(".", 1)[-1]


# -- inspect -------------------------------------------------------------------------------


def inspect(adapter: Adapter, *, threshold: float = 0.99, module_glob: str | None = None) -> dict:
    from .rank import rank_report

    if not 0 < threshold <= 1:
        raise ValidationError(f"--threshold must be in (0, 1], got {threshold}")
    modules = []
    for name, mod in adapter.modules.items():
        if module_glob and not fnmatch.fnmatchcase(name, module_glob):
            continue
        B, A = factors_2d(mod)
        rep = rank_report(B, A, mod.scale, threshold=threshold)
        rep = {"name": name, "kind": mod.kind, **rep}
        rep["shape"] = list(mod.base_shape)
        rep["rank"] = mod.rank
        modules.append(rep)
    if not modules:
        raise ValidationError(
            f"no module matches {module_glob!r}" if module_glob else "the adapter has no modules"
        )
    by_kind: dict[str, list[dict]] = {}
    for m in modules:
        by_kind.setdefault(layer_kind(m["name"]), []).append(m)

    def stats(ms: list[dict]) -> dict:
        return {
            "modules": len(ms),
            "rank": max(m["rank"] for m in ms),
            "numerical_rank_max": max(m["numerical_rank"] for m in ms),
            "energy_rank_max": max(m["energy_rank"] for m in ms),
            "energy_rank_median": statistics.median(m["energy_rank"] for m in ms),
            "stable_rank_mean": statistics.fmean(m["stable_rank"] for m in ms),
            "entropy_rank_mean": statistics.fmean(m["entropy_rank"] for m in ms),
        }

    summary = stats(modules)
    summary["threshold"] = threshold
    summary["suggested_rank"] = max(1, summary["energy_rank_max"])
    summary["by_layer_kind"] = {k: stats(v) for k, v in sorted(by_kind.items())}
    return {"modules": modules, "summary": summary}


# -- resize --------------------------------------------------------------------------------


def resize(
    adapter: Adapter, *, rank: int | None = None, energy: float | None = None, progress=None
) -> tuple[Adapter, dict[str, float]]:
    """Truncate every module by SVD to ``rank`` or to the fewest σ holding ``energy``.

    The factors become B' = U√S, A' = √S·Vᵀ (divided by √scale) and alpha is rescaled so that
    each module's scale, and so its ΔW up to the truncation, is kept.
    """
    from .rank import truncate

    _one_of(rank, energy)
    progress = progress or (lambda n=1, label=None: None)
    mods, kept = {}, {}
    for name, mod in adapter.modules.items():
        B, A = factors_2d(mod)
        r = min(rank, mod.rank) if rank is not None else None
        B2, A2, k_energy = truncate(B, A, mod.scale, rank=r, energy=energy)
        s = mod.scale if mod.scale > 0 else 1.0
        root = math.sqrt(s)
        new = module_from_2d(mod, B2 / root, A2 / root, s)
        new = replace(new, A=new.A.to(mod.A.dtype), B=new.B.to(mod.B.dtype))
        mods[name] = new
        kept[name] = float(k_energy)
        progress(1, name)
    meta = replace(
        adapter.meta, name=None, source=f"resize of {adapter.meta.name or adapter.meta.source}"
    )
    origin = {k: v for k, v in adapter.origin.items() if k != "peft_config"}
    if "peft_config" in adapter.origin:
        origin["peft_config_base"] = {
            k: adapter.origin["peft_config"].get(k)
            for k in ("task_type", "base_model_name_or_path", "revision")
        }
    return Adapter(mods, meta, origin), kept


def _one_of(rank, energy) -> None:
    if (rank is None) == (energy is None):
        raise ValidationError("give exactly one of --rank and --energy")
    if rank is not None and rank < 1:
        raise ValidationError(f"--rank must be at least 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise ValidationError(f"--energy must be in (0, 1], got {energy}")


# -- extract -------------------------------------------------------------------------------

_CONV1D_NAMES = re.compile(r"\.(c_attn|c_proj|c_fc|q_attn)\.weight$")
_EMBED_NAMES = re.compile(
    r"(embed_tokens|word_embeddings|wte|wpe|embed_positions|shared|embeddings?)\.weight$"
)


def _model_type(root: Path) -> str | None:
    import json

    cfg = (root if root.is_dir() else root.parent) / "config.json"
    try:
        return json.loads(cfg.read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def extract(
    base_path: str | os.PathLike,
    finetuned_path: str | os.PathLike,
    *,
    rank: int | None = None,
    energy: float | None = None,
    device: str = "auto",
    progress: Callable | None = None,
) -> tuple[Adapter, dict[str, float]]:
    """A LoRA from ΔW = W_finetuned − W_base, one tensor pair at a time.

    Every 2-D or 4-D floating tensor pair that differs becomes a module; 1-D tensors (norms,
    biases) cannot be expressed as LoRA and are reported by the caller if they differ. Returns
    the adapter (scale 1: alpha = r) and the relative Frobenius error of each module.
    """
    import torch

    from .merge import pick_device
    from .rank import lowrank_from_dense
    from .tensors.header import FLOAT_DTYPES, read_base
    from .tensors.io import read_tensor

    _one_of(rank, energy)
    dev = pick_device(device)
    base = read_base(base_path)
    ft = read_base(finetuned_path)
    missing = sorted(set(base.tensors) ^ set(ft.tensors))
    if missing:
        raise ValidationError(
            "the two models hold different tensors", file=finetuned_path, tensor=missing[0]
        )
    gpt2 = _model_type(ft.root) == "gpt2" or _model_type(base.root) == "gpt2"
    progress = progress or (lambda n=1, label=None: None)
    modules: dict[str, LoraModule] = {}
    errors: dict[str, float] = {}
    skipped: list[str] = []
    for name, binfo in base.tensors.items():
        finfo = ft.tensors[name]
        if finfo.shape != binfo.shape:
            raise ValidationError(
                f"shape {list(finfo.shape)} in the fine-tuned model, {list(binfo.shape)} in the base",
                file=finetuned_path,
                tensor=name,
            )
        if binfo.dtype not in FLOAT_DTYPES or len(binfo.shape) not in (1, 2, 4):
            progress(1, name)
            continue
        wb = read_tensor(binfo).to(dev)
        wf = read_tensor(finfo).to(dev)
        delta = wf.to(torch.float32) - wb.to(torch.float32)
        del wb, wf
        if not bool(delta.any()):
            progress(1, name)
            continue
        if delta.dim() == 1:
            skipped.append(name)
            progress(1, name)
            continue
        if delta.dim() == 4:
            kind, mat = "conv2d", delta.flatten(1)
        elif _EMBED_NAMES.search(name):
            kind, mat = "embedding", delta.T  # PEFT keeps B·A = ΔWᵀ for embeddings
        elif gpt2 and _CONV1D_NAMES.search(name):
            kind, mat = "linear_fifo", delta.T  # Conv1D stores in×out
        else:
            kind, mat = "linear", delta
        B, A, err = lowrank_from_dense(mat, rank=rank, energy=energy)
        B, A = B.to("cpu", torch.float32), A.to("cpu", torch.float32)
        k = A.shape[0]
        if kind == "conv2d":
            A = A.reshape(k, *delta.shape[1:])
            B = B.reshape(delta.shape[0], k, 1, 1)
        modules[name] = LoraModule(name, kind, A.contiguous(), B.contiguous(), float(k))
        errors[name] = float(err)
        progress(1, name)
    if not modules:
        raise ValidationError(
            "the two models are identical in every 2-D tensor: nothing to extract",
            file=finetuned_path,
        )
    meta = AdapterMeta(
        base_model=str(base_path), source=f"extract {finetuned_path}", format="loratool"
    )
    adapter = Adapter(modules, meta, {"format": "loratool", "extract_skipped_1d": skipped})
    return adapter, errors


# -- combine -------------------------------------------------------------------------------

METHODS = ("linear", "cat", "svd", "ties", "dare")


def combine(
    inputs: list[tuple[Adapter, float]],
    method: str,
    *,
    rank: int | None = None,
    density: float = 0.5,
    seed: int = 0,
) -> tuple[Adapter, dict[str, float]]:
    """One adapter from several; each adapter's own scale is applied exactly once.

    Returns the adapter and, for re-factored methods, each module's relative error against the
    combination it stands for (0 for the exact methods).
    """
    from . import combine as cm

    if method not in METHODS:
        raise ValidationError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if len(inputs) < 1:
        raise ValidationError("give at least one adapter")
    if method in ("svd", "ties", "dare") and rank is None:
        raise ValidationError(f"--method {method} needs --rank")
    if method in ("ties", "dare") and not 0 < density <= 1:
        raise ValidationError(f"--density must be in (0, 1], got {density}")
    bases = {
        a.meta.base_model.rstrip("/").rsplit("/", 1)[-1] for a, _ in inputs if a.meta.base_model
    }
    if len(bases) > 1:
        raise ValidationError(f"the adapters are for different bases: {', '.join(sorted(bases))}")
    names: list[str] = []
    for a, _ in inputs:
        names += [n for n in a.modules if n not in names]
    modules, errors = {}, {}
    for name in names:
        present = [(a.modules[name], w) for a, w in inputs if name in a.modules]
        first = present[0][0]
        for m, _ in present[1:]:
            if m.base_shape != first.base_shape or m.kind != first.kind:
                raise ValidationError(
                    f"shapes differ between adapters: {list(first.base_shape)} ({first.kind}) vs {list(m.base_shape)} ({m.kind})",
                    tensor=name,
                )
        parts = [(*factors_2d(m), m.scale, w) for m, w in present]
        err = 0.0
        if method == "cat":
            B, A = cm.combine_cat(parts)
        elif method == "linear":
            B, A = cm.combine_linear(parts)
        elif method == "svd":
            B, A, err = cm.combine_svd(parts, rank)
        elif method == "ties":
            B, A, err = cm.combine_ties(parts, rank, density)
        else:
            B, A, err = cm.combine_dare(parts, rank, density, seed)
        modules[name] = module_from_2d(first, B.float(), A.float(), 1.0, rslora=False)
        errors[name] = float(err)
    base_model = next((a.meta.base_model for a, _ in inputs if a.meta.base_model), None)
    meta = AdapterMeta(
        base_model=base_model, format="loratool", source=f"combine --method {method}"
    )
    return Adapter(modules, meta, {"format": "loratool"}), errors
