"""Adapter-level rank operations: inspect, resize, extract, combine.

The math lives in ``rank.py`` and ``combine.py`` as pure functions on 2-D factors; this module
maps every layer kind onto them and back:

- linear, linear_fifo and embedding keep PEFT's (B, A) layout, B d×r, A r×k; the stored ΔW
  is B·A or its transpose, which has the same singular values, so one path serves all three.
- conv2d flattens A (r×in×kh×kw) to r×(in·kh·kw) and B (out×r×1×1) to out×r, and reshapes
  the results back.
"""

from __future__ import annotations

import fnmatch
import math
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from .adapter import Adapter, AdapterMeta, LoraModule
from .errors import ValidationError
from .rank import RankRule
from .weights import check_weight


def factors_2d(mod: LoraModule):
    if mod.kind == "conv2d":
        return mod.B.flatten(1).float(), mod.A.flatten(1).float()
    return mod.B.float(), mod.A.float()


def module_from_2d(
    template: LoraModule, B, A, scale: float = 1.0, *, rslora: bool | None = None
) -> LoraModule:
    """A module of ``template``'s kind and shape whose ΔW is scale·B·A (B, A 2-D, float32)."""
    rslora = template.rslora if rslora is None else rslora
    k = A.shape[0]
    if template.kind == "conv2d":
        A = A.reshape(k, *template.A.shape[1:])
        B = B.reshape(B.shape[0], k, 1, 1)
    alpha = scale * (math.sqrt(k) if rslora else k)
    return LoraModule(template.name, template.kind, A.contiguous(), B.contiguous(), alpha, rslora)


def layer_kind(name: str) -> str:
    """The module's role (q_proj, c_attn, …): the path's last component before ``.weight``."""
    return name.removesuffix(".weight").rsplit(".", 1)[-1]


# -- inspect -------------------------------------------------------------------------------


def rank_report_of(mod, threshold: float) -> dict:
    """inspect-rank's report of a module that is not one B·A, from its ``svdvals()``."""
    from .rank import spectrum_report

    shape = mod.base_shape
    flat = [int(shape[0]), math.prod(int(x) for x in shape[1:])]
    return spectrum_report(mod.svdvals().tolist(), flat, mod.rank, threshold)


def inspect(
    adapter: Adapter,
    *,
    threshold: float = 0.99,
    module_glob: str | None = None,
    progress: Callable[[int, str | None], None] | None = None,
    base=None,
) -> dict:
    """inspect-rank's report. Module at a time: a lazily loaded adapter (``lazy=True``) has
    each module's factors read, measured and dropped before the next, so private memory holds
    one module, whatever the adapter's size. ``progress(1, name)`` after each module.

    Expert-stacked modules get a spectrum per expert (``experts``; the module's figures are the
    largest over its experts). DoRA modules get ``dora``: their magnitudes and, with ``base``
    (a path), how far they moved from the base's norms (peft starts them at ‖W‖) and the factor
    m / ‖W + ΔW‖ the merge multiplies each output by."""
    from .adapter import ExpertLoraModule
    from .rank import rank_report

    if not 0 < threshold <= 1:
        raise ValidationError(f"--threshold must be in (0, 1], got {threshold}")
    weights = None
    if base is not None and any(m.magnitude is not None for m in adapter.modules.values()):
        from .formats.resolve import resolve
        from .tensors.header import read_base

        index = read_base(base)
        resolved = resolve(adapter, index, source=adapter.meta.source)
        by_id = {id(m.A): n for n, m in resolved.modules.items() if hasattr(m, "A")}
        weights = (index, by_id)
    modules, skipped = [], []
    for name, lazy_mod in adapter.modules.items():
        if module_glob and not fnmatch.fnmatchcase(name, module_glob):
            continue
        if isinstance(lazy_mod, ExpertLoraModule):
            rep = _experts_report(lazy_mod, threshold)
            modules.append({"name": name, "kind": lazy_mod.label, **rep})
            continue
        if not isinstance(lazy_mod, LoraModule) and not hasattr(lazy_mod, "svdvals"):
            skipped.append({"name": name, "kind": lazy_mod.label, "reason": "no spectrum"})
            continue
        mod = lazy_mod.materialized()
        dora = _dora_report(lazy_mod, mod, weights) if mod.magnitude is not None else None
        if hasattr(mod, "svdvals"):
            # LyCORIS kinds: the spectrum from their own factors (adapter/lycoris.py), no ΔW
            rep = rank_report_of(mod, threshold)
        else:
            B, A = factors_2d(mod)
            rep = rank_report(B, A, mod.scale, threshold=threshold)
            del B, A
        del mod
        # DoRA: the spectrum of its low-rank part (the magnitude re-normalises rows after).
        rep = {"name": name, "kind": lazy_mod.label, **rep}
        rep["shape"] = list(lazy_mod.base_shape)
        rep["rank"] = lazy_mod.rank
        if dora is not None:
            rep["dora"] = dora
        modules.append(rep)
        if progress is not None:
            progress(1, name)
    if not modules:
        raise ValidationError(
            f"no module matches {module_glob!r}"
            if module_glob and not skipped
            else "no module of the adapter has a spectrum loratool can compute"
            if skipped
            else "the adapter has no modules"
        )
    by_kind: dict[str, list[dict]] = {}
    for m in modules:
        by_kind.setdefault(layer_kind(m["name"]), []).append(m)

    def stats(ms: list[dict]) -> dict:
        return {
            "modules": len(ms),
            "rank": max(m["rank"] for m in ms),
            "numerical_rank_max": max(m["numerical_rank"] for m in ms),
            "energy_rank_max": max(m["energy_rank"] for m in ms),
            "energy_rank_median": statistics.median(m["energy_rank"] for m in ms),
            "stable_rank_mean": statistics.fmean(m["stable_rank"] for m in ms),
            "entropy_rank_mean": statistics.fmean(m["entropy_rank"] for m in ms),
        }

    summary = stats(modules)
    summary["threshold"] = threshold
    summary["suggested_rank"] = max(1, summary["energy_rank_max"])
    summary["by_layer_kind"] = {k: stats(v) for k, v in sorted(by_kind.items())}
    summary["skipped"] = skipped  # modules that are not one B·A (expert-stacked, LoHa, …)
    return {"modules": modules, "summary": summary}


