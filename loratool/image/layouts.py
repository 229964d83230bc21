"""The layouts image models ship in, seen the way adapters name their modules.

A base is recognised from its tensor names (headers only):

- a diffusers pipeline directory (``tensors/pipeline.py``): one view per component folder;
- one diffusers / transformers component alone: a UNet, a Flux (or other) transformer, a CLIP
  or T5 text encoder;
- an original single file: Stable Diffusion 1/2 (``model.diffusion_model.…``,
  ``cond_stage_model.…``), SDXL (``conditioner.embedders.0/1.…``), Flux in BFL's names
  (``double_blocks.N.img_attn.qkv``, possibly behind ``model.diffusion_model.``), SD3 / SD3.5
  in SAI's MMDiT names (``joint_blocks.N.x_block.attn.qkv``, its text encoders under
  ``text_encoders.clip_l/clip_g/t5xxl.transformer.``).

A *view* maps every name an adapter may use for a tensor of one component (the file's own
names, and the other layout's names via ``maps.py``) to a ``Target``: the shape the module's ΔW
must have and the pieces of base tensors it lands in (a whole tensor, rows of a fused one, or
rows of the ΔW spread over several tensors).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..tensors.header import FLOAT_DTYPES, BaseIndex
from ..tensors.pipeline import PipelineIndex
from . import maps

SD_UNET = "model.diffusion_model."
SD1_CLIP = "cond_stage_model.transformer."
SD2_OPENCLIP = "cond_stage_model.model."
SDXL_CLIP = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP = "conditioner.embedders.1.model."
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass(frozen=True)
class Piece:
    tensor: str  # the base tensor (its key in BaseIndex.tensors)
    src: tuple[int, int] | None = None  # rows of the module's ΔW that go there (None: all)
    dst: tuple[int, int] | None = None  # rows of the tensor they go to (None: all of it)


@dataclass(frozen=True)
class Target:
    shape: tuple[int, ...]
    is_float: bool
    pieces: tuple[Piece, ...]

    def is_floating_point(self) -> bool:  # what formats.resolve asks of a base tensor
        return self.is_float

    @property
    def whole(self) -> bool:
        return len(self.pieces) == 1 and self.pieces[0].src is None and self.pieces[0].dst is None


View = dict  # name as adapters use it → Target


@dataclass
class Layout:
    kind: str  # pipeline | unet | transformer | text_encoder | sd1 | sd2 | sdxl | flux-bfl | sd3
    views: dict[str, View]
    # pipeline components that cannot be merged into, and why
    closed: dict[str, str] = field(default_factory=dict)
    # per view, its names in diffusers' naming (the pipeline's own: what diffusers and PEFT
    # load); ``convert`` names modules with these. A view missing here: every name is.
    canonical: dict[str, frozenset[str]] = field(default_factory=dict)

    @property
    def components(self) -> list[str]:
        return sorted(self.views)

    def view_name(self, component: str | None) -> str | None:
        """The view that holds ``component``'s modules (None: the base has no such part)."""
        if component in self.views:
            return component
        if component == "unet" and "transformer" in self.views:
            return "transformer"  # sd-scripts names Flux / SD3 modules lora_unet_
        if self.kind == "text_encoder" and component in TEXT_ENCODERS:
            return "text_encoder"
        if component == "text_encoder_3" and "text_encoder_3" not in self.views:
            te2 = self.views.get("text_encoder_2") or {}
            if any(".block." in k or k.startswith("block.") for k in te2):
                return "text_encoder_2"  # Flux's T5 is its pipeline's text_encoder_2
        return None


def _whole(base: BaseIndex, key: str) -> Target:
    info = base.tensors[key]
    return Target(tuple(info.shape), info.dtype in FLOAT_DTYPES, (Piece(key),))


def native(base: BaseIndex, strip: str = "", keys=None) -> View:
    """The file's own names (``strip`` removed) as a view."""
    view: View = {}
    for key in keys if keys is not None else base.tensors:
        if key.startswith(strip):
            view[key[len(strip) :]] = _whole(base, key)
    return view


# -- aliases from maps.py ------------------------------------------------------------------------


def add_unet_aliases(view: View, original_names: bool) -> None:
    """Add the other naming (diffusers ↔ ldm) for every weight of a UNet view."""
    names = [n for n in view if n.endswith(".weight")]
    shape = (
        maps.unet_shape_from_ldm(names) if original_names else maps.unet_shape_from_diffusers(names)
    )
    if shape is None:
        return
    r = maps.unet_renamer(shape)
    for n in names:
        alias = r.to_diffusers(n) if original_names else r.to_original(n)
        if alias and alias not in view:
            view[alias] = view[n]


