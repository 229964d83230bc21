"""An image adapter's modules resolved against a base and named for the format written.

``convert --base`` for an image model resolves exactly as ``merge`` does (the same component
groups and views, ``component_groups`` / ``resolve_in_view``), so a module matches its base
tensor in whatever naming the adapter uses: diffusers', the original checkpoint's (ldm / sgm,
BFL, OpenCLIP) or kohya's flattening of either, against a pipeline directory or an original
single file alike. For diffusers, PEFT and the other non-kohya targets the module is then named
in the naming of a diffusers pipeline's component (what diffusers and PEFT load), whatever the
base's layout: the same adapter converts to the same names against an SD 1.5 ``.safetensors``
file and against its pipeline directory. For kohya and LyCORIS files (``keep_naming``) each
module keeps the naming the adapter uses, unflattened (sd-scripts names SD modules after
diffusers' but Flux modules after BFL's, and ComfyUI reads both), under the component the
base gives it (Flux's T5 is a pipeline's ``text_encoder_2``, which kohya calls ``lora_te3_``).

Where one module in one naming is several in the other (BFL's fused ``qkv`` / ``linear1``
against diffusers' ``to_q``, ``to_k``, ``to_v``, ``proj_mlp``; OpenCLIP's ``in_proj``), its ΔW
is split by rows, exactly as the merge would place it: a LoRA's ``B`` rows, the same ``A``
(diffusers' and sd-scripts' own Flux converters do the same). Rows that must be reordered
(BFL's final modulation is shift, scale; diffusers' scale, shift) are taken in the diffusers
order.
"""

from __future__ import annotations

import dataclasses

from ..adapter import Adapter
from ..errors import ValidationError
from ..formats import naming
from ..tensors.header import BaseIndex
from .layouts import Layout, Target, detect

__all__ = ["resolve_names"]


def resolve_names(
    adapter: Adapter, base: BaseIndex, *, source=None, keep_naming: bool = False
) -> Adapter | None:
    """``adapter`` with every module and operation resolved against ``base`` and renamed
    ``<component>.<diffusers name>`` (a module may become several, see the module docstring)
    or, with ``keep_naming``, ``<component>.<its own name, unflattened>``; None when ``base``
    is not an image model. Every module must find its tensor: a module of a component the
    base does not hold is refused (nothing is dropped)."""
    from . import component_groups, resolve_in_view

    layout = detect(base)
    if layout is None:
        return None
    skipped: dict[str, int] = {}
    groups = component_groups(adapter, layout, source, False, [], skipped)
    if skipped:
        comp, n = sorted(skipped.items())[0]
        raise ValidationError(
            f"{n} modules of {comp}: the base holds {', '.join(layout.components)} only",
            file=source,
            hint="convert against a base that holds every component the adapter changes "
            "(the pipeline directory or the full checkpoint)",
        )
    modules, ops = {}, {}
    for view_name, members in groups:
        resolved = resolve_in_view(adapter, members, layout.views[view_name], source)
        names = _Canonical(layout, view_name, base)
        for vname, mod in resolved.modules.items():
            whole = [(vname, [(0, mod.base_shape[0])])]
            for cname, rows in whole if keep_naming else names.of(vname, source):
                new = f"{view_name}.{_clip_path(view_name, cname)}"
                if new in modules:
                    raise ValidationError(
                        f"two modules change {cname} of {view_name}", file=source, tensor=vname
                    )
                modules[new] = take_rows(mod, rows, source=source).with_name(new)
        for vname, op in resolved.ops.items():
            cname = vname if keep_naming else names.of(vname, source, whole=True)[0][0]
            new = f"{view_name}.{_clip_path(view_name, cname)}"
            ops[new] = op.retarget(new)
    return Adapter(modules, adapter.meta, dict(adapter.origin), dict(adapter.extra_tensors), ops)


def _clip_path(component: str, name: str) -> str:
    """A CLIP text encoder's path without transformers 4's ``text_model.`` level, as
    transformers 5 names it: PEFT matches target modules by suffix, so this form finds the
    module in either (writers that need the level, kohya's, add it back)."""
    rest = name.removeprefix("text_model.")
    return rest if rest != name and naming.is_clip_text_path(component, rest) else name


def _segments(t: Target, base: BaseIndex) -> list[tuple[str, int, int, int, int]]:
    """A target as (tensor, module rows lo, hi, tensor rows lo, hi) segments."""
    out = []
    for p in t.pieces:
        total = base.tensors[p.tensor].shape[0]
        dst = p.dst or (0, total)
        src = p.src or (0, dst[1] - dst[0])
        out.append((p.tensor, *src, *dst))
    return out


