"""diffusers' LoRA config in the safetensors header (``lora_adapter_metadata``).

diffusers ≥ 0.34 (``loaders/lora_base.py``: ``write_lora_layers`` / ``_save_lora_weights``),
SimpleTuner and others store no ``.alpha`` tensor: the adapter's ``LoraConfig`` lives in the
header as ``__metadata__["lora_adapter_metadata"]``, a JSON object. A pipeline's
``save_lora_weights`` prefixes each config field with the component it belongs to
(``_pack_dict_with_prefix``: ``"unet.r"``, ``"unet.lora_alpha"``, ``"text_encoder.rank_pattern"``),
the same prefix its tensor keys carry; a model's ``save_lora_adapter`` writes the fields bare
(``"r"``, ``"lora_alpha"``). ``load_lora_adapter`` strips ``"<prefix>."`` from both and builds
``LoraConfig(**fields)``, so a module's scale is ``lora_alpha / r`` (÷ √r with ``use_rslora``)
with PEFT's ``rank_pattern`` / ``alpha_pattern`` lookups, and the defaults are LoraConfig's
(r = 8, lora_alpha = 8). Without this key diffusers uses alpha = r (scale 1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import FormatError, ValidationError
from .peft import pattern_value

METADATA_KEY = "lora_adapter_metadata"
# LoraConfig fields that tell a bare (un-prefixed) config from a prefixed one.
_CONFIG_FIELDS = {"r", "lora_alpha", "target_modules", "peft_type", "rank_pattern", "alpha_pattern"}
# Fields that change what the tensors mean and that this reader cannot honour: refused.
_REFUSED = {
    "use_dora": "DoRA (use_dora) is not supported",
    "lora_bias": "LoRA bias terms (lora_bias) are not supported",
    "layer_replication": "layer_replication is not supported",
}


@dataclass(frozen=True)
class ModuleConfig:
    alpha: float
    rslora: bool
    fan_in_fan_out: bool


def read_configs(metadata: dict[str, str] | None, *, source: object) -> dict[str | None, dict]:
    """The LoraConfig fields per component prefix (key ``None`` for a bare config); empty when
    the header has no ``lora_adapter_metadata``."""
    raw = (metadata or {}).get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{METADATA_KEY} in the header is not JSON", file=source) from exc
    if not isinstance(obj, dict):
        raise FormatError(f"{METADATA_KEY} in the header is not a JSON object", file=source)
    if not obj:
        return {}
    if _CONFIG_FIELDS & set(obj):
        return {None: obj}
    out: dict[str | None, dict] = {}
    for key, value in obj.items():
        prefix, sep, name = key.partition(".")
        if not sep or not prefix or not name:
            raise FormatError(
                f"{METADATA_KEY}: field {key!r} is neither a LoraConfig field nor <component>.<field>",
                file=source,
            )
        out.setdefault(prefix, {})[name] = value
    return out


def config_for(stem: str, configs: dict[str | None, dict]) -> tuple[dict | None, str]:
    """The config that covers the module ``stem`` (its key without ``.lora_A.weight``) and the
    module's path relative to that config's model."""
    if None in configs:
        return configs[None], stem
    prefix, _, rest = stem.partition(".")
    if prefix in configs and rest:
        return configs[prefix], rest
    return None, stem


def module_config(
    config: dict[str, Any], path: str, rank: int, *, source: object, tensor: str
) -> ModuleConfig:
    """alpha, rsLoRA and fan_in_fan_out of one module as PEFT's LoraConfig gives them."""
    peft_type = config.get("peft_type") or "LORA"
    if str(peft_type).upper() != "LORA":
        raise ValidationError(
            f"{METADATA_KEY} says peft_type {peft_type}; only LORA is supported",
            file=source,
            tensor=tensor,
        )
    for field, why in _REFUSED.items():
        if config.get(field):
            raise ValidationError(f"{METADATA_KEY}: {why}", file=source, tensor=tensor)
    declared = pattern_value(config.get("rank_pattern") or {}, path, config.get("r", 8))
    if int(declared) != rank:
        raise ValidationError(
            f"{METADATA_KEY} says r={declared} but the tensors have rank {rank}",
            file=source,
            tensor=tensor,
        )
    alpha = pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8))
    try:
        alpha = float(alpha)
    except (TypeError, ValueError) as exc:
        raise ValidationError(
            f"{METADATA_KEY}: lora_alpha {alpha!r} is not a number", file=source, tensor=tensor
        ) from exc
    return ModuleConfig(
        alpha=alpha,
        rslora=bool(config.get("use_rslora", False)),
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
    )


def fits(configs: dict[str | None, dict], stems: dict[str, Any]) -> bool:
    """Whether ``configs`` still describe every module (``stems``: key stem → LoraModule) exactly,
    so the original header can be written back unchanged."""
    for stem, mod in stems.items():
        cfg, path = config_for(stem, configs)
        if cfg is None:
            return False
        try:
            mc = module_config(cfg, path, mod.rank, source=None, tensor=stem)
        except (ValidationError, FormatError):
            return False
        if (mc.alpha, mc.rslora) != (mod.alpha, mod.rslora):
            return False
        if mod.kind in ("linear", "linear_fifo") and mc.fan_in_fan_out != (
            mod.kind == "linear_fifo"
        ):
            return False
    return True


def build_metadata(stems: dict[str, Any], prefixes: set[str]) -> str:
    """A ``lora_adapter_metadata`` value for modules keyed by stem (``unet.down_blocks…to_q``):
    one LoraConfig per component prefix in ``prefixes`` (a bare one when the stems carry none),
    as diffusers' ``_save_lora_weights`` writes it: ``json.dumps(indent=2, sort_keys=True)``."""
    from ..adapter import Adapter
    from .peft import build_config

    groups: dict[str | None, dict[str, Any]] = {}
    for stem, mod in stems.items():
        prefix, _, rest = stem.partition(".")
        if prefix in prefixes and rest:
            groups.setdefault(prefix, {})[rest] = mod
        else:
            groups.setdefault(None, {})[stem] = mod
    if None in groups and len(groups) > 1:
        raise ValidationError(
            "some modules carry a component prefix and some do not: "
            f"{sorted(groups[None])[0]!r} has none",
            tensor=sorted(groups[None])[0],
        )
    out: dict[str, Any] = {}
    for prefix, mods in sorted(groups.items(), key=lambda kv: kv[0] or ""):
        sub = Adapter({p + ".weight": m.with_name(p + ".weight") for p, m in mods.items()})
        config = build_config(sub)
        # Full paths, not leaf names: a leaf name would make PEFT wrap modules the file has no
        # tensors for.
        config["target_modules"] = sorted(mods)
        for key, value in config.items():
            out[key if prefix is None else f"{prefix}.{key}"] = value
    return json.dumps(out, indent=2, sort_keys=True)
