"""One rank's whole job: join the process group, load + shard, harm pass, preserve pass, select."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from harmprune.distributed.fsdp import (
    abs_reduce_scatter_class,
    accumulate_sharded,
    build_sharded_model,
    shard_infos,
)
from harmprune.distributed.jobfile import (
    DistributedJob,
    DistributedResult,
    SumAbsMode,
    save_result,
)
from harmprune.distributed.select import gather_ranked_top, protected_among, values_at
from harmprune.method import attribution, selection


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


def resolve_sum_abs_mode(job: DistributedJob) -> tuple[SumAbsMode, Any | None]:
    """The job's sum_abs mode as this torch can run it, and the reduce-scatter it needs:
    "abs_reduce" falls back to "replicate" when torch lacks FSDP2's custom reduce-scatter."""
    if job.sum_abs_mode != "abs_reduce" or job.preserve != "sum_abs":
        return job.sum_abs_mode, None
    abs_comm_class = abs_reduce_scatter_class()
    if abs_comm_class is None:
        return "replicate", None
    return "abs_reduce", abs_comm_class()


def run_rank(
    rank: int, world: int, job: DistributedJob, result_path: str | None = None
) -> DistributedResult | None:
    """One rank's whole job: load + shard, harm pass, preserve pass, selection.

    MASTER_ADDR/MASTER_PORT must be set (launch() and torchrun do). Joins the default process
    group, or uses the one already initialised. Returns the result on rank 0 (also written to
    `result_path` if given), None on the other ranks.
    """
    from torch.distributed.device_mesh import init_device_mesh

    timings: dict[str, float] = {}
    with process_group(job, rank, world) as device:
        mesh = init_device_mesh(device.type, (world,))
        mode, abs_comm = resolve_sum_abs_mode(job)
        t0 = time.perf_counter()
        model = build_sharded_model(job, rank, mesh, device, abs_comm)
        timings["load"] = time.perf_counter() - t0
        params = attribution.scored_parameters(model)
        infos = shard_infos(params, rank, world)
        local_w = {n: p.to_local().detach() for n, p in params.items()}  # type: ignore[attr-defined]
        common: dict[str, Any] = dict(
            batch_size=job.batch_size,
            pad_id=job.pad_id,
            rank=rank,
            world=world,
            sum_abs_mode=mode,
            abs_comm=abs_comm,
            per_sample_bytes=job.per_sample_bytes,
        )
        q_max = job.q_max if job.q_max is not None else job.q
        n_of = {n: int(p.numel()) for n, p in params.items()}
        n_h, n_all = len(job.harmful), len(job.harmful) + len(job.benign)
        report = _progress_writer(job.progress_path if rank == 0 else None, n_all)

        t0 = time.perf_counter()
        grads = accumulate_sharded(
            model, params, job.harmful, reduction="sum", on_step=report, **common
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
