"""PEFT's on-disk layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` and, for
embeddings, ``base_model.model.<path>.lora_embedding_A`` / ``lora_embedding_B`` (no ``.weight``).
The module path is what ``named_modules()`` of the wrapped model calls it, so the base tensor is
``<path>.weight``. Rank and alpha may differ per module through ``rank_pattern`` /
``alpha_pattern``, whose keys match a module path as PEFT's ``get_pattern_key`` does:
``re.match(rf"(.*\\.)?({key})$", path)``, first match in the dict's order wins.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from ..adapter import Adapter, AdapterMeta, LoraModule, build_module
from ..errors import FormatError, ValidationError
from ..tensors.header import refuse_pickle
from ..tensors.io import load_file, save_file

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."

_LORA_KEY = re.compile(r"^(?P<path>.+)\.(?P<which>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_EMB_KEY = re.compile(r"^(?P<path>.+)\.lora_embedding_(?P<which>A|B)(?:\.(?P<adapter>[^.]+))?$")
_UNSUPPORTED = (
    ("lora_magnitude_vector", "DoRA magnitude vectors are not supported"),
    ("lora_bias", "LoRA bias terms are not supported"),
)

# The fields peft writes for a LoraConfig; used when an adapter has no config of its own.
DEFAULT_CONFIG: dict[str, Any] = {
    "peft_type": "LORA",
    "task_type": None,
    "base_model_name_or_path": None,
    "revision": None,
    "r": 8,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "target_modules": [],
    "fan_in_fan_out": False,
    "bias": "none",
    "use_rslora": False,
    "use_dora": False,
    "modules_to_save": None,
    "init_lora_weights": True,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "inference_mode": True,
}


def is_peft_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).exists()


def pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return patterns[key]
    return default


def read_peft(path: Path, *, lazy: bool = False) -> Adapter:
    path = Path(path)
    cfg_path = path / CONFIG
    try:
        config = json.loads(cfg_path.read_text())
    except FileNotFoundError as exc:
        raise FormatError(f"no {CONFIG}: not a PEFT adapter directory", file=path) from exc
    except (OSError, ValueError) as exc:
        raise FormatError("not valid JSON", file=cfg_path) from exc
    if not isinstance(config, dict):
        raise FormatError("not a JSON object", file=cfg_path)
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValidationError(
            f"peft_type is {peft_type}; only LORA adapters are supported", file=cfg_path
        )
    if config.get("use_dora"):
        raise ValidationError("DoRA adapters (use_dora) are not supported", file=cfg_path)
    weights = path / WEIGHTS
    if not weights.exists():
        for name in ("adapter_model.bin", "adapter_model.pt"):
            if (path / name).exists():
                refuse_pickle(path / name)
        raise FormatError(f"no {WEIGHTS}", file=path)
    tensors, _ = load_file(weights, lazy=lazy)
    return peft_from_tensors(tensors, config, source=weights)


def peft_from_tensors(tensors: dict, config: dict, *, source: object) -> Adapter:
    pairs: dict[str, dict[str, Any]] = {}
    saved_base: dict[str, Any] = {}
    for key, t in tensors.items():
        if key.endswith(".base_layer.weight"):
            # peft's save_embedding_layers stores the (possibly resized) full embedding and
            # lm_head next to the LoRA factors. They are not part of ΔW: carry them unchanged
            # so that the PEFT layout round-trips, and leave the base's own weights to merges.
            saved_base[key] = t
            continue
        for marker, why in _UNSUPPORTED:
            if marker in key:
                raise ValidationError(why, file=source, tensor=key)
        m = _LORA_KEY.match(key)
        kind = None
        if m:
            kind = "linear"
        else:
            m = _EMB_KEY.match(key)
            if m:
                kind = "embedding"
        if m is None:
            raise ValidationError(
                "not a LoRA tensor (full weights from modules_to_save are not supported)",
                file=source,
                tensor=key,
            )
        path = m.group("path").removeprefix(PREFIX)
        which = m.group("which")[-1]
        entry = pairs.setdefault(path, {"kind": kind})
        if entry["kind"] != kind:
            raise ValidationError("mixes lora_A/B and lora_embedding_A/B", file=source, tensor=key)
        if which in entry:
            raise ValidationError("stored twice (several adapter names?)", file=source, tensor=key)
        entry[which] = t
        entry[which + "_key"] = key
    r_default = config.get("r", 8)
    alpha_default = config.get("lora_alpha", 8)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    fifo = bool(config.get("fan_in_fan_out", False))
    rslora = bool(config.get("use_rslora", False))
    modules: dict[str, LoraModule] = {}
    for path, entry in pairs.items():
        name = path + ".weight"
        for which in "AB":
            if which not in entry:
                other = entry["A_key" if which == "B" else "B_key"]
                raise ValidationError(f"has no matching lora_{which}", file=source, tensor=other)
        A, B = entry["A"], entry["B"]
        kind = entry["kind"]
        if kind == "linear":
            if A.dim() == 4:
                kind = "conv2d"
            elif fifo:
                kind = "linear_fifo"
        alpha = pattern_value(alpha_pattern, path, alpha_default)
        mod = build_module(name, kind, A, B, alpha, rslora, source=source)
        declared = pattern_value(rank_pattern, path, r_default)
        if mod.rank != declared:
            raise ValidationError(
                f"adapter_config.json says r={declared} but the tensors have rank {mod.rank}",
                file=source,
                tensor=entry["A_key"],
            )
        modules[name] = mod
    if not modules:
        raise ValidationError("holds no LoRA tensors", file=source)
    meta = AdapterMeta(base_model=config.get("base_model_name_or_path"), format="peft")
    return Adapter(modules, meta, {"peft_config": config}, extra_tensors=saved_base)


def module_path(name: str) -> str:
    return name.removesuffix(".weight")


def build_config(adapter: Adapter) -> dict[str, Any]:
    """The adapter_config.json for ``adapter``: its original one when it still describes the
    modules exactly (so round trips are lossless), else one rebuilt from the modules."""
    original = adapter.origin.get("peft_config")
    mods = list(adapter.modules.values())
    if original is not None and _config_fits(original, mods):
        config = dict(original)
        if adapter.meta.base_model:
            config["base_model_name_or_path"] = adapter.meta.base_model
        return config
    config = dict(DEFAULT_CONFIG)
    if original:
        for key in ("task_type", "base_model_name_or_path", "revision", "bias"):
            if key in original:
                config[key] = original[key]
    if adapter.meta.base_model:
        config["base_model_name_or_path"] = adapter.meta.base_model
    ranks = Counter(m.rank for m in mods)
    alphas = Counter(m.alpha for m in mods)
    r = ranks.most_common(1)[0][0] if ranks else 8
    alpha = alphas.most_common(1)[0][0] if alphas else r
    config["r"] = r
    config["lora_alpha"] = int(alpha) if float(alpha).is_integer() else alpha
    # Patterns keyed by the full path: PEFT's (.*\.)?(key)$ matches it exactly (dots in the
    # key match themselves too).
    config["rank_pattern"] = {module_path(m.name): m.rank for m in mods if m.rank != r}
    config["alpha_pattern"] = {
        module_path(m.name): (int(m.alpha) if m.alpha.is_integer() else m.alpha)
        for m in mods
        if m.alpha != alpha
    }
    config["use_rslora"] = any(m.rslora for m in mods)
    config["fan_in_fan_out"] = any(m.kind == "linear_fifo" for m in mods)
    config["target_modules"] = sorted({module_path(m.name).rsplit(".", 1)[-1] for m in mods})
    return config


def _config_fits(config: dict, mods: list[LoraModule]) -> bool:
    r = config.get("r", 8)
    alpha = config.get("lora_alpha", 8)
    rp = config.get("rank_pattern") or {}
    ap = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    fifo = bool(config.get("fan_in_fan_out", False))
    for m in mods:
        p = module_path(m.name)
        if pattern_value(rp, p, r) != m.rank or float(pattern_value(ap, p, alpha)) != m.alpha:
            return False
        if (
            m.rslora != rslora
            or (m.kind == "linear_fifo") != fifo
            and m.kind in ("linear", "linear_fifo")
        ):
            return False
    return True


def peft_tensors(adapter: Adapter) -> dict:
    out = {}
    for m in adapter.modules.values():
        p = PREFIX + module_path(m.name)
        if m.kind == "embedding":
            out[p + ".lora_embedding_A"] = m.A
            out[p + ".lora_embedding_B"] = m.B
        else:
            out[p + ".lora_A.weight"] = m.A
            out[p + ".lora_B.weight"] = m.B
    out.update(adapter.extra_tensors)
    return out


def write_peft_files(adapter: Adapter, folder: Path) -> None:
    """Write adapter_config.json and adapter_model.safetensors into an existing folder."""
    folder = Path(folder)
    (folder / CONFIG).write_text(json.dumps(build_config(adapter), indent=2, sort_keys=True) + "\n")
    save_file(peft_tensors(adapter), folder / WEIGHTS, metadata={"format": "pt"})
