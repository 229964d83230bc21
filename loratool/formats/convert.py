"""Any readable adapter to any writable format (``loratool convert`` and ``export --format``).

With a base, module names are resolved against the model's own tensor names first (kohya's
flattened names become the real module paths PEFT / diffusers / MLX / GGUF need), keeping each
module's pipeline component; a diffusers pipeline directory (``model_index.json``) resolves each
component's modules against its own subfolder. The base's ``config.json`` is handed to writers
that need the architecture (GGUF).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..adapter import Adapter
from ..errors import ValidationError
from ..fsutil import check_destination
from ..tensors.header import read_base
from . import naming
from .registry import WriteContext, get
from .resolve import resolve


@dataclass
class ConvertReport:
    dest: Path
    source_format: str
    format: str
    modules: int
    warnings: list[str] = field(default_factory=list)
    # LyCORIS modules written as LoRA (tolora.to_lora): name → kind, ranks, energy kept
    converted: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {
            "dest": str(self.dest),
            "from": self.source_format,
            "to": self.format,
            "modules": self.modules,
            "warnings": list(self.warnings),
        }
        if self.converted:
            out["converted"] = self.converted
        return out


def base_config(base: str | os.PathLike) -> dict | None:
    p = Path(base)
    cfg = (p if p.is_dir() else p.parent) / "config.json"
    try:
        obj = json.loads(cfg.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def resolve_keeping_components(
    adapter: Adapter, base: str | os.PathLike, *, to: str | None = None
) -> Adapter:
    """``resolve`` against ``base``, the component prefix of each module kept in its name.

    An image model (a pipeline directory, one component, an original SD / SDXL / Flux BFL
    single file) is resolved as ``merge`` resolves it (``image.names``): its modules named in
    diffusers' naming, or for kohya / LyCORIS files (``to``) in the adapter's own naming; any
    other base by ``formats.resolve``."""
    from ..image.names import resolve_names

    named = resolve_names(
        adapter, read_base(base), source=adapter.meta.source, keep_naming=to in KEEP_NAMING
    )
    if named is not None:
        return named
    root = Path(base)
    adapter = Adapter(
        dict(adapter.modules), adapter.meta, dict(adapter.origin), adapter.extra_tensors
    )
    groups: dict[str | None, list[str]] = {}
    for name in adapter.modules:
        mid = naming.parse(name)
        groups.setdefault(mid.component if mid.explicit else None, []).append(name)
    pipeline = root.is_dir() and (root / "model_index.json").is_file()
    mapping: dict[str, str] = {}
    for component, names in groups.items():
        if pipeline:
            if component is None or not (root / component).is_dir():
                raise ValidationError(
                    f"the pipeline has no {component} component for these modules",
                    file=root,
                    tensor=names[0],
                )
            index = read_base(root / component)
        else:
            index = read_base(root)
        sub = Adapter({n: adapter.modules[n] for n in names})
        resolved = resolve(sub, index, source=adapter.meta.source)
        # resolve renames in order and may flip linear ↔ fan_in_fan_out to fit the base
        for old, (new, mod) in zip(names, resolved.modules.items(), strict=True):
            final = f"{component}.{new}" if component else new
            mapping[old] = final
            adapter.modules[old] = mod.with_name(new)
    return adapter.renamed(mapping)


def convert(
    adapter: Adapter,
    dest: str | os.PathLike,
    to: str,
    *,
    base: str | os.PathLike | None = None,
    component: str | None = None,
    force: bool = False,
    rule=None,
) -> ConvertReport:
    """``rule`` (a ``rank.RankRule``): how LyCORIS modules are truncated when the target holds
    only LoRA (default: every singular value the arithmetic resolves, i.e. exact)."""
    from . import save_adapter

    check_destination(dest, inputs=[base], force=force)
    fmt = get(to)
    if fmt.write is None:
        raise ValidationError(f"{to} cannot be written")
    if component is not None and component not in naming.COMPONENTS:
        raise ValidationError(
            f"unknown component {component!r}; one of {', '.join(naming.COMPONENTS)}"
        )
    ctx = WriteContext(component=component)
    source_format = adapter.meta.format or adapter.origin.get("format") or "?"
    from .kohya import split_qkv_note

    note = split_qkv_note(adapter, adapter.meta.source or "the adapter")
    if note:
        ctx.warn(note)
    if base is not None:
        adapter = resolve_keeping_components(adapter, base, to=to)
        ctx.base = None
        ctx.base_config = base_config(base)
    converted = {}
    if to not in KEEPS_LYCORIS:
        from ..tolora import needs_conversion, to_lora

        if needs_conversion(adapter):
            adapter, converted = to_lora(adapter, rule)
            ctx.warnings.extend(lycoris_warnings(converted, to))
    out = save_adapter(adapter, dest, to, force=force, ctx=ctx)
    return ConvertReport(out, source_format, to, len(adapter.modules), ctx.warnings, converted)


# formats whose image-model modules keep the naming the adapter uses (sd-scripts' family:
# diffusers' names for SD, BFL's for Flux); the others get diffusers' names
KEEP_NAMING = ("kohya", "lycoris")

# formats that hold LoHa / LoKr / Tucker LoCon modules as they are
KEEPS_LYCORIS = ("lycoris", "loratool")


def lycoris_warnings(converted: dict[str, dict], to: str) -> list[str]:
    """One line per kind of approximation made writing LyCORIS modules as LoRA."""
    out = []
    lossy = {n: r for n, r in converted.items() if r["energy_kept"] < 1.0 - 1e-9}
    out.append(
        f"{len(converted)} LyCORIS modules written as {to} LoRA by SVD of their ΔW"
        + (
            f"; {len(lossy)} truncated (least energy kept "
            f"{min(r['energy_kept'] for r in lossy.values()):.6f}, in {min(lossy, key=lambda n: lossy[n]['energy_kept'])})"
            if lossy
            else " (every singular value kept: exact to rounding)"
        )
    )
    assumed = sorted(n for n, r in converted.items() if r["shape_assumed"])
    if assumed:
        out.append(
            f"{len(assumed)} LoHa/LoKr modules without a Tucker core written as Linear (their "
            f"factors flatten a conv kernel; pass --base to know), e.g. {assumed[0]}"
        )
    return out