def _experts_report(lazy_mod, threshold: float) -> dict:
    """One spectrum per expert (A_e, B_e as peft lays them out: adapter/experts.py)."""
    import statistics as st

    from .rank import rank_report

    mod = lazy_mod.materialized()
    A, B = mod.factors()
    per = []
    for e in range(mod.num_experts):
        # ΔW[e] = B_e·A_e, or its transpose (same singular values) for transposed experts
        r = rank_report(B[e], A[e], mod.scale, threshold=threshold)
        r.pop("energy", None)
        per.append({"expert": e, **r})
    top = max(per, key=lambda r: r["singular_values"][0] if r["singular_values"] else 0.0)
    return {
        "shape": list(lazy_mod.base_shape),
        "rank": mod.rank,
        "numerical_rank": max(r["numerical_rank"] for r in per),
        "energy_rank": max(r["energy_rank"] for r in per),
        "stable_rank": st.fmean(r["stable_rank"] for r in per),
        "entropy_rank": st.fmean(r["entropy_rank"] for r in per),
        "singular_values": top["singular_values"],
        "experts": per,
    }


def _dora_report(lazy_mod, mod, weights) -> dict:
    import torch

    m = mod.magnitude.detach().float().reshape(-1)
    out = {
        "magnitude_min": float(m.min()),
        "magnitude_max": float(m.max()),
        "magnitude_mean": float(m.mean()),
    }
    if weights is None:
        return out
    index, by_id = weights
    name = by_id.get(id(lazy_mod.A))
    if name is None or name not in index.tensors:
        return out
    from .tensors.io import read_tensor

    W = read_tensor(index.tensors[name]).float()
    d = mod.delta()

    def norms(x):  # one per output: rows as stored (linear, conv), columns (Conv1D, embedding)
        return (
            torch.linalg.vector_norm(x, dim=0)
            if mod.dora_axis == 1
            else (torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1))
        )

    norm_w, norm_wd = norms(W), norms(W + d)
    moved = (m / norm_w - 1).abs()
    factor = m / norm_wd
    out.update(
        {
            "moved_max": float(moved.max()),  # |m / ‖W‖ − 1|: peft starts m at ‖W‖
            "moved_mean": float(moved.mean()),
            "factor_min": float(factor.min()),  # m / ‖W + ΔW‖, what the merge multiplies by
            "factor_max": float(factor.max()),
        }
    )
    return out


# -- resize --------------------------------------------------------------------------------


