"""loratool: a catalog, merge engine and rank toolkit for LoRA adapters.

The public API; torch is imported only by the functions that need it::

    import loratool
    adapter = loratool.load_adapter("path/to/peft-dir")
    base = loratool.read_base("path/to/model")          # headers only, no tensor data
    adapter = loratool.resolve(adapter, base)            # names → base tensors, shapes checked
    deltas = adapter.deltas()                            # {base tensor name: ΔW in float32}
"""

from __future__ import annotations

__version__ = "0.1.0"

from .adapter import Adapter, AdapterMeta, LoraModule, delta_from_factors
from .errors import LoratoolError
from .formats import detect_format, load_adapter, resolve, save_adapter
from .tensors.header import BaseIndex, read_base, read_header

__all__ = [
    "__version__",
    "Adapter",
    "AdapterMeta",
    "LoraModule",
    "BaseIndex",
    "LoratoolError",
    "delta_from_factors",
    "detect_format",
    "load_adapter",
    "read_base",
    "read_header",
    "resolve",
    "save_adapter",
]
