"""LoHa / LoKr / LoCon-Tucker ΔW against lycoris-lora itself.

Each case builds the real package's module on a tiny nn.Linear / nn.Conv2d, sets its factors,
takes the tensors it saves (``state_dict``: what a LyCORIS file holds) and checks that
loratool's module built from them gives the ΔW lycoris applies in its forward pass
(``get_weight(shape) · scalar · multiplier``, and the forward itself), and, where they agree,
``lycoris.functional``'s ``diff_weight``. lycoris' own ``merge_to`` scales LoHa/LoKr twice;
that divergence is pinned too (see loratool/adapter/lycoris.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loratool.adapter import module_class
from loratool.adapter.lycoris import LoconTuckerModule, LohaModule, LokrModule
from loratool.errors import ValidationError

lycoris = pytest.importorskip("lycoris")
from lycoris.functional import locon as f_locon  # noqa: E402
from lycoris.functional import loha as f_loha  # noqa: E402
from lycoris.functional import lokr as f_lokr  # noqa: E402
from lycoris.modules.locon import LoConModule  # noqa: E402
from lycoris.modules.loha import LohaModule as LyLoha  # noqa: E402
from lycoris.modules.lokr import LokrModule as LyLokr  # noqa: E402

TOL = dict(rtol=0, atol=1e-6)


def seeded(layer_seed: int, layer):
    torch.manual_seed(layer_seed)
    with torch.no_grad():
        layer.weight.normal_()
    return layer


def fill(mod, seed: int) -> dict[str, torch.Tensor]:
    """Random factors (lycoris initialises some to 0) and the tensors lycoris saves."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(mod.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return {k: v.detach().clone() for k, v in mod.state_dict().items()}


def ours(kind: str, sd: dict, name="m"):
    alpha = float(sd.pop("alpha"))
    roles = {k.removesuffix(".weight"): v for k, v in sd.items()}
    return module_class(kind).from_parts(name, kind, roles, {"alpha": alpha})


def lycoris_forward_delta(lyco, org) -> torch.Tensor:
    """ΔW as lycoris' forward adds it at multiplier 1."""
    with torch.no_grad():
        return (lyco.get_weight(lyco.shape) * lyco.scalar).reshape(org.weight.shape)


def check_forward(lyco, org, delta, x):
    """The real forward pass equals the layer with W + ΔW."""
    w0 = org.weight.detach().clone()
    lyco.apply_to()
    try:
        with torch.no_grad():
            got = org(x)
            if isinstance(org, torch.nn.Linear):
                want = F.linear(x, w0 + delta)
            else:
                want = F.conv2d(x, w0 + delta, None, org.stride, org.padding)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    finally:
        lyco.restore()


LINEAR = lambda: seeded(1, torch.nn.Linear(64, 48, bias=False))  # noqa: E731
CONV = lambda: seeded(2, torch.nn.Conv2d(32, 24, 3, padding=1, bias=False))  # noqa: E731


@pytest.mark.parametrize(
    "make, kw, tucker",
    [
        (LINEAR, {}, False),
        (CONV, {}, False),
        (CONV, {"use_tucker": True}, True),
    ],
    ids=["linear", "conv", "conv-tucker"],
)
def test_loha_matches_lycoris(make, kw, tucker):
    org = make()
    lyco = LyLoha("m", org, 1.0, lora_dim=3, alpha=2.5, **kw)
    sd = fill(lyco, 11)
    assert ("hada_t1" in sd) == tucker
    mod = ours("loha", dict(sd))
    assert mod.rank == 3 and mod.scale == pytest.approx(2.5 / 3)
    fitted = mod.fit(tuple(org.weight.shape))
    delta = fitted.delta()
    assert delta.shape == org.weight.shape
    ref = lycoris_forward_delta(lyco, org)
    torch.testing.assert_close(delta, ref, **TOL)
    # the functional API (w1d, w1u, w2d, w2u[, t1, t2]) agrees
    fn = f_loha.diff_weight(
        sd["hada_w1_b"],
        sd["hada_w1_a"],
        sd["hada_w2_b"],
        sd["hada_w2_a"],
        sd.get("hada_t1"),
        sd.get("hada_t2"),
        gamma=torch.tensor(float(sd["alpha"]) / 3),
    ).reshape(org.weight.shape)
    torch.testing.assert_close(delta, fn, **TOL)
    x = torch.randn(2, 64) if isinstance(org, torch.nn.Linear) else torch.randn(1, 32, 5, 5)
    check_forward(lyco, org, delta, x)


