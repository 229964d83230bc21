"""PEFT's on-disk layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Every key is ``base_model.model.<path>…`` where ``<path>`` is what ``named_modules()`` of the
model calls the module (peft 0.21, utils/save_and_load.py ``get_peft_model_state_dict``; the
adapter name is removed from the keys). What each key holds:

- ``<path>.lora_A.weight`` / ``.lora_B.weight`` — the factors (``lora_embedding_A`` /
  ``lora_embedding_B``, no ``.weight``, for embeddings); the base tensor is ``<path>.weight``.
  Rank and alpha may differ per module through ``rank_pattern`` / ``alpha_pattern``, whose keys
  match a module path as ``get_pattern_key`` does: ``re.match(rf"(.*\\.)?({key})$", path)``,
  first match in the dict's order wins.
- ``<path>.lora_magnitude_vector`` — DoRA's magnitude (``use_dora``).
- ``<path>.lora_B.bias`` — ``lora_bias``: added to ``<path>.bias`` times the module's scale.
- ``<module>(.base_layer)*.lora_A.weight`` for ``target_parameters``: peft's ``ParamWrapper``
  adapts a parameter of ``<module>`` (fused MoE experts); several parameters of one module nest
  their wrappers, each inner one one ``.base_layer`` deeper, and the key never names the
  parameter: it is told apart by shape when resolved against the base.
- ``<path>.token_adapter.trainable_tokens_delta`` — ``trainable_token_indices``: the new rows
  (not a difference, despite the name: peft's TrainableTokensLayer ``index_copy``s them).
- any other key is a full tensor of the model: ``modules_to_save`` (``<path>.<param>``, older
  peft ``<path>.modules_to_save[.<adapter>].<param>``), biases of ``bias="all"`` /
  ``"lora_only"`` (``<path>[.base_layer].bias``), and the embeddings ``save_embedding_layers``
  writes (``<path>[.base_layer].weight``, resized when tokens were added). They replace the
  base tensor. A full tensor that none of these explains is refused.

The config fields that change what a tensor means are honoured or refused (``check_config``).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

from ..adapter import (
    Adapter,
    AdapterMeta,
    AddToTensor,
    ExpertLoraModule,
    Module,
    ReplaceRows,
    ReplaceTensor,
    build_module,
)
from ..bases import INPUT_EMBEDDINGS, OUTPUT_EMBEDDINGS
from ..errors import FormatError, ValidationError
from ..jsonutil import loads
from ..tensors.header import refuse_pickle
from ..tensors.io import load_file, save_file
from .patterns import compile_patterns, pattern_value

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."

_NOT_WB = r"(?!weight$|bias$)[^.]+"  # an adapter name, never the trailing weight/bias
_FACTOR = re.compile(
    rf"^(?P<path>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    rf"(?:\.(?P<adapter>{_NOT_WB}))?(?:\.(?P<param>weight|bias))?$"
)
_TOKENS = re.compile(
    rf"^(?P<path>.+)\.token_adapter\.trainable_tokens_delta(?:\.(?P<adapter>{_NOT_WB}))?$"
)
# peft wraps a modules_to_save module's trained copy as ``<path>.modules_to_save.<adapter>``;
# 0.21 saves it under ``<path>.<param>``, some older writers kept the infix (with the
# default adapter name or none)
_MODULES_TO_SAVE = re.compile(r"\.modules_to_save(?:\.default)?(?=\.)")
# peft's EMBEDDING_LAYER_NAMES and the names get_input/output_embeddings have in transformers
_EMBEDDING_LEAVES = {"embed_tokens", "lm_head"} | {
    n.removesuffix(".weight") for n in (*INPUT_EMBEDDINGS, *OUTPUT_EMBEDDINGS)
}

# init_lora_weights values whose adapter is relative to the base as loaded (peft changes
# nothing in the base weights for them)
_PLAIN_INITS = {True, False, "gaussian", "eva", "orthogonal"}
# ...and those that rewrote the base weights into a residual before training
_RESIDUAL_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")

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
# carried from an original config into a rebuilt one: they describe tensors still there
_CARRIED = (
    "task_type",
    "base_model_name_or_path",
    "revision",
    "bias",
    "modules_to_save",
    "trainable_token_indices",
    "target_parameters",
    "lora_bias",
)


def is_peft_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).exists()


def _config_value(
    config: dict, key: str, default: Any, file: object, *, rank: bool, label: str | None = None
) -> Any:
    """r (an integer ≥ 1) or lora_alpha (a finite number), strictly: "abc", null, a list or
    true is an error, not a traceback later."""
    value = config.get(key, default)
    ok = isinstance(value, int) if rank else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value) or (rank and value < 1):
        what = "a whole number ≥ 1" if rank else "a finite number"
        raise ValidationError(f"{label or key} must be {what}, got {value!r}", file=file)
    return value


def _flag(config: dict, key: str, file: object) -> bool:
    """A true/false field: "false" (a string, and truthy) is an error, not a silent True."""
    value = config.get(key)
    if value is not None and not isinstance(value, bool):
        raise ValidationError(f"{key} must be true or false, got {value!r}", file=file)
    return bool(value)


def _pattern_values(patterns: Any, field: str, file: object, *, rank: bool) -> dict:
    if patterns is None:
        return {}
    compile_patterns(patterns, field, file=file)  # shape of the dict, and every key
    for key in patterns:
        _config_value(patterns, key, None, file, rank=rank, label=f"{field}[{key!r}]")
    return dict(patterns)


def read_peft(path: Path, *, lazy: bool = False) -> Adapter:
    path = Path(path)
    cfg_path = path / CONFIG
    try:
        config = loads(cfg_path.read_bytes(), file=cfg_path)
    except FileNotFoundError as exc:
        raise FormatError(f"no {CONFIG}: not a PEFT adapter directory", file=path) from exc
    except OSError as exc:
        raise FormatError(f"cannot be read: {exc.strerror or exc}", file=cfg_path) from exc
    if not isinstance(config, dict):
        raise FormatError("not a JSON object", file=cfg_path)
    check_config(config, cfg_path)
    weights = path / WEIGHTS
    if not weights.exists():
        for name in ("adapter_model.bin", "adapter_model.pt"):
            if (path / name).exists():
                refuse_pickle(path / name)
        raise FormatError(f"no {WEIGHTS}", file=path)
    tensors, _ = load_file(weights, lazy=lazy)
    return peft_from_tensors(tensors, config, source=weights)


def check_config(config: dict, source: object) -> None:
    """Refuse, in one line, a config whose fields change what the tensors mean in a way that
    loratool does not reproduce."""
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValidationError(
            f"peft_type is {peft_type}; only LORA adapters are supported", file=source
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
        raise ValidationError(
            f"init_lora_weights={init!r}: this adapter is relative to the residual base peft "
            "computed when it was created (the base minus its initial factors), not to the base "
            "itself, and merging it as plain LoRA would be wrong",
            file=source,
            hint="convert it first: save_pretrained(..., path_initial_model_for_weight_conversion=...)",
        )
    if init not in _PLAIN_INITS:
        raise ValidationError(f"unknown init_lora_weights={init!r}", file=source)
    if config.get("layer_replication"):
        raise ValidationError(
            "layer_replication: the adapter's layers are those of a model with replicated "
            "layers, not the base's; merging it into the base is not supported",
            file=source,
        )
    variants = {
        "use_qalora": "QALoRA",
        "alora_invocation_tokens": "aLoRA (activated LoRA)",
        "arrow_config": "Arrow routing",
        "kasa_config": "KaSA",
        "monteclora_config": "MonteCLoRA",
        "use_bdlora": "block-diagonal LoRA",
        "ensure_weight_tying": "ensure_weight_tying (adapters shared by tied layers)",
    }
    for key, what in variants.items():
        if config.get(key):
            raise ValidationError(
                f"{key} is set: {what} changes what the factors mean and is not supported",
                file=source,
            )
    bias = config.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise ValidationError(f"unknown bias={bias!r}", file=source)


def _embedding_like(path: str) -> bool:
    return path.rsplit(".", 1)[-1] in _EMBEDDING_LEAVES or path.endswith(
        tuple(n.removesuffix(".weight") for n in INPUT_EMBEDDINGS)
    )


def _in_modules_to_save(path: str, names) -> bool:
    """Whether ``path`` lies in a module peft's modules_to_save wrapped: peft wraps every
    module whose name ends with an entry (plain ``str.endswith``, as ``_set_trainable``)."""
    parts = path.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(p.endswith(n) for p in prefixes for n in names)


def _full_tensor(key: str, rest: str, t, config: dict, source) -> tuple[str, Any]:
    """A non-LoRA tensor: (where it goes, the op or 'extra') or a refusal."""
    if ".original_module." in f".{rest}":
        return "extra", None  # peft 0.2 saved the frozen original beside its copy: never merged
    target = _MODULES_TO_SAVE.sub("", rest)
    target = re.sub(r"(\.base_layer)+(?=\.[^.]+$)", "", target)
    module, _, param = target.rpartition(".")
    names = config.get("modules_to_save") or []
    if isinstance(names, str):
        names = [names]
    bias = config.get("bias", "none")
    if names and _in_modules_to_save(module, names):
        why, resize = "modules_to_save", _embedding_like(module)
    elif param == "bias" and bias != "none":
        why, resize = "bias", False
    elif param == "weight" and (".base_layer." in f".{rest}" or _embedding_like(module)):
        why, resize = "embedding", True
    else:
        raise ValidationError(
            "a full tensor that neither modules_to_save, bias nor save_embedding_layers explains",
            file=source,
            tensor=key,
        )
    return "op", ReplaceTensor(target, t, why, resize, key.removeprefix(PREFIX))


def _token_indices(config: dict, path: str, source, key: str) -> list[int]:
    spec = config.get("trainable_token_indices")
    if isinstance(spec, list):
        return spec
    if isinstance(spec, dict):
        for name, indices in spec.items():
            if path == name or path.endswith("." + name):
                return indices
    raise ValidationError(
        "trainable tokens whose indices adapter_config.json does not give (trainable_token_indices)",
        file=source,
        tensor=key,
    )


def _param_targets(path: str, config: dict) -> tuple[str, int, list[str]]:
    """For a LoRA path under target_parameters: (module, depth, candidate parameter names)."""
    targets = config.get("target_parameters") or []
    module, depth = path, 0
    while module.endswith(".base_layer"):
        module, depth = module.removesuffix(".base_layer"), depth + 1
    cands = []
    for t in targets:
        p = t.rsplit(".", 1)[-1]
        full = f"{module}.{p}"
        if (full == t or full.endswith("." + t)) and p not in cands:
            cands.append(p)
    return module, depth, cands


def peft_from_tensors(tensors: dict, config: dict, *, source: object) -> Adapter:
    groups: dict[str, dict[str, Any]] = {}
    ops: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, t in tensors.items():
        rest = key.removeprefix(PREFIX)
        m = _FACTOR.match(rest)
        if m is not None:
            part, param = m.group("part"), m.group("param")
            role = {
                "lora_A": "A",
                "lora_B": "B",
                "lora_embedding_A": "A",
                "lora_embedding_B": "B",
                "lora_magnitude_vector": "magnitude",
            }[part]
            if part == "lora_B" and param == "bias":
                role = "bias"
            elif part in ("lora_A", "lora_B") and param != "weight":
                raise ValidationError("a LoRA factor without .weight", file=source, tensor=key)
            g = groups.setdefault(m.group("path"), {})
            emb = part.startswith("lora_embedding")
            if role in ("A", "B"):
                if g.get("embedding", emb) != emb:
                    raise ValidationError(
                        "mixes lora_A/B and lora_embedding_A/B", file=source, tensor=key
                    )
                g["embedding"] = emb
            if role in g:
                raise ValidationError(
                    "stored twice (several adapter names?)", file=source, tensor=key
                )
            g[role], g[role + "_key"] = t, key
            continue
        m = _TOKENS.match(rest)
        if m is not None:
            path = m.group("path")
            indices = _token_indices(config, path, source, key)
            target = path + ".weight"
            if target in ops:
                raise ValidationError("stored twice", file=source, tensor=key)
            ops[target] = ReplaceRows(target, indices, t, "trainable_tokens", rest)
            continue
        where, op = _full_tensor(key, rest, t, config, source)
        if where == "extra":
            extra[key] = t
            continue
        if op.target in ops:
            raise ValidationError(f"a second full tensor for {op.target}", file=source, tensor=key)
        ops[op.target] = op
    modules, paths, bias_ops = _build_modules(groups, config, source)
    for target, op in bias_ops.items():
        if target in ops:
            raise ValidationError(
                f"{target} is both saved in full and given a lora_bias",
                file=source,
                tensor=op.key,
            )
        ops[target] = op
    if not modules and not ops:
        raise ValidationError("holds no LoRA tensors", file=source)
    meta = AdapterMeta(base_model=config.get("base_model_name_or_path"), format="peft")
    origin: dict[str, Any] = {"peft_config": config}
    if paths:
        origin["peft_paths"] = paths
    return Adapter(modules, meta, origin, extra_tensors=extra, ops=ops)


def _build_modules(groups: dict, config: dict, source) -> tuple[dict, dict, dict]:
    cfg_file = Path(source).with_name(CONFIG) if isinstance(source, Path) else source
    r_default = _config_value(config, "r", 8, cfg_file, rank=True)
    alpha_default = _config_value(config, "lora_alpha", 8, cfg_file, rank=False)
    rank_pattern = _pattern_values(config.get("rank_pattern"), "rank_pattern", cfg_file, rank=True)
    alpha_pattern = _pattern_values(
        config.get("alpha_pattern"), "alpha_pattern", cfg_file, rank=False
    )
    fifo = _flag(config, "fan_in_fan_out", cfg_file)
    rslora = _flag(config, "use_rslora", cfg_file)
    dora = _flag(config, "use_dora", cfg_file)
    lora_bias = _flag(config, "lora_bias", cfg_file)
    modules: dict[str, Module] = {}
    paths: dict[str, str] = {}  # module name → its path in the file, where not name-derived
    bias_ops: dict[str, AddToTensor] = {}
    wrapped: dict[str, list[tuple[int, str]]] = {}  # module → [(depth, path)] (ParamWrapper)
    for path, g in groups.items():
        for which in "AB":
            if which not in g:
                other = (
                    g.get("A_key") or g.get("B_key") or g.get("magnitude_key") or g.get("bias_key")
                )
                raise ValidationError(f"has no matching lora_{which}", file=source, tensor=other)
        if "magnitude" in g and not dora:
            raise ValidationError(
                "a DoRA magnitude, but adapter_config.json has use_dora false",
                file=source,
                tensor=g["magnitude_key"],
            )
        if "bias" in g and not lora_bias:
            raise ValidationError(
                "a lora_B bias, but adapter_config.json has lora_bias false",
                file=source,
                tensor=g["bias_key"],
            )
        if config.get("target_parameters") and not g["embedding"]:
            module, depth, cands = _param_targets(path, config)
            if cands:
                wrapped.setdefault(module, []).append((depth, path))
                continue
        if dora and "magnitude" not in g:
            raise ValidationError(
                "use_dora is set but this module has no lora_magnitude_vector",
                file=source,
                tensor=g["A_key"],
            )
        A, B = g["A"], g["B"]
        if g["embedding"]:
            kind = "embedding"
        elif A.dim() >= 3:
            kind = f"conv{A.dim() - 2}d"
        else:
            kind = "linear_fifo" if fifo else "linear"  # settled by the layer type on resolve
        alpha = pattern_value(alpha_pattern, path, alpha_default)
        name = path + ".weight"
        mod = build_module(
            name, kind, A, B, alpha, rslora, magnitude=g.get("magnitude"), source=source
        )
        _check_rank(mod.rank, pattern_value(rank_pattern, path, r_default), source, g["A_key"])
        modules[name] = mod
        if "bias" in g:
            target = path + ".bias"
            bias_ops[target] = AddToTensor(
                target, g["bias"], mod.scale, "lora_bias", g["bias_key"].removeprefix(PREFIX)
            )
    for module, found in wrapped.items():
        _, _, cands = _param_targets(module, config)
        found.sort()
        if len(found) > len(cands):
            raise ValidationError(
                f"{len(found)} nested LoRA wrappers but target_parameters names {len(cands)} "
                f"parameters of {module}",
                file=source,
                tensor=groups[found[0][1]]["A_key"],
            )
        # peft nests the wrapper of the parameter a module defines first innermost (deepest
        # .base_layer): a provisional pairing by the usual definition order, checked (and
        # corrected) by shape when the adapter is resolved against its base
        cands = sorted(cands, key=_definition_order)
        names = [f"{module}.{p}" for p in cands]
        found.sort(reverse=True)  # deepest first
        for i, (_depth, path) in enumerate(found):
            g = groups[path]
            name = names[i]
            alts = tuple(n for n in names if n != name) if len(names) > 1 else ()
            r = pattern_value(rank_pattern, name, r_default)
            alpha = pattern_value(alpha_pattern, name, alpha_default)
            A, B = g["A"], g["B"]
            if any(pattern_value(rank_pattern, n, r_default) != r for n in alts):
                raise ValidationError(
                    "rank_pattern gives these parameters different ranks, and the file does not "
                    "say which parameter each factor pair adapts",
                    file=source,
                    tensor=g["A_key"],
                )
            if r <= 0 or A.dim() != 2 or A.shape[0] % r:
                raise ValidationError(
                    f"lora_A {list(A.shape)} is not (experts·r) × in for r={r}",
                    file=source,
                    tensor=g["A_key"],
                )
            experts = A.shape[0] // r
            if experts == 1:  # a 2-D parameter: peft's Linear delta, no transpose
                mod = build_module(name, "linear", A, B, alpha, rslora, source=source)
                mod.alternatives = alts
            else:
                mod = ExpertLoraModule.from_parts(
                    name,
                    "experts",
                    {"lora_A": A, "lora_B": B},
                    {
                        "alpha": alpha,
                        "rslora": rslora,
                        "num_experts": experts,
                        "alternatives": alts,
                    },
                    source=source,
                )
            modules[name] = mod
            paths[name] = path
    return modules, paths, bias_ops


# The order transformers' MoE experts classes define their parameters in.
_EXPERT_PARAMS = ("gate_up_proj", "gate_up_proj_bias", "gate_proj", "up_proj", "w1", "w3")


def _definition_order(param: str) -> tuple[int, str]:
    return (_EXPERT_PARAMS.index(param) if param in _EXPERT_PARAMS else len(_EXPERT_PARAMS), param)


def _check_rank(rank: int, declared, source, key) -> None:
    if rank != declared:
        raise ValidationError(
            f"adapter_config.json says r={declared} but the tensors have rank {rank}",
            file=source,
            tensor=key,
        )


def module_path(name: str) -> str:
    return name.removesuffix(".weight")


def build_config(adapter: Adapter) -> dict[str, Any]:
    """The adapter_config.json for ``adapter``: its original one when it still describes the
    modules exactly (so round trips are lossless), else one rebuilt from the modules."""
    original = adapter.origin.get("peft_config")
    mods = list(adapter.modules.values())
    if original is not None and _config_fits(original, adapter):
        config = dict(original)
        if adapter.meta.base_model:
            config["base_model_name_or_path"] = adapter.meta.base_model
        return config
    config = dict(DEFAULT_CONFIG)
    if original:
        for key in _CARRIED:
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
    config["use_dora"] = any(m.magnitude is not None for m in mods)
    config["fan_in_fan_out"] = any(m.kind == "linear_fifo" for m in mods)
    config["target_modules"] = sorted(
        {
            module_path(m.name).rsplit(".", 1)[-1]
            for m in mods
            if m.name not in adapter.origin.get("peft_paths", {})
        }
    )
    if any(o.why == "lora_bias" for o in adapter.ops.values()):
        config["lora_bias"] = True
    rows = [o for o in adapter.ops.values() if isinstance(o, ReplaceRows)]
    if rows:
        config["trainable_token_indices"] = {
            module_path(o.target).rsplit(".", 1)[-1]: list(o.indices) for o in rows
        }
    return config


def _config_fits(config: dict, adapter: Adapter) -> bool:
    r = config.get("r", 8)
    alpha = config.get("lora_alpha", 8)
    rp = config.get("rank_pattern") or {}
    ap = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    fifo = bool(config.get("fan_in_fan_out", False))
    dora = bool(config.get("use_dora", False))
    paths = adapter.origin.get("peft_paths", {})
    targets = config.get("target_modules")
    for m in adapter.modules.values():
        p = module_path(m.name)
        if pattern_value(rp, p, r) != m.rank or float(pattern_value(ap, p, alpha)) != m.alpha:
            return False
        if m.name not in paths and targets is not None and not _targeted(targets, p):
            return False  # a module the config does not name (combine of other modules)
        if m.rslora != rslora or (m.magnitude is not None) != dora:
            return False
        if m.name not in paths and (m.kind == "linear_fifo") != fifo and m.kind == "linear_fifo":
            return False
    return True


def _targeted(targets, path: str) -> bool:
    """Whether peft's target_modules matching (``check_target_module_exists``) picks the
    module at ``path``: a string is a regex matched in full, a list names path suffixes."""
    if isinstance(targets, str):
        try:
            return re.fullmatch(targets, path) is not None
        except re.error:
            return False
    if isinstance(targets, (list, tuple, set)):
        return path in targets or any(
            isinstance(t, str) and path.endswith("." + t) for t in targets
        )
    return True


def peft_tensors(adapter: Adapter) -> dict:
    out = {}
    paths = adapter.origin.get("peft_paths", {})
    for m in adapter.modules.values():
        p = PREFIX + paths.get(m.name, module_path(m.name))
        if m.kind == "embedding":
            out[p + ".lora_embedding_A"] = m.A
            out[p + ".lora_embedding_B"] = m.B
        else:
            out[p + ".lora_A.weight"] = m.A
            out[p + ".lora_B.weight"] = m.B
        if m.magnitude is not None:
            out[p + ".lora_magnitude_vector"] = m.magnitude
    for o in adapter.ops.values():
        if isinstance(o, ReplaceTensor):
            key = o.key or o.target
            out[PREFIX + key] = o.value
        elif isinstance(o, ReplaceRows):
            key = o.key or module_path(o.target) + ".token_adapter.trainable_tokens_delta"
            out[PREFIX + key] = o.values
        elif isinstance(o, AddToTensor) and o.why == "lora_bias":
            key = o.key or o.target.removesuffix(".bias") + ".lora_B.bias"
            out[PREFIX + key] = o.value
        else:
            raise ValidationError(f"PEFT's format has no place for a {o.op!r}", tensor=o.target)
    out.update(adapter.extra_tensors)
    return out


def write_peft_files(adapter: Adapter, folder: Path) -> None:
    """Write adapter_config.json and adapter_model.safetensors into an existing folder."""
    folder = Path(folder)
    (folder / CONFIG).write_text(json.dumps(build_config(adapter), indent=2, sort_keys=True) + "\n")
    save_file(peft_tensors(adapter), folder / WEIGHTS, metadata={"format": "pt"})
