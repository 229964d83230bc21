"""The folder `push` uploads: the adapter in the layout its users load, and a model card.

A language-model adapter goes up in PEFT's layout (adapter_config.json +
adapter_model.safetensors: ``PeftModel.from_pretrained`` / ``AutoPeftModel…`` load it); an
image-model adapter (modules of a UNet, a diffusion transformer or its text encoders) in
diffusers' (pytorch_lora_weights.safetensors: ``pipe.load_lora_weights(repo)`` loads it).
Nothing local goes up: a base named by a path on this machine is left out of the config and
the card, with a warning.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .adapter import Adapter
from .card import Publication, check_card, hub_base_model, model_card

DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"


def is_diffusion(adapter: Adapter) -> bool:
    """An adapter of an image model: its modules name a pipeline component (unet,
    transformer, text encoders) or carry kohya's image-model prefixes."""
    from .formats import naming

    return any(
        naming.parse(name).component is not None
        for name in list(adapter.modules) + list(getattr(adapter, "ops", {}) or {})
    )


def build_hub_folder(
    adapter: Adapter,
    repo_id: str,
    folder: Path,
    *,
    name: str,
    task: str | None = None,
    tags: list[str] | tuple[str, ...] = (),
    description: str | None = None,
    license: str | None = None,
    base_model: str | None = None,
    progress=None,
) -> tuple[Publication, list[str]]:
    """Write the adapter and README.md into the existing ``folder``. Returns what the card
    says and the warnings (what was left out)."""
    from .formats.convert import convert

    folder = Path(folder)
    warnings: list[str] = []
    declared = base_model or adapter.meta.base_model
    hub_base = hub_base_model(declared)
    if declared and hub_base is None:
        warnings.append(
            f"the adapter's base {declared!r} is not a Hub id: the card and config name no base "
            "model (give --base-model OWNER/NAME)"
        )
    config = adapter.origin.get("peft_config")
    task_type = config.get("task_type") if isinstance(config, dict) else None
    # what goes up names the base by its Hub id or not at all, never by a path here
    adapter = replace(adapter, meta=replace(adapter.meta, base_model=hub_base))
    if isinstance(config, dict):
        adapter.origin = {
            **adapter.origin,
            "peft_config": {**config, "base_model_name_or_path": hub_base},
        }
    diffusion = is_diffusion(adapter)
    if diffusion:
        from .errors import LoratoolError

        try:
            report = convert(adapter, folder / DIFFUSERS_WEIGHTS, "diffusers", force=True)
            weights = DIFFUSERS_WEIGHTS
        except LoratoolError:
            # kohya names whose dots only a base could place: uploaded as kohya's file, which
            # diffusers' load_lora_weights converts itself (as ComfyUI and A1111 read it)
            weights = f"{name}.safetensors"
            report = convert(adapter, folder / weights, "kohya", force=True)
    else:
        report = convert(adapter, folder / "peft", "peft", force=True)
        for f in (folder / "peft").iterdir():
            f.rename(folder / f.name)
        (folder / "peft").rmdir()
        weights = "adapter_model.safetensors"
    warnings += report.warnings
    pub = Publication(
        repo_id=repo_id,
        name=name,
        task=task,
        base_model=hub_base,
        diffusion=diffusion,
        weights_file=weights,
        task_type=task_type,
        license=license,
        tags=tuple(tags),
        description=description,
    )
    from .transform import inspect

    report_ = inspect(adapter, progress=progress)
    card = model_card(adapter, pub, base_bytes=_local_base_bytes(declared), report=report_)
    check_card(card, pub)
    card.save(folder / "README.md")
    return pub, warnings


def _local_base_bytes(base_model: str | None) -> int | None:
    """The base's size when it is a model on this machine (headers only; its path stays
    here), else None."""
    if not base_model or not Path(base_model).exists():
        return None
    from .errors import LoratoolError
    from .tensors.header import read_base

    try:
        return read_base(base_model).total_bytes
    except LoratoolError:
        return None
