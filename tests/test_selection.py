"""Selection equals a brute-force Python implementation: sort by (-score, index), take ceil(q*n)."""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import pytest
import torch
from harmprune.method import selection
from harmprune.method.selection import (
    count_for,
    indices_that_can_rank,
    select,
    select_global,
    select_per_matrix,
    set_difference,
    top_k_indices,
)

# ---------------------------------------------------------------- brute force


def bf_count(fraction: float, n: int) -> int:
    """ceil(fraction * n) computed exactly on the decimal value the user wrote."""
    if fraction <= 0:
        return 0
    return min(n, math.ceil(Fraction(str(fraction)) * n))


def bf_top_k(scores: torch.Tensor, k: int) -> list[int]:
    values = scores.reshape(-1).tolist()
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return sorted(order[: max(k, 0)])


def bf_select(
    harm: dict[str, torch.Tensor], keep: dict[str, torch.Tensor], q: float, p: float
) -> dict[str, tuple[list[int], int, list[int]]]:
    out = {}
    for name, h in harm.items():
        cand = bf_top_k(h, bf_count(q, h.numel()))
        prot = set(bf_top_k(keep[name], bf_count(p, h.numel())))
        pruned = [i for i in cand if i not in prot]
        out[name] = (cand, len(cand) - len(pruned), pruned)
    return out


def bf_select_global(
    harm: dict[str, torch.Tensor], keep: dict[str, torch.Tensor], q: float, p: float
) -> dict[str, tuple[list[int], int, list[int]]]:
    names = list(harm)
    flat_h = torch.cat([harm[n].reshape(-1) for n in names])
    flat_k = torch.cat([keep[n].reshape(-1) for n in names])
    total = flat_h.numel()
    cand = bf_top_k(flat_h, bf_count(q, total))
    prot = set(bf_top_k(flat_k, bf_count(p, total)))
    out, offset = {}, 0
    for n in names:
        size = harm[n].numel()
        c = [i - offset for i in cand if offset <= i < offset + size]
        pr = [i - offset for i in cand if offset <= i < offset + size and i not in prot]
        out[n] = (c, len(c) - len(pr), pr)
        offset += size
    return out


def random_scores(
    seed: int, shapes: list[tuple[int, ...]], ties: bool
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)

    def one(shape: tuple[int, ...]) -> torch.Tensor:
        if ties:  # few distinct values: many ties at every threshold
            return torch.randint(-3, 4, shape, generator=g).float()
        return torch.randn(shape, generator=g)

    names = [f"model.layers.{i}.mlp.w{i}.weight" for i in range(len(shapes))]
    harm = {n: one(s) for n, s in zip(names, shapes, strict=True)}
    keep = {n: one(s).abs() for n, s in zip(names, shapes, strict=True)}
    return harm, keep


def as_lists(sel: dict) -> dict[str, tuple[list[int], int, list[int]]]:
    out = {}
    for name, s in sel.items():
        assert s.candidates.dtype == torch.long and s.pruned.dtype == torch.long
        out[name] = (s.candidates.tolist(), int(s.protected_candidates), s.pruned.tolist())
    return out


# ---------------------------------------------------------------- count_for


@pytest.mark.parametrize(
    ("fraction", "n", "k"),
    [
        (0.0, 100, 0),
        (-0.1, 100, 0),
        (1e-9, 100, 1),  # a small matrix with q > 0 still offers one candidate
        (0.01, 100, 1),
        (0.011, 100, 2),
        (0.07, 100, 7),  # 0.07 * 100 is 7.000000000000001 in floating point
        (0.29, 100, 29),  # 0.29 * 100 is 28.999999999999996
        (0.5, 3, 2),
        (0.999, 10, 10),
        (1.0, 10, 10),
        (2.0, 10, 10),
        (1e-4, 576 * 576, 34),
        (3e-2, 1536 * 576, 26543),
        (0.3, 0, 0),
    ],
)
def test_count_for(fraction: float, n: int, k: int) -> None:
    assert count_for(fraction, n) == k == bf_count(fraction, n)


