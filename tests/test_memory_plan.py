"""The memory-lean selection path (scores reduced as soon as computed) selects exactly what the
plain path (both full score maps held) selects, for every q up to the reduction's q_max."""

import pytest
import torch
from harmprune.method import selection


def _maps(seed: int, ties: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (64, 48), "b.weight": (7, 5), "c.weight": (128, 32)}
    harm, keep = {}, {}
    for name, shape in shapes.items():
        h = torch.randn(shape, generator=gen)
        k = torch.rand(shape, generator=gen)
        if ties:  # coarse values: many exact ties at every threshold
            h, k = (h * 2).round(), (k * 4).round()
        harm[name], keep[name] = h, k
    return harm, keep


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.01, 0.2])
def test_ranked_scores_select_like_full_maps(ties: bool, p: float) -> None:
    harm, keep = _maps(seed=3, ties=ties)
    q_values = [0.001, 0.01, 0.05, 0.2]
    q_max = max(q_values)
    ranked = selection.RankedScores(
        sizes={n: t.numel() for n, t in harm.items()},
        harm_ranked={
            n: selection.ranked_top(t, selection.count_for(q_max, t.numel()))
            for n, t in harm.items()
        },
        protected={
            n: selection.top_k_indices(t, selection.count_for(p, t.numel()))
            for n, t in keep.items()
        },
        q_max=q_max,
    )
    for q in q_values:
        lean = ranked.select(q)
        plain = selection.select_per_matrix(harm, keep, q, p)
        for name in harm:
            assert torch.equal(lean[name].pruned, plain[name].pruned), (q, name)
            assert torch.equal(lean[name].candidates, plain[name].candidates), (q, name)
            assert lean[name].protected_candidates == plain[name].protected_candidates


def test_ranked_scores_refuse_q_above_reduction() -> None:
    harm, _ = _maps(seed=1, ties=False)
    ranked = selection.RankedScores(
        {n: t.numel() for n, t in harm.items()},
        {n: selection.ranked_top(t, 5) for n, t in harm.items()},
        {n: torch.empty(0, dtype=torch.long) for n in harm},
        q_max=0.01,
    )
    with pytest.raises(ValueError, match="q_max"):
        ranked.select(0.02)


def test_ranked_top_orders_best_first_with_lower_index_on_ties() -> None:
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    assert selection.ranked_top(scores, 4).tolist() == [1, 2, 4, 3]
