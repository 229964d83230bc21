"""What loratool knows about a base model beyond its tensors' names and shapes: its
config.json, and the layer facts that shapes alone cannot give (as data, not code).

- Which layers are GPT-2-style ``Conv1D`` (weights stored in × out): peft decides
  ``fan_in_fan_out`` per module from the layer's class, whatever the config flag says, and a
  square Conv1D (GPT-2's ``attn.c_proj``) cannot be told from a Linear by its shape.
- Which MoE expert tensors are stored transposed ((E, in, out), applied as ``x @ W[e]``:
  the models whose experts transformers declares with ``is_transposed=True``).
- Which tensor an untied ``lm_head`` would copy (the input embedding it is tied to).

The tables were read from transformers 5 (``Conv1D(`` in ``models/*/modeling_*.py``,
``use_experts_implementation(is_transposed=True)``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# model_type → the module names (last path component) that are transformers' Conv1D
CONV1D_LAYERS: dict[str, frozenset[str]] = {
    "gpt2": frozenset({"c_attn", "q_attn", "c_fc", "c_proj"}),
    "decision_transformer": frozenset({"c_attn", "q_attn", "c_fc", "c_proj"}),
    "imagegpt": frozenset({"c_attn", "q_attn", "c_fc", "c_proj"}),
    "openai-gpt": frozenset({"c_attn", "c_fc", "c_proj"}),
    "clvp": frozenset({"c_fc", "c_proj"}),
}
# model types whose fused experts are (E, in, out)
TRANSPOSED_EXPERTS = frozenset({"gpt_oss", "openai_privacy_filter", "aria", "aria_text"})
# an output embedding tied to an input embedding: (output tensor, input tensor suffixes)
OUTPUT_EMBEDDINGS = ("lm_head.weight", "embed_out.weight")
INPUT_EMBEDDINGS = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
    "shared.weight",
)


@dataclass(frozen=True)
class BaseFacts:
    model_type: str | None = None
    config: dict = field(default_factory=dict)
    config_path: Path | None = None

    @property
    def tie_word_embeddings(self) -> bool | None:
        """As the config says; None when it does not say (older configs: transformers 4
        then defaulted to True)."""
        for cfg in (self.config, self.config.get("text_config") or {}):
            if isinstance(cfg, dict) and "tie_word_embeddings" in cfg:
                return bool(cfg["tie_word_embeddings"])
        return None

    def is_conv1d(self, tensor_name: str) -> bool | None:
        """Whether the layer holding ``tensor_name`` is a Conv1D; None if unknown."""
        layers = CONV1D_LAYERS.get(self.model_type or "")
        if layers is None:
            return None
        leaf = tensor_name.removesuffix(".weight").rsplit(".", 1)[-1]
        return leaf in layers

    @property
    def experts_transposed(self) -> bool | None:
        if self.model_type is None:
            return None
        return self.model_type in TRANSPOSED_EXPERTS


def facts_from_config(config: dict | None, path: Path | None = None) -> BaseFacts:
    config = config if isinstance(config, dict) else {}
    mt = config.get("model_type")
    text = config.get("text_config")
    if isinstance(text, dict) and text.get("model_type") in TRANSPOSED_EXPERTS:
        mt = text["model_type"]
    return BaseFacts(mt if isinstance(mt, str) else None, config, path)


def read_facts(root: Path) -> BaseFacts:
    """The facts of the base at ``root`` (a directory, or a file whose folder holds
    config.json); empty facts when there is no readable config."""
    root = Path(root)
    cfg = (root if root.is_dir() else root.parent) / "config.json"
    try:
        return facts_from_config(json.loads(cfg.read_text()), cfg)
    except (OSError, ValueError):
        return BaseFacts()


def tied_pair(keys, shapes: dict) -> tuple[str, str] | None:
    """(output name, input embedding name) for a base that holds an input embedding and no
    output embedding of its own: its lm_head is tied to the embedding."""
    keys = list(keys)
    for out in OUTPUT_EMBEDDINGS:
        if out in shapes:
            return None
    inputs = [k for k in keys if k.endswith(INPUT_EMBEDDINGS) and len(shapes[k]) == 2]
    if len(inputs) != 1:
        return None
    return OUTPUT_EMBEDDINGS[0], inputs[0]