# ---------------------------------------------------------------- top_k_indices


@pytest.mark.parametrize(
    ("scores", "k", "expected"),
    [
        ([3.0, 1.0, 2.0], 0, []),
        ([3.0, 1.0, 2.0], -1, []),
        ([3.0, 1.0, 2.0], 1, [0]),
        ([3.0, 1.0, 2.0], 2, [0, 2]),
        ([3.0, 1.0, 2.0], 3, [0, 1, 2]),
        ([3.0, 1.0, 2.0], 7, [0, 1, 2]),
        ([1.0, 1.0, 1.0, 1.0], 2, [0, 1]),  # ties: lower index first
        ([0.0, 5.0, 5.0, 5.0, 1.0], 2, [1, 2]),
        ([5.0, 2.0, 2.0, 9.0, 2.0], 3, [0, 1, 3]),
        ([-1.0, -2.0, -1.0], 2, [0, 2]),
        ([-0.0, 0.0, -0.0], 2, [0, 1]),  # -0.0 == 0.0: a tie
        ([float("-inf"), 1.0, float("inf")], 2, [1, 2]),
        ([], 0, []),
        ([], 3, []),
    ],
)
def test_top_k_table(scores: list[float], k: int, expected: list[int]) -> None:
    t = torch.tensor(scores, dtype=torch.float32)
    assert top_k_indices(t, k).tolist() == expected == bf_top_k(t, k)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("ties", [False, True])
