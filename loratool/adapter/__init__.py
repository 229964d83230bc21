"""The adapter model: modules (one per adapted base tensor, any kind), full-tensor operations,
and the delta math beside them.

- ``module.py``: the :class:`Module` protocol every kind implements, and the kind registry;
- ``lora.py``: LoRA and DoRA on linear, Conv1D (``linear_fifo``), conv2d and embedding weights;
- ``experts.py``: LoRA on fused 3-D expert tensors (peft's ``target_parameters``);
- ``lycoris.py``: LyCORIS LoHa, LoKr and Tucker LoCon, as lycoris-lora computes them;
- ``ops.py``: whole-tensor operations (replace, replace rows, add to a bias);
- ``model.py``: :class:`Adapter` and :class:`AdapterMeta`.
"""

from __future__ import annotations

from .experts import ExpertLoraModule
from .lora import KINDS, LoraModule, build_module, delta_from_factors
from .lycoris import LoconTuckerModule, LohaModule, LokrModule
from .model import Adapter, AdapterMeta
from .module import KIND_CLASSES, DeltaTerm, Module, module_class, register
from .ops import OP_CLASSES, AddToTensor, ReplaceRows, ReplaceTensor, TensorOp, op_class

__all__ = [
    "KINDS",
    "KIND_CLASSES",
    "OP_CLASSES",
    "Adapter",
    "AdapterMeta",
    "AddToTensor",
    "DeltaTerm",
    "ExpertLoraModule",
    "LoconTuckerModule",
    "LohaModule",
    "LokrModule",
    "LoraModule",
    "Module",
    "ReplaceRows",
    "ReplaceTensor",
    "TensorOp",
    "build_module",
    "delta_from_factors",
    "module_class",
    "op_class",
    "register",
]