def lokr_cases():
    return [
        ("linear w1 + w2a/b", LINEAR, dict(lora_dim=2)),
        ("linear w1a/b + w2a/b", LINEAR, dict(lora_dim=2, decompose_both=True)),
        ("linear w1 + w2 (full)", LINEAR, dict(lora_dim=2, full_matrix=True)),
        ("linear w1 + w2 (rank too large)", LINEAR, dict(lora_dim=6)),
        ("conv w1 + w2a/b", CONV, dict(lora_dim=2)),
        ("conv w1 + t2", CONV, dict(lora_dim=2, use_tucker=True)),
        ("conv w1a/b + t2", CONV, dict(lora_dim=1, use_tucker=True, decompose_both=True)),
        ("conv w1 + w2 (4-D)", CONV, dict(lora_dim=2, full_matrix=True)),
        ("linear factor 4", LINEAR, dict(lora_dim=2, factor=4)),
    ]


@pytest.mark.parametrize("label, make, kw", lokr_cases(), ids=[c[0] for c in lokr_cases()])
def test_lokr_matches_lycoris(label, make, kw):
    org = make()
    lyco = LyLokr("m", org, 1.0, alpha=3.0, **kw)
    sd = fill(lyco, 12)
    mod = ours("lokr", dict(sd))
    fitted = mod.fit(tuple(org.weight.shape))
    delta = fitted.delta()
    ref = lycoris_forward_delta(lyco, org)
    torch.testing.assert_close(delta, ref, **TOL)
    assert mod.scale == pytest.approx(lyco.scale)
    # both halves whole: scale 1 whatever alpha says (lycoris sets alpha = lora_dim)
    if "lokr_w1" in sd and "lokr_w2" in sd:
        assert mod.scale == 1.0
    x = torch.randn(2, 64) if isinstance(org, torch.nn.Linear) else torch.randn(1, 32, 5, 5)
    check_forward(lyco, org, delta, x)
    if "lokr_t2" not in sd:
        # functional.lokr reads the rank off w1a / w2a, which is the rank when not Tucker
        fn = f_lokr.diff_weight(
            sd.get("lokr_w1"),
            sd.get("lokr_w1_a"),
            sd.get("lokr_w1_b"),
            sd.get("lokr_w2"),
            sd.get("lokr_w2_a"),
            sd.get("lokr_w2_b"),
            None,
            gamma=float(sd["alpha"]),
        ).reshape(org.weight.shape)
        torch.testing.assert_close(delta, fn, **TOL)


def test_locon_tucker_matches_lycoris():
    org = CONV()
    lyco = LoConModule("m", org, 1.0, lora_dim=3, alpha=1.5, use_tucker=True)
    sd = fill(lyco, 13)
    assert "lora_mid.weight" in sd
    mod = ours("locon_tucker", dict(sd))
    delta = mod.delta()
    ref = lyco.get_diff_weight(1.0)[0].reshape(org.weight.shape)  # LoCon scales once
    torch.testing.assert_close(delta, ref, **TOL)
    fn = f_locon.diff_weight(
        sd["lora_down.weight"], sd["lora_up.weight"], sd["lora_mid.weight"], gamma=1.5 / 3
    ).reshape(org.weight.shape)
    torch.testing.assert_close(delta, fn, **TOL)
    check_forward(lyco, org, delta, torch.randn(1, 32, 5, 5))


def test_lycoris_merge_to_scales_twice():
    """lycoris 4.1.3's merge_to adds scale²·ΔW for LoHa/LoKr (get_diff_weight multiplies the
    already-scaled get_weight by the scale again); loratool follows the forward (scale·ΔW).
    If this starts failing, lycoris changed: re-read its merge path."""
    for cls, kw in ((LyLoha, dict(lora_dim=3)), (LyLokr, dict(lora_dim=2))):
        org = LINEAR()
        w0 = org.weight.detach().clone()
        lyco = cls("m", org, 1.0, alpha=2.0, **kw)
        sd = fill(lyco, 14)
        mod = ours("loha" if cls is LyLoha else "lokr", dict(sd))
        lyco.merge_to(1.0)
        torch.testing.assert_close(org.weight.detach() - w0, mod.delta() * mod.scale, **TOL)


