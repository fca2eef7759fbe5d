"""The job a rank runs and the result rank 0 returns, and their files: the job as JSON, the
result as safetensors with its metadata as JSON (no pickle: torchrun's ranks read and write them).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from harmprune.inputs.data import Example
from harmprune.method import attribution, selection

PreserveVariant = Literal["sum_abs", "abs_mean"]
# How the ranks get sum_i |g_i| (see the package's docstring): "batched" per-sample products of
# each rank's batch; "abs_reduce" one sample per rank and step, |.| before the reduce-scatter;
# "replicate" every rank the same sample (memory scaling only).
SumAbsMode = Literal["batched", "abs_reduce", "replicate"]
ProtectedMode = Literal["candidates", "full"]


@dataclass
class DistributedJob:
    """Everything a rank needs: sent to spawned processes, or saved as JSON for torchrun."""

    model: str  # a local model directory (config.json + safetensors)
    harmful: list[Example]
    benign: list[Example]
    q: float
    p: float
    q_max: float | None = None  # harm candidates kept for any q <= q_max (default: q)
    preserve: PreserveVariant = "sum_abs"
    batch_size: int = 8
    pad_id: int = 0
    dtype: str = "float32"  # weights' dtype on the ranks ("bfloat16" on GPUs)
    protected: ProtectedMode = "candidates"
    sum_abs_mode: SumAbsMode = "batched"
    per_sample_bytes: int = attribution.PER_SAMPLE_BYTES  # "batched": products formed at once
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


def save_job(job: DistributedJob, path: Path | str) -> None:
    Path(path).write_text(json.dumps(dataclasses.asdict(job)))


def load_job(path: Path | str) -> DistributedJob:
    raw = json.loads(Path(path).read_text())
    return DistributedJob(
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
    )
