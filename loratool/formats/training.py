"""Training metadata that adapter files carry, in one vocabulary.

Readers put what the file says into ``adapter.origin["training"]``, a flat ``{key: str}``:
``base_model``, ``trigger_words``, ``steps``, ``epochs``, ``learning_rate``, ``resolution``,
``network_dim``, ``network_alpha``, ``title``, ``author``, ``date``, ``architecture``,
``trainer``… The catalog records it (``show`` prints it, ``list --trained K=V`` filters on it).

Sources, as their writers define them: sd-scripts' ``train_network.py`` ``ss_*`` keys (every value
a string) and the SAI model spec (``library/sai_model_spec.py``: ``modelspec.*``); PEFT's
adapter_config.json; GGUF ``general.*`` keys; mlx-lm's adapter_config.json.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..adapter import Adapter

# (file key, our key): first present wins for each of our keys.
SAFETENSORS_KEYS = (
    ("ss_sd_model_name", "base_model"),
    ("ss_base_model_version", "base_model_version"),
    ("modelspec.architecture", "architecture"),
    ("modelspec.trigger_phrase", "trigger_words"),
    # the steps done when the file was saved (an epoch checkpoint's), before the planned total,
    # as the epoch it was saved at comes before the planned number of epochs
    ("ss_steps", "steps"),
    ("ss_max_train_steps", "steps"),
    ("ss_epoch", "epochs"),
    ("ss_num_epochs", "epochs"),
    ("ss_learning_rate", "learning_rate"),
    ("ss_resolution", "resolution"),
    ("modelspec.resolution", "resolution"),
    ("ss_network_module", "network_module"),
    ("ss_network_dim", "network_dim"),
    ("ss_network_alpha", "network_alpha"),
    ("ss_output_name", "title"),
    ("modelspec.title", "title"),
    ("modelspec.author", "author"),
    ("modelspec.date", "date"),
    ("ss_training_started_at", "started_at"),
    ("modelspec.description", "description"),
    ("modelspec.license", "license"),
    ("modelspec.tags", "tags"),
    ("modelspec.usage_hint", "usage_hint"),
    ("sshs_model_hash", "addnet_hash"),
    ("ss_new_sd_model_hash", "base_model_hash"),
    ("ss_training_finished_at", "finished_at"),
    ("ss_training_comment", "comment"),
    ("ss_optimizer", "optimizer"),
    ("ss_lr_scheduler", "lr_scheduler"),
    ("ss_unet_lr", "unet_lr"),
    ("ss_text_encoder_lr", "text_encoder_lr"),
    ("ss_network_args", "network_args"),
    ("ss_seed", "seed"),
    ("ss_clip_skip", "clip_skip"),
    ("ss_mixed_precision", "precision"),
    ("ss_num_train_images", "train_images"),
    ("ss_total_batch_size", "batch_size"),
    ("ss_noise_offset", "noise_offset"),
    ("ss_sd_scripts_commit_hash", "trainer_commit"),
    ("modelspec.prediction_type", "prediction_type"),
    ("modelspec.implementation", "implementation"),
    ("modelspec.merged_from", "merged_from"),
)


def _clean(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value)
    text = text.strip()
    return text if text and text.lower() not in ("none", "null") else None


def from_safetensors_metadata(metadata: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, ours in SAFETENSORS_KEYS:
        v = _clean(metadata.get(key))
        if v is not None and ours not in out:
            out[ours] = v
    if "trigger_words" not in out and metadata.get("ss_tag_frequency"):
        # sd-scripts records caption tag counts per dataset dir; the most frequent tag is the
        # usual trigger word.
        try:
            freq: dict[str, int] = {}
            for tags in json.loads(metadata["ss_tag_frequency"]).values():
                for tag, n in tags.items():
                    freq[tag.strip()] = freq.get(tag.strip(), 0) + int(n)
            if freq:
                out["top_tags"] = ", ".join(sorted(freq, key=lambda t: (-freq[t], t))[:5])
        except (ValueError, AttributeError, TypeError):
            pass
    return out


def from_peft_config(config: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, ours in (
        ("base_model_name_or_path", "base_model"),
        ("task_type", "task_type"),
        ("peft_version", "trainer"),
    ):
        v = _clean(config.get(key))
        if v is not None:
            out[ours] = v
    return out


def merged(*dicts: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for d in dicts:
        for k, v in (d or {}).items():
            out.setdefault(k, v)
    return out


def from_mlx_config(config: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, ours in (
        ("model", "base_model"),
        ("iters", "steps"),
        ("learning_rate", "learning_rate"),
        ("num_layers", "num_layers"),
    ):
        v = _clean(config.get(key))
        if v is not None:
            out[ours] = v
    out["trainer"] = "mlx-lm"
    return out


def training_of(adapter: Adapter) -> dict[str, str]:
    """What the adapter's source file said about its training, derived from the format facts
    its ``origin`` keeps (so catalog blobs stay what they were)."""
    from .diffusers_meta import read_configs

    o = adapter.origin
    parts = []
    for key in ("kohya_metadata", "diffusers_metadata", "lycoris_metadata"):
        if o.get(key):
            parts.append(from_safetensors_metadata(o[key]))
    if o.get("diffusers_metadata"):
        try:
            configs = read_configs(o["diffusers_metadata"], source="origin")
        except Exception:  # a header that did not parse was refused when read
            configs = {}
        parts += [from_peft_config(c) for c in configs.values()]
    if o.get("peft_config"):
        parts.append(from_peft_config(o["peft_config"]))
    if o.get("mlx_config"):
        parts.append(from_mlx_config(o["mlx_config"]))
    if o.get("gguf_training"):
        parts.append(dict(o["gguf_training"]))
    return merged(*parts)


def training_of_origin(origin: dict[str, Any]) -> dict[str, str]:
    """``training_of`` for an adapter of which only the ``origin`` is at hand (the catalog reads
    it from a blob's header, without torch)."""
    from types import SimpleNamespace

    return training_of(SimpleNamespace(origin=origin))  # type: ignore[arg-type]


def kohya_metadata(adapter: Adapter) -> dict[str, str]:
    """The ``__metadata__`` of a kohya export: the source's ``ss_*`` / ``modelspec.*`` kept as
    they are; for a source that had none, the ones sd-scripts writes that loratool knows."""
    src = adapter.origin.get("kohya_metadata")
    if src is None and adapter.origin.get("lycoris_metadata"):
        src = as_plain_lora(adapter.origin["lycoris_metadata"])  # its modules are LoRA now
    if src is None:
        src = {
            k: v
            for k, v in (adapter.origin.get("diffusers_metadata") or {}).items()
            if k.startswith(("ss_", "modelspec.", "sshs_"))
        }
    meta = dict(src)
    if any(k.startswith("ss_") for k in meta):
        return refresh_network_facts(meta, adapter.modules.values())
    from collections import Counter

    mods = list(adapter.modules.values())
    ranks = Counter(m.rank for m in mods)
    alphas = Counter(m.scale * m.rank for m in mods)
    t = training_of(adapter)
    meta.setdefault("ss_network_module", "networks.lora")
    if ranks:
        meta.setdefault("ss_network_dim", str(ranks.most_common(1)[0][0]))
        meta.setdefault("ss_network_alpha", f"{alphas.most_common(1)[0][0]:g}")
    name = adapter.meta.name or t.get("title")
    if name:
        meta.setdefault("ss_output_name", name)
        meta.setdefault("modelspec.title", name)
    if adapter.meta.base_model or t.get("base_model"):
        meta.setdefault("ss_sd_model_name", adapter.meta.base_model or t["base_model"])
    for ours, key in (
        ("steps", "ss_steps"),
        ("epochs", "ss_epoch"),
        ("learning_rate", "ss_learning_rate"),
        ("trigger_words", "modelspec.trigger_phrase"),
        ("architecture", "modelspec.architecture"),
        ("author", "modelspec.author"),
        ("date", "modelspec.date"),
        ("license", "modelspec.license"),
    ):
        if t.get(ours):
            meta.setdefault(key, t[ours])
    if adapter.meta.description:
        meta.setdefault("modelspec.description", adapter.meta.description)
    if adapter.meta.tags:
        meta.setdefault("modelspec.tags", ", ".join(adapter.meta.tags))
    meta.setdefault("modelspec.sai_model_spec", "1.0.0")
    return meta


# -- the fields that describe the tensors ---------------------------------------------------------

# sd-scripts' network_args that give one rank / alpha per block (lora.py ``block_dims`` …): a
# file whose ranks or alphas changed no longer has them.
_BLOCK_DIMS = ("block_dims", "conv_block_dims")
_BLOCK_ALPHAS = ("block_alphas", "conv_block_alphas")
# alphas are stored in the file's dtype (sd-scripts saves them in bf16/fp16 too): a stated
# alpha within half a bf16 step of the tensors' describes them
_ALPHA_TOL = 2.0**-8


def network_facts(modules: Iterable) -> dict[str, set[float]]:
    """The ranks and kohya alphas (scale·r) of an adapter's modules, as sd-scripts states them:
    ``dim``/``alpha`` for Linear and 1×1 conv modules (``network_dim``), ``conv_dim``/
    ``conv_alpha`` for k×k conv ones (``network_args`` ``conv_dim``/``conv_alpha``)."""
    out: dict[str, set[float]] = {
        "dim": set(),
        "alpha": set(),
        "conv_dim": set(),
        "conv_alpha": set(),
    }
    from ..adapter import LoraModule

    for m in modules:
        rank = m.rank
        # a LoRA's kohya alpha carries its whole scale (rsLoRA folded); LyCORIS states its own
        alpha = m.scale * rank if isinstance(m, LoraModule) else getattr(m, "alpha", None)
        shape = tuple(getattr(m, "base_shape", ()) or ())
        conv = len(shape) == 4 and shape[2] * shape[3] > 1
        out["conv_dim" if conv else "dim"].add(float(rank))
        if alpha is not None:
            out["conv_alpha" if conv else "alpha"].add(float(alpha))
    return out


def _stated(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None  # "Dynamic", "None": says nothing a number could contradict
    return v if math.isfinite(v) else None


def _refresh(d: dict, key: str, values: set[float], fmt, tol: float, changed: bool) -> bool:
    """Make ``d[key]`` true of ``values`` if it states a number they contradict: when every
    module has one value and the stated number is another. ``changed`` (the tensors were
    remade: a resize): any stated value is rewritten from the tensors, "Dynamic" (sd-scripts'
    word for per-module ranks) when they differ. Returns whether it changed."""
    if key not in d or not values:
        return False
    stated = _stated(d.get(key))
    if stated is None and not changed:
        return False
    if changed:
        new = fmt(next(iter(values))) if len(values) == 1 else "Dynamic"
        if (
            stated is not None
            and len(values) == 1
            and math.isclose(stated, next(iter(values)), rel_tol=tol)
        ):
            return False
        if d[key] == new:
            return False
        d[key] = new
        return True

    def same(v: float) -> bool:
        return math.isclose(stated, v, rel_tol=tol, abs_tol=0.0)

    if len(values) == 1:
        (v,) = values
        if same(v):
            return False
        d[key] = fmt(v)
        return True
    # Modules that differ may be a block-wise file (block_dims / block_alphas), whose stated
    # number is the default, not any module's: nothing says it is wrong.
    return False


def _dim(v: float) -> str:
    return str(int(v))


def _alpha(v: float) -> str:
    return str(float(v))  # as sd-scripts writes a float alpha: "8.0"


def refresh_network_facts(
    meta: dict[str, str], modules: Iterable, *, changed: bool = False
) -> dict[str, str]:
    """``meta`` (a source's ``ss_*`` keys) with the fields that describe the tensors made true
    of ``modules``: ``ss_network_dim``, ``ss_network_alpha`` and, in ``ss_network_args``,
    ``conv_dim``/``conv_alpha`` (one value, or "Dynamic" as sd-scripts' resize_lora writes for
    per-module ranks) and the per-block dims/alphas, dropped once they no longer hold. A field
    the tensors do not contradict is left byte for byte, so an unchanged adapter exports its
    metadata unchanged; the training history (steps, dataset, trigger words, …) is never
    touched.
    ``changed``: the tensors were remade (``resize``), so per-module ranks are "Dynamic" even
    where the stated number is one of them. Hashes of the tensors are the writer's
    (``kohya.stamp_hashes``)."""
    facts = network_facts(modules)
    out = dict(meta)
    dims = _refresh(out, "ss_network_dim", facts["dim"], _dim, 0.0, changed)
    alphas = _refresh(out, "ss_network_alpha", facts["alpha"], _alpha, _ALPHA_TOL, changed)
    raw = out.get("ss_network_args")
    try:
        args = json.loads(raw) if raw else None
    except (ValueError, RecursionError):
        args = None
    if isinstance(args, dict):
        before = dict(args)
        dims |= _refresh(args, "conv_dim", facts["conv_dim"], _dim, 0.0, changed)
        alphas |= _refresh(args, "conv_alpha", facts["conv_alpha"], _alpha, _ALPHA_TOL, changed)
        for key in (_BLOCK_DIMS if dims else ()) + (_BLOCK_ALPHAS if alphas else ()):
            args.pop(key, None)
        if args != before:
            out["ss_network_args"] = json.dumps(args)
    return out


def refreshed_origin(origin: dict[str, Any], modules: Iterable) -> dict[str, Any]:
    """``origin`` of an adapter whose tensors were remade, its kohya / LyCORIS header
    metadata describing ``modules`` (``refresh_network_facts`` with ``changed``)."""
    modules = list(modules)
    out = dict(origin)
    for key in ("kohya_metadata", "lycoris_metadata"):
        if isinstance(out.get(key), dict):
            meta = refresh_network_facts(out[key], modules, changed=True)
            for stale in _TENSOR_HASHES:  # of the old tensors; writers hash what they write
                meta.pop(stale, None)
            out[key] = meta
    return out


_TENSOR_HASHES = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")


# LyCORIS network_args that say which algorithm and factorisation its modules use
# (lycoris/kohya create_network: algo, use_cp / use_conv_cp / disable_conv_cp, factor,
# decompose_both, block_size, and newer presets and variants): a file of plain LoRA no
# longer has them.
_LYCORIS_ARGS = (
    "algo", "preset", "use_tucker", "use_cp", "use_conv_cp", "disable_conv_cp", "use_scalar",
    "factor", "decompose_both", "block_size", "full_matrix", "unbalanced_factorization",
    "dora_wd", "weight_decompose", "wd_on_output", "bypass_mode", "rescaled", "constraint",
    "train_norm",
)  # fmt: skip


def as_plain_lora(meta: dict[str, str]) -> dict[str, str]:
    """A LyCORIS trainer's ``ss_*`` metadata for a file of plain LoRA modules (``convert`` of
    LoHa / LoKr to kohya): ``ss_network_module`` sd-scripts' ``networks.lora``, LyCORIS'
    algorithm arguments dropped, everything else kept."""
    out = dict(meta)
    if not str(out.get("ss_network_module", "")).startswith("lycoris"):
        return out
    out["ss_network_module"] = "networks.lora"
    try:
        args = json.loads(out["ss_network_args"]) if out.get("ss_network_args") else None
    except (ValueError, RecursionError):
        args = None
    if isinstance(args, dict):
        out["ss_network_args"] = json.dumps(
            {k: v for k, v in args.items() if k not in _LYCORIS_ARGS}
        )
    return out
