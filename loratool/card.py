"""The model card (README.md) that `push` uploads next to the PEFT files."""

from __future__ import annotations

import json
from pathlib import Path

from . import __version__
from .adapter import Adapter
from .units import human_size


def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML scalar


def model_card(adapter: Adapter, row: dict, repo_id: str, *, base_bytes: int | None = None) -> str:
    """Markdown with YAML front matter, from the adapter and its catalog row."""
    from .transform import inspect

    base_model = row.get("base_model") or adapter.meta.base_model
    task = row.get("task") or "unknown"
    tags = ["lora", "loratool", task, *row.get("tags", [])]
    front = ["---", "library_name: peft"]
    if base_model:
        front.append(f"base_model: {_yaml_str(base_model)}")
    front.append("tags:")
    front += [f"- {_yaml_str(t)}" for t in dict.fromkeys(tags)]
    front.append("---")
    lines = front + ["", f"# {row.get('name') or repo_id}", ""]
    lines.append(f"A LoRA adapter for **{task}**" + (f" on `{base_model}`." if base_model else "."))
    if row.get("description"):
        lines += ["", row["description"]]
    params, dense = adapter.params, adapter.dense_params
    lines += [
        "",
        "## Size",
        "",
        f"- {len(adapter.modules)} adapted weights, {params:,} parameters ({human_size(adapter.nbytes)}) standing for "
        f"{dense:,} dense parameters: {dense / params:.1f}× fewer.",
    ]
    if base_bytes:
        lines.append(
            f"- The base weighs {human_size(base_bytes)}: this adapter is {100 * adapter.nbytes / base_bytes:.3f}% of a full "
            f"fine-tuned copy, which would take {human_size(base_bytes)} more per task."
        )
    report = inspect(adapter)
    s = report["summary"]
    lines += [
        "",
        "## Effective rank",
        "",
        f"Singular values of each scale·B·A, computed from the factors: r up to {s['rank']}, numerical rank up to "
        f"{s['numerical_rank_max']}; {s['threshold']:g} of the energy fits in rank {s['energy_rank_max']} in every module.",
        "",
        "| layer kind | modules | r | energy rank (median / max) | stable rank (mean) |",
        "|---|---:|---:|---:|---:|",
    ]
    for k, v in s["by_layer_kind"].items():
        lines.append(
            f"| {k} | {v['modules']} | {v['rank']} | {v['energy_rank_median']:g} / {v['energy_rank_max']} | {v['stable_rank_mean']:.2f} |"
        )
    lines += [
        "",
        "## Modules",
        "",
        "| module | kind | shape | r | alpha | params |",
        "|---|---|---|---:|---:|---:|",
    ]
    for name, m in adapter.modules.items():
        lines.append(
            f"| `{name}` | {m.kind} | {'×'.join(map(str, m.base_shape))} | {m.rank} | {m.alpha:g} | {m.params:,} |"
        )
    load_base = base_model or "BASE_MODEL"
    lines += [
        "",
        "## Use it",
        "",
        "With peft:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "from peft import PeftModel",
        "",
        f"model = AutoModelForCausalLM.from_pretrained({load_base!r})",
        f"model = PeftModel.from_pretrained(model, {repo_id!r})",
        "```",
        "",
        "With loratool (catalog it, then merge it into the base without loading the model):",
        "",
        "```bash",
        f"loratool pull {repo_id} --task {task}",
        f"loratool merge ./base-model {repo_id.split('/')[-1]} -o ./merged",
        "```",
        "",
        f"Published with loratool {__version__}.",
        "",
    ]
    return "\n".join(lines)


def write_card(folder: Path, text: str) -> None:
    (Path(folder) / "README.md").write_text(text)