# -- spectrum and truncation without the dense ΔW ------------------------------------------------


@pytest.mark.parametrize("kind", ["loha", "loha-tucker", "lokr", "lokr-tucker", "locon_tucker"])
def test_spectrum_and_truncation_from_factors(kind):
    org = CONV() if kind != "lokr" else LINEAR()
    if kind.startswith("loha"):
        lyco = LyLoha("m", org, 1.0, lora_dim=3, alpha=2.0, use_tucker=kind.endswith("tucker"))
        k = "loha"
    elif kind.startswith("lokr"):
        lyco = LyLokr("m", org, 1.0, lora_dim=2, alpha=2.0, use_tucker=kind.endswith("tucker"))
        k = "lokr"
    else:
        lyco = LoConModule("m", org, 1.0, lora_dim=3, alpha=2.0, use_tucker=True)
        k = "locon_tucker"
    mod = ours(k, fill(lyco, 15)).fit(tuple(org.weight.shape))
    dense = mod.delta().double().reshape(org.weight.shape[0], -1)
    S_ref = torch.linalg.svdvals(dense)
    S = mod.svdvals().double()
    n = min(S.numel(), S_ref.numel())
    torch.testing.assert_close(S[:n], S_ref[:n], rtol=1e-4, atol=1e-5)
    # past the structural rank bound everything is 0 in the reference too
    if k == "loha":
        assert S.numel() <= 9 and float(S_ref[9:].abs().max()) < 1e-4
    U, Sd, Vh = torch.linalg.svd(dense, full_matrices=False)
    for rank in (1, 2, 4):
        B, A, S_all = mod.truncated(rank)
        approx = B.double() @ A.double()
        best = (U[:, :rank] * Sd[:rank]) @ Vh[:rank]
        torch.testing.assert_close(approx, best, rtol=1e-4, atol=1e-4)


# -- refusals ---------------------------------------------------------------------------------------


def test_partial_and_mixed_factors_are_refused():
    w = torch.ones(4, 2)
    with pytest.raises(ValidationError, match="needs lokr_w1"):
        LokrModule("m", "lokr", 1.0, w2=torch.ones(2, 2))
    with pytest.raises(ValidationError, match="come together"):
        LokrModule("m", "lokr", 1.0, w1a=w, w2=torch.ones(2, 2))
    with pytest.raises(ValidationError, match="not both"):
        LokrModule("m", "lokr", 1.0, w1=w, w1a=w, w1b=w.T, w2=torch.ones(2, 2))
    with pytest.raises(ValidationError, match="hada_t1 and hada_t2"):
        LohaModule(
            "m",
            "loha",
            torch.ones(4, 2),
            w.T,
            torch.ones(4, 2),
            w.T,
            1.0,
            t1=torch.ones(2, 2, 3, 3),
        )
    with pytest.raises(ValidationError, match="rank 2 but hada_w2 has rank 3"):
        LohaModule(
            "m", "loha", torch.ones(4, 2), torch.ones(2, 5), torch.ones(4, 3), torch.ones(3, 5), 1.0
        )
    with pytest.raises(ValidationError, match="lora_mid"):
        LoconTuckerModule(
            "m",
            "locon_tucker",
            torch.ones(2, 3, 1, 1),
            torch.ones(3, 3, 3, 3),
            torch.ones(4, 2, 1, 1),
            1.0,
        )


def test_conv_shape_comes_from_the_base():
    """A non-Tucker conv LoHa flattens the kernel into hada_w1_b: the base says the shape."""
    org = CONV()
    lyco = LyLoha("m", org, 1.0, lora_dim=2, alpha=2.0)
    mod = ours("loha", fill(lyco, 16))
    assert mod.base_shape == (24, 32 * 9) and not mod.shape_known
    fitted = mod.fit((24, 32, 3, 3))
    assert fitted.base_shape == (24, 32, 3, 3) and fitted.facts()["shape"] == [24, 32, 3, 3]
    with pytest.raises(ValidationError, match="base tensor is"):
        mod.fit((24, 33, 3, 3))