def test_top_k_random(seed: int, ties: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    shape = (
        int(torch.randint(1, 9, (1,), generator=g)),
        int(torch.randint(1, 40, (1,), generator=g)),
    )
    scores = (
        torch.randint(-2, 3, shape, generator=g).float()
        if ties
        else torch.randn(shape, generator=g)
    )
    n = scores.numel()
    for k in sorted({0, 1, 2, n // 3, n // 2, n - 1, n, n + 5}):
        got = top_k_indices(scores, k)
        assert got.dtype == torch.long
        assert got.tolist() == bf_top_k(scores, k), (k, scores)


def sorted_top_k(scores: torch.Tensor, k: int) -> list[int]:
    """bf_top_k for large tensors: a stable sort by -score keeps lower indices first on ties."""
    order = torch.sort(-scores.reshape(-1), stable=True).indices[: max(k, 0)]
    return sorted(order.tolist())


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros"])
def test_top_k_large_uses_a_sampled_bound_and_stays_exact(kind: str) -> None:
    g = torch.Generator().manual_seed(7)
    n = 200_000  # above the size where a sample bounds the k-th score
    scores = {
        "normal": torch.randn(n, generator=g),
        "ties": torch.randint(-2, 3, (n,), generator=g).float(),  # the k-th value tied ~40k times
        "zeros": torch.where(torch.rand(n, generator=g) < 0.9, 0.0, torch.rand(n, generator=g)),
    }[kind]
    assert sorted_top_k(scores[:50], 9) == bf_top_k(scores[:50], 9)
    for k in (1, 20, 6_000, 30_000, 100_000, n - 1):
        got = top_k_indices(scores, k)
        assert got.tolist() == sorted_top_k(scores, k), k
        if kind == "normal" and k <= 30_000:  # the sample did its job: far fewer than n ranked
            assert indices_that_can_rank(scores, k).numel() < n // 4


def test_top_k_large_falls_back_when_the_sample_misleads() -> None:
    # Put the largest scores exactly where the (fixed-seed) sample looks: the bound it gives is
    # far too high, fewer than k scores pass it, and everything is ranked instead.
    n, k = 200_000, 5_000
    picks = torch.randint(n, (selection._SAMPLE,), generator=torch.Generator().manual_seed(0))
    scores = torch.zeros(n)
    scores[picks] = 1.0 + torch.arange(picks.numel(), dtype=torch.float32)
    assert indices_that_can_rank(scores, k).numel() == n
    assert top_k_indices(scores, k).tolist() == sorted_top_k(scores, k)


def test_top_k_2d_gives_flat_indices() -> None:
    scores = torch.tensor([[0.0, 9.0], [8.0, 1.0]])
    assert top_k_indices(scores, 2).tolist() == [1, 2]


# ---------------------------------------------------------------- set_difference


@pytest.mark.parametrize(
    ("candidates", "protected", "expected"),
    [
        ([], [], []),
        ([1, 3, 5], [], [1, 3, 5]),
        ([], [1, 2], []),
        ([1, 3, 5], [3], [1, 5]),
        ([1, 3, 5], [0, 2, 4, 6], [1, 3, 5]),
        ([1, 3, 5], [5, 3, 1], []),
        ([0, 2, 4, 6, 8], [8, 0, 9], [2, 4, 6]),
    ],
)
def test_set_difference(candidates: list[int], protected: list[int], expected: list[int]) -> None:
    c = torch.tensor(candidates, dtype=torch.long)
    pr = torch.tensor(protected, dtype=torch.long)
    assert set_difference(c, pr).tolist() == expected
    assert expected == [i for i in candidates if i not in set(protected)]


# ---------------------------------------------------------------- per matrix and global

QP = [
    (0.1, 0.0),  # p = 0: nothing protected
    (0.1, 0.1),
    (0.3, 0.05),
    (0.05, 0.5),
    (1e-6, 0.0),  # one candidate per matrix
    (0.999, 0.999),  # k = n for both: everything is a candidate and protected
    (0.5, 1e-6),
]
SHAPES = [[(4, 8), (16, 4), (3, 5)], [(1, 1), (2, 7)], [(32, 32), (64, 32), (32, 64)]]


def over_selection_grid(test: Callable[..., None]) -> Callable[..., None]:
    """Run `test(q, p, shapes, ties)` on every (q, p) of QP, matrix shapes of SHAPES, with and
    without tied scores."""
    test = pytest.mark.parametrize("ties", [False, True])(test)
    test = pytest.mark.parametrize("shapes", SHAPES)(test)
    return pytest.mark.parametrize(("q", "p"), QP)(test)


@over_selection_grid
def test_select_per_matrix_matches_brute_force(
    q: float, p: float, shapes: list[tuple[int, ...]], ties: bool
) -> None:
    harm, keep = random_scores(hash((q, p, len(shapes), ties)) % 1000, shapes, ties)
    got = select_per_matrix(harm, keep, q, p)
    assert as_lists(got) == bf_select(harm, keep, q, p)
    assert as_lists(select(harm, keep, q, p)) == as_lists(got)  # the default is per matrix
    if p == 0:
        assert all(s.protected_candidates == 0 for s in got.values())
        assert all(torch.equal(s.pruned, s.candidates) for s in got.values())


@over_selection_grid
def test_select_global_matches_brute_force(
    q: float, p: float, shapes: list[tuple[int, ...]], ties: bool
) -> None:
    harm, keep = random_scores(7 + len(shapes), shapes, ties)
    got = select_global(harm, keep, q, p)
    assert list(got) == list(harm)
    assert as_lists(got) == bf_select_global(harm, keep, q, p)
    assert as_lists(select(harm, keep, q, p, "global")) == as_lists(got)
    total = sum(h.numel() for h in harm.values())
    assert sum(s.candidates.numel() for s in got.values()) == bf_count(q, total)


def test_global_can_concentrate_on_one_matrix() -> None:
    harm = {"a": torch.tensor([10.0, 9.0, 8.0]), "b": torch.tensor([1.0, 2.0, 3.0])}
    keep = {"a": torch.tensor([0.0, 0.0, 5.0]), "b": torch.zeros(3)}
    got = select_global(harm, keep, q=0.5, p=1 / 6)  # 3 candidates, 1 protected
    assert as_lists(got) == {"a": ([0, 1, 2], 1, [0, 1]), "b": ([], 0, [])}
    per = select_per_matrix(harm, keep, q=0.5, p=1 / 6)  # 2 candidates, 1 protected per matrix
    assert as_lists(per) == {"a": ([0, 1], 0, [0, 1]), "b": ([1, 2], 0, [1, 2])}
