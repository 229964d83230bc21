"""diffusers' single-file LoRA (``pytorch_lora_weights.safetensors``), the layouts diffusers 0.42
reads (``loaders/lora_pipeline.py``, ``utils/state_dict_utils.py``):

- current, PEFT-style: ``<component>.<path>.lora_A.weight`` / ``.lora_B.weight`` with the
  component prefixes ``save_lora_weights`` writes (``unet.``, ``transformer.``,
  ``text_encoder.``, ``text_encoder_2.``), or none (a model's ``save_lora_adapter``); scales
  in the header's ``lora_adapter_metadata`` (``diffusers_meta``);
- older: ``….lora.down.weight`` / ``….lora.up.weight`` (LoRACompatibleLinear),
  ``….lora_linear_layer.down/up.weight`` (text encoders), and attention processors
  ``….processor.to_q_lora.down.weight`` (``to_out_lora`` is ``to_out.0`` in a UNet;
  ``to_q/k/v/out_lora`` are ``q/k/v/out_proj`` in a text encoder, as diffusers'
  ``DIFFUSERS_OLD_TO_PEFT`` maps them).

A ``<stem>.alpha`` tensor (which ComfyUI honours) is read as alpha; a header that disagrees with
it is refused. Written in the current layout, with the header a pipeline's
``load_lora_weights`` reads, one LoraConfig per component.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..adapter import Adapter, AdapterMeta, LoraModule, build_module
from ..errors import ValidationError
from ..tensors.io import dtype_tag, save_file
from . import diffusers_meta, naming, training
from .kohya import _alpha_tensor, alpha_value
from .registry import Format, WriteContext, register

# (pattern, factor, layout). The stem group is the module path as diffusers keys it.
_KEYS = (
    (re.compile(r"^(?P<stem>.+)\.lora_A\.weight$"), "A", "peft"),
    (re.compile(r"^(?P<stem>.+)\.lora_B\.weight$"), "B", "peft"),
    (re.compile(r"^(?P<stem>.+)\.lora_embedding_A$"), "eA", "peft"),
    (re.compile(r"^(?P<stem>.+)\.lora_embedding_B$"), "eB", "peft"),
    (re.compile(r"^(?P<stem>.+)\.lora\.down\.weight$"), "A", "old"),
    (re.compile(r"^(?P<stem>.+)\.lora\.up\.weight$"), "B", "old"),
    (re.compile(r"^(?P<stem>.+)\.lora_linear_layer\.down\.weight$"), "A", "old"),
    (re.compile(r"^(?P<stem>.+)\.lora_linear_layer\.up\.weight$"), "B", "old"),
    (
        re.compile(
            r"^(?P<stem>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.down\.weight$"
        ),
        "A",
        "old",
    ),
    (
        re.compile(
            r"^(?P<stem>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.up\.weight$"
        ),
        "B",
        "old",
    ),
    (re.compile(r"^(?P<stem>.+)\.alpha$"), "alpha", None),
)
# attention-processor projections, by component kind
_PROCS_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_PROCS_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_UNSUPPORTED = (
    ("lora_magnitude_vector", "DoRA magnitude vectors are not supported"),
    ("dora_scale", "DoRA (dora_scale) is not supported"),
    ("lokr_", "LyCORIS LoKr tensors are not supported yet"),
    ("hada_", "LyCORIS LoHa tensors are not supported yet"),
)


def looks_like_diffusers(keys) -> bool:
    return any(
        k.endswith(
            (
                ".lora_A.weight",
                ".lora_B.weight",
                ".lora.down.weight",
                ".lora_linear_layer.down.weight",
                "_lora.down.weight",
            )
        )
        for k in keys
    )


def _match(key: str):
    for pattern, which, layout in _KEYS:
        m = pattern.match(key)
        if m:
            stem = m.group("stem")
            proj = m.groupdict().get("proj")
            if proj:
                comp = naming.parse(stem + ".x").component or ""
                table = _PROCS_TEXT if comp.startswith("text_encoder") else _PROCS_UNET
                stem = f"{stem}.{table[proj]}"
            return stem, which, layout
    return None


def diffusers_from_tensors(tensors: dict, metadata: dict, *, source: object) -> Adapter:
    groups: dict[str, dict] = {}
    layouts, alpha_tags, alpha_shapes = set(), set(), set()
    for key, t in tensors.items():
        for marker, why in _UNSUPPORTED:
            if marker in key:
                raise ValidationError(why, file=source, tensor=key)
        hit = _match(key)
        if hit is None:
            raise ValidationError(
                "not a diffusers LoRA tensor (lora_A/lora_B, lora.down/up, *_lora.down/up)",
                file=source,
                tensor=key,
            )
        stem, which, layout = hit
        g = groups.setdefault(stem, {})
        if which == "alpha":
            if t.numel() != 1:
                raise ValidationError(
                    f"alpha must be a scalar, got shape {tuple(t.shape)}", file=source, tensor=key
                )
            g["alpha"], g["alpha_key"] = alpha_value(t), key
            alpha_tags.add(dtype_tag(t.dtype))
            alpha_shapes.add(tuple(t.shape))
            continue
        layouts.add(layout)
        if len(layouts) > 1:
            raise ValidationError(
                "mixes current (lora_A/lora_B) and older diffusers keys", file=source, tensor=key
            )
        kind = "embedding" if which.startswith("e") else None
        which = which[-1]
        if which in g:
            raise ValidationError("stored twice under two key styles", file=source, tensor=key)
        g[which], g[which + "_key"], g["kind"] = t, key, kind
    prefixed = {s.split(".", 1)[0] in naming.COMPONENTS for s in groups}
    if len(prefixed) > 1:
        bare = sorted(s for s in groups if s.split(".", 1)[0] not in naming.COMPONENTS)[0]
        raise ValidationError(
            "mixes component-prefixed keys (unet./text_encoder./transformer.) and bare ones",
            file=source,
            tensor=bare,
        )
    configs = diffusers_meta.read_configs(metadata, source=source)
    modules: dict[str, LoraModule] = {}
    for stem, g in groups.items():
        for which in "AB":
            if which not in g:
                present = g.get("A_key") or g.get("B_key") or g.get("alpha_key")
                raise ValidationError(f"has no matching lora_{which}", file=source, tensor=present)
        A, B = g["A"], g["B"]
        kind = g["kind"] or ("conv2d" if A.dim() == 4 else "linear")
        rank = int(A.shape[0])
        alpha, rslora = g.get("alpha", float(rank)), False
        cfg, path = diffusers_meta.config_for(stem, configs)
        if cfg is not None:
            # diffusers ≥ 0.34 keeps alpha in the header, not in a tensor: without it the
            # module would merge at scale 1 instead of alpha / r.
            mc = diffusers_meta.module_config(cfg, path, rank, source=source, tensor=g["A_key"])
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
        modules[stem + ".weight"] = build_module(
            stem + ".weight", kind, A, B, alpha, rslora, source=source
        )
    if not modules:
        raise ValidationError("holds no LoRA tensors", file=source)
    origin = {
        "diffusers_metadata": dict(metadata or {}),
        "diffusers_has_alpha": any("alpha" in g for g in groups.values()),
        "diffusers_alpha_dtype": alpha_tags.pop() if len(alpha_tags) == 1 else None,
        "diffusers_alpha_shape": list(alpha_shapes.pop()) if len(alpha_shapes) == 1 else [],
    }
    return Adapter(modules, AdapterMeta(format="diffusers"), origin)


def diffusers_parts(adapter: Adapter, ctx: WriteContext) -> tuple[dict, dict[str, str]]:
    origin = adapter.origin
    tensors: dict = {}
    stems: dict[str, LoraModule] = {}  # header stems (patterns match by suffix)
    prefixes: set[str] = set()
    write_alpha = bool(origin.get("diffusers_has_alpha"))
    for m in adapter.modules.values():
        mid = naming.parse(m.name)
        component = mid.component or ctx.component
        if component is None:
            raise ValidationError(
                "cannot tell which pipeline component this module belongs to",
                tensor=m.name,
                hint="pass --component unet|transformer|text_encoder|text_encoder_2",
            )
        if mid.path is None:
            raise ValidationError(
                "a kohya name whose dots cannot be told from its underscores",
                tensor=m.name,
                hint="pass --base with the model (or pipeline directory) it is for",
            )
        key = f"{component}.{naming.kohya_path(component, mid.path)}"
        if key + ".lora_A.weight" in tensors or key + ".lora_embedding_A" in tensors:
            raise ValidationError(f"two modules map to {key}", tensor=m.name)
        if m.kind == "embedding":
            tensors[key + ".lora_embedding_A"] = m.A
            tensors[key + ".lora_embedding_B"] = m.B
        else:
            tensors[key + ".lora_A.weight"] = m.A
            tensors[key + ".lora_B.weight"] = m.B
        if write_alpha and not m.rslora:
            tensors[key + ".alpha"] = _alpha_tensor(
                m.alpha,
                origin.get("diffusers_alpha_dtype"),
                origin.get("diffusers_alpha_shape") or [],
            )
        prefixes.add(component)
        stems[f"{component}.{mid.path}"] = m
    src = origin.get("diffusers_metadata")
    meta = dict(src or {})
    if src is None:
        meta["format"] = "pt"
        meta.update(
            {
                k: v
                for k, v in training.kohya_metadata(adapter).items()
                if k.startswith("modelspec.")
            }
        )
    configs = diffusers_meta.read_configs(meta, source="the adapter's origin")
    plain = all(
        m.alpha == m.rank and not m.rslora and m.kind != "linear_fifo" for m in stems.values()
    )
    if configs and diffusers_meta.fits(configs, stems):
        pass  # the source's own header still describes every module
    elif configs or not plain:
        meta[diffusers_meta.METADATA_KEY] = diffusers_meta.build_metadata(stems, prefixes)
    return tensors, meta


def write_diffusers(adapter: Adapter, dest: Path, ctx: WriteContext) -> None:
    tensors, meta = diffusers_parts(adapter, ctx)
    save_file(tensors, dest, metadata=meta or None)


def _detect(path: Path, header) -> bool:
    return header is not None and looks_like_diffusers(header.tensors)


def _read(path: Path, lazy: bool) -> Adapter:
    from ..tensors.io import load_file

    tensors, metadata = load_file(path, lazy=lazy)
    return diffusers_from_tensors(tensors, metadata, source=path)


FORMAT = register(
    Format(
        name="diffusers",
        help="one .safetensors file that diffusers' load_lora_weights reads (unet./transformer./text_encoder. lora_A/lora_B, alphas in the header)",
        layout="file",
        detect=_detect,
        read=_read,
        write=write_diffusers,
        priority=31,
        suffix=".safetensors",
    )
)