def common_rank_for(adapters: list[Adapter], rule: RankRule, progress=None) -> int:
    """The one rank a set of adapters is brought to: the rule's largest pick over every
    module of every adapter (a fixed --rank is itself), from the factors' spectra."""
    from .rank import factored_svdvals

    if rule.method == "rank":
        return int(rule.cap)
    progress = progress or (lambda n=1, label=None: None)
    best = 1
    for adapter in adapters:
        for name, lazy_mod in adapter.modules.items():
            if not isinstance(lazy_mod, LoraModule):
                raise ValidationError(
                    f"resize works on LoRA B·A modules; this one is {lazy_mod.label}", tensor=name
                )
            mod = lazy_mod.materialized()
            B, A = factors_2d(mod)
            S = factored_svdvals(B, A, mod.scale)
            best = max(best, rule.pick(S))
            progress(1, name)
    return best


def _common_scale(adapter: Adapter) -> tuple[float, bool]:
    """The scale (and rsLoRA flag) most modules share: a --common-rank output uses it for all."""
    scales = Counter(m.scale for m in adapter.modules.values() if m.scale != 0)
    s0 = scales.most_common(1)[0][0] if scales else 1.0
    flags = {m.rslora for m in adapter.modules.values()}
    return s0, flags == {True}


def _pad(B, A, R: int):
    """B d×r, A r×k padded with zero rank-columns/rows to rank R: B·A unchanged, exactly."""
    import torch

    r = A.shape[0]
    if r == R:
        return B, A
    return (
        torch.cat([B, B.new_zeros(B.shape[0], R - r)], 1),
        torch.cat([A, A.new_zeros(R - r, A.shape[1])], 0),
    )


def _resized(template: LoraModule, B, A, scale: float, rslora: bool) -> LoraModule:
    """``template`` with 2-D factors B, A (reshaped for conv2d) standing for scale·B·A, alpha
    set for that scale; every other field (DoRA magnitude, target rows) kept."""
    k = A.shape[0]
    if template.kind == "conv2d":
        A = A.reshape(k, *template.A.shape[1:])
        B = B.reshape(B.shape[0], k, 1, 1)
    alpha = scale * (math.sqrt(k) if rslora else k)
    return replace(
        template,
        A=A.to(template.A.dtype).contiguous(),
        B=B.to(template.B.dtype).contiguous(),
        alpha=alpha,
        rslora=rslora,
    )


