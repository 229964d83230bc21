"""The round-trip check of a quantized base, in the scheme's own terms (``unmerge --check``).

A merge into a quantized base that keeps the scheme rounds twice on a round trip (requantized
at the merge, requantized again at the unmerge), and a block whose largest value moved gets a
new scale, so bit-exactness is not to be expected. What is: every logical weight decodes to
within a step or so of the original, a *step* being the scheme's own unit — the distance
between neighbouring representable values at that element's scale (an e4m3 ulp times the
block scale; an E2M1 gap times 2^e; an NF4 gap times absmax). ``max_ulp_error`` reports the
worst error in those steps; ordinary tensors are compared as ``merge.check`` does.
"""

from __future__ import annotations

import math

from ..errors import ValidationError
from ..tensors.header import BaseIndex
from . import REGISTRY, QuantizedBase, read_parts


def compare_quantized(
    res: BaseIndex, ref: BaseIndex, qres: QuantizedBase | None, qref: QuantizedBase, where
) -> dict:
    import torch

    from ..tensors.io import read_tensor

    codec = REGISTRY[qref.scheme]
    res_owned = qres.owner() if qres is not None else {}
    ref_owned = qref.owner()
    max_abs = max_rel = max_steps = 0.0
    exact = elements = codes_equal = 0
    worst = None
    checked = 0
    for name, lw in qref.weights.items():
        checked += 1
        b = codec.decode(lw, (ref_parts := read_parts(lw)))
        if qres is not None and name in qres.weights:
            if qres.scheme != qref.scheme:
                raise ValidationError(
                    f"quantized as {qres.scheme}, the reference as {qref.scheme}",
                    file=where,
                    tensor=name,
                )
            rlw = qres.weights[name]
            res_parts = read_parts(rlw)
            a = codec.decode(rlw, res_parts)
            same = all(
                torch.equal(res_parts[r].view(torch.uint8), ref_parts[r].view(torch.uint8))
                if res_parts[r].shape == ref_parts[r].shape
                and res_parts[r].dtype == ref_parts[r].dtype
                else False
                for r in ref_parts
            )
            main = next(iter(ref_parts))  # the values: weight / blocks
            if res_parts[main].shape == ref_parts[main].shape:
                codes_equal += int(
                    (res_parts[main].view(torch.uint8) == ref_parts[main].view(torch.uint8)).sum()
                )
        else:
            info = res.tensors.get(name)
            if info is None:
                raise ValidationError("missing from the result", file=where, tensor=name)
            a = read_tensor(info).to(torch.float32)
            same = False
        if tuple(a.shape) != tuple(b.shape):
            raise ValidationError(
                f"shape {list(a.shape)} vs {list(b.shape)}", file=where, tensor=name
            )
        elements += b.numel()
        if same:
            exact += 1
            continue
        d = (a.double() - b.double()).abs()
        err = float(d.max()) if d.numel() else 0.0
        top = float(b.abs().max()) if b.numel() else 0.0
        if err > max_abs:
            max_abs, worst = err, name
        if top > 0:
            max_rel = max(max_rel, err / top)
        step = codec.step(lw, ref_parts).double()
        max_steps = max(
            max_steps, float((d / step.clamp(min=torch.finfo(torch.float32).tiny)).max())
        )
    plain_exact = 0
    for name, rinfo in ref.tensors.items():
        if name in ref_owned:
            continue
        checked += 1
        oinfo = res.tensors.get(name)
        if oinfo is None or name in res_owned:
            raise ValidationError(
                "missing from the result, or quantized there", file=where, tensor=name
            )
        a, b = read_tensor(oinfo), read_tensor(rinfo)
        elements += b.numel()
        if (
            a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        ):
            plain_exact += 1
            continue
        if not b.dtype.is_floating_point or a.shape != b.shape:
            raise ValidationError("tensor differs", file=where, tensor=name)
        err = float((a.double() - b.double()).abs().max())
        if err > max_abs:
            max_abs, worst = err, name
        top = float(b.abs().max())
        if top > 0:
            max_rel = max(max_rel, err / top)
    return {
        "scheme": qref.scheme,
        "max_abs_error": max_abs,
        "max_rel_error": max_rel,
        # in the scheme's own steps (see the module docstring), rounded up
        "max_ulp_error": int(math.ceil(max_steps - 1e-9)) if max_steps else 0,
        "max_error_in_steps": round(max_steps, 4),
        "tensors_checked": checked,
        "tensors_exact": exact + plain_exact,
        "quantized_weights_exact": exact,
        "elements_checked": elements,
        "codes_equal": codes_equal,
        "worst_tensor": worst,
    }
