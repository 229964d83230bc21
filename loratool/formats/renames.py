"""Tensor names that differ between an adapter and the checkpoint on disk for the same model.

transformers renames weights between a checkpoint and the model's modules (its
``conversion_mapping.py``, ``WeightRenaming``): since 4.52 a llava-style VLM's language model
is ``model.language_model.layers…`` in the model (and so in adapters trained on it) while
checkpoints written before, or written back in the original layout by transformers 5, keep
``language_model.model.layers…``; Qwen2-VL's text layers moved from ``model.layers`` to
``model.language_model.layers``; Mixtral's ``block_sparse_moe`` became ``mlp``. Both sides are
brought to the model's names with the same rules, applied in order, and compared there.

transformers 5 also fuses MoE experts in the model (``mlp.experts.gate_up_proj``, E × 2I × H)
that checkpoints keep per expert (``mlp.experts.{e}.gate_proj.weight`` and ``up_proj``,
concatenated along the output rows; ``down_proj``): ``UNFUSED_EXPERTS`` says how
(``WeightConverter`` with ``MergeModulelist(dim=0)`` and ``Concatenate(dim=1)``), so that an
adapter on the fused parameter is applied to the per-expert tensors, expert by expert.
"""

from __future__ import annotations

import re

# (checkpoint pattern, model replacement), from transformers 5 conversion_mapping.py:
# "llava" and the VLMs mapped to it (LlavaModel's "^language_model.model" first), the
# Qwen2-VL family, "mixtral".
CHECKPOINT_RENAMES: tuple[tuple[re.Pattern, str], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"^language_model\.lm_head\.", "lm_head."),
        (r"^language_model\.model\.", "model.language_model."),
        (r"^language_model\.", "model.language_model."),
        (r"^vision_tower\.", "model.vision_tower."),
        (r"^multi_modal_projector\.", "model.multi_modal_projector."),
        (r"^visual\.", "model.visual."),
        (
            r"^model\.(?!language_model\.|visual\.|vision_tower\.|multi_modal_projector\.)",
            "model.language_model.",
        ),
        (r"\.block_sparse_moe\.", ".mlp."),
    )
)

# fused model parameter → per-expert checkpoint tensors, concatenated along ΔW's rows
UNFUSED_EXPERTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")),
    "down_proj": (("down_proj",), ("w2",)),
}


def model_name(key: str) -> str:
    """A checkpoint key in the model's namespace (every rule that matches, in order)."""
    for pattern, repl in CHECKPOINT_RENAMES:
        key = pattern.sub(repl, key, count=1)
    return key


class KeyIndex:
    """The base's keys by their model-namespace names, built once per resolution."""

    def __init__(self, keys):
        self.by_model: dict[str, list[str]] = {}
        for k in keys:
            self.by_model.setdefault(model_name(k), []).append(k)

    def find(self, name: str) -> list[str]:
        n = model_name(name)
        hit = self.by_model.get(n)
        if hit:
            return list(hit)
        out = []
        for m, ks in self.by_model.items():
            if m.endswith("." + n) or n.endswith("." + m):
                out.extend(ks)
        return out


def unfused_expert_keys(name: str, keys, index: KeyIndex) -> list[list[str]] | None:
    """For a fused expert parameter ``….experts.<param>`` the base does not hold: the
    per-expert checkpoint tensors, [[part keys of expert 0], [… of expert 1], …], or None."""
    module, _, param = name.rpartition(".")
    if not module.endswith("experts") or param not in UNFUSED_EXPERTS:
        return None
    for parts in UNFUSED_EXPERTS[param]:
        found: list[list[str]] = []
        e = 0
        while True:
            row = []
            for p in parts:
                hits = index.find(f"{module}.{e}.{p}.weight")
                if len(hits) != 1:
                    break
                row.append(hits[0])
            if len(row) != len(parts):
                break
            found.append(row)
            e += 1
        if found:
            return found
    return None
