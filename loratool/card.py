"""The model card (README.md) that `push` uploads next to the adapter's files.

Built with huggingface_hub's ``ModelCardData`` / ``ModelCard``, so the metadata is what the Hub
reads: ``library_name`` (peft, or diffusers for an image-model adapter), ``base_model`` only
when it is a Hub id (a local path names nothing on the Hub, and would put this machine's
paths in a public repo), the ``base_model:adapter:<id>`` tag the Hub files adapters under,
``pipeline_tag`` from the adapter's task type, ``license`` when it is known. The usage code
fits the adapter: PEFT with the AutoModel class of its task type for a language model,
diffusers' ``load_lora_weights`` for an image model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .adapter import Adapter
from .units import human_size, plural

# PEFT task_type → (the Hub's pipeline_tag, the transformers AutoModel class that loads it)
TASK_TYPES = {
    "CAUSAL_LM": ("text-generation", "AutoModelForCausalLM"),
    "SEQ_2_SEQ_LM": ("text2text-generation", "AutoModelForSeq2SeqLM"),
    "SEQ_CLS": ("text-classification", "AutoModelForSequenceClassification"),
    "TOKEN_CLS": ("token-classification", "AutoModelForTokenClassification"),
    "QUESTION_ANS": ("question-answering", "AutoModelForQuestionAnswering"),
    "FEATURE_EXTRACTION": ("feature-extraction", "AutoModel"),
}


@dataclass(frozen=True)
class Publication:
    """What the card says about where the adapter goes and what it is."""

    repo_id: str
    name: str
    task: str | None
    base_model: str | None  # a Hub id, or None
    diffusion: bool  # an image-model adapter, published in diffusers' layout
    weights_file: str  # adapter_model.safetensors or pytorch_lora_weights.safetensors
    task_type: str | None = None
    license: str | None = None
    tags: tuple[str, ...] = ()
    description: str | None = None


def hub_base_model(base_model: str | None) -> str | None:
    """``base_model`` when it names a model on the Hub (OWNER/NAME, not a path on this
    machine), without a revision; else None."""
    if not base_model:
        return None
    from .bases import is_local, looks_like_hub_id

    name = base_model.partition("@")[0]
    if Path(name).is_absolute() or name.startswith((".", "~")) or is_local(name):
        return None
    return name if looks_like_hub_id(name) else None


def card_data(pub: Publication):
    from huggingface_hub import ModelCardData

    tags = ["lora", "loratool"]
    if pub.diffusion:
        tags += ["diffusers", "text-to-image"]
    if pub.task:
        tags.append(pub.task)
    tags += list(pub.tags)
    if pub.base_model:
        tags.append(f"base_model:adapter:{pub.base_model}")
    pipeline = "text-to-image" if pub.diffusion else TASK_TYPES.get(pub.task_type or "", (None,))[0]
    return ModelCardData(
        library_name="diffusers" if pub.diffusion else "peft",
        base_model=pub.base_model,
        pipeline_tag=pipeline,
        license=pub.license,
        tags=list(dict.fromkeys(tags)),
        model_name=pub.name,
    )


def usage(pub: Publication) -> list[str]:
    """The card's "Use it" section: code that loads this adapter."""
    base = pub.base_model or "BASE_MODEL"
    note = [] if pub.base_model else ["# BASE_MODEL: the model this adapter was trained on"]
    if pub.diffusion:
        code = [
            "import torch",
            "from diffusers import DiffusionPipeline",
            "",
            *note,
            f"pipe = DiffusionPipeline.from_pretrained({base!r}, torch_dtype=torch.bfloat16)",
            f"pipe.load_lora_weights({pub.repo_id!r})"
            if pub.weights_file == "pytorch_lora_weights.safetensors"
            else f"pipe.load_lora_weights({pub.repo_id!r}, weight_name={pub.weights_file!r})",
        ]
        return ["With diffusers:", "", "```python", *code, "```"]
    auto = TASK_TYPES.get(pub.task_type or "", (None, "AutoModelForCausalLM"))[1]
    code = [
        f"from transformers import {auto}",
        "from peft import PeftModel",
        "",
        *note,
        f"model = {auto}.from_pretrained({base!r})",
        f"model = PeftModel.from_pretrained(model, {pub.repo_id!r})",
    ]
    lines = ["With peft:", "", "```python", *code, "```"]
    short = pub.repo_id.split("/")[-1]
    lines += [
        "",
        "With loratool (catalog it, then merge it into the base without loading the model):",
        "",
        "```bash",
        f"loratool pull {pub.repo_id} --task {pub.task or 'TASK'}",
        f"loratool merge {base} {short} -o ./merged",
        "```",
    ]
    return lines


