"""kohya-ss / sd-scripts single-file LoRA: ``<stem>.lora_down.weight`` (A),
``<stem>.lora_up.weight`` (B) and ``<stem>.alpha`` (a 0-d tensor), where ``<stem>`` is the module
path flattened behind a prefix naming the component (``formats.naming``).

Read as sd-scripts' ``create_network_from_weights`` reads it: alpha missing from every module means
alpha = rank (old LoRAs); missing from some modules only, or missing in a LyCORIS file
(``ss_network_module = lycoris.…``, which always writes it), is refused as partial; alpha 0 is
refused because sd-scripts reads it as alpha = rank and ComfyUI / diffusers as scale 0.
Flattened stems are kept as module names until resolved against a base (``formats.resolve``).

Written with the names sd-scripts and ComfyUI expect for each component, every scale folded into
the per-module alpha (alpha' = scale · r: rsLoRA, rank/alpha patterns), and the ``ss_*`` /
``modelspec.*`` metadata of the source kept (``ss_network_dim`` / ``ss_network_alpha`` refreshed,
``sshs_model_hash`` recomputed over the tensor bytes, as sd-scripts' ``save_weights`` does).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

from ..adapter import Adapter, AdapterMeta, LoraModule, build_module
from ..errors import ValidationError
from ..tensors.header import HeaderTensor
from ..tensors.io import dtype_tag, header_bytes, serialize, torch_dtype
from . import naming, training
from .registry import Format, WriteContext, register

KOHYA_PREFIXES = tuple(naming.KOHYA_PREFIX_COMPONENT)
_KEY = re.compile(r"^(?P<stem>.+?)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")
_LYCORIS = ("hada_", "lokr_", "lora_mid", ".diff", "diff_b", "oft_", ".w_norm", ".b_norm")


def looks_like_kohya(keys) -> bool:
    return any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys)


def is_flat_stem(name: str) -> bool:
    return name.startswith("lora_") and "." not in name


def alpha_value(t) -> float:
    return t.scalar() if isinstance(t, HeaderTensor) else float(t.double().reshape(()).item())


def kohya_from_tensors(tensors: dict, metadata: dict, *, source: object) -> Adapter:
    groups: dict[str, dict] = {}
    alpha_tags, alpha_shapes, prefixes = set(), set(), set()
    for key, t in tensors.items():
        if "dora_scale" in key:
            raise ValidationError("DoRA (dora_scale) is not supported", file=source, tensor=key)
        if any(m in key for m in _LYCORIS):
            raise ValidationError(
                "LyCORIS tensors (LoHa/LoKr/LoCon mid, diff) are not supported, only plain LoRA",
                file=source,
                tensor=key,
            )
        m = _KEY.match(key)
        if m is None:
            raise ValidationError(
                "not a kohya LoRA tensor (expected lora_down/lora_up/alpha)",
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
            g["alpha"], g["alpha_key"] = alpha_value(t), key
            alpha_tags.add(dtype_tag(t.dtype))
            alpha_shapes.add(tuple(t.shape))
            continue
        which = "A" if part.startswith("lora_down") else "B"
        g[which], g[which + "_key"] = t, key
    flat = {s for s in groups if "." not in s}
    if flat and len(flat) != len(groups):
        dotted = sorted(set(groups) - flat)[0]
        raise ValidationError(
            f"mixes kohya names ({sorted(flat)[0]}) and dotted names", file=source, tensor=dotted
        )
    for stem in flat:
        for p in KOHYA_PREFIXES:
            if stem.startswith(p):
                prefixes.add(p)
                break
        else:
            raise ValidationError(
                f"unknown kohya prefix (known: {', '.join(KOHYA_PREFIXES)})",
                file=source,
                tensor=stem,
            )
    if {"lora_te_", "lora_te1_"} <= prefixes:
        raise ValidationError(
            "mixes lora_te_ (one text encoder) and lora_te1_ (SDXL/Flux numbering)", file=source
        )
    with_alpha = [s for s, g in groups.items() if "alpha" in g]
    if with_alpha and len(with_alpha) != len(groups):
        missing = sorted(s for s in groups if s not in with_alpha)[0]
        raise ValidationError(
            f"has no alpha while {len(with_alpha)} other modules have one: a partial file",
            file=source,
            tensor=missing,
        )
    lycoris = str((metadata or {}).get("ss_network_module", "")).startswith("lycoris")
    if lycoris and not with_alpha:
        raise ValidationError(
            "a LyCORIS file (ss_network_module = lycoris…) without alpha tensors: partial",
            file=source,
        )
    modules: dict[str, LoraModule] = {}
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
        if not math.isfinite(alpha):
            raise ValidationError(f"alpha is {alpha}", file=source, tensor=g.get("alpha_key"))
        if alpha == 0:
            raise ValidationError(
                "alpha is 0: sd-scripts reads that as alpha = rank, ComfyUI and diffusers as "
                "scale 0; refusing to guess",
                file=source,
                tensor=g.get("alpha_key"),
            )
        modules[name] = build_module(name, kind, A, B, alpha, source=source)
    if not modules:
        raise ValidationError("holds no LoRA tensors", file=source)
    origin = {
        "kohya_style": "kohya",
        "kohya_metadata": dict(metadata or {}),
        "kohya_alpha_dtype": alpha_tags.pop() if len(alpha_tags) == 1 else None,
        "kohya_alpha_shape": list(alpha_shapes.pop()) if len(alpha_shapes) == 1 else [],
        "kohya_has_alpha": bool(with_alpha),
    }
    return Adapter(modules, AdapterMeta(format="kohya"), origin)


# sd-scripts' split_qkv: the modules it splits (its own tests on the kohya name) and into how
# many parts: lora_flux's double-block qkv (q, k, v) and single-block linear1 (q, k, v, MLP),
# lora_sd3's joint-block qkv (its x_block's and context_block's attn / attn2)
_SPLIT_QKV = ((("double", "qkv"), 3), (("single", "linear1"), 4), (("joint_blocks", "qkv"), 3))


def split_qkv_modules(adapter: Adapter) -> dict[str, int]:
    """The modules of an sd-scripts Flux or SD3 LoRA trained with ``split_qkv=True`` (its
    ``ss_network_args``), name → number of parts. sd-scripts trains q, k, v (and a single
    block's MLP) as separate rank-r LoRAs at scale alpha/r, then saves them as one module of
    the fused tensor (``LoRANetwork.state_dict``): A the parts' A's stacked (n·r rows), B their
    B's on the diagonal, the same alpha. Every loader (ComfyUI, diffusers'
    ``_convert_kohya_flux_lora_to_diffusers``, sd-scripts' own ``create_network_from_weights``,
    ``flux_merge_lora`` and ``convert_flux_lora``) reads that as rank n·r, scale alpha/(n·r),
    and so does loratool; ``split_qkv_note`` says so."""
    meta = adapter.origin.get("kohya_metadata") or {}
    try:
        args = json.loads(meta.get("ss_network_args") or "null")
    except (ValueError, RecursionError):
        return {}
    # create_network: split_qkv = True if split_qkv == "True" else False
    if not isinstance(args, dict) or args.get("split_qkv") != "True":
        return {}
    out = {}
    for name, m in adapter.modules.items():
        if not name.startswith("lora_unet_"):
            continue  # is_flux: the transformer's modules only
        for words, n in _SPLIT_QKV:
            if all(w in name for w in words) and m.rank % n == 0:
                out[name] = n
                break
    return out


def split_qkv_note(adapter: Adapter, label: object) -> str | None:
    """One warning line for an adapter with ``split_qkv_modules``, else None."""
    split = split_qkv_modules(adapter)
    if not split:
        return None
    return (
        f"{label}: {len(split)} modules were trained by sd-scripts with split_qkv (q, k, v and "
        "the MLP each a rank-r LoRA at scale alpha/r) and saved as one module of rank n·r with "
        "the same alpha: applied at alpha/(n·r), as ComfyUI, diffusers and sd-scripts' own "
        "merge apply them, which is 1/n of the update it trained (sd-scripts issue #2204)"
    )


def flat_stem(name: str, components: set | None = None, *, original: bool = False) -> str:
    """The kohya stem of a module name (kept as is when it already is one); ``original``: see
    ``naming.kohya_prefix``."""
    if is_flat_stem(name):
        return name
    mid = naming.parse(name)
    comps = components if components is not None else {mid.component}
    path = naming.kohya_path(mid.component, mid.path or mid.flat)
    prefix = naming.kohya_prefix(mid.component, mid.path, comps, original=original)
    return prefix + naming.flatten(path)


def stem_namer(adapter: Adapter):
    """name → kohya stem for the modules of ``adapter``: prefixes chosen knowing every
    component it has (SDXL / Flux / SD3 number their text encoders) and whether its
    transformer modules use the original layout's names."""
    ids = [naming.parse(n) for n in adapter.modules]
    components = {mid.component for mid in ids}
    original = naming.original_transformer(
        mid.path for mid in ids if mid.component == "transformer"
    )
    return lambda name: flat_stem(name, components, original=original)


