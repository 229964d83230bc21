"""The rank rules against their definitions.

sd-scripts (kohya-ss/sd-scripts networks/resize_lora.py: index_sv_ratio, index_sv_cumulative,
index_sv_fro, and rank_resize's zero test and cap) and mergekit (mergekit/scripts/
extract_lora.py: TaskVectorDecompositionTask.execute's max_rank and sv_epsilon) are pinned
twice: worked examples whose numbers are computed by hand in the comments, and a property test
against the two projects' code transcribed below, line for line, on random spectra.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratool.errors import ValidationError
from loratool.rank import RankRule

S = [4.0, 2.0, 1.0, 1.0]  # Σσ = 8; σ² = 16, 4, 1, 1 with Σσ² = 22


def pick(method, value, max_rank=None, spectrum=S, **kw):
    return RankRule(method, value, max_rank).pick(spectrum, **kw)


@pytest.mark.parametrize(
    "target,want",
    [
        (4, 2),  # σ₁/4 = 1: σ > 1 are 4, 2 → count 2 → index 1 → rank 2
        (3, 2),  # 4/3 = 1.33: still 4, 2
        (2, 1),  # 4/2 = 2: only 4 (2 is not > 2)
        (1, 1),  # 4/1 = 4: none > 4 → index −1, clamped to 0 → rank 1
        (8, 4),  # 0.5: all four
    ],
)
def test_sv_ratio_worked(target, want):
    assert pick("sv_ratio", target) == want


@pytest.mark.parametrize(
    "target,want",
    [
        (0.5, 1),  # cumsum/Σσ = .5, .75, .875, 1: first ≥ .5 is index 0 → rank 1
        (0.6, 2),  # first ≥ .6 is .75, index 1
        (0.75, 2),  # searchsorted is left-sided: equal counts, index 1
        (0.76, 3),  # .875
        (0.9, 4),
        (1.0, 4),
    ],
)
def test_sv_cumulative_worked(target, want):
    assert pick("sv_cumulative", target) == want


@pytest.mark.parametrize(
    "target,want",
    [
        (0.8, 1),  # target² = .64; cumsum σ²/22 = .727, .909, .955, 1 → index 0
        (0.9, 2),  # .81 → .909, index 1
        (0.95, 2),  # .9025 → .909
        (0.96, 3),  # .9216 → .955
        (0.98, 4),  # .9604 → 1
    ],
)
def test_sv_fro_worked(target, want):
    assert pick("sv_fro", target) == want


def test_sd_zero_test_and_cap():
    # rank_resize: S[0] <= 1e-6 is a zero matrix, rank 1; then new_rank is capped at --new_rank.
    for method in ("sv_ratio", "sv_fro", "sv_cumulative"):
        assert pick(method, 0.99 if method != "sv_ratio" else 100, spectrum=[1e-6, 5e-7]) == 1
        assert pick(method, 0.999 if method != "sv_ratio" else 100, max_rank=3) == 3
    assert pick("sv_ratio", 8, max_rank=2) == 2
    assert pick("sv_ratio", 8, spectrum=[2e-6, 1e-6]) == 2  # above the zero test: counted


@pytest.mark.parametrize(
    "eps,max_rank,want",
    [
        (1.0, None, 2),  # σ > 1: 4, 2
        (0.5, None, 4),
        (0.0, None, 4),  # 0 turns the threshold off: max_rank (here all)
        (0.0, 3, 3),
        (0.5, 3, 3),
        (5.0, None, 1),  # mergekit would keep 0; a LoRA needs at least 1
    ],
)
def test_sv_epsilon_worked(eps, max_rank, want):
    assert pick("sv_epsilon", eps, max_rank) == want


def test_rank_and_energy():
    assert pick("rank", 3) == 3
    assert pick("rank", 9) == 4  # no more than the spectrum has
    assert pick("rank", 9, n=4) == 4
    assert pick("rank", 3, max_rank=2) == 2
    assert pick("energy", 16 / 22) == 1  # exactly the first share
    assert pick("energy", 0.8) == 2  # .909
    assert pick("energy", 1.0) == 4


def test_leading_values_with_the_known_total():
    # A randomized SVD gives the leading σ and ‖ΔW‖_F² exactly; a share the leading values
    # do not reach answers len(S) ("too short to tell"), one they reach is the full answer.
    lead = [4.0, 2.0]
    assert pick("energy", 0.8, spectrum=lead, total_sq=22.0) == 2
    assert pick("energy", 0.95, spectrum=lead, total_sq=22.0) == 2  # = len: ask for more
    assert pick("sv_fro", 0.9, spectrum=lead, total_sq=22.0) == 2
    assert pick("sv_fro", 0.8, spectrum=lead, total_sq=22.0) == 1
    assert pick("sv_ratio", 8, spectrum=lead) == 2  # = len: ask for more


def test_bad_rules_are_refused():
    for method, value in (
        ("rank", 0),
        ("rank", 2.5),
        ("energy", 0),
        ("energy", 1.5),
        ("sv_fro", 0),
        ("sv_cumulative", 2),
        ("sv_ratio", 0.5),
        ("sv_epsilon", -1),
        ("nope", 1),
        ("energy", float("nan")),
    ):
        with pytest.raises(ValidationError):
            RankRule(method, value)
    with pytest.raises(ValidationError, match="max-rank"):
        RankRule("energy", 0.9, 0)


# -- the two projects' code, transcribed (float64 σ) -------------------------------------------

MIN_SV = 1e-6


def ref_index_sv_cumulative(S, target):
    original_sum = float(torch.sum(S))
    cumulative_sums = torch.cumsum(S, dim=0) / original_sum
    index = int(torch.searchsorted(cumulative_sums, target))
    index = max(0, min(index, len(S) - 1))
    return index


def ref_index_sv_fro(S, target):
    S_squared = S.pow(2)
    S_fro_sq = float(torch.sum(S_squared))
    sum_S_squared = torch.cumsum(S_squared, dim=0) / S_fro_sq
    index = int(torch.searchsorted(sum_S_squared, target**2))
    index = max(0, min(index, len(S) - 1))
    return index


def ref_index_sv_ratio(S, target):
    max_sv = S[0]
    min_sv = max_sv / target
    index = int(torch.sum(S > min_sv).item()) - 1
    index = max(0, min(index, len(S) - 1))
    return index


def ref_rank_resize(S, rank, dynamic_method, dynamic_param):
    if dynamic_method == "sv_ratio":
        new_rank = ref_index_sv_ratio(S, dynamic_param) + 1
    elif dynamic_method == "sv_cumulative":
        new_rank = ref_index_sv_cumulative(S, dynamic_param) + 1
    elif dynamic_method == "sv_fro":
        new_rank = ref_index_sv_fro(S, dynamic_param) + 1
    else:
        new_rank = rank
    if S[0] <= MIN_SV:
        new_rank = 1
    elif new_rank > rank:
        new_rank = rank
    return new_rank


def ref_mergekit_rank(s, max_rank, sv_epsilon):
    rank = min(max_rank, s.shape[0])
    if sv_epsilon > 0:
        rank = min((s > sv_epsilon).sum().item(), rank)
    return rank


spectra = st.lists(
    st.one_of(st.floats(1e-9, 1e3), st.sampled_from([0.0, 1.0, 2.0, 0.5])),
    min_size=1,
    max_size=24,
).map(lambda xs: sorted(xs, reverse=True))


@settings(max_examples=300, deadline=None)
@given(
    spectra,
    st.sampled_from(["sv_ratio", "sv_fro", "sv_cumulative"]),
    st.floats(0.01, 1.0),
    st.integers(1, 30),
)
def test_sd_scripts_rules_equal_their_code(s, method, param, max_rank):
    S = torch.tensor(s, dtype=torch.float64)
    if method == "sv_ratio":
        param = 1 / param  # a ratio ≥ 1
    if method == "sv_cumulative" and float(S.sum()) == 0:
        return  # sd-scripts divides by zero there (its zero test comes after)
    want = ref_rank_resize(S, max_rank, method, param)
    assert RankRule(method, param, max_rank).pick(s) == want


@settings(max_examples=200, deadline=None)
@given(spectra, st.floats(0, 100), st.integers(1, 30))
def test_mergekit_sv_epsilon_equals_its_code(s, eps, max_rank):
    want = ref_mergekit_rank(torch.tensor(s, dtype=torch.float64), max_rank, eps)
    assert RankRule("sv_epsilon", eps, max_rank).pick(s) == max(1, want)
