"""Comparing two bases: the round-trip error an unmerge reports (``unmerge --check``)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable

from ..errors import ValidationError
from ..tensors.header import read_base


def ulp_distance(a, b):
    """Elementwise distance in units in the last place between two tensors of one float dtype.

    The bit patterns are mapped to integers that are ordered like the values (sign-magnitude to
    two's complement), so the difference counts the representable values between a and b.
    """
    import torch

    ints = {
        torch.float16: torch.int16,
        torch.bfloat16: torch.int16,
        torch.float32: torch.int32,
        torch.float64: torch.int64,
    }
    it = ints[a.dtype]
    bits = {torch.int16: 16, torch.int32: 32, torch.int64: 64}[it]
    sign = 1 << (bits - 1)

    def ordered(t):
        i = t.contiguous().view(it).to(torch.int64)
        if bits < 64:
            i = torch.where(i < 0, -(i + sign), i)  # clear the sign bit, negate
        else:
            i = torch.where(i < 0, -(i & (sign - 1)), i)
        return i

    return (ordered(a) - ordered(b)).abs()


def compare_bases(
    result_path: str | os.PathLike,
    reference_path: str | os.PathLike,
    progress: Callable[[int, str | None], None] | None = None,
) -> dict:
    """max abs error, max ulp error, tensors checked and exact, between two bases.

    ``progress(nbytes, tensor)`` is called as each pair of tensors is compared (the bytes of
    both)."""
    import torch

    from ..tensors.io import read_tensor

    res = read_base(result_path)
    ref = read_base(reference_path)
    from ..quant import detect_base

    qref = detect_base(ref)
    if qref is not None:  # compared weight by weight, in the scheme's own steps
        from ..quant.check import compare_quantized

        return compare_quantized(res, ref, detect_base(res), qref, result_path)
    missing = sorted(set(ref.tensors) ^ set(res.tensors))
    if missing:
        raise ValidationError(
            "the two models hold different tensors", file=result_path, tensor=missing[0]
        )
    max_abs = 0.0
    max_ulp = 0
    at_scale = 0.0
    exact = 0
    elements = within = 0
    worst = None
    for name, rinfo in ref.tensors.items():
        oinfo = res.tensors[name]
        if oinfo.shape != rinfo.shape:
            raise ValidationError(
                f"shape {list(oinfo.shape)} vs {list(rinfo.shape)}", file=result_path, tensor=name
            )
        a = read_tensor(oinfo)
        b = read_tensor(rinfo)
        if progress is not None:
            progress(oinfo.nbytes + rinfo.nbytes, name)
        elements += b.numel()
        if a.dtype == b.dtype and torch.equal(
            a.view(torch.uint8) if a.dtype.is_floating_point else a,
            b.view(torch.uint8) if b.dtype.is_floating_point else b,
        ):
            exact += 1
            within += b.numel()
            continue
        if not a.dtype.is_floating_point:
            raise ValidationError("integer tensor differs", file=result_path, tensor=name)
        err = (a.double() - b.double()).abs().max().item()
        if err > max_abs:
            max_abs, worst = err, name
        ulps = ulp_distance(a if a.dtype == b.dtype else a.to(b.dtype), b)
        max_ulp = max(max_ulp, int(ulps.max().item()))
        within += int((ulps <= 1).sum().item())
        # An ulp near zero is tiny: a weight of 1e-9 restored as 1e-9 + 1e-16 is thousands
        # of its own ulps off. Measured in ulps of the tensor's largest magnitude instead,
        # the error says how it compares with the rounding the tensor's values live with.
        top = float(b.abs().max())
        if top > 0 and math.isfinite(top):
            step = torch.finfo(b.dtype).eps * 2.0 ** (math.frexp(top)[1] - 1)  # ulp(top)
            at_scale = max(at_scale, err / step)
    return {
        "max_abs_error": max_abs,
        "max_ulp_error": max_ulp,
        "tensors_checked": len(ref.tensors),
        "tensors_exact": exact,
        "elements_checked": elements,
        "elements_within_1_ulp": within,
        "max_error_in_ulps_at_tensor_scale": round(at_scale, 4),
        "worst_tensor": worst,
    }
