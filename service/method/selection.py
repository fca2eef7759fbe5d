"""Stage 4, selection: which weights to prune. Pure tensor functions, no model, no I/O.

candidates = top-q fraction by harm score; protected = top-p fraction by preserve score;
pruned = candidates minus protected. Per matrix (default) or over all scored weights at once.

Counts: k = ceil(fraction * n), so a small matrix with q > 0 still offers one candidate.
Ties at the k-th score are broken by the lower flat index, so a selection is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import torch

Selection = Literal["per_matrix", "global"]


def count_for(fraction: float, n: int) -> int:
    # FIX(tests): ceil of the exact decimal product. In binary floating point 0.07 * 100 is
    # 7.000000000000001, and ceil() of it took 8 weights where q*n is exactly 7.
    return 0 if fraction <= 0 else min(n, math.ceil(Fraction(str(fraction)) * n))


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted flat indices of the k largest scores; ties broken by the lower index."""
    flat = scores.reshape(-1)
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=flat.device)
    if k >= flat.numel():
        return torch.arange(flat.numel(), device=flat.device)
    idx = indices_that_can_rank(flat, k)
    values = flat[idx]
    threshold = torch.topk(values, k, sorted=False).values.min()
    above = values > threshold
    at = values == threshold
    at &= torch.cumsum(at, 0) <= k - int(above.sum())  # the lowest indices among the ties
    return idx[above | at]


# Ranking a whole matrix to find its top k costs a full top-k per matrix (most of selection's
# time on SmolLM2). A random sample bounds the k-th largest score from below; one compare pass
# keeps the scores at or above the bound (k and a margin), and the exact top-k runs on those.
_SAMPLE = 16_384


def indices_that_can_rank(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of a subset of `flat` that holds its k largest values (and every tie with
    the k-th): exact, whatever the sample; when the bound lets fewer than k through, all."""
    n = flat.numel()

    def everything() -> torch.Tensor:  # made only when needed: 8 bytes per score
        return torch.arange(n, device=flat.device)

    if n <= 4 * _SAMPLE:
        return everything()
    picks = torch.randint(n, (_SAMPLE,), generator=_generator(), device="cpu").to(flat.device)
    sample = flat[picks]
    expected = k * _SAMPLE / n  # sample values at or above the true k-th largest, on average
    j = int(expected + 6 * math.sqrt(expected) + 32)
    if j >= _SAMPLE:
        return everything()
    bound = torch.topk(sample, j, sorted=False).values.min()
    idx = torch.nonzero(flat >= bound).flatten()
    return idx if idx.numel() >= k else everything()


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)  # any sample gives the same, exact, result


def set_difference(candidates: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """Sorted indices in `candidates` and not in `protected`."""
    if protected.numel() == 0:
        return candidates
    return candidates[~torch.isin(candidates, protected)]


@dataclass(frozen=True)
class MatrixSelection:
    candidates: torch.Tensor  # flat indices, sorted
    protected_candidates: int  # candidates saved by the preserve score
    pruned: torch.Tensor  # flat indices, sorted


def select_per_matrix(
    harm: dict[str, torch.Tensor], keep: dict[str, torch.Tensor], q: float, p: float
) -> dict[str, MatrixSelection]:
    out = {}
    for name, h in harm.items():
        n = h.numel()
        candidates = top_k_indices(h, count_for(q, n))
        protected = top_k_indices(keep[name], count_for(p, n))
        pruned = set_difference(candidates, protected)
        out[name] = MatrixSelection(candidates, candidates.numel() - pruned.numel(), pruned)
    return out


def select_global(
    harm: dict[str, torch.Tensor], keep: dict[str, torch.Tensor], q: float, p: float
) -> dict[str, MatrixSelection]:
    """One ranking over all scored weights. Needs every score in memory at once."""
    names = list(harm)
    sizes = [harm[n].numel() for n in names]
    total = sum(sizes)
    all_harm = torch.cat([harm[n].reshape(-1) for n in names])
    candidates = top_k_indices(all_harm, count_for(q, total))
    del all_harm
    all_keep = torch.cat([keep[n].reshape(-1) for n in names])
    protected = top_k_indices(all_keep, count_for(p, total))
    del all_keep
    pruned = set_difference(candidates, protected)
    out = {}
    offset = 0
    for name, size in zip(names, sizes, strict=True):
        lo, hi = offset, offset + size

        def part(idx: torch.Tensor, lo: int = lo, hi: int = hi) -> torch.Tensor:
            return idx[(idx >= lo) & (idx < hi)] - lo

        c, pr = part(candidates), part(pruned)
        out[name] = MatrixSelection(c, c.numel() - pr.numel(), pr)
        offset = hi
    return out


def select(
    harm: dict[str, torch.Tensor],
    keep: dict[str, torch.Tensor],
    q: float,
    p: float,
    selection: Selection = "per_matrix",
) -> dict[str, MatrixSelection]:
    if selection == "global":
        return select_global(harm, keep, q, p)
    return select_per_matrix(harm, keep, q, p)


# ---------------------------------------------------------------- the memory-lean path
#
# Per-matrix selection never needs a whole score map once it is computed: the harm map is
# reduced to each matrix's best k_max = ceil(q_max * n) weights in rank order (any q <= q_max
# takes a prefix of that ranking, since ranks follow the total order (-score, index)), and the
# preserve map to its top-p indices. So only one fp32 score-sized buffer is ever alive.


def ranked_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the k best scores, best first (ties: lower index first)."""
    idx = top_k_indices(scores, k)
    order = torch.sort(scores.reshape(-1)[idx], descending=True, stable=True).indices
    return idx[order]


@dataclass
class RankedScores:
    """Per-matrix selection state after attribution, without any full score map."""

    sizes: dict[str, int]
    harm_ranked: dict[str, torch.Tensor]  # top-k_max harm indices per matrix, best first
    protected: dict[str, torch.Tensor]  # top-p preserve indices per matrix, sorted
    q_max: float

    def select(self, q: float) -> dict[str, MatrixSelection]:
        if q > self.q_max:
            raise ValueError(f"q={q} exceeds the q_max={self.q_max} the scores were reduced for")
        out = {}
        for name, n in self.sizes.items():
            candidates = torch.sort(self.harm_ranked[name][: count_for(q, n)]).values
            pruned = set_difference(candidates, self.protected[name])
            out[name] = MatrixSelection(candidates, candidates.numel() - pruned.numel(), pruned)
        return out


@dataclass
class FullScores:
    """Both full score maps: what global selection needs (one ranking over every weight)."""

    harm: dict[str, torch.Tensor]
    keep: dict[str, torch.Tensor]
    p: float
    mode: Selection

    def select(self, q: float) -> dict[str, MatrixSelection]:
        return select(self.harm, self.keep, q, self.p, self.mode)
