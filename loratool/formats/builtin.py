"""Registrations for the formats whose modules other helpers own (``peft.py``, ``canonical.py``):
the registry entries live here so those files stay as they are."""

from __future__ import annotations

from pathlib import Path

from ..adapter import Adapter
from ..errors import ValidationError
from . import naming
from .canonical import canonical_bytes, canonical_from_tensors, is_canonical
from .peft import CONFIG, WEIGHTS, read_peft, write_peft_files
from .registry import Format, WriteContext, register


def _peft_detect(path: Path, header) -> bool:
    if path.is_dir():
        return (path / CONFIG).is_file() and not _is_mlx_config(path / CONFIG)
    return path.name == WEIGHTS and (path.parent / CONFIG).is_file()


def _is_mlx_config(cfg: Path) -> bool:
    from .mlx import is_mlx_config

    return is_mlx_config(cfg)


def _peft_read(path: Path, lazy: bool) -> Adapter:
    folder = path if path.is_dir() else path.parent
    return read_peft(folder, lazy=lazy)


def single_model(adapter: Adapter, ctx: WriteContext, fmt: str) -> Adapter:
    """The adapter as one model's modules (``<path>.weight``): a pipeline adapter's component
    prefix is dropped, or ``--component`` picks one component out of several."""
    groups: dict[str | None, dict[str, str]] = {}
    for name in [*adapter.modules, *adapter.ops]:
        mid = naming.parse(name)
        if mid.path is None:
            raise ValidationError(
                "a kohya name whose dots cannot be told from its underscores",
                tensor=name,
                hint="pass --base with the model it is for",
            )
        if "." not in name:  # a kohya stem: its dotted path
            new = mid.path + ".weight"
        elif mid.explicit and name.startswith(f"{mid.component}."):
            new = name[len(mid.component) + 1 :]  # the component prefix dropped, the rest kept
        else:
            new = name  # expert parameters, biases: not always ``.weight``
        groups.setdefault(mid.component if mid.explicit else None, {})[name] = new
    if ctx.component is not None:
        if ctx.component not in groups:
            have = ", ".join(sorted(str(c) for c in groups))
            raise ValidationError(f"no modules of component {ctx.component!r} (it has {have})")
        chosen = groups[ctx.component]
    elif len(groups) > 1:
        have = ", ".join(sorted(str(c) for c in groups))
        raise ValidationError(
            f"{fmt} holds one model but this adapter has modules of {have}",
            hint="pick one with --component",
        )
    else:
        chosen = next(iter(groups.values()))
    mods = {
        new: adapter.modules[old].with_name(new)
        for old, new in chosen.items()
        if old in adapter.modules
    }
    ops = {new: adapter.ops[old].retarget(new) for old, new in chosen.items() if old in adapter.ops}
    dropped = len(adapter.modules) + len(adapter.ops) - len(mods) - len(ops)
    if dropped:
        ctx.warn(f"{dropped} modules of other components left out (--component {ctx.component})")
    return Adapter(mods, adapter.meta, dict(adapter.origin), dict(adapter.extra_tensors), ops)


def _peft_write(adapter: Adapter, dest: Path, ctx: WriteContext) -> None:
    dest.mkdir(exist_ok=True)
    write_peft_files(single_model(adapter, ctx, "PEFT"), dest)


def _canonical_detect(path: Path, header) -> bool:
    return header is not None and is_canonical(header.metadata)


def _canonical_read(path: Path, lazy: bool) -> Adapter:
    from ..tensors.io import load_file

    tensors, metadata = load_file(path, lazy=lazy)
    return canonical_from_tensors(tensors, metadata, source=path)


def _canonical_write(adapter: Adapter, dest: Path, ctx: WriteContext) -> None:
    dest.write_bytes(canonical_bytes(adapter, with_meta=True))


PEFT = register(
    Format(
        name="peft",
        help="a directory PeftModel.from_pretrained loads (adapter_config.json + adapter_model.safetensors)",
        layout="dir",
        detect=_peft_detect,
        read=_peft_read,
        write=_peft_write,
        priority=10,
        weights=WEIGHTS,
    )
)
LORATOOL = register(
    Format(
        name="loratool",
        help="loratool's own single file: every module exactly as the catalog holds it",
        layout="file",
        detect=_canonical_detect,
        read=_canonical_read,
        write=_canonical_write,
        priority=0,
        suffix=".safetensors",
    )
)
