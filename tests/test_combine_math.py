"""combine.py against the dense math Σ wᵢ·sᵢ·Bᵢ·Aᵢ, written-out TIES/DARE, and real peft 0.21.2.

The peft tests build a tiny nn.Sequential, put real LoRA adapters on it with peft's LoraConfig,
run ``add_weighted_adapter`` and compare what peft produces (``get_delta_weight`` of the new
adapter) with the exact weighted sum of the sources' ``get_delta_weight``. What they found in
peft 0.21.2:

1. ``linear`` (equal ranks) is not the weighted sum: it is (Σ√(wᵢsᵢ)Bᵢ)(Σ√(wᵢsᵢ)Aᵢ), cross
   terms included (peft#3004). Still so in 0.21.2.
2. ``svd`` with alpha ≠ r applies the scale once: it SVDs get_delta_weight (scale inside) and
   gives the new adapter alpha = r, scale 1. The "scale twice" claim does not hold for 0.21.2;
   the test asserts the agreement.
3. rsLoRA sources: the new adapter inherits use_rslora with alpha = r, so its scale is √r_new
   and ``cat``, ``svd`` and ``linear`` all come out √r_new too large (fixed upstream by
   peft#3449, not in 0.21.2).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from loratool import combine as C
from loratool.errors import ValidationError


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def dense_sum(parts):
    return sum(w * s * (B.double() @ A.double()) for B, A, s, w in parts)


def make_parts(d=24, k=18, ranks=(4, 6, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = [2.0, 0.5, 1 / math.sqrt(3)]
    weights = [0.7, -1.2, 0.4]
    return [
        (
            torch.randn(d, r, generator=g),
            torch.randn(r, k, generator=g) / math.sqrt(k),
            scales[i % 3],
            weights[i % 3],
        )
        for i, r in enumerate(ranks)
    ]


# -- exact methods ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [C.combine_cat, C.combine_linear])
def test_cat_and_linear_are_the_exact_weighted_sum(fn):
    parts = make_parts()
    B, A = fn(parts)
    assert B.shape == (24, 13) and A.shape == (13, 18)
    assert B.dtype == A.dtype == torch.float32
    assert rel(B @ A, dense_sum(parts)) < 1e-5


def test_equal_ranks_linear_is_exact_too():
    parts = make_parts(ranks=(5, 5))
    B, A = C.combine_linear(parts)
    assert rel(B @ A, dense_sum(parts)) < 1e-5


def test_half_precision_inputs_are_upcast():
    parts = [(B.to(torch.bfloat16), A.to(torch.bfloat16), s, w) for B, A, s, w in make_parts()]
    B, A = C.combine_cat(parts)
    assert B.dtype == torch.float32
    assert rel(B @ A, dense_sum([(B_.float(), A_.float(), s, w) for B_, A_, s, w in parts])) < 1e-5


def test_svd_at_full_summed_rank_is_exact_and_lower_rank_is_the_optimum():
    parts = make_parts()
    ref = dense_sum(parts)
    B, A, err = C.combine_svd(parts, 13)
    assert rel(B @ A, ref) < 1e-5 and err < 1e-5
    U, S, Vh = torch.linalg.svd(ref, full_matrices=False)
    for k in (1, 4, 9):
        B, A, err = C.combine_svd(parts, k)
        best = (U[:, :k] * S[:k]) @ Vh[:k]
        assert B.shape == (24, k)
        assert rel(B @ A, best) < 1e-5
        assert err == pytest.approx(
            float(S[k:].square().sum().sqrt() / S.square().sum().sqrt()), rel=1e-4
        )


def test_bad_parts_are_refused():
    with pytest.raises(ValidationError, match="nothing to combine"):
        C.combine_cat([])
    with pytest.raises(ValidationError, match="part 1"):
        C.combine_cat(
            [
                (torch.randn(5, 2), torch.randn(2, 4), 1.0, 1.0),
                (torch.randn(6, 2), torch.randn(2, 4), 1.0, 1.0),
            ]
        )
    with pytest.raises(ValidationError, match="density"):
        C.combine_ties(make_parts(), 4, 0.0)
    with pytest.raises(ValidationError, match="rank"):
        C.combine_svd(make_parts(), 0)


# -- TIES and DARE against written-out dense references ------------------------------------------


def ties_reference(parts, density):
    """TIES as mergekit computes it (sum consensus, normalize), on dense float64 task vectors."""
    taus = [s * (B.double() @ A.double()) for B, A, s, _ in parts]
    weights = torch.tensor([w for *_, w in parts], dtype=torch.float64)
    trimmed = []
    for t in taus:
        flat = t.flatten()
        k = int(density * flat.numel())
        order = torch.argsort(flat.abs(), descending=True)
        keep = torch.zeros_like(flat)
        keep[order[:k]] = 1
        trimmed.append((flat * keep).reshape(t.shape))
    deltas = torch.stack(trimmed)
    w = weights[:, None, None]
    weighted = deltas * w
    majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).double()
    mask = (weighted.sign() == majority).double()
    mixed = (weighted * mask).sum(0)
    divisor = (w * mask).sum(0)
    divisor[divisor == 0] = 1
    return mixed / divisor


def best_rank(M, k):
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_the_dense_reference(density):
    parts = make_parts(d=12, k=10)
    ref = ties_reference(parts, density)
    B, A, err = C.combine_ties(parts, 10, density)  # full rank: only TIES itself
    assert B.shape == (12, 10)
    assert rel(B @ A, ref) < 1e-5 and err < 1e-5
    B, A, err = C.combine_ties(parts, 3, density)
    assert rel(B @ A, best_rank(ref, 3)) < 1e-5
    assert err == pytest.approx(rel(best_rank(ref, 3), ref), rel=1e-4)


def test_ties_with_one_part_gives_the_trimmed_task_vector_whatever_its_weight():
    ((B, A, s, _),) = make_parts(ranks=(4,))
    tau = s * (B.double() @ A.double())
    out_B, out_A, _ = C.combine_ties([(B, A, s, 0.5)], 18, 1.0)
    assert rel(out_B @ out_A, tau) < 1e-5  # normalized: weights are relative


def test_ties_disagreeing_signs_are_dropped_not_averaged():
    # Two rank-1 updates with entries of opposite sign: the weaker side loses each entry.
    u = torch.tensor([[1.0], [2.0]])
    v = torch.tensor([[1.0, -1.0]])
    parts = [(u, v, 1.0, 1.0), (-0.5 * u, v, 1.0, 1.0)]
    B, A, _ = C.combine_ties(parts, 2, 1.0)
    torch.testing.assert_close(B @ A, u @ v, rtol=1e-6, atol=1e-6)


def dare_reference(parts, density, seed):
    """DARE with the documented draw order: one torch.rand per part from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    total = 0
    for B, A, s, w in parts:
        tau = s * (B.float() @ A.float())
        keep = torch.rand(tau.shape, generator=g) < density
        total = total + w * tau.double() * keep.double() / density
    return total


