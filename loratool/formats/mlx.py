"""mlx-lm's adapter directory: ``adapters.safetensors`` + ``adapter_config.json``.

As mlx-lm 0.32 defines it (``tuner/lora.py``, ``tuner/utils.py``): ``LoRALinear`` holds
``lora_a`` (in × r) and ``lora_b`` (r × out) and adds ``scale · (x @ lora_a) @ lora_b``, so
ΔW = scale · lora_bᵀ·lora_aᵀ, i.e. A = lora_aᵀ, B = lora_bᵀ with an absolute ``scale`` (not
alpha / r); ``LoRAEmbedding`` adds ``scale · lora_a @ lora_b`` (num_embeddings × r, r × dims).
``load_adapters`` reads ``fine_tune_type``, ``num_layers`` and ``lora_parameters`` (``rank``,
``scale``, ``dropout``, optional ``keys``), wraps the ``keys`` of the last ``num_layers``
layers (-1: all) at that one rank and scale, and loads the tensors by parameter path
(``model.layers.0.self_attn.q_proj.lora_a``), shapes checked.

One rank and one scale per file: modules of lower rank are zero-padded (exact), and a module of
another scale has its B multiplied by the ratio (exact only for powers of two; warned).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from ..adapter import Adapter, AdapterMeta, LoraModule, build_module
from ..errors import FormatError, ValidationError
from ..tensors.io import load_file, save_file
from .registry import Format, WriteContext, register

CONFIG = "adapter_config.json"
WEIGHTS = "adapters.safetensors"
_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "token_embedding", "tok_embeddings")


def is_mlx_config(cfg: Path) -> bool:
    try:
        obj = json.loads(Path(cfg).read_text())
    except (OSError, ValueError, RecursionError):  # not mlx's: the reader that claims it says why
        return False
    return isinstance(obj, dict) and ("lora_parameters" in obj or "fine_tune_type" in obj)


def alpha_for_scale(scale: float, rank: int) -> float:
    """An alpha whose alpha / rank is ``scale`` exactly in float64 (nearest neighbours of
    scale·rank are tried when the product rounds)."""
    alpha = scale * rank
    for _ in range(4):
        if alpha / rank == scale:
            return alpha
        alpha = math.nextafter(alpha, math.inf if alpha / rank < scale else -math.inf)
    return scale * rank


def read_mlx(folder: Path, lazy: bool = False) -> Adapter:
    cfg_path = folder / CONFIG
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise FormatError("not valid JSON", file=cfg_path) from exc
    ftype = config.get("fine_tune_type", "lora")
    if ftype != "lora":
        raise ValidationError(
            f"fine_tune_type is {ftype!r}; only mlx-lm LoRA adapters are supported", file=cfg_path
        )
    params = config.get("lora_parameters") or {}
    if "scale" not in params or "rank" not in params:
        raise ValidationError("lora_parameters needs rank and scale", file=cfg_path)
    scale, rank = float(params["scale"]), int(params["rank"])
    weights = folder / WEIGHTS
    if not weights.exists():
        raise FormatError(f"no {WEIGHTS}", file=folder)
    tensors, _ = load_file(weights, lazy=lazy)
    pairs: dict[str, dict] = {}
    for key, t in tensors.items():
        path, _, leaf = key.rpartition(".")
        if leaf not in ("lora_a", "lora_b"):
            raise ValidationError(
                "not an mlx-lm LoRA tensor (lora_a / lora_b; DoRA's m is not supported)",
                file=weights,
                tensor=key,
            )
        pairs.setdefault(path, {})[leaf] = t
    modules: dict[str, LoraModule] = {}
    for path, p in pairs.items():
        if set(p) != {"lora_a", "lora_b"}:
            raise ValidationError(
                f"has no matching {'lora_b' if 'lora_a' in p else 'lora_a'}",
                file=weights,
                tensor=f"{path}.{next(iter(p))}",
            )
        a, b = _t(p["lora_a"]), _t(p["lora_b"])
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
            raise ValidationError(
                f"lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)} do not chain",
                file=weights,
                tensor=path,
            )
        if a.shape[1] != rank:
            raise ValidationError(
                f"{CONFIG} says rank {rank} but the tensors have rank {a.shape[1]}",
                file=weights,
                tensor=path + ".lora_a",
            )
        kind = "embedding" if path.rsplit(".", 1)[-1] in _EMBEDDINGS else "linear"
        name = path + ".weight"
        modules[name] = build_module(
            name,
            kind,
            a.T.contiguous(),
            b.T.contiguous(),
            alpha_for_scale(scale, rank),
            source=weights,
        )
    if not modules:
        raise ValidationError("holds no LoRA tensors", file=weights)
    meta = AdapterMeta(base_model=config.get("model"), format="mlx")
    return Adapter(modules, meta, {"mlx_config": config})


def _t(x):
    from ..tensors.io import materialize

    return materialize(x)


def write_mlx(adapter: Adapter, dest: Path, ctx: WriteContext) -> None:
    import torch

    from .builtin import single_model

    adapter = single_model(adapter, ctx, "MLX")
    mods = [m.materialized() for m in adapter.modules.values()]
    for m in mods:
        if m.kind == "conv2d":
            raise ValidationError("mlx-lm's LoRA has no conv layers", tensor=m.name)
    rank = max(m.rank for m in mods)
    scales = Counter(m.scale for m in mods)
    scale = scales.most_common(1)[0][0]
    tensors = {}
    keys = set()
    folded = []
    for m in mods:
        A, B = m.A, m.B
        if m.rank < rank:
            # zero rows of A and columns of B add nothing to B·A: exact
            A = torch.cat([A, A.new_zeros(rank - m.rank, A.shape[1])])
            B = torch.cat([B, B.new_zeros(B.shape[0], rank - m.rank)], dim=1)
            ctx.warn(f"ranks differ: lower-rank modules zero-padded to rank {rank} (exact)")
        if m.scale != scale:
            ratio = m.scale / scale
            B = (B.to(torch.float64) * ratio).to(B.dtype)
            if not (ratio > 0 and math.log2(abs(ratio)).is_integer()):
                folded.append(m.name)
        # Linear and fan_in_fan_out modules are both a Linear in mlx (out × in): A, B as is.
        path = m.name.removesuffix(".weight")
        tensors[path + ".lora_a"] = A.T.contiguous()
        tensors[path + ".lora_b"] = B.T.contiguous()
        parts = path.split(".")
        if "layers" in parts and parts.index("layers") + 2 <= len(parts) - 1:
            i = parts.index("layers")
            keys.add(".".join(parts[i + 2 :]) if parts[i + 1].isdigit() else path)
        else:
            keys.add(path)
    if folded:
        ctx.warn(
            f"mlx-lm has one scale per adapter ({scale:g}); B of {len(folded)} modules rescaled "
            f"and rounded to its dtype (approximate): {', '.join(folded[:5])}"
        )
    if any(m.rslora for m in mods):
        ctx.warn("rsLoRA scales carried in mlx-lm's absolute scale (exact)")
    config = {
        "fine_tune_type": "lora",
        "num_layers": -1,
        "lora_parameters": {
            "rank": rank,
            "scale": scale,
            "dropout": 0.0,
            "keys": sorted(keys),
        },
    }
    from .training import training_of

    base = adapter.meta.base_model or training_of(adapter).get("base_model")
    if base:
        config["model"] = base
    dest.mkdir(exist_ok=True)
    (dest / CONFIG).write_text(json.dumps(dict(sorted(config.items())), indent=4) + "\n")
    save_file(tensors, dest / WEIGHTS, metadata={"format": "mlx"})


def _detect(path: Path, header) -> bool:
    if path.is_dir():
        return (path / WEIGHTS).is_file() and is_mlx_config(path / CONFIG)
    return path.name == WEIGHTS and is_mlx_config(path.parent / CONFIG)


def _read(path: Path, lazy: bool) -> Adapter:
    return read_mlx(path if path.is_dir() else path.parent, lazy)


FORMAT = register(
    Format(
        name="mlx",
        help="an mlx-lm adapter directory (adapters.safetensors + adapter_config.json)",
        layout="dir",
        detect=_detect,
        read=_read,
        write=write_mlx,
        priority=5,
        weights=WEIGHTS,
    )
)
