"""Distributed attribution with FSDP2: the attribution of a model too large for one device.

Launch: `launch(nprocs, job)` (torch.multiprocessing.spawn, returns rank 0's result), or
`run_torchrun(job, nprocs, work_dir)`: torchrun in a subprocess, with progress and cancel (what
the pipeline uses on a multi-GPU worker). By hand: `python -m torch.distributed.run
--nproc-per-node N -m harmprune.distributed --job J` where J is a `DistributedJob` as JSON
(`save_job`; rank 0 writes `<J>.result.safetensors`, `save_result`).

The modules, in the order a job meets them:
- `jobfile`: the job (a local model directory, the tokenized sets, q/p) and the result, and
  their files (JSON and safetensors, no pickle);
- `launch`: the launchers; `__main__`: torchrun's entry; `rank`: one rank's whole job;
- `fsdp`: the sharded model and each rank's shard of the gradient sums;
- `select`: per-matrix selection across shards, exact.

The maths, per pass (ranks work on DIFFERENT samples: data parallel, `world` x throughput). Each
rank keeps scores for its OWN shards only: a post-accumulate-grad hook on every scored sharded
DTensor parameter folds the reduced local gradient shard into a local fp32 buffer and frees it,
as `harmprune.method.attribution` does on one device.
- harm (and preserve abs_mean): sum_i g_i is linear in the per-sample gradients, so each rank
  back-propagates its own batch and FSDP's reduce-scatter sums them. FSDP2 AVERAGES by default
  (ReduceOp.AVG, or a post-division by the data-parallel size): `set_gradient_divide_factor(1.0)`
  with `set_force_sum_reduction_for_comms(True)` makes it a plain SUM with no scaling at all
  (gloo has no AVG/PREMUL_SUM; NCCL gets the same plain SUM), so no 1/world factor to undo.
- preserve sum_abs: sum_i |g_i| needs each sample's own gradient, and a reduce-scatter of
  g_a + g_b would give |g_a + g_b|. Modes (`DistributedJob.sum_abs_mode`):
  "batched" (default): each rank back-propagates its own batch; every scored layer forms the
  per-sample gradients of the rank's samples from its inputs and output gradients
  (`attribution.layer_gradients_folded`) and hands autograd sum_i |g_i| as the weight's
  gradient, so the plain SUM reduce-scatter adds non-negative per-rank sums: exact.
  "abs_reduce": each rank back-propagates ONE sample per step and the reduce-scatter input (the
  flat concatenation of this block's unsharded per-sample gradients) is replaced by its
  absolute value just before the collective (a custom FSDP2 reduce-scatter, `AbsReduceScatter`).
  "replicate": every rank runs the SAME sample and only rank 0's loss counts (the others are
  multiplied by 0), so the reduced gradient is exactly g_i (memory scaling only, no speed-up);
  "abs_reduce" falls back to it when torch lacks the custom-comm API.
  Steps where a rank has no sample left run a dummy sample with its loss multiplied by 0
  (every rank must join every collective).
- The reduce runs in fp32 (`MixedPrecisionPolicy(reduce_dtype=float32)`); the reduced shard is
  cast back to the weights' dtype (bf16 on GPU) before the hook sees it, as on one device
  where autograd's gradient is bf16 too.
"""

from harmprune.distributed.jobfile import (
    DistributedJob,
    DistributedResult,
    PreserveVariant,
    ProtectedMode,
    SumAbsMode,
    load_job,
    load_result,
    save_job,
    save_result,
)
from harmprune.distributed.launch import launch, run_torchrun
from harmprune.distributed.rank import run_rank

__all__ = [
    "DistributedJob",
    "DistributedResult",
    "PreserveVariant",
    "ProtectedMode",
    "SumAbsMode",
    "launch",
    "load_job",
    "load_result",
    "run_rank",
    "run_torchrun",
    "save_job",
    "save_result",
]