def test_dare_matches_the_reference_and_is_deterministic():
    parts = make_parts(d=12, k=10)
    ref = dare_reference(parts, 0.4, seed=3)
    B1, A1, _ = C.combine_dare(parts, 10, 0.4, seed=3)
    B2, A2, _ = C.combine_dare(parts, 10, 0.4, seed=3)
    assert torch.equal(B1, B2) and torch.equal(A1, A2)
    assert rel(B1 @ A1, ref) < 1e-5
    B3, A3, _ = C.combine_dare(parts, 10, 0.4, seed=4)
    assert rel(B3 @ A3, B1 @ A1) > 0.1


def test_dare_drops_and_rescales_entries():
    ((B, A, s, _),) = make_parts(d=40, k=50, ranks=(6,))
    tau = s * (B.double() @ A.double())
    out_B, out_A, _ = C.combine_dare([(B, A, s, 2.0)], 40, 0.25, seed=0)
    out = (out_B @ out_A).double()
    kept = out.abs() > 1e-4 * float(tau.abs().max())
    assert 0.2 < float(kept.double().mean()) < 0.3  # about density of the entries survive
    torch.testing.assert_close(out[kept], 2.0 * tau[kept] / 0.25, rtol=1e-4, atol=1e-5)
    assert float(out[~kept].abs().max()) < 1e-4 * float(tau.abs().max())


def test_dare_is_unbiased():
    parts = make_parts(d=8, k=6, ranks=(2, 3))
    ref = dense_sum(parts)
    mean = 0
    n = 2000
    for seed in range(n):
        B, A, _ = C.combine_dare(parts, 6, 0.5, seed)
        mean = mean + (B @ A).double() / n
    # per-entry std of one draw ≈ |wτ|·√((1−p)/p); of the mean over n draws, /√n ≈ 2.2 %
    assert rel(mean, ref) < 0.05
    B, A, _ = C.combine_dare(parts, 6, 0.5, 0)
    assert rel(mean, ref) < rel(B @ A, ref) / 5  # far closer than any single draw


def test_dare_density_one_is_the_plain_sum():
    parts = make_parts()
    B, A, err = C.combine_dare(parts, 18, 1.0, seed=0)
    assert rel(B @ A, dense_sum(parts)) < 1e-5


# -- against real peft 0.21.2 ----------------------------------------------------------------------

peft = pytest.importorskip("peft")


def peft_model(configs, seed=0):
    """A tiny Sequential with real peft LoRA adapters named as in ``configs`` (non-zero B)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.ReLU(), torch.nn.Linear(10, 8))
    (name0, kw0), *rest = configs
    common = dict(target_modules=["0", "2"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, LoraConfig(**common, **kw0), adapter_name=name0)
        for name, kw in rest:
            model.add_adapter(name, LoraConfig(**common, **kw))
    return model


def layers(model):
    return [model.base_model.model[0], model.base_model.model[2]]


def our_parts(layer, names, weights):
    return [
        (
            layer.lora_B[n].weight.detach(),
            layer.lora_A[n].weight.detach(),
            float(layer.scaling[n]),
            w,
        )
        for n, w in zip(names, weights, strict=True)
    ]


def peft_combine(model, names, weights, method, **kw):
    new = f"{method}_{len(model.peft_config)}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_weighted_adapter(names, weights, new, combination_type=method, **kw)
    return new


def reference(layer, names, weights):
    """The weighted sum of the sources' own ΔW, as peft itself computes each one."""
    return sum(
        w * layer.get_delta_weight(n).detach().double() for n, w in zip(names, weights, strict=True)
    )


