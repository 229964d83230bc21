"""Base models: where one comes from, what it is, what was merged into it.

- ``source``: a BASE argument → a model on this machine: a local path as it is, or a Hub id
  (``OWNER/NAME[@REV]``) read headers first and downloaded through the Hugging Face cache,
  only the files a command reads (:func:`open_base`, :func:`read_any`).
- ``identity``: the names a base is known by and the merge history its files record.
- ``facts``: what config.json and the model type say beyond tensor names and shapes (Conv1D
  layers, transposed experts, tied embeddings).

The index of a base's tensors is ``loratool.tensors.header.read_base`` (headers only, byte
offsets for the merge engine; :func:`read_any` for a path or a Hub id); its quantization scheme
is ``loratool.quant.detect_base`` (:func:`quantization` here).
"""

from .facts import (
    CONV1D_LAYERS,
    INPUT_EMBEDDINGS,
    OUTPUT_EMBEDDINGS,
    TRANSPOSED_EXPERTS,
    BaseFacts,
    facts_from_config,
    read_facts,
    tied_pair,
)
from .identity import PROVENANCE_KEY, base_identity, base_name, hub_snapshot, merge_history
from .source import (
    BaseSource,
    HubModel,
    RemoteBase,
    is_local,
    looks_like_hub_id,
    open_base,
    read_any,
    remote_base,
)


def quantization(base):
    """The base's quantization scheme and logical weights (``quant.QuantizedBase``), None for
    an ordinary base; refuses in one line a scheme loratool cannot merge."""
    from ..quant import detect_base

    return detect_base(base)


__all__ = [
    "CONV1D_LAYERS",
    "INPUT_EMBEDDINGS",
    "OUTPUT_EMBEDDINGS",
    "PROVENANCE_KEY",
    "TRANSPOSED_EXPERTS",
    "BaseFacts",
    "BaseSource",
    "HubModel",
    "base_identity",
    "base_name",
    "facts_from_config",
    "hub_snapshot",
    "is_local",
    "looks_like_hub_id",
    "merge_history",
    "open_base",
    "quantization",
    "read_any",
    "read_facts",
    "remote_base",
    "RemoteBase",
    "tied_pair",
]
