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

# The public names load on first use (PEP 562), so that `import loratool.cli` for a command
# costs nothing here and the console script can take Ctrl-C from its first instant.
_EXPORTS = {
    "Adapter": ".adapter",
    "AdapterMeta": ".adapter",
    "LoraModule": ".adapter",
    "delta_from_factors": ".adapter",
    "LoratoolError": ".errors",
    "detect_format": ".formats",
    "load_adapter": ".formats",
    "resolve": ".formats",
    "save_adapter": ".formats",
    "BaseIndex": ".tensors.header",
    "read_base": ".tensors.header",
    "read_header": ".tensors.header",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'loratool' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