def model_card(
    adapter: Adapter, pub: Publication, *, base_bytes: int | None = None, report: dict | None = None
):
    """The ``huggingface_hub.ModelCard``; ``report``: inspect-rank's (computed when None)."""
    from huggingface_hub import ModelCard

    if report is None:
        from .transform import inspect

        report = inspect(adapter)
    lines = ["", f"# {pub.name}", ""]
    what = f"A LoRA adapter for **{pub.task}**" if pub.task else "A LoRA adapter"
    lines.append(
        what
        + (
            f" on [`{pub.base_model}`](https://huggingface.co/{pub.base_model})."
            if pub.base_model
            else "."
        )
    )
    if pub.description:
        lines += ["", pub.description]
    params, dense = adapter.params, adapter.dense_params
    lines += [
        "",
        "## Size",
        "",
        f"- {plural(len(adapter.modules), 'adapted weight')}, {params:,} parameters "
        f"({human_size(adapter.nbytes)}) standing for {dense:,} dense parameters: "
        f"{dense / params if params else 0:.1f}× fewer.",
    ]
    if base_bytes:
        lines.append(
            f"- The base weighs {human_size(base_bytes)}: this adapter is "
            f"{100 * adapter.nbytes / base_bytes:.3f}% of a full fine-tuned copy, which would "
            f"take {human_size(base_bytes)} more per task."
        )
    s = report["summary"]
    lines += [
        "",
        "## Effective rank",
        "",
        f"Singular values of each scale·B·A, computed from the factors: r up to {s['rank']}, "
        f"numerical rank up to {s['numerical_rank_max']}; {s['threshold']:g} of the energy "
        f"fits in rank {s['energy_rank_max']} in every module.",
        "",
        "| layer kind | modules | r | energy rank (median / max) | stable rank (mean) |",
        "|---|---:|---:|---:|---:|",
    ]
    for k, v in s["by_layer_kind"].items():
        lines.append(
            f"| {k} | {v['modules']} | {v['rank']} | {v['energy_rank_median']:g} / "
            f"{v['energy_rank_max']} | {v['stable_rank_mean']:.2f} |"
        )
    lines += [
        "",
        "## Modules",
        "",
        "| module | kind | shape | r | alpha | params |",
        "|---|---|---|---:|---:|---:|",
    ]
    for name, m in adapter.modules.items():
        alpha = getattr(m, "alpha", None)
        lines.append(
            f"| `{name}` | {m.label} | {'×'.join(map(str, m.base_shape))} | {m.rank} | "
            f"{'' if alpha is None else f'{alpha:g}'} | {m.params:,} |"
        )
    lines += ["", "## Use it", "", *usage(pub), "", f"Published with loratool {__version__}.", ""]
    data = card_data(pub)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines))


def check_card(card, pub: Publication) -> None:
    """What the Hub would refuse or mis-file, checked before anything is uploaded: the
    metadata parses back to what was meant, base_model is a valid Hub id."""
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import validate_repo_id

    from .errors import ValidationError

    back = ModelCard(str(card)).data
    if back.library_name != ("diffusers" if pub.diffusion else "peft"):
        raise ValidationError("the model card's library_name did not survive its YAML")
    if pub.base_model:
        validate_repo_id(pub.base_model)
        if back.base_model != pub.base_model or f"base_model:adapter:{pub.base_model}" not in (
            back.tags or []
        ):
            raise ValidationError("the model card's base_model did not survive its YAML")
