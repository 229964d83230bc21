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
    if src is None:
        src = {
            k: v
            for k, v in (adapter.origin.get("diffusers_metadata") or {}).items()
            if k.startswith(("ss_", "modelspec.", "sshs_"))
        }
    meta = dict(src)
    if any(k.startswith("ss_") for k in meta):
        return meta
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