def resize(
    adapter: Adapter,
    rule: RankRule,
    *,
    common_rank: int | None = None,
    progress=None,
) -> tuple[Adapter, dict[str, dict]]:
    """Truncate every module to the rank ``rule`` picks, from its factors: QR of B and Aᵀ and
    the SVD of the r×r core (``rank.factored_svd``), never the d×k ΔW.

    Without ``common_rank`` each module keeps its scale: the factors become U√S/√s and
    √S·Vᵀ/√s with alpha rescaled so that scale s is unchanged (a non-positive scale becomes
    1). Modules whose rank the rule does not lower keep their rank.

    With ``common_rank`` R, every module of the adapter gets rank exactly R and one scale,
    so that the config has one r and one lora_alpha and no rank or alpha patterns (servers
    that pad every adapter to their largest rank, vLLM's max_lora_rank, read only those):
    a module above R is truncated by SVD to R (lossy: its energy kept is reported); a module
    at or below R keeps its factors and is padded with zero rank-columns (exact); a module
    whose scale differs from the one most modules share has the ratio folded into B.

    Returns the new adapter and, per module: rank_before, rank_after, energy_kept (share of
    Σσ² kept, 1.0 when lossless), padded (zero rank-columns added).
    """
    from .rank import factored_svd

    if common_rank is not None and common_rank < 1:
        raise ValidationError(f"common rank must be ≥ 1, got {common_rank}")
    progress = progress or (lambda n=1, label=None: None)
    common = common_rank is not None
    s0, rslora0 = _common_scale(adapter) if common else (1.0, False)
    mods, report = {}, {}
    for name, lazy_mod in adapter.modules.items():
        if not isinstance(lazy_mod, LoraModule):
            raise ValidationError(
                f"resize works on LoRA B·A modules; this one is {lazy_mod.label}", tensor=name
            )
        mod = lazy_mod.materialized()
        B, A = factors_2d(mod)
        # The scale the new factors are written for: the module's own (1 if it is 0), or s0.
        s = s0 if common else (mod.scale or 1.0)
        kept = 1.0
        if common and mod.rank <= common_rank:
            # Exact: the factors as they are, the scale ratio folded into B when it differs.
            B2 = B * (mod.scale / s0) if mod.scale != s0 else B
            A2 = A
        else:
            U, S, Vh = factored_svd(B, A, mod.scale)
            keep = min(common_rank if common else rule.pick(S), S.numel())
            if mod.magnitude is not None and keep < mod.rank:
                # DoRA's magnitude was trained against the norms of W + ΔW; a truncated ΔW
                # changes them, and what the result means then is not known: refuse.
                raise ValidationError(
                    f"a DoRA module cannot be truncated (rank {mod.rank} → {keep}): its "
                    "magnitude vector belongs to the full ΔW",
                    tensor=name,
                    hint="pick a rank rule that keeps it, or --common-rank at or above its rank",
                )
            squares = S.double().square()
            total = float(squares.sum())
            kept = 1.0 if total == 0.0 else float(squares[:keep].sum()) / total
            # B2·A2·s = U_k·S_k·Vh_k: √S on both sides (balanced norms), s divided out.
            root = S[:keep].sqrt() / math.sqrt(abs(s))
            B2 = U[:, :keep] * (root if s > 0 else -root)
            A2 = root[:, None] * Vh[:keep]
        padded = 0
        if common:
            padded = common_rank - B2.shape[1]
            B2, A2 = _pad(B2, A2, common_rank)
            new = _resized(mod, B2, A2, s, rslora0)
        elif B2.shape[1] == mod.rank:
            # The rule keeps every value: the module as it was, bit for bit (still lazy when
            # it came lazily, so an unchanged module is written from its file, not memory).
            new = lazy_mod
        else:
            new = _resized(mod, B2, A2, s, mod.rslora)
        mods[name] = new
        report[name] = {
            "rank_before": mod.rank,
            "rank_after": new.rank,
            "energy_kept": kept,
            "padded": padded,
        }
        progress(1, name)
    meta = replace(
        adapter.meta, name=None, source=f"resize of {adapter.meta.name or adapter.meta.source}"
    )
    # The source's PEFT config stays as the template: build_config keeps it when it still
    # describes the modules and otherwise carries its task_type, base model and revision.
    # A lora_bias is scaled by its module's scale (PEFT applies the layer's scaling to
    # lora_B's bias): a resize that changed that scale would change what the bias adds.
    for op in adapter.ops.values():
        if getattr(op, "why", None) == "lora_bias":
            name = op.target.removesuffix(".bias") + ".weight"
            if name in mods and not math.isclose(mods[name].scale, op.scale, rel_tol=1e-12):
                raise ValidationError(
                    f"its lora_bias is scaled by the module's scale {op.scale:g}, which this "
                    f"resize would change to {mods[name].scale:g}",
                    tensor=name,
                    hint="--common-rank folds differing scales; resize without it keeps them",
                )
    # Tensor operations (modules_to_save heads, saved biases and embeddings, trainable tokens)
    # are not low-rank: they travel unchanged.
    # A kohya / LyCORIS header's dim and alpha describe the new factors (sd-scripts'
    # resize_lora rewrites them the same way); its training history stays.
    origin = dict(adapter.origin)
    if any(mods[n] is not adapter.modules[n] for n in mods):
        from .formats.training import refreshed_origin

        origin = refreshed_origin(origin, mods.values())
    out = Adapter(
        mods,
        meta,
        origin,
        extra_tensors=dict(adapter.extra_tensors),
        ops=dict(adapter.ops),
    )
    return out, report


# -- extract -------------------------------------------------------------------------------


def extract(base_path, finetuned_path, rule: RankRule, *, progress=None, **options):
    """A LoRA from ΔW = W_finetuned − W_base; see ``loratool.extract`` (plan, then run).

    ``options`` are ``plan_extract``'s (exact, oversample, niter, seed, device, dtype, embed,
    base_model, task_type). Returns an ``ExtractResult``.
    """
    from .extract import plan_extract, run_extract

    return run_extract(plan_extract(base_path, finetuned_path, rule, **options), progress)


# -- combine -------------------------------------------------------------------------------

METHODS = ("linear", "cat", "svd", "ties", "dare")