def _alpha_tensor(value: float, tag: str | None, shape: list):
    """``value`` in the source's alpha dtype when that holds it exactly, else the narrowest of
    float32 / float64 that does."""
    import torch

    for t in ([tag] if tag else []) + ["F32", "F64"]:
        dt = torch_dtype(t)
        x = torch.tensor(value, dtype=dt)
        if float(x.item()) == value:
            return x.reshape(shape)
    return torch.tensor(value, dtype=torch.float64).reshape(shape)


def kohya_parts(adapter: Adapter, ctx: WriteContext | None = None) -> tuple[dict, dict]:
    ctx = ctx or WriteContext()
    origin = adapter.origin
    tag = origin.get("kohya_alpha_dtype")
    shape = origin.get("kohya_alpha_shape", []) or []
    stem_of = stem_namer(adapter)
    out: dict = {}
    owner: dict[str, str] = {}
    for m in adapter.modules.values():
        if m.kind in ("linear_fifo", "embedding"):
            # kohya's loaders know Linear and Conv2d only: store the transposed update as a
            # plain linear so that ΔW is unchanged: (B·A)ᵀ = Aᵀ·Bᵀ.
            A, B = m.B.T.contiguous(), m.A.T.contiguous()
        else:
            A, B = m.A, m.B
        stem = stem_of(m.name)
        if stem in owner:
            raise ValidationError(
                f"both {owner[stem]} and {m.name} flatten to the kohya name {stem}", tensor=m.name
            )
        owner[stem] = m.name
        out[stem + ".lora_down.weight"] = A
        out[stem + ".lora_up.weight"] = B
        # kohya's scale is alpha / r: any scale is carried exactly by alpha' = scale · r.
        alpha = m.alpha * math.sqrt(m.rank) if m.rslora else m.alpha
        if m.rslora:
            ctx.warn("rsLoRA scales folded into kohya's per-module alpha (alpha' = alpha·√r)")
            if alpha / m.rank != m.scale:
                ctx.warn(f"{m.name}: alpha·√r is not exact in float64; scale kept to 1 ulp")
        if origin.get("kohya_has_alpha", True) or alpha != m.rank:
            out[stem + ".alpha"] = _alpha_tensor(alpha, tag, shape)
    meta = training.kohya_metadata(adapter)
    return out, meta


