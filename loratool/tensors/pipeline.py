"""A diffusers pipeline directory as one base: ``model_index.json`` and a subfolder per component.

``DiffusionPipeline.save_pretrained`` writes each model component (``unet``, ``transformer``,
``text_encoder``, ``text_encoder_2``, ``vae``…) into its own folder, as
``diffusion_pytorch_model.safetensors`` or ``model.safetensors``, sharded with an index or not;
the rest (``model_index.json``, ``scheduler/``, ``tokenizer/``, each ``config.json``) are files.

The pipeline's tensors are named ``<component>.<name in its file>`` (``unet.conv_in.weight``);
``TensorInfo.name`` keeps the name inside the file, which is what the output file holds. A
component whose weights cannot be read as one set of safetensors (only pickles, or several
variants such as ``….fp16.safetensors`` beside the main file: merging one would leave the
others stale) is not indexed: its files are copied as they are, and an adapter that targets it
is refused (``Component.why``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FormatError
from .header import BaseIndex, TensorInfo

MODEL_INDEX = "model_index.json"


@dataclass(frozen=True)
class Component:
    name: str
    folder: Path
    index: BaseIndex | None  # None: not merged into (``why`` says why)
    why: str | None = None


@dataclass(frozen=True)
class PipelineIndex(BaseIndex):
    components: tuple[Component, ...] = field(default_factory=tuple)

    def component(self, name: str) -> Component | None:
        return next((c for c in self.components if c.name == name), None)

    @property
    def usable(self) -> list[Component]:
        return [c for c in self.components if c.index is not None]


def is_pipeline(root: Path) -> bool:
    return root.is_dir() and (root / MODEL_INDEX).is_file()


def read_pipeline(root: Path) -> PipelineIndex:
    from .header import read_base

    try:
        spec = json.loads((root / MODEL_INDEX).read_text())
        if not isinstance(spec, dict):
            raise ValueError
    except (OSError, ValueError) as exc:
        raise FormatError(f"{MODEL_INDEX} is not a JSON object", file=root / MODEL_INDEX) from exc
    comps: list[Component] = []
    for name, value in spec.items():
        if name.startswith("_") or not isinstance(value, list) or not any(value):
            continue
        folder = root / name
        if "/" in name or "\\" in name or name in (".", "..") or not folder.is_dir():
            continue
        weights = sorted(p for p in folder.glob("*.safetensors"))
        if not weights:
            continue  # scheduler, tokenizer, or a component saved as pickles: copied as files
        try:
            index = read_base(folder)
        except FormatError as exc:
            comps.append(Component(name, folder, None, exc.message))
            continue
        stale = sorted(p.name for p in weights if p not in index.files)
        if stale:
            comps.append(
                Component(
                    name,
                    folder,
                    None,
                    f"holds weight variants ({', '.join(stale)}) beside "
                    f"{', '.join(f.name for f in index.files)}: merging one set would leave the "
                    "others unmerged",
                )
            )
            continue
        comps.append(Component(name, folder, index))
    if not any(c.index is not None for c in comps):
        raise FormatError("a pipeline directory with no component saved as safetensors", file=root)
    files: list[Path] = []
    tensors: dict[str, TensorInfo] = {}
    metas: dict[Path, dict[str, str]] = {}
    for c in comps:
        if c.index is None:
            continue
        files += c.index.files
        metas.update(c.index.file_metadata)
        for key, info in c.index.tensors.items():
            tensors[f"{c.name}.{key}"] = info
    return PipelineIndex(root, tuple(files), tensors, None, {}, metas, tuple(comps))


def out_name(base: BaseIndex, f: Path) -> str:
    """Where ``f`` goes inside the output directory (its path relative to the base)."""
    return f.relative_to(base.root).as_posix()


def component_indexes(base: PipelineIndex, sizes: dict[Path, int], where: dict[str, Path]):
    """One index per sharded component: (path relative to the base, index JSON), the
    ``weight_map`` naming tensors as their files name them. ``sizes``: bytes of tensor data
    written per base file; ``where``: tensor key → base file."""
    out = []
    for c in base.usable:
        idx = c.index
        if idx.index_path is None:
            continue
        weight_map = {
            key: where[f"{c.name}.{key}"].relative_to(c.folder).as_posix() for key in idx.tensors
        }
        total = sum(sizes[f] for f in idx.files)
        doc = {"metadata": {**idx.index_metadata, "total_size": total}, "weight_map": weight_map}
        out.append((out_name(base, idx.index_path), doc))
    return out


def extra_candidates(base: PipelineIndex) -> list[Path]:
    """Every file of the pipeline that is not a merged weight file or its index, in order."""
    skip = set()
    for c in base.usable:
        skip.update(f.resolve() for f in c.index.files)
        if c.index.index_path is not None:
            skip.add(c.index.index_path.resolve())
    out = []
    for dirpath, dirnames, filenames in os.walk(base.root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            p = Path(dirpath) / fn
            if fn.startswith(".") or p.resolve() in skip:
                continue
            out.append(p)
    return out