def combine(
    inputs: list[tuple[Adapter, float]],
    method: str,
    *,
    rank: int | None = None,
    density: float = 0.5,
    seed: int = 0,
    max_memory: int | None = None,
    progress: Callable[[int, str | None], None] | None = None,
) -> tuple[Adapter, dict[str, float]]:
    """One adapter from several; each adapter's own scale is applied exactly once.

    Returns the adapter and, for re-factored methods, each module's relative error against the
    combination it stands for (0 for the exact methods). The result keeps what PEFT needs to
    load it with ``AutoPeftModel…``: the inputs' base model and their task_type (when they
    agree). ``progress(1, name)`` after each module.
    """
    import torch

    from . import combine as cm

    if method not in METHODS:
        raise ValidationError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if len(inputs) < 1:
        raise ValidationError("give at least one adapter")
    for i, (a, w) in enumerate(inputs):
        label = a.meta.name or a.meta.source or f"adapter {i + 1}"
        check_weight(w, ((n, m.scale) for n, m in a.modules.items()), label=str(label))
    if method in ("svd", "ties", "dare") and rank is None:
        raise ValidationError(f"--method {method} needs --rank")
    if method in ("ties", "dare") and not 0 < density <= 1:
        raise ValidationError(f"--density must be in (0, 1], got {density}")
    limit = cm.memory_limit(max_memory)
    bases = {
        a.meta.base_model.rstrip("/").rsplit("/", 1)[-1] for a, _ in inputs if a.meta.base_model
    }
    if len(bases) > 1:
        raise ValidationError(f"the adapters are for different bases: {', '.join(sorted(bases))}")
    names: list[str] = []
    for a, _ in inputs:
        names += [n for n in a.modules if n not in names]
    for a, _ in inputs:  # everything refused before any work
        for name, m in a.modules.items():
            if not isinstance(m, LoraModule):
                raise ValidationError(
                    f"combine works on LoRA B·A modules; this one is {m.label}",
                    tensor=name,
                    hint="convert it to LoRA first (loratool convert SRC DEST --to kohya)",
                )
            if m.magnitude is not None:
                # a DoRA magnitude belongs to its own ΔW: there is no magnitude for a sum
                raise ValidationError(
                    f"combine works on LoRA B·A modules; a DoRA module ({m.label}) cannot be "
                    "combined",
                    tensor=name,
                )
        for op in a.ops.values():
            # a replaced head or bias is not a low-rank update: weights and sums mean nothing
            verb = {"replace": "replaces", "rows": "replaces rows of", "add": "adds to"}[op.op]
            raise ValidationError(
                f"combine works on LoRA B·A modules; this adapter also {verb} a full tensor "
                f"({op.why})",
                tensor=op.target,
            )
    modules, errors = {}, {}
    for name in names:
        present = [(a.modules[name], w) for a, w in inputs if name in a.modules]
        first = present[0][0]
        for m, _ in present[1:]:
            if m.base_shape != first.base_shape or m.kind != first.kind:
                raise ValidationError(
                    f"shapes differ between adapters: {list(first.base_shape)} ({first.kind}) vs {list(m.base_shape)} ({m.kind})",
                    tensor=name,
                )
        parts = [(*factors_2d(m), m.scale, w) for m, w in present]
        cm.check_memory(method, parts, limit, name=name)  # before any dense buffer exists
        err = 0.0
        try:
            if method == "cat":
                B, A = cm.combine_cat(parts)
            elif method == "linear":
                B, A = cm.combine_linear(parts)
            elif method == "svd":
                B, A, err = cm.combine_svd(parts, rank)
            elif method == "ties":
                B, A, err = cm.combine_ties(parts, rank, density)
            else:
                B, A, err = cm.combine_dare(parts, rank, density, seed)
        except torch.linalg.LinAlgError as exc:  # the SVD of a sum that overflowed float32
            raise ValidationError(
                "the combination is not finite in float32", tensor=name, hint="use smaller weights"
            ) from exc
        if not (bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())):
            raise ValidationError(
                "the combined factors contain NaN or Inf (they overflow float32)",
                tensor=name,
                hint="use smaller weights",
            )
        modules[name] = module_from_2d(first, B.float(), A.float(), 1.0, rslora=False)
        errors[name] = float(err)
        if progress is not None:
            progress(1, name)
    base_model = next((a.meta.base_model for a, _ in inputs if a.meta.base_model), None)
    meta = AdapterMeta(
        base_model=base_model, format="loratool", source=f"combine --method {method}"
    )
    return Adapter(modules, meta, _combined_origin(inputs, base_model)), errors


def _combined_origin(inputs: list[tuple[Adapter, float]], base_model: str | None) -> dict:
    """The origin of a combination: the first input's PEFT config (it is written again only
    where it still describes the modules; otherwise its task_type, base model and revision are
    carried into a rebuilt one), with the task_type the inputs agree on, if any."""
    configs = [a.origin.get("peft_config") for a, _ in inputs]
    configs = [c for c in configs if isinstance(c, dict)]
    if not configs:
        return {"format": "loratool"}
    config = dict(configs[0])
    for key in ("modules_to_save", "trainable_token_indices", "target_parameters"):
        config[key] = None  # a combination holds LoRA modules only
    config["lora_bias"] = False
    task_types = {c.get("task_type") for c in configs} - {None}
    config["task_type"] = task_types.pop() if len(task_types) == 1 else None
    if base_model:
        config["base_model_name_or_path"] = base_model
    return {"format": "loratool", "peft_config": config}