def add_openclip_aliases(view: View) -> None:
    """transformers CLIPTextModel names for an OpenCLIP text encoder's view
    (``transformer.resblocks.N.…`` → ``text_model.encoder.layers.N.…``; q, k, v are rows of
    ``attn.in_proj_weight``)."""
    for n, t in list(view.items()):
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", n)
        if m is None:
            continue
        layer, rest = m.groups()
        for hf, oc, rows in maps.OPENCLIP_LAYER:
            oc_name = oc if oc.endswith("_weight") else oc + ".weight"
            if rest != oc_name:
                continue
            hf_name = f"text_model.encoder.layers.{layer}.{hf}.weight"
            if rows is None:
                view.setdefault(hf_name, t)
                continue
            ((src, dst),) = maps.row_pieces(rows, t.shape[0], 0)
            shape = (dst[1] - dst[0], *t.shape[1:])
            view.setdefault(
                hf_name, Target(shape, t.is_float, (Piece(t.pieces[0].tensor, None, dst),))
            )


def _flux_rules(view: View, original_names: bool):
    """Each Flux rule instantiated for the blocks the view has: (diffusers, BFL, rows)."""
    if original_names:
        dbl = {int(m.group(1)) for n in view if (m := re.match(r"double_blocks\.(\d+)\.", n))}
        sgl = {int(m.group(1)) for n in view if (m := re.match(r"single_blocks\.(\d+)\.", n))}
    else:
        dbl = {int(m.group(1)) for n in view if (m := re.match(r"transformer_blocks\.(\d+)\.", n))}
        sgl = {
            int(m.group(1))
            for n in view
            if (m := re.match(r"single_transformer_blocks\.(\d+)\.", n))
        }
    for d, b, rows in maps.FLUX_TOP:
        yield d, b, rows
    for i in sorted(dbl):
        for d, b, rows in maps.FLUX_DOUBLE:
            yield d.format(i=i), b.format(i=i), rows
    for i in sorted(sgl):
        for d, b, rows in maps.FLUX_SINGLE:
            yield d.format(i=i), b.format(i=i), rows


def _flux_hidden(view: View, original_names: bool) -> int:
    for n, t in view.items():
        if original_names and re.match(r"double_blocks\.\d+\.img_attn\.qkv\.weight$", n):
            return t.shape[0] // 3
        if not original_names and re.match(r"transformer_blocks\.\d+\.attn\.to_q\.weight$", n):
            return t.shape[0]
        if not original_names and re.match(
            r"single_transformer_blocks\.\d+\.attn\.to_q\.weight$", n
        ):
            return t.shape[0]
    return 0


def add_flux_aliases(view: View, original_names: bool) -> None:
    """BFL names for a diffusers Flux transformer, or diffusers names for a BFL one."""
    hidden = _flux_hidden(view, original_names)
    if not hidden:
        return
    add_fused_aliases(view, list(_flux_rules(view, original_names)), hidden, original_names)


def _sd3_rules(view: View, original_names: bool):
    """Each SD3 rule instantiated for the joint blocks the view has: (diffusers, MMDiT, rows).
    A joint block's context modulation is the last block's pre-only one (its halves swapped)
    when it has 2 chunks (rows = 2 × its input width) instead of 6."""
    pattern = r"joint_blocks\.(\d+)\." if original_names else r"transformer_blocks\.(\d+)\."
    blocks = sorted({int(m.group(1)) for n in view if (m := re.match(pattern, n))})
    yield from maps.SD3_TOP
    for i in blocks:
        for d, b, rows in maps.SD3_JOINT:
            yield d.format(i=i), b.format(i=i), rows
        d, b = (x.format(i=i) for x in maps.SD3_CONTEXT_MOD)
        t = view.get((b if original_names else d) + ".weight")
        if t is None:
            continue
        pre_only = len(t.shape) == 2 and t.shape[0] == 2 * t.shape[1]
        yield d, b, ("swap",) if pre_only else None


def add_sd3_aliases(view: View, original_names: bool) -> frozenset[str]:
    """diffusers names for SAI's MMDiT (SD3 / SD3.5 original), or MMDiT names for a diffusers
    SD3Transformer2DModel; returns the view's diffusers names (``context_embedder`` is one
    name in both)."""
    return add_fused_aliases(view, list(_sd3_rules(view, original_names)), 0, original_names)


