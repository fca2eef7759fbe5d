"""FSDP2 plumbing: the model sharded over the ranks, and each rank's shard of the gradient sums.

Each rank holds 1/world of every weight (`fully_shard` on every decoder block, then on the root).
Weights are loaded once, on rank 0, and broadcast into the shards (the other ranks build the
model on the meta device), so host memory is one full copy, not one per rank. Gradients are
reduce-scattered as a plain SUM in fp32, and a post-accumulate-grad hook on every scored sharded
parameter folds the rank's reduced shard into a local fp32 buffer, as on one device.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from harmprune.distributed.jobfile import DistributedJob, SumAbsMode
from harmprune.inputs.data import Example, collate
from harmprune.method import attribution
from torch import nn


def abs_reduce_scatter_class() -> type | None:
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


def build_sharded_model(
    job: DistributedJob, rank: int, mesh: Any, device: torch.device, abs_comm: Any | None
) -> nn.Module:
    """Meta model on every rank, sharded, then rank 0's full weights broadcast into the shards.

    Only the scored weights require grad, set BEFORE sharding: FSDP2 fixes each unsharded
    parameter's requires_grad at its first all-gather.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, job.dtype)
    full_sd: dict[str, Any] = {}
    np_buffers: dict[str, torch.Tensor] = {}
    if rank == 0:
        full = AutoModelForCausalLM.from_pretrained(job.model, dtype=dtype, use_safetensors=True)
        full_sd = full.state_dict()
        np_buffers = {n: _get_buffer(full, n).clone() for n in _non_persistent_buffers(full)}
        del full
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(job.model), dtype=dtype)
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
    return model


# ---------------------------------------------------------------- shard geometry


def _row_offset(rows: int, rank: int, world: int) -> int:
    """First global row of `rank`'s dim-0 shard (FSDP2 uses torch.chunk pieces)."""
    chunk = -(-rows // world)
    return min(rank * chunk, rows)


def local_rows(rows: int, rank: int, world: int) -> int:
    """Rows of `rank`'s dim-0 shard (the last ranks may hold fewer, or none)."""
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
        if local.numel() != local_rows(shape[0], rank, world) * row:
            raise RuntimeError(f"{name}: unexpected FSDP shard shape {tuple(local.shape)}")
        out[name] = ShardInfo(shape, _row_offset(shape[0], rank, world) * row, local.numel())
    return out


# ---------------------------------------------------------------- gradient sums on shards


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
    sum_abs_mode: SumAbsMode,
    abs_comm: Any | None,
    per_sample_bytes: int = attribution.PER_SAMPLE_BYTES,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """This rank's shard of sum_i g_i (or sum_i |g_i|), fp32, one buffer per scored matrix.
    `on_step(samples done by all ranks)` after each step.

    sum_abs, by `sum_abs_mode`: "batched": each rank back-propagates its batch and every scored
    layer hands autograd, as its weight's gradient, sum_i |g_i| over the rank's samples
    (`attribution.layer_gradients_folded`), which the SUM reduce-scatter adds across ranks;
    "abs_reduce": one sample per rank and step, `abs_comm` takes |.| before the reduce-scatter;
    "replicate": one sample per step on every rank, only rank 0's counts.
    """
    sum_abs = reduction == "sum_abs"
    batched = not sum_abs or sum_abs_mode == "batched"
    replicate = sum_abs and sum_abs_mode == "replicate"
    per_rank = batch_size if batched else 1
    buffers = {
        n: torch.zeros(p.to_local().shape, dtype=torch.float32, device=p.device)  # type: ignore[attr-defined]
        for n, p in params.items()
    }
    # |.| again is a no-op after the abs reduce-scatter and on the batched sums, and needed when
    # world == 1 (FSDP skips the collective) or in replicate mode.
    folding = attribution.gradients_folded_into(
        params,
        buffers,
        take_abs=sum_abs,
        local=lambda grad: grad.to_local(),  # type: ignore[attr-defined]
    )
    per_sample = (
        attribution.layer_gradients_folded(
            model, params, _per_sample_gradient(params, per_sample_bytes)
        )
        if sum_abs and batched
        else contextlib.nullcontext()
    )
    if abs_comm is not None:
        abs_comm.take_abs = sum_abs and sum_abs_mode == "abs_reduce"
    device = next(iter(buffers.values())).device
    try:
        with torch.enable_grad(), folding, per_sample:
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
        if abs_comm is not None:
            abs_comm.take_abs = False
    return buffers


def _per_sample_gradient(
    params: dict[str, nn.Parameter], max_bytes: int
) -> Callable[[str, bool], attribution.LayerFold]:
    """The FSDP fold: sum_i |g_i| of this rank's samples becomes the unsharded weight's gradient
    (in the weights' dtype, as autograd's own would be), for FSDP to reduce-scatter."""

    scratch = attribution.Scratch()

    def fold_for(name: str, transposed: bool) -> attribution.LayerFold:
        dtype = params[name].dtype

        def fold(x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
            sums = attribution.per_sample_abs_grad_sum(
                x, grad_y, transposed=transposed, max_bytes=max_bytes, scratch=scratch
            )
            return sums.to(dtype)

        return fold

    return fold_for
