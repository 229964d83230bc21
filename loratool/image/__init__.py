"""Merging adapters into the layouts image models ship in.

``resolve_parts`` is what a merge plan asks: for an adapter and a base, every (base tensor,
module or operation) pair to apply. For a base that is not an image model it is
``formats.resolve`` unchanged. For an image base (``layouts.detect``):

- each module is given its component from its name: kohya's prefix (``lora_unet_``,
  ``lora_te_``, ``lora_te1_``/``lora_te2_``/``lora_te3_``, ``lora_transformer_``) or diffusers'
  (``unet.``, ``transformer.``, ``text_encoder.``…); a bare name belongs to the one component
  whose names it matches;
- the modules of one component are resolved against that component's view (``formats.resolve``
  on names as adapters use them), so SDXL's two text encoders never mix;
- a module whose view target is rows of a fused tensor (q, k, v in Flux's or SD3's ``qkv`` or
  OpenCLIP's ``in_proj_weight``) gets ``target_rows`` (merge op ``slice``); one whose ΔW spreads over
  several tensors or swapped halves is split by rows (``slice_rows``);
- modules of a component the base does not hold (a text encoder's, with a UNet file alone) are
  skipped and reported in one warning per component, or refused with ``strict``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..adapter import Adapter
from ..errors import ResolutionError, ValidationError
from ..formats.resolve import candidates, resolve
from ..tensors.header import BaseIndex
from .layouts import TEXT_ENCODERS, Layout, Piece, Target, detect

__all__ = ["ResolvedParts", "compact", "component_of", "detect", "resolve_parts", "slice_rows"]

# kohya / sd-scripts prefixes → pipeline component (longest first)
KOHYA_COMPONENTS = (
    ("lora_unet_", "unet"),
    ("lora_transformer_", "transformer"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "text_encoder_3"),
    ("lora_te_", "text_encoder"),
)
DOTTED_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass
class ResolvedParts:
    modules: list = field(default_factory=list)  # (base tensor, Module)
    ops: list = field(default_factory=list)  # (base tensor, TensorOp)
    warnings: list[str] = field(default_factory=list)


def component_of(name: str) -> tuple[str | None, str]:
    """(component or None, the name to resolve inside it)."""
    if name.startswith("lora_") and "." not in name:
        for prefix, comp in KOHYA_COMPONENTS:
            if name.startswith(prefix):
                return comp, name
        return None, name
    head, _, rest = name.partition(".")
    if head in DOTTED_COMPONENTS and rest:
        return head, rest
    return None, name


def resolve_parts(
    adapter: Adapter,
    base: BaseIndex,
    *,
    source=None,
    strict: bool = False,
    facts=None,
    virtual=None,
) -> ResolvedParts:
    """``facts`` and ``virtual``: see ``formats.resolve.resolve`` (language models)."""
    layout = detect(base)
    if layout is None:
        a = resolve(adapter, base, source=source, facts=facts, virtual=virtual)
        return ResolvedParts(list(a.modules.items()), list(a.ops.items()))
    return _resolve_image(adapter, base, layout, source, strict)


def _resolve_image(adapter, base, layout: Layout, source, strict) -> ResolvedParts:
    from ..formats.kohya import split_qkv_note

    out = ResolvedParts()
    note = split_qkv_note(adapter, source or "the adapter")
    if note:
        out.warnings.append(note)
    for view_name, members in component_groups(adapter, layout, source, strict, out.warnings):
        _resolve_group(adapter, members, layout.views[view_name], base, source, out)
    return out


def component_groups(
    adapter, layout: Layout, source, strict: bool, warnings: list[str], skipped=None
):
    """The adapter's modules and operations by the view that holds them: [(view name,
    {name: (name inside the component, part)})]. Parts of components the base does not hold
    are skipped with a warning (appended to ``warnings``; ``skipped``, a dict, gets their
    count by component), or refused with ``strict``."""
    groups: dict[str | None, dict[str, tuple[str, object]]] = {}
    for name, part in [*adapter.modules.items(), *adapter.ops.items()]:
        comp, inner = component_of(name)
        groups.setdefault(comp, {})[name] = (inner, part)
    if None in groups:
        for name, (inner, part) in groups.pop(None).items():
            comp = _guess_component(layout, inner, source, name)
            groups.setdefault(comp, {})[name] = (inner, part)
    tes = sorted(c for c in groups if c in TEXT_ENCODERS)
    if layout.kind == "text_encoder" and len(tes) > 1:
        raise ValidationError(
            f"the adapter has modules for {' and '.join(tes)} but the base is one text encoder",
            file=source,
            hint="merge into the pipeline directory or the original checkpoint",
        )
    skipped = {} if skipped is None else skipped
    found = []
    for comp, members in groups.items():
        view_name = layout.view_name(comp)
        if view_name is None:
            if comp in layout.closed:
                raise ValidationError(
                    f"{len(members)} modules are for the pipeline's {comp}, which "
                    f"{layout.closed[comp]}",
                    file=source,
                )
            skipped[comp] = len(members)
            continue
        found.append((view_name, members))
    for comp, n in sorted(skipped.items()):
        msg = (
            f"{source or 'the adapter'}: {n} modules of {comp} skipped: the base holds "
            f"{', '.join(layout.components)} only"
        )
        if strict:
            raise ValidationError(msg, hint="drop --strict to merge the rest")
        warnings.append(msg)
    if not found:
        raise ResolutionError(
            "no module of the adapter is for this base "
            f"(it holds {', '.join(layout.components)}; the adapter has {', '.join(sorted(map(str, groups)))})",
            file=source,
        )
    return found


def _guess_component(layout: Layout, inner: str, source, name: str) -> str | None:
    if len(layout.views) == 1:
        return next(iter(layout.views))
    hits = [c for c, view in layout.views.items() if candidates(inner, list(view))]
    if len(hits) == 1:
        return hits[0]
    raise ResolutionError(
        "cannot tell which component it belongs to"
        + (f": it matches tensors of {', '.join(hits)}" if hits else ""),
        file=source,
        tensor=name,
        hint="name it with a component prefix (unet., text_encoder., lora_te_…)",
    )


def resolve_in_view(adapter, members, view, source) -> Adapter:
    """One component's modules and operations resolved against its view (names as the view
    knows them)."""
    mods = {
        inner: part.with_name(inner)
        for name, (inner, part) in members.items()
        if name in adapter.modules
    }
    ops = {
        inner: part.retarget(inner)
        for name, (inner, part) in members.items()
        if name in adapter.ops
    }
    return resolve(Adapter(mods, ops=ops), view, source=source)


def _resolve_group(adapter, members, view, base, source, out: ResolvedParts) -> None:
    resolved = resolve_in_view(adapter, members, view, source)
    for vname, mod in resolved.modules.items():
        target: Target = view[vname]
        for piece in target.pieces:
            out.modules.append(_place(mod, piece, base, source, vname))
    for vname, op in resolved.ops.items():
        target = view[vname]
        if not target.whole:
            raise ValidationError(
                f"{op.why} replaces a tensor that is part of a fused one in this base",
                file=source,
                tensor=vname,
            )
        t = target.pieces[0].tensor
        out.ops.append((t, op.retarget(t)))


def _place(mod, piece: Piece, base: BaseIndex, source, vname: str):
    if piece.src is not None:
        mod = compact(slice_rows(mod, *piece.src, source=source))
    mod = mod.with_name(piece.tensor)
    if piece.dst is not None:
        if not any(f.name == "target_rows" for f in dataclasses.fields(mod)):
            raise ValidationError(
                f"a {mod.label} module cannot be merged into rows of a fused tensor",
                file=source,
                tensor=vname,
            )
        mod = dataclasses.replace(mod, target_rows=tuple(piece.dst))
    shape = tuple(base.tensors[piece.tensor].shape)
    return piece.tensor, mod.fit(shape, source=source, where=base.root)


def slice_rows(mod, lo: int, hi: int, *, source=None):
    """A module whose ΔW is rows lo:hi of ``mod``'s (its output rows): B's rows for LoRA, the
    out-side factors' for LoHa and Tucker LoCon. A LoKr's rows are rows of a Kronecker product
    and have no such form: refused."""
    from ..adapter import LoconTuckerModule, LohaModule, LoraModule

    m = mod.materialized()
    if isinstance(m, LoraModule) and m.kind in ("linear", "conv2d") and m.magnitude is None:
        return dataclasses.replace(m, B=m.B[lo:hi].contiguous())
    if isinstance(m, LohaModule):
        if m.tucker:
            a1, a2 = m.w1a[:, lo:hi], m.w2a[:, lo:hi]
        else:
            a1, a2 = m.w1a[lo:hi], m.w2a[lo:hi]
        return dataclasses.replace(m, w1a=a1.contiguous(), w2a=a2.contiguous(), shape=None)
    if isinstance(m, LoconTuckerModule):
        return dataclasses.replace(m, up=m.up[lo:hi].contiguous(), shape=None)
    raise ValidationError(
        f"a {m.label} module's ΔW would have to be split across tensors here (rows {lo}:{hi}), "
        "which it has no form for",
        file=source,
        tensor=m.name,
    )


def compact(mod):
    """``mod`` without the rank components that change nothing: the columns of a LoRA's B that
    are all zero (with A's matching rows), alpha chosen so that the scale stays the same float.

    Rows of a block-diagonal B have such columns: sd-scripts' Flux ``split_qkv`` saves q, k, v
    (and a single block's MLP) as one module, A their stacked A's and B their B's on the
    diagonal (``LoRANetwork.state_dict``), so the q rows of B use q's rank columns only. Their
    ΔW is unchanged (the dropped terms are exact zeros); a module with no such column, or whose
    scale no alpha at the smaller rank gives exactly, is returned as it is."""
    from ..adapter import LoraModule

    if not isinstance(mod, LoraModule) or mod.kind != "linear" or mod.magnitude is not None:
        return mod
    m = mod.materialized()
    used = m.B.ne(0).any(dim=0)
    keep = int(used.sum())
    if keep in (0, m.rank):
        return mod
    alpha = _alpha_for(m, keep)
    if alpha is None:
        return mod
    idx = used.nonzero().flatten()
    return dataclasses.replace(m, A=m.A[idx].contiguous(), B=m.B[:, idx].contiguous(), alpha=alpha)


def _alpha_for(m, rank: int) -> float | None:
    """An alpha that gives ``m``'s scale at ``rank`` exactly (float64), or None."""
    import math

    div = math.sqrt(rank) if m.rslora else rank
    want = m.scale
    first = want * div
    for alpha in (first, math.nextafter(first, math.inf), math.nextafter(first, -math.inf)):
        if math.isfinite(alpha) and alpha / div == want:
            return alpha
    return None