def add_fused_aliases(view: View, rules, hidden: int, original_names: bool) -> frozenset[str]:
    """The other naming for a view, from (diffusers, original, rows) rules (``maps.py``):
    several diffusers tensors may be rows of one original tensor, or its halves swapped.
    Returns, for a view in the original names, the diffusers names it now has."""
    named: set[str] = set()
    groups: dict[str, list] = {}
    for d, b, rows in rules:
        groups.setdefault(b, []).append((d, rows))
    for b, members in groups.items():
        b_name = b + ".weight"
        if original_names:
            t = view.get(b_name)
            if t is None:
                continue
            for d, rows in members:
                named.add(d + ".weight")
                if rows is None:
                    view.setdefault(d + ".weight", t)
                    continue
                pieces = maps.row_pieces(rows, t.shape[0], hidden)
                rows_total = sum(s[1] - s[0] for s, _ in pieces)
                target = Target(
                    (rows_total, *t.shape[1:]),
                    t.is_float,
                    tuple(
                        Piece(t.pieces[0].tensor, s if rows[0] == "swap" else None, o)
                        for s, o in pieces
                    ),
                )
                view.setdefault(d + ".weight", target)
        else:
            parts = [(view.get(d + ".weight"), rows) for d, rows in members]
            if any(t is None for t, _ in parts):
                continue
            if members[0][1] is None:
                view.setdefault(b_name, parts[0][0])
                continue
            if members[0][1][0] == "swap":
                t = parts[0][0]
                pieces = maps.row_pieces(("swap",), t.shape[0], hidden)
                view.setdefault(
                    b_name,
                    Target(
                        t.shape,
                        t.is_float,
                        tuple(Piece(t.pieces[0].tensor, o, s) for s, o in pieces),
                    ),
                )
                continue
            # several diffusers tensors make up the fused BFL one: the module's rows split
            pieces, start = [], 0
            for t, _ in parts:
                n = t.shape[0]
                pieces.append(Piece(t.pieces[0].tensor, (start, start + n), None))
                start += n
            t0 = parts[0][0]
            view.setdefault(b_name, Target((start, *t0.shape[1:]), t0.is_float, tuple(pieces)))
    return frozenset(named)


# -- recognising a base --------------------------------------------------------------------------


def classify(keys) -> str | None:
    """What one component's keys are: unet, unet-ldm, flux, flux-bfl, sd3, sd3-mmdit,
    transformer, text_encoder (CLIP / T5), or None (not an image-model component)."""
    ks = list(keys)
    if any(k.startswith(("input_blocks.", "output_blocks.")) for k in ks):
        return "unet-ldm"
    if any(k.startswith("down_blocks.") for k in ks) and any(k.startswith("conv_in.") for k in ks):
        return "unet"
    if any(re.match(r"double_blocks\.\d+\.img_attn\.qkv\.weight$", k) for k in ks):
        return "flux-bfl"
    if any(k.startswith("single_transformer_blocks.") for k in ks):
        return "flux"
    if any(re.match(r"joint_blocks\.\d+\.x_block\.attn\.qkv\.weight$", k) for k in ks):
        return "sd3-mmdit"
    if any(re.match(r"transformer_blocks\.\d+\.attn\.add_q_proj\.weight$", k) for k in ks) and any(
        k.startswith("pos_embed.proj.") for k in ks
    ):
        return "sd3"
    if any(k.startswith(("transformer_blocks.", "joint_blocks.")) for k in ks) and any(
        k.startswith(("pos_embed.", "x_embedder.", "context_embedder.")) for k in ks
    ):
        return "transformer"
    if any(re.match(r"(text_model\.)?encoder\.layers\.\d+\.self_attn\.", k) for k in ks) and any(
        "embeddings.token_embedding" in k for k in ks
    ):
        return "text_encoder"
    if any(re.match(r"(encoder\.)?block\.\d+\.layer\.\d+\.SelfAttention\.", k) for k in ks):
        return "text_encoder"
    return None


def component_view(base: BaseIndex, keys, prefix: str) -> tuple[str | None, View]:
    """(component, view) of one component's keys (their BaseIndex keys start with ``prefix``)."""
    component, view, _ = _component_view(base, keys, prefix)
    return component, view


def _component_view(base: BaseIndex, keys, prefix: str):
    """(component, view, its diffusers-named keys)."""
    rel = [k[len(prefix) :] for k in keys]
    kind = classify(rel)
    view = native(base, prefix, keys)
    own = frozenset(view)
    if kind in ("unet", "unet-ldm"):
        add_unet_aliases(view, kind == "unet-ldm")
        return "unet", view, _diffusers_keys(view, own, kind == "unet-ldm")
    if kind in ("flux", "flux-bfl"):
        add_flux_aliases(view, kind == "flux-bfl")
        return "transformer", view, _diffusers_keys(view, own, kind == "flux-bfl")
    if kind == "sd3":
        add_sd3_aliases(view, False)
        return "transformer", view, own
    if kind == "sd3-mmdit":
        named = add_sd3_aliases(view, True)
        return "transformer", view, _diffusers_keys(view, own, True) | named
    return kind, view, own