class _Canonical:
    """The diffusers names of one view and the rows of base tensors each stands for."""

    def __init__(self, layout: Layout, view_name: str, base: BaseIndex):
        self.view = layout.views[view_name]
        self.view_name = view_name
        self.base = base
        names = layout.canonical.get(view_name)
        self.names = frozenset(self.view) if names is None else names
        self.by_tensor: dict[str, list[str]] = {}
        for n in sorted(self.names):
            for p in self.view[n].pieces:
                self.by_tensor.setdefault(p.tensor, []).append(n)

    def of(self, vname: str, source, *, whole: bool = False) -> list[tuple[str, list]]:
        """[(diffusers name, module row blocks it takes)] for the module resolved to
        ``vname``; the blocks together take every row of the module exactly once."""
        target = self.view[vname]
        rows = target.shape[0]
        if vname in self.names:
            return [(vname, [(0, rows)])]
        mine = _segments(target, self.base)
        out: list[tuple[str, list]] = []
        covered: list[tuple[str, int, int]] = []
        for cname in dict.fromkeys(n for seg in mine for n in self.by_tensor.get(seg[0], ())):
            blocks = _blocks(_segments(self.view[cname], self.base), mine)
            if blocks is None:
                continue
            out.append((cname, blocks))
            covered += [(s[0], s[3], s[4]) for s in _segments(self.view[cname], self.base)]
        if not out or not _tiles(covered, [(s[0], s[3], s[4]) for s in mine]):
            raise ValidationError(
                f"has no name in diffusers' naming of the {self.view_name} in this base",
                file=source,
                tensor=vname,
            )
        if whole and (len(out) > 1 or out[0][1] != [(0, rows)]):
            raise ValidationError(
                f"replaces a tensor that is {len(out)} tensors in diffusers' naming",
                file=source,
                tensor=vname,
            )
        return out


def _blocks(theirs, mine) -> list[tuple[int, int]] | None:
    """The module rows (in ``mine``'s numbering) that make up ``theirs``, in their row order;
    None when ``theirs`` lies (even partly) outside what ``mine`` covers."""
    blocks: list[tuple[int, int]] = []
    # in the order of their own rows (a Target's pieces tile its rows)
    for tensor, _c_lo, _c_hi, t_lo, t_hi in sorted(theirs, key=lambda s: s[1]):
        pos = t_lo
        while pos < t_hi:
            seg = next(
                (s for s in mine if s[0] == tensor and s[3] <= pos < s[4]),
                None,
            )
            if seg is None:
                return None
            stop = min(t_hi, seg[4])
            lo = seg[1] + (pos - seg[3])
            hi = lo + (stop - pos)
            if blocks and blocks[-1][1] == lo:
                blocks[-1] = (blocks[-1][0], hi)
            else:
                blocks.append((lo, hi))
            pos = stop
    return blocks


def _tiles(parts, whole) -> bool:
    """Whether the (tensor, lo, hi) row ranges ``parts`` cover ``whole``'s exactly once."""

    def rows(ranges):
        out: dict[str, list[tuple[int, int]]] = {}
        for t, lo, hi in ranges:
            out.setdefault(t, []).append((lo, hi))
        return {t: sorted(v) for t, v in out.items()}

    have, want = rows(parts), rows(whole)
    if have.keys() != want.keys():
        return False
    for t, ranges in have.items():
        merged: list[list[int]] = []
        for lo, hi in ranges:
            if merged and lo < merged[-1][1]:
                return False  # two names for the same rows
            if merged and lo == merged[-1][1]:
                merged[-1][1] = hi
            else:
                merged.append([lo, hi])
        target: list[list[int]] = []
        for lo, hi in want[t]:
            if target and lo == target[-1][1]:
                target[-1][1] = hi
            else:
                target.append([lo, hi])
        if merged != target:
            return False
    return True


def take_rows(mod, blocks: list[tuple[int, int]], *, source=None):
    """A module whose ΔW is the rows ``blocks`` of ``mod``'s, concatenated in that order,
    without the rank components those rows do not use (``image.compact``: the q rows of an
    sd-scripts ``split_qkv`` module keep q's rank only)."""
    from . import compact, slice_rows

    if len(blocks) == 1:
        lo, hi = blocks[0]
        if lo == 0 and hi == mod.base_shape[0]:
            return mod
        return compact(slice_rows(mod, lo, hi, source=source))
    import torch

    parts = [slice_rows(mod, lo, hi, source=source) for lo, hi in blocks]
    first = parts[0]
    if not hasattr(first, "B"):
        raise ValidationError(
            f"a {mod.label} module's rows cannot be reordered", file=source, tensor=mod.name
        )
    return compact(dataclasses.replace(first, B=torch.cat([p.B for p in parts]).contiguous()))