def stamp_hashes(meta: dict[str, str], body: bytes) -> dict[str, str]:
    """The metadata's hashes of the tensors made those of ``body`` (the bytes after the
    header): sd-webui-additional-networks' ``sshs_model_hash`` (sd-scripts'
    ``precalculate_safetensors_hashes``: sha256 of the bytes after the header) recomputed;
    ``sshs_legacy_hash`` (bytes at 1 MiB of the whole file, header included) dropped, sd tools
    recompute it; ``modelspec.hash_sha256`` kept only while it still is the sha256 of these
    tensor bytes (writers differ on what it hashes; a stale one is never written)."""
    meta = dict(meta)
    digest = hashlib.sha256(body).hexdigest()
    if meta.get("sshs_model_hash") is not None or "ss_network_module" in meta:
        meta["sshs_model_hash"] = digest
        meta.pop("sshs_legacy_hash", None)
    spec = meta.get("modelspec.hash_sha256")
    if spec is not None and spec.strip().lower().removeprefix("0x") != digest:
        del meta["modelspec.hash_sha256"]
    return meta


def write_kohya(adapter: Adapter, dest: Path, ctx: WriteContext) -> None:
    tensors, meta = kohya_parts(adapter, ctx)
    write_stamped(tensors, meta, dest)


def write_stamped(tensors: dict, meta: dict[str, str], dest: Path) -> None:
    """A safetensors file whose metadata's tensor hashes are those of the bytes written."""
    data = serialize(tensors, None)
    n = int.from_bytes(data[:8], "little")
    body = data[8 + n :]
    meta = stamp_hashes(meta, body)
    entries = []
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    for name, e in header.items():
        entries.append((name, e["dtype"], tuple(e["shape"]), *e["data_offsets"]))
    Path(dest).write_bytes(header_bytes(entries, meta or None) + body)


def _detect(path: Path, header) -> bool:
    return header is not None and looks_like_kohya(header.tensors)


def _read(path: Path, lazy: bool) -> Adapter:
    from ..tensors.io import load_file

    tensors, metadata = load_file(path, lazy=lazy)
    return kohya_from_tensors(tensors, metadata, source=path)


FORMAT = register(
    Format(
        name="kohya",
        help="one .safetensors file as sd-scripts / ComfyUI name it (lora_down/lora_up/alpha)",
        layout="file",
        detect=_detect,
        read=_read,
        write=write_kohya,
        priority=30,
        suffix=".safetensors",
    )
)