WEIGHTS = [0.7, 1.3]


def test_peft_linear_has_cross_terms_ours_is_exact():
    model = peft_model([("a", dict(r=4, lora_alpha=8)), ("b", dict(r=4, lora_alpha=8))])
    new = peft_combine(model, ["a", "b"], WEIGHTS, "linear")
    for layer in layers(model):
        ref = reference(layer, ["a", "b"], WEIGHTS)
        got = layer.get_delta_weight(new).detach()
        assert rel(got, ref) > 0.1, "peft 0.21.2 linear is expected to add cross terms"
        # peft's result is exactly the product of the √(w·s)-weighted sums of Bs and As
        parts = our_parts(layer, ["a", "b"], WEIGHTS)
        Bsum = sum(math.sqrt(w * s) * B.double() for B, _, s, w in parts)
        Asum = sum(math.sqrt(w * s) * A.double() for _, A, s, w in parts)
        assert rel(got, Bsum @ Asum) < 1e-5
        B, A = C.combine_linear(parts)
        assert rel(B @ A, ref) < 1e-5


def test_peft_svd_applies_the_scale_once_in_0_21_2():
    # alpha ≠ r on both sources, different alphas: the case said to double the scale.
    model = peft_model([("a", dict(r=4, lora_alpha=16)), ("b", dict(r=4, lora_alpha=2))])
    new = peft_combine(model, ["a", "b"], WEIGHTS, "svd", svd_rank=8)
    cat = peft_combine(model, ["a", "b"], WEIGHTS, "cat")
    for layer in layers(model):
        ref = reference(layer, ["a", "b"], WEIGHTS)
        assert layer.scaling[new] == 1.0
        assert rel(layer.get_delta_weight(new).detach(), ref) < 1e-5  # peft 0.21.2 is right here
        assert rel(layer.get_delta_weight(cat).detach(), ref) < 1e-5
        B, A, err = C.combine_svd(our_parts(layer, ["a", "b"], WEIGHTS), 8)
        assert rel(B @ A, ref) < 1e-5 and err < 1e-5


@pytest.mark.parametrize("method", ["cat", "svd", "linear"])
def test_peft_overscales_rslora_sources_by_sqrt_r(method):
    kw = dict(r=4, lora_alpha=8, use_rslora=True)
    model = peft_model([("a", kw), ("b", kw)])
    extra = dict(svd_rank=8) if method == "svd" else {}
    new = peft_combine(model, ["a", "b"], WEIGHTS, method, **extra)
    new_rank = {"cat": 8, "svd": 8, "linear": 4}[method]
    for layer in layers(model):
        # the new adapter has alpha = r and inherits use_rslora: scale √r, not 1
        assert layer.scaling[new] == pytest.approx(math.sqrt(new_rank))
        ref = reference(layer, ["a", "b"], WEIGHTS)
        got = layer.get_delta_weight(new).detach()
        if method != "linear":  # linear also has cross terms; its excess is √r times those
            assert rel(got, math.sqrt(new_rank) * ref) < 1e-5
        else:
            assert float(got.norm()) > 1.5 * float(ref.norm())
        parts = our_parts(layer, ["a", "b"], WEIGHTS)
        assert parts[0][2] == pytest.approx(8 / 2)  # rsLoRA scale alpha/√r as peft has it
        B, A = C.combine_cat(parts)
        assert rel(B @ A, ref) < 1e-5
        B, A, _ = C.combine_svd(parts, 8)
        assert rel(B @ A, ref) < 1e-5


def test_ties_with_unit_weights_matches_peft_ties_svd():
    # With all weights 1, peft's ties (sign from the unweighted sum, divide by the count) and
    # mergekit's (weighted sum, divide by the weights) coincide; peft's ties_svd at full rank
    # is then TIES of get_delta_weight, which ours must equal.
    model = peft_model(
        [
            ("a", dict(r=4, lora_alpha=8)),
            ("b", dict(r=3, lora_alpha=3)),
            ("c", dict(r=4, lora_alpha=4)),
        ]
    )
    names = ["a", "b", "c"]
    new = peft_combine(
        model, names, [1.0, 1.0, 1.0], "ties_svd", svd_rank=10, density=0.4, svd_full_matrices=False
    )
    for layer in layers(model):
        got = layer.get_delta_weight(new).detach()
        full = min(got.shape)
        B, A, _ = C.combine_ties(our_parts(layer, names, [1.0, 1.0, 1.0]), full, 0.4)
        assert rel(B @ A, got) < 1e-5
