"""Distributed attribution with FSDP2: the attribution of a model too large for one device.

Launch: `launch(nprocs, job)` (torch.multiprocessing.spawn, returns rank 0's result), or
`run_torchrun(job, nprocs, work_dir)`: torchrun in a subprocess, with progress and cancel (what
the pipeline uses on a multi-GPU worker: Celery's pool processes are daemonic and may not
start multiprocessing children). By hand: `python -m torch.distributed.run --nproc-per-node N
-m harmprune.distributed --job J` where J is a `DistributedJob` as JSON (`save_job`; rank 0
writes `<J>.result.safetensors`, `save_result`). No pickle file: jobs are
JSON and results are tensors in safetensors with their metadata as JSON.

Each rank holds 1/world of every weight (`fully_shard` on every decoder block, then on the root).
Weights are loaded once, on rank 0, and broadcast into the shards (the other ranks build the
model on the meta device), so host memory is one full copy, not one per rank.

Scores, per rank, on its OWN shards only: a post-accumulate-grad hook on every scored sharded
DTensor parameter folds the reduced local gradient shard (`param.grad.to_local()`) into a local
fp32 buffer and frees it, exactly as `harmprune.attribution` does on one device.

The maths, per pass (ranks work on DIFFERENT samples: data parallel, `world` x throughput):
- harm (and preserve abs_mean): sum_i g_i is linear in the per-sample gradients, so each rank
  back-propagates its own batch and FSDP's reduce-scatter sums them. FSDP2 AVERAGES by default
  (ReduceOp.AVG, or a post-division by the data-parallel size): `set_gradient_divide_factor(1.0)`
  with `set_force_sum_reduction_for_comms(True)` makes it a plain SUM with no scaling at all
  (gloo has no AVG/PREMUL_SUM; NCCL gets the same plain SUM), so no 1/world factor to undo.
- preserve sum_abs: sum_i |g_i| needs each sample's own gradient, and a reduce-scatter of
  g_a + g_b would give |g_a + g_b|. Each rank back-propagates ONE sample per step and the
  reduce-scatter input (the flat concatenation of this block's unsharded per-sample gradients)
  is replaced by its absolute value just before the collective (a custom FSDP2 reduce-scatter,
  `AbsReduceScatter`): the sum the ranks reduce is then |g_a| + |g_b|, exact, and still data
  parallel. Fallback `sum_abs_mode="replicate"`: every rank runs the SAME sample and only
  rank 0's loss counts (the others are multiplied by 0), so the reduced gradient is exactly g_i
  (memory scaling only, no speed-up); used when torch lacks the custom-comm API.
  Steps where a rank has no sample left run a dummy sample with its loss multiplied by 0
  (every rank must join every collective).
- The reduce runs in fp32 (`MixedPrecisionPolicy(reduce_dtype=float32)`); the reduced shard is
  cast back to the weights' dtype (bf16 on GPU) before the hook sees it, as on one device
  where autograd's gradient is bf16 too.

Selection, per matrix, across shards (global flat indices = local flat index + the shard's
first row x row length, FSDP2 shards dim 0 in `torch.chunk` pieces):
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

Checkpoint: the full state dict is gathered on rank 0 (`get_model_state_dict(full_state_dict,
cpu_offload)`), the pruned weights are zeroed there (their original values kept in the mask
file) and rank 0 writes `save_pretrained` + `harmprune-mask.safetensors`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from harmprune import attribution, selection
from harmprune.data import Example
from harmprune.errors import AttributionError, JobCancelled
from harmprune.pruning import MASK_FILE, PruneMask, save_mask
from torch import nn

PreserveVariant = Literal["sum_abs", "abs_mean"]
SumAbsMode = Literal["abs_reduce", "replicate"]
ProtectedMode = Literal["candidates", "full"]


# ---------------------------------------------------------------- the job


@dataclass(frozen=True)
class RandomInit:
    """A randomly initialised model from a config dict (tests, benchmarks): no download.

    `std`: redraw every matrix from N(0, std) after the model's own init (larger, deterministic
    weights). Built identically in every process from `seed`.
    """

    config: dict[str, Any]
    seed: int = 0
    std: float | None = None

    def hf_config(self) -> Any:
        from transformers import AutoConfig

        cfg = dict(self.config)
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)

    def build(self, dtype: torch.dtype = torch.float32) -> Any:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(self.seed)
        model = AutoModelForCausalLM.from_config(self.hf_config(), dtype=dtype)
        if self.std is not None:
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() >= 2:
                        p.normal_(0.0, self.std)
        return model.eval()


@dataclass
class DistributedJob:
    """Everything a rank needs: sent to spawned processes, or saved as JSON for torchrun."""

    model: str | RandomInit  # a local model directory (config.json + safetensors), or RandomInit
    harmful: list[Example]
    benign: list[Example]
    q: float
    p: float
    q_max: float | None = None  # harm candidates kept for any q <= q_max (default: q)
    preserve: PreserveVariant = "sum_abs"
    batch_size: int = 8
    pad_id: int = 0
    dtype: str = "float32"  # weights' dtype on the ranks ("bfloat16" on GPUs)
    out_dir: str | None = None  # rank 0 writes the pruned checkpoint here; None: no checkpoint
    protected: ProtectedMode = "candidates"
    sum_abs_mode: SumAbsMode = "abs_reduce"
    backend: str | None = None  # default: nccl with CUDA, else gloo
    threads: int | None = None  # torch.set_num_threads in each rank (CPU runs)
    progress_path: str | None = None  # rank 0 writes "done total" (samples) here after each step


@dataclass
class DistributedResult:
    scores: selection.RankedScores  # what the pipeline's `compute_scores` returns (per matrix)
    pruned: dict[str, torch.Tensor]  # flat indices pruned at job.q, per scored matrix
    pruned_count: int
    world_size: int
    sum_abs_mode: str
    # scores of the harm candidates, aligned with `scores.harm_ranked` (best first): S_harm and
    # S_keep of each, the same numbers the single-process score maps hold there
    harm_values: dict[str, torch.Tensor] = field(default_factory=dict)
    candidate_keep_values: dict[str, torch.Tensor] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    checkpoint: str | None = None


# ---------------------------------------------------------------- job and result files (no pickle)


def save_job(job: DistributedJob, path: Path | str) -> None:
    Path(path).write_text(json.dumps(dataclasses.asdict(job)))


def load_job(path: Path | str) -> DistributedJob:
    raw = json.loads(Path(path).read_text())
    model = raw.pop("model")
    return DistributedJob(
        model=RandomInit(**model) if isinstance(model, dict) else model,
        harmful=[Example(**e) for e in raw.pop("harmful")],
        benign=[Example(**e) for e in raw.pop("benign")],
        **raw,
    )


# DistributedResult's tensor dicts, stored as "<group>/<parameter name>" in one safetensors file
_RESULT_TENSORS = ("harm_ranked", "protected", "pruned", "harm_values", "candidate_keep_values")


def save_result(result: DistributedResult, path: Path | str) -> None:
    from safetensors.torch import save_file

    scores = result.scores
    groups = zip(
        _RESULT_TENSORS,
        (
            scores.harm_ranked,
            scores.protected,
            result.pruned,
            result.harm_values,
            result.candidate_keep_values,
        ),
        strict=True,
    )
    tensors = {
        f"{group}/{name}": t.detach().cpu().clone()  # own storage each: safetensors insists
        for group, by_name in groups
        for name, t in by_name.items()
    }
    meta = {
        "sizes": scores.sizes,
        "q_max": scores.q_max,
        "pruned_count": result.pruned_count,
        "world_size": result.world_size,
        "sum_abs_mode": result.sum_abs_mode,
        "timings_s": result.timings_s,
        "checkpoint": result.checkpoint,
    }
    save_file(tensors, str(path), metadata={"result": json.dumps(meta)})


def load_result(path: Path | str) -> DistributedResult:
    from safetensors import safe_open

    groups: dict[str, dict[str, torch.Tensor]] = {g: {} for g in _RESULT_TENSORS}
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["result"])
        for key in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
            group, name = key.split("/", 1)
            groups[group][name] = f.get_tensor(key)
    sizes = meta["sizes"]
    return DistributedResult(
        scores=selection.RankedScores(
            sizes, groups["harm_ranked"], groups["protected"], meta["q_max"]
        ),
        pruned=groups["pruned"],
        pruned_count=meta["pruned_count"],
        world_size=meta["world_size"],
        sum_abs_mode=meta["sum_abs_mode"],
        harm_values=groups["harm_values"],
        candidate_keep_values=groups["candidate_keep_values"],
        timings_s=meta["timings_s"],
        checkpoint=meta["checkpoint"],
    )


# ---------------------------------------------------------------- FSDP2 plumbing


def _abs_reduce_scatter_class() -> type | None:
    """A reduce-scatter that takes |.| of its input first (None when torch lacks the API)."""
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter
    except ImportError:
        return None
    if not hasattr(FSDPModule, "set_custom_reduce_scatter"):
        return None

    class AbsReduceScatter(DefaultReduceScatter):  # type: ignore[misc]
        """With `.take_abs`, reduce-scatter sum_r |g_r| instead of sum_r g_r."""

        take_abs = False

        def __call__(self, output_tensor: Any, input_tensor: Any, *args: Any, **kw: Any) -> Any:
            if self.take_abs:
                input_tensor.abs_()  # the flat, padded concatenation of per-sample gradients
            return super().__call__(output_tensor, input_tensor, *args, **kw)

    return AbsReduceScatter


def _fsdp_modules(model: nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def shard_model(model: nn.Module, mesh: Any, *, abs_comm: Any | None) -> None:
    """fully_shard every decoder block, then the root; plain SUM gradient reduction in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for block in attribution.decoder_layers(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for m in _fsdp_modules(model):
        # SUM, not the default average: the scores are sums over ALL samples of all ranks.
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)
        if abs_comm is not None:
            m.set_custom_reduce_scatter(abs_comm)