def _diffusers_keys(view: View, own: frozenset[str], original_names: bool) -> frozenset[str]:
    """A view's names in diffusers' naming: its own, or the aliases added for a file in the
    original (ldm / BFL / OpenCLIP) naming."""
    return frozenset(set(view) - own) if original_names else own


def detect(base: BaseIndex) -> Layout | None:
    if isinstance(base, PipelineIndex):
        views, canonical = {}, {}
        for c in base.usable:
            keys = [f"{c.name}.{k}" for k in c.index.tensors]
            _, views[c.name], canonical[c.name] = _component_view(base, keys, c.name + ".")
        closed = {c.name: c.why for c in base.components if c.index is None}
        return Layout("pipeline", views, closed, canonical)
    keys = list(base.tensors)
    if any(k.startswith(SD_UNET + "input_blocks.") for k in keys):
        return _sd_family(base, keys)
    bfl = next(
        (k for k in keys if re.search(r"(^|\.)double_blocks\.0\.img_attn\.qkv\.weight$", k)), None
    )
    if bfl is not None:
        prefix = bfl[: bfl.index("double_blocks.0.")]
        view = native(base, prefix)
        own = frozenset(view)
        add_flux_aliases(view, True)
        return Layout(
            "flux-bfl",
            {"transformer": view},
            canonical={"transformer": _diffusers_keys(view, own, True)},
        )
    mmdit = next(
        (k for k in keys if re.search(r"(^|\.)joint_blocks\.0\.x_block\.attn\.qkv\.weight$", k)),
        None,
    )
    if mmdit is not None:
        return _sd3_file(base, keys, mmdit[: mmdit.index("joint_blocks.0.")])
    component, view, own = _component_view(base, keys, "")
    if component is None:
        return None
    return Layout(component, {component: view}, canonical={component: own})


def _sd_family(base: BaseIndex, keys) -> Layout:
    unet = native(base, SD_UNET)
    own = frozenset(unet)
    add_unet_aliases(unet, True)
    views = {"unet": unet}
    canonical = {"unet": _diffusers_keys(unet, own, True)}

    def openclip(component: str, prefix: str) -> None:
        te = native(base, prefix)
        own = frozenset(te)
        add_openclip_aliases(te)  # transformers' CLIP names, which diffusers' pipelines use
        views[component], canonical[component] = te, _diffusers_keys(te, own, True)

    if any(k.startswith(SDXL_CLIP) for k in keys) or any(k.startswith(SDXL_OPENCLIP) for k in keys):
        kind = "sdxl"
        if any(k.startswith(SDXL_CLIP) for k in keys):
            views["text_encoder"] = native(base, SDXL_CLIP)
        if any(k.startswith(SDXL_OPENCLIP) for k in keys):
            openclip("text_encoder_2", SDXL_OPENCLIP)
    elif any(k.startswith(SD2_OPENCLIP) for k in keys):
        kind = "sd2"
        openclip("text_encoder", SD2_OPENCLIP)
    else:
        kind = "sd1"
        if any(k.startswith(SD1_CLIP) for k in keys):
            views["text_encoder"] = native(base, SD1_CLIP)
    return Layout(kind, views, canonical=canonical)


# SD3's original single file: its text encoders in transformers' names behind these prefixes
# (diffusers' single_file_utils reads them from there), as a pipeline names them
SD3_TEXT_ENCODERS = (
    ("text_encoder", "text_encoders.clip_l.transformer."),
    ("text_encoder_2", "text_encoders.clip_g.transformer."),
    ("text_encoder_3", "text_encoders.t5xxl.transformer."),
)


def _sd3_file(base: BaseIndex, keys, prefix: str) -> Layout:
    """An SD3 / SD3.5 original single file: the MMDiT (``joint_blocks.N.x_block.…``, usually
    behind ``model.diffusion_model.``) and the text encoders it includes."""
    view = native(base, prefix, [k for k in keys if k.startswith(prefix)] if prefix else None)
    own = frozenset(view)
    named = add_sd3_aliases(view, True)
    views = {"transformer": view}
    canonical = {"transformer": _diffusers_keys(view, own, True) | named}
    for component, te_prefix in SD3_TEXT_ENCODERS:
        if any(k.startswith(te_prefix) for k in keys):
            views[component] = native(base, te_prefix)
            canonical[component] = frozenset(views[component])
    return Layout("sd3", views, canonical=canonical)
