"""kohya-ss / diffusers single-file LoRA.

Two key styles are read:

- kohya: ``<stem>.lora_down.weight`` (A), ``<stem>.lora_up.weight`` (B), ``<stem>.alpha``
  (a 0-d tensor), where ``<stem>`` is the module path with dots turned into underscores behind a
  prefix naming the sub-model: ``lora_unet_``, ``lora_te_``, ``lora_te1_``, ``lora_te2_``…
- diffusers / PEFT-in-one-file: ``<dotted path>.lora_A.weight`` / ``.lora_B.weight``, optional
  ``<dotted path>.alpha``, often behind ``unet.`` / ``text_encoder.`` / ``transformer.``.

A missing alpha means alpha = rank (scale 1), which is what kohya's loader assumes.
Flattened kohya stems cannot be turned back into dotted names without the base's key list, so
they are kept as module names until resolved against a base (see ``formats.resolve``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..adapter import Adapter, AdapterMeta, LoraModule, build_module
from ..errors import ValidationError
from ..tensors.header import HeaderTensor
from ..tensors.io import dtype_tag, load_file, save_file, torch_dtype
from . import diffusers_meta

KOHYA_PREFIXES = (
    "lora_unet_",
    "lora_te1_",
    "lora_te2_",
    "lora_te3_",
    "lora_te_",
    "lora_transformer_",
)
_KEY = re.compile(
    r"^(?P<stem>.+?)\.(?P<part>lora_down\.weight|lora_up\.weight|lora_A\.weight|lora_B\.weight|alpha)$"
)
_UNSUPPORTED = ("hada_", "lokr_", "dora_scale", "oft_", "lora_mid", "diff_b", ".diff")


def looks_like_kohya(keys: list[str]) -> bool:
    return any(
        k.endswith((".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight"))
        for k in keys
    )


def is_flat_stem(name: str) -> bool:
    return name.startswith("lora_") and "." not in name


def read_kohya(path: Path, *, lazy: bool = False) -> Adapter:
    tensors, metadata = load_file(path, lazy=lazy)
    return kohya_from_tensors(tensors, metadata, source=path)


def kohya_from_tensors(tensors: dict, metadata: dict, *, source: object) -> Adapter:
    groups: dict[str, dict] = {}
    style = None
    alpha_dtype = None
    for key, t in tensors.items():
        for marker in _UNSUPPORTED:
            if marker in key:
                raise ValidationError(
                    "LyCORIS / DoRA tensors are not supported, only plain LoRA",
                    file=source,
                    tensor=key,
                )
        m = _KEY.match(key)
        if m is None:
            raise ValidationError(
                "not a LoRA tensor (expected lora_down/lora_up/alpha or lora_A/lora_B)",
                file=source,
                tensor=key,
            )
        stem, part = m.group("stem"), m.group("part")
        g = groups.setdefault(stem, {})
        if part == "alpha":
            if t.numel() != 1:
                raise ValidationError(
                    f"alpha must be a scalar, got shape {tuple(t.shape)}", file=source, tensor=key
                )
            g["alpha"] = (
                t.scalar() if isinstance(t, HeaderTensor) else float(t.float().reshape(()).item())
            )
            g["alpha_key"] = key
            alpha_dtype = dtype_tag(t.dtype)
            g["alpha_shape"] = list(t.shape)
            continue
        this_style = (
            "kohya" if part.startswith("lora_down") or part.startswith("lora_up") else "diffusers"
        )
        if style not in (None, this_style):
            raise ValidationError(
                "mixes lora_down/lora_up and lora_A/lora_B keys", file=source, tensor=key
            )
        style = this_style
        which = "A" if part.startswith(("lora_down", "lora_A")) else "B"
        g[which] = t
        g[which + "_key"] = key
    configs = diffusers_meta.read_configs(metadata, source=source)
    if configs and style == "kohya":
        raise ValidationError(
            f"lora_down/lora_up keys with diffusers' {diffusers_meta.METADATA_KEY} header: "
            "which alpha applies is ambiguous",
            file=source,
        )
    modules: dict[str, LoraModule] = {}
    alpha_shapes = set()
    for stem, g in groups.items():
        for which in "AB":
            if which not in g:
                present = g.get("A_key") or g.get("B_key") or g.get("alpha_key")
                raise ValidationError(
                    f"has no matching {'lora_down' if which == 'A' else 'lora_up'}",
                    file=source,
                    tensor=present,
                )
        A, B = g["A"], g["B"]
        kind = "conv2d" if A.dim() == 4 else "linear"
        name = stem if is_flat_stem(stem) else stem + ".weight"
        alpha = g.get("alpha", float(A.shape[0]))
        rslora = False
        if not math_isfinite(alpha):
            raise ValidationError(f"alpha is {alpha}", file=source, tensor=g.get("alpha_key"))
        cfg, path = diffusers_meta.config_for(stem, configs)
        if cfg is not None:
            # diffusers ≥ 0.34 keeps alpha in the header, not in a tensor: without it the
            # module would merge at scale 1 instead of alpha / r.
            mc = diffusers_meta.module_config(
                cfg, path, int(A.shape[0]), source=source, tensor=g["A_key"]
            )
            if "alpha" in g and g["alpha"] != mc.alpha:
                raise ValidationError(
                    f"the alpha tensor says {g['alpha']:g} but {diffusers_meta.METADATA_KEY} "
                    f"says {mc.alpha:g}",
                    file=source,
                    tensor=g["alpha_key"],
                )
            alpha, rslora = mc.alpha, mc.rslora
            if mc.fan_in_fan_out and kind == "linear":
                kind = "linear_fifo"
        mod = build_module(name, kind, A, B, alpha, rslora, source=source)
        modules[name] = mod
        if "alpha_shape" in g:
            alpha_shapes.add(json.dumps(g["alpha_shape"]))
    if not modules:
        raise ValidationError("holds no LoRA tensors", file=source)
    origin = {
        "kohya_style": style or "kohya",
        "kohya_metadata": dict(metadata or {}),
        "kohya_alpha_dtype": alpha_dtype,
        "kohya_alpha_shape": json.loads(alpha_shapes.pop()) if len(alpha_shapes) == 1 else [],
        "kohya_has_alpha": any("alpha" in g for g in groups.values()),
    }
    return Adapter(modules, AdapterMeta(format="kohya"), origin)


def math_isfinite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))


def flat_stem(name: str, prefix: str = "lora_unet_") -> str:
    if is_flat_stem(name):
        return name
    return prefix + name.removesuffix(".weight").replace(".", "_")


def kohya_tensors(adapter: Adapter) -> tuple[dict, dict]:
    import torch

    style = adapter.origin.get("kohya_style", "kohya")
    prefix = adapter.origin.get("kohya_prefix", "lora_unet_")
    alpha_dtype = torch_dtype(adapter.origin.get("kohya_alpha_dtype") or "F32")
    alpha_shape = adapter.origin.get("kohya_alpha_shape", [])
    write_alpha = adapter.origin.get("kohya_has_alpha", True)
    meta = dict(adapter.origin.get("kohya_metadata") or {})
    # A diffusers file whose alphas live in its header keeps them there.
    in_header = style == "diffusers" and diffusers_meta.METADATA_KEY in meta
    out = {}
    stems = {}
    for m in adapter.modules.values():
        if m.kind in ("linear_fifo", "embedding"):
            # kohya's loaders know Linear and Conv2d only: store the transposed update as a
            # plain linear so that ΔW is unchanged: (B·A)ᵀ = Aᵀ·Bᵀ.
            A, B = m.B.T.contiguous(), m.A.T.contiguous()
        else:
            A, B = m.A, m.B
        if m.rslora and not in_header:
            raise ValidationError(
                "kohya's format has no rsLoRA; export as PEFT, or resize first", tensor=m.name
            )
        if style == "diffusers" and not is_flat_stem(m.name):
            stem = m.name.removesuffix(".weight")
            out[stem + ".lora_A.weight"] = A
            out[stem + ".lora_B.weight"] = B
            stems[stem] = m
            if in_header:
                continue
        else:
            stem = flat_stem(m.name, prefix)
            out[stem + ".lora_down.weight"] = A
            out[stem + ".lora_up.weight"] = B
        if write_alpha or m.alpha != m.rank:
            out[stem + ".alpha"] = torch.tensor(m.alpha, dtype=alpha_dtype).reshape(alpha_shape)
    if in_header:
        configs = diffusers_meta.read_configs(meta, source="the adapter's origin")
        if not diffusers_meta.fits(configs, stems):
            prefixes = {p for p in configs if p is not None}
            meta[diffusers_meta.METADATA_KEY] = diffusers_meta.build_metadata(stems, prefixes)
    return out, meta


def write_kohya_file(adapter: Adapter, dest: Path) -> None:
    tensors, meta = kohya_tensors(adapter)
    save_file(tensors, dest, metadata=meta or None)