def _non_persistent_buffers(model: nn.Module) -> list[str]:
    names = []
    for mod_name, module in model.named_modules():
        for b in sorted(module._non_persistent_buffers_set):
            if getattr(module, b, None) is not None:
                names.append(f"{mod_name}.{b}" if mod_name else b)
    return names


def _get_buffer(model: nn.Module, name: str) -> torch.Tensor:
    mod_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(mod_name) if mod_name else model, attr)


def _hf_config(job: DistributedJob) -> Any:
    if isinstance(job.model, RandomInit):
        return job.model.hf_config()
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(job.model)


def _load_full(job: DistributedJob, dtype: torch.dtype) -> nn.Module:
    if isinstance(job.model, RandomInit):
        return job.model.build(dtype)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(job.model, dtype=dtype, use_safetensors=True).eval()


def build_sharded_model(
    job: DistributedJob, rank: int, mesh: Any, device: torch.device, abs_comm: Any | None
) -> tuple[nn.Module, Any]:
    """Meta model on every rank, sharded, then rank 0's full weights broadcast into the shards.

    Only the scored weights require grad, set BEFORE sharding: FSDP2 fixes each unsharded
    parameter's requires_grad at its first all-gather.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, job.dtype)
    config = _hf_config(job)
    full_sd: dict[str, Any] = {}
    np_buffers: dict[str, torch.Tensor] = {}
    if rank == 0:
        full = _load_full(job, dtype)
        full_sd = full.state_dict()
        np_buffers = {n: _get_buffer(full, n).clone() for n in _non_persistent_buffers(full)}
        del full
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    scored = set(attribution.scored_parameters(model))
    for name, p in model.named_parameters():
        p.requires_grad_(name in scored)
    shard_model(model, mesh, abs_comm=abs_comm)
    model.to_empty(device=device)
    set_model_state_dict(
        model, full_sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    del full_sd
    # Non-persistent buffers (e.g. rotary inv_freq) are in no state dict: broadcast them too.
    for name in _non_persistent_buffers(model):
        buf = _get_buffer(model, name)
        if rank == 0:
            buf.copy_(np_buffers[name].to(buf.device))
        dist.broadcast(buf, src=0)
    return model, config


# ---------------------------------------------------------------- attribution on shards


def _row_offset(rows: int, rank: int, world: int) -> int:
    """First global row of `rank`'s dim-0 shard (FSDP2 uses torch.chunk pieces)."""
    chunk = -(-rows // world)
    return min(rank * chunk, rows)


def _local_rows(rows: int, rank: int, world: int) -> int:
    chunk = -(-rows // world)
    return max(0, min(chunk, rows - rank * chunk))


@dataclass
class ShardInfo:
    shape: tuple[int, ...]  # the full matrix
    offset: int  # global flat index of this rank's first element
    local_numel: int


def shard_infos(params: dict[str, nn.Parameter], rank: int, world: int) -> dict[str, ShardInfo]:
    out = {}
    for name, p in params.items():
        shape = tuple(p.shape)
        row = math.prod(shape[1:])
        local = p.to_local()  # type: ignore[attr-defined]
        if local.numel() != _local_rows(shape[0], rank, world) * row:
            raise RuntimeError(f"{name}: unexpected FSDP shard shape {tuple(local.shape)}")
        out[name] = ShardInfo(shape, _row_offset(shape[0], rank, world) * row, local.numel())
    return out


def _steps(
    examples: Sequence[Example], per_rank: int, rank: int, world: int, replicate: bool
) -> Iterator[tuple[list[Example], float]]:
    """(this rank's batch, loss weight) per step. Every rank yields the same number of steps."""
    if replicate:  # same sample everywhere, only rank 0's gradient counts
        for e in examples:
            yield [e], 1.0 if rank == 0 else 0.0
        return
    span = per_rank * world
    for start in range(0, len(examples), span):
        mine = list(examples[start + rank * per_rank : start + (rank + 1) * per_rank])
        yield (mine, 1.0) if mine else ([examples[0]], 0.0)


def accumulate_sharded(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    examples: Sequence[Example],
    *,
    reduction: attribution.GradReduction,
    batch_size: int,
    pad_id: int,
    rank: int,
    world: int,
    abs_comm: Any | None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """This rank's shard of sum_i g_i (or sum_i |g_i|), fp32, one buffer per scored matrix.
    `on_step(samples done by all ranks)` after each step."""
    from harmprune.data import collate

    sum_abs = reduction == "sum_abs"
    replicate = sum_abs and abs_comm is None
    per_rank = 1 if sum_abs else batch_size
    buffers = {
        n: torch.zeros(p.to_local().shape, dtype=torch.float32, device=p.device)  # type: ignore[attr-defined]
        for n, p in params.items()
    }

    def make_hook(buffer: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def fold(param: Any) -> None:
            grad = param.grad.to_local()
            # |.| again is a no-op after the abs reduce-scatter, and needed when world == 1
            # (FSDP skips the collective) or in replicate mode.
            buffer.add_(grad.abs() if sum_abs else grad)
            param.grad = None

        return fold

    handles = [
        p.register_post_accumulate_grad_hook(make_hook(buffers[n])) for n, p in params.items()
    ]
    if abs_comm is not None:
        abs_comm.take_abs = sum_abs
    device = next(iter(buffers.values())).device
    try:
        with torch.enable_grad():
            step_size = 1 if replicate else per_rank * world
            for step, (chunk, weight) in enumerate(
                _steps(examples, per_rank, rank, world, replicate)
            ):
                batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
                loss = attribution.response_losses(model, batch).sum()
                (loss * weight if weight != 1.0 else loss).backward()
                if on_step:
                    on_step(min((step + 1) * step_size, len(examples)))
    finally:
        for h in handles:
            h.remove()
        if abs_comm is not None:
            abs_comm.take_abs = False
    return buffers


# ---------------------------------------------------------------- selection across shards


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
                min(ks[n], _local_rows(infos[n].shape[0], r, world) * math.prod(infos[n].shape[1:]))
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


# ---------------------------------------------------------------- the entry point


def _device_and_backend(job: DistributedJob, local_rank: int) -> tuple[torch.device, str]:
    backend = job.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), backend
    return torch.device("cpu"), backend


@contextlib.contextmanager
def process_group(job: DistributedJob, rank: int, world: int) -> Iterator[torch.device]:
    """Join (or reuse) the default process group; yields this rank's device."""
    if job.threads:
        torch.set_num_threads(job.threads)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device, backend = _device_and_backend(job, local_rank)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        yield device
    finally:
        if owned:
            dist.destroy_process_group()


def distributed_attribution_main(
    rank: int, world: int, job: DistributedJob, result_path: str | None = None
) -> DistributedResult | None:
    """One rank's whole job: load + shard, harm pass, preserve pass, selection, checkpoint.

    MASTER_ADDR/MASTER_PORT must be set (launch() and torchrun do). Joins the default process
    group, or uses the one already initialised. Returns the result on rank 0 (also written to
    `result_path` if given), None on the other ranks.
    """
    from torch.distributed.device_mesh import init_device_mesh

    timings: dict[str, float] = {}
    with process_group(job, rank, world) as device:
        mesh = init_device_mesh(device.type, (world,))
        abs_cls = _abs_reduce_scatter_class() if job.sum_abs_mode == "abs_reduce" else None
        abs_comm = abs_cls() if abs_cls is not None and job.preserve == "sum_abs" else None
        mode = "abs_reduce" if abs_comm is not None else "replicate"
        t0 = time.perf_counter()
        model, config = build_sharded_model(job, rank, mesh, device, abs_comm)
        timings["load"] = time.perf_counter() - t0
        params = attribution.scored_parameters(model)
        infos = shard_infos(params, rank, world)
        local_w = {n: p.to_local().detach() for n, p in params.items()}  # type: ignore[attr-defined]
        common = dict(batch_size=job.batch_size, pad_id=job.pad_id, rank=rank, world=world)
        q_max = job.q_max if job.q_max is not None else job.q
        n_of = {n: int(p.numel()) for n, p in params.items()}
        n_h, n_all = len(job.harmful), len(job.harmful) + len(job.benign)
        report = _progress_writer(job.progress_path if rank == 0 else None, n_all)

        t0 = time.perf_counter()
        grads = accumulate_sharded(
            model, params, job.harmful, reduction="sum", abs_comm=abs_comm, on_step=report, **common
        )
        harm = attribution.harm_score_map(local_w, grads)  # type: ignore[arg-type]
        k_max = {n: selection.count_for(q_max, n_of[n]) for n in params}
        ranked = gather_ranked_top(harm, infos, k_max, rank, world)
        harm_values = values_at(harm, infos, ranked)
        del harm, grads
        timings["harm"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        reduction: attribution.GradReduction = "sum_abs" if job.preserve == "sum_abs" else "sum"
        grads = accumulate_sharded(
            model,
            params,
            job.benign,
            reduction=reduction,
            abs_comm=abs_comm,
            on_step=lambda done: report(n_h + done),
            **common,
        )
        keep = attribution.preserve_score_map(
            local_w,  # type: ignore[arg-type]
            grads,
            job.preserve,
            len(job.benign),
        )
        kp = {n: selection.count_for(job.p, n_of[n]) for n in params}
        keep_values = values_at(keep, infos, ranked)
        if job.protected == "full":
            top_p = gather_ranked_top(keep, infos, kp, rank, world)
            protected = {n: torch.sort(t).values for n, t in top_p.items()}
        else:
            protected = protected_among(keep, infos, ranked, kp, keep_values)
        del keep, grads
        timings["preserve"] = time.perf_counter() - t0

        scores = selection.RankedScores(n_of, ranked, protected, q_max)
        pruned = {n: s.pruned for n, s in scores.select(job.q).items()}
        checkpoint = None
        if job.out_dir is not None:
            t0 = time.perf_counter()
            checkpoint = save_pruned_checkpoint(model, config, pruned, job, rank)
            timings["save"] = time.perf_counter() - t0
        del model, params, local_w
        dist.barrier()
    if rank != 0:
        return None
    result = DistributedResult(
        scores=scores,
        pruned=pruned,
        pruned_count=sum(t.numel() for t in pruned.values()),
        world_size=world,
        sum_abs_mode=mode if job.preserve == "sum_abs" else "n/a",
        harm_values={n: v.cpu() for n, v in harm_values.items()},
        candidate_keep_values={n: v.cpu() for n, v in keep_values.items()},
        timings_s={k: round(v, 3) for k, v in timings.items()},
        checkpoint=checkpoint,
    )
    if result_path:
        save_result(result, result_path)
    return result


def _progress_writer(path: str | None, total: int) -> Callable[[int], None]:
    """`write(done)`: "done total" into `path`, replaced atomically (the launcher polls it)."""

    def write(done: int) -> None:
        if path is not None:
            tmp = f"{path}.tmp"
            Path(tmp).write_text(f"{done} {total}")
            os.replace(tmp, path)

    return write


def save_pruned_checkpoint(
    model: nn.Module,
    config: Any,
    pruned: dict[str, torch.Tensor],
    job: DistributedJob,
    rank: int,
) -> str | None:
    """Gather the full state dict on rank 0 (CPU), zero the pruned weights, save_pretrained."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    sd = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if rank != 0:
        return None
    entries = {}
    for name, idx in pruned.items():
        if idx.numel() == 0:
            continue
        flat = torch.as_tensor(sd[name]).view(-1)
        entries[name] = (idx.clone(), flat[idx].clone())
        flat[idx] = 0
    out = Path(job.out_dir)  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, job.dtype))
    skeleton.load_state_dict(sd, assign=True, strict=False)
    skeleton.tie_weights()
    skeleton.save_pretrained(out)
    save_mask(PruneMask(entries), out / MASK_FILE, {"q": job.q, "p": job.p})
    if isinstance(job.model, str):
        with contextlib.suppress(Exception):  # no tokenizer files: the caller adds them
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(job.model).save_pretrained(out)
    return str(out)


# ---------------------------------------------------------------- launchers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn_entry(rank: int, world: int, jobs: list[DistributedJob], result_dir: str) -> None:
    with process_group(jobs[0], rank, world):  # one group for all the jobs
        results = [distributed_attribution_main(rank, world, job) for job in jobs]
    if rank == 0:
        for i, result in enumerate(results):
            save_result(result, Path(result_dir) / f"result-{i}.safetensors")


def launch(
    nprocs: int,
    jobs: DistributedJob | Sequence[DistributedJob],
    *,
    port: int | None = None,
) -> Any:
    """Run the job (or several, one after the other in one process group: the processes start
    once) on `nprocs` local processes: one per GPU, or CPU processes with gloo.

    Returns rank 0's `DistributedResult` (a list of them for a list of jobs).
    """
    import torch.multiprocessing as mp

    many = not isinstance(jobs, DistributedJob)
    job_list = [jobs] if isinstance(jobs, DistributedJob) else list(jobs)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port or free_port())
    with tempfile.TemporaryDirectory(prefix="harmprune-dist-") as tmp:
        mp.spawn(_spawn_entry, args=(nprocs, job_list, tmp), nprocs=nprocs, join=True)
        results = [load_result(Path(tmp) / f"result-{i}.safetensors") for i in range(len(job_list))]
    return results if many else results[0]


ROOT = Path(__file__).resolve().parent.parent
# Never handed to the ranks: they read a local model directory and need no credentials.
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HARMPRUNE_HF_TOKEN", "HARMPRUNE_API_KEYS")


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (a killed worker leaves no ranks)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait_s)
            return


def rank_errors(log: str) -> str:
    """The exception lines of the ranks' tracebacks (torchrun's own summary says little)."""
    found = re.findall(r"^(?:\[rank\d+\]: )?([\w.]*(?:Error|Exception)\b:? .*)$", log, re.M)
    unique = list(dict.fromkeys(line.strip() for line in found))
    return "; ".join(unique[-3:]) or "\n".join(log.strip().splitlines()[-10:])


def run_torchrun(
    job: DistributedJob,
    nprocs: int,
    work_dir: Path,
    *,
    on_progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    poll_s: float = 0.5,
) -> DistributedResult:
    """The job on `nprocs` local ranks (one per GPU; gloo CPU processes without CUDA) under
    torchrun, in a subprocess of its own process group.

    Polls every `poll_s`: forwards rank 0's progress (samples done, total) and stops the whole
    group when `should_cancel()` (raising JobCancelled) or on any exception here (e.g. a soft
    time limit). A rank that fails raises AttributionError with the tail of the ranks' log.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    job_path, result_path = work_dir / "job.json", work_dir / "result.safetensors"
    progress_path, log_path = work_dir / "progress", work_dir / "ranks.log"
    save_job(dataclasses.replace(job, progress_path=str(progress_path)), job_path)
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nprocs}",
        "-m",
        "harmprune.distributed",
        "--job",
        str(job_path),
        "--result",
        str(result_path),
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=work_dir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # one group: cancel stops the launcher and every rank
            preexec_fn=die_with_parent,
        )
    try:
        while True:
            try:
                proc.wait(timeout=poll_s)
                break
            except subprocess.TimeoutExpired:
                pass
            if should_cancel and should_cancel():
                raise JobCancelled("cancelled during distributed attribution")
            if on_progress and progress_path.is_file():
                with contextlib.suppress(ValueError, OSError):
                    done, total = map(int, progress_path.read_text().split())
                    on_progress(done, total)
    except BaseException:
        _stop_group(proc)
        raise
    if proc.returncode != 0 or not result_path.is_file():
        raise AttributionError(
            f"distributed attribution failed on {nprocs} processes (exit {proc.returncode}): "
            + rank_errors(log_path.read_text(errors="replace"))
        )
    return load_result(result_path)


def main(argv: Sequence[str] | None = None) -> None:
    """torchrun entry: `python -m torch.distributed.run --nproc-per-node N -m harmprune.distributed
    --job job.json`; rank 0 writes `job.json.result.safetensors` (or --result)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True)
    parser.add_argument("--result")
    args = parser.parse_args(argv)
    die_with_parent()  # the torchrun agent is our parent: no orphan ranks if it is killed
    job = load_job(args.job)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    distributed_attribution_main(rank, world, job, args.result or f"{args.job}.result.safetensors")


if __name__ == "__main__":
    # Run the imported module's main: under `-m` this file is `__main__`, a second copy of the
    # module whose classes are not `harmprune.distributed`'s (isinstance checks would fail).
    from harmprune.distributed import main as _main

    _main()
