"""Per-matrix selection across shards, exact: each rank holds its rows of every score map.

Global flat indices = local flat index + the shard's first row x row length (FSDP2 shards dim 0
in `torch.chunk` pieces, `fsdp.ShardInfo`).
- candidates: each rank's local top-k_max (values + global indices) are all-gathered and merged
  under the total order (-score, index) of `selection.ranked_top`; the global top-k is contained
  in the union of the per-shard top-k's, so the merge is exact. Cost: world x k_max per matrix.
- protected, `protected="candidates"` (default): only protected ∩ candidates ever matters
  (pruned = candidates - protected), so for each candidate e every rank counts the weights of its
  shard that rank before e, the counts are all-reduced, and e is protected iff its rank < k_p.
  Exact; cost k_max numbers per matrix on the wire and one sort of the local shard, for any p.
  `RankedScores.protected` then holds protected ∩ candidates(q_max), which selects exactly the
  same weights for every q <= q_max.
- protected, `protected="full"`: the whole top-k_p set, gathered like the candidates (identical
  to the single-process `RankedScores`). Cost: world x k_p (value, index) pairs per matrix; with
  p = 3% of an 8B model that is ~0.2 G pairs x 12 bytes x world: fine for tests, not at scale.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from harmprune.distributed.fsdp import ShardInfo, local_rows
from harmprune.method import selection


def _all_gather_var(t: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """all_gather of 1-D tensors whose per-rank lengths `counts` every rank knows."""
    width = max(max(counts), 1)
    padded = torch.zeros(width, dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    out = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(out, padded)
    return [o[:c] for o, c in zip(out, counts, strict=True)]


def gather_ranked_top(
    local: dict[str, torch.Tensor],
    infos: dict[str, ShardInfo],
    ks: dict[str, int],
    rank: int,
    world: int,
) -> dict[str, torch.Tensor]:
    """Per matrix, global flat indices of the k best scores, best first (ties: lower index):
    `selection.ranked_top` of the full map, from the per-shard top-k's (one all_gather)."""
    names = list(local)
    vals, idxs, per_rank = [], [], []
    for n in names:
        flat = local[n].reshape(-1)
        top = selection.top_k_indices(flat, min(ks[n], flat.numel()))
        vals.append(flat[top])
        idxs.append(top + infos[n].offset)
    for r in range(world):  # every rank's local counts, from the shard arithmetic
        per_rank.append(
            [
                min(ks[n], local_rows(infos[n].shape[0], r, world) * math.prod(infos[n].shape[1:]))
                for n in names
            ]
        )
    totals = [sum(c) for c in per_rank]
    device = next(iter(local.values())).device
    cat_v = torch.cat(vals) if vals else torch.zeros(0, device=device)
    cat_i = torch.cat(idxs) if idxs else torch.zeros(0, dtype=torch.long, device=device)
    all_v = _all_gather_var(cat_v.float(), totals)
    all_i = _all_gather_var(cat_i.long(), totals)
    out = {}
    split_v = [v.split(c) for v, c in zip(all_v, per_rank, strict=True)]
    split_i = [i.split(c) for i, c in zip(all_i, per_rank, strict=True)]
    for j, n in enumerate(names):
        v = torch.cat([split_v[r][j] for r in range(world)])
        i = torch.cat([split_i[r][j] for r in range(world)])
        by_index = torch.sort(i).indices
        v, i = v[by_index], i[by_index]
        order = torch.sort(v, descending=True, stable=True).indices
        out[n] = i[order][: ks[n]].cpu()
    return out


def values_at(
    local: dict[str, torch.Tensor], infos: dict[str, ShardInfo], at: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per matrix, the full map's scores at global flat indices `at` (same on every rank): each
    value comes from the rank that holds it, the others add 0.0 (exact), one all_reduce."""
    names = list(local)
    device = next(iter(local.values())).device
    values = []
    for n in names:
        c = at[n].to(device)
        local_idx = c - infos[n].offset
        mine = (local_idx >= 0) & (local_idx < infos[n].local_numel)
        v = torch.zeros(c.numel(), dtype=torch.float32, device=device)
        v[mine] = local[n].reshape(-1)[local_idx[mine]].float()
        values.append(v)
    flat_v = torch.cat(values) if values else torch.zeros(0, device=device)
    dist.all_reduce(flat_v)
    split = flat_v.split([at[n].numel() for n in names])
    return {n: v for n, v in zip(names, split, strict=True)}


def protected_among(
    keep: dict[str, torch.Tensor],
    infos: dict[str, ShardInfo],
    candidates: dict[str, torch.Tensor],
    kp: dict[str, int],
    keep_values: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Per matrix, the candidates (global flat indices) inside the top-k_p of the full preserve
    map, sorted: each rank counts, per candidate, the weights of its shard ranking before it
    under (-score, index); the counts are all-reduced. `keep_values`: the candidates' preserve
    scores if already known (`values_at`).
    """
    names = list(keep)
    device = next(iter(keep.values())).device
    cand_v = keep_values if keep_values is not None else values_at(keep, infos, candidates)
    # 2. how many of this shard's weights rank strictly before each candidate
    counts = []
    for n in names:
        v = cand_v[n].to(device)
        c = candidates[n].to(device)
        flat = keep[n].reshape(-1).float()
        if flat.numel() == 0 or c.numel() == 0:
            counts.append(torch.zeros(c.numel(), dtype=torch.long, device=device))
            continue
        ordered = torch.sort(flat).values
        right = torch.searchsorted(ordered, v, right=True)
        left = torch.searchsorted(ordered, v, right=False)
        count = flat.numel() - right
        for j in torch.nonzero(right > left).flatten().tolist():  # ties: lower index first
            lower = torch.arange(flat.numel(), device=device) + infos[n].offset < c[j]
            count[j] += int(((flat == v[j]) & lower).sum())
        counts.append(count)
        del ordered
    flat_c = torch.cat(counts) if counts else torch.zeros(0, dtype=torch.long, device=device)
    dist.all_reduce(flat_c)
    out = {}
    for n, cnt in zip(names, flat_c.split([candidates[n].numel() for n in names]), strict=True):
        out[n] = torch.sort(candidates[n][(cnt < kp[n]).cpu()]).values
    return out
