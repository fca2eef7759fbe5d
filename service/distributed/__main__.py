"""torchrun entry: `python -m torch.distributed.run --nproc-per-node N -m harmprune.distributed
--job job.json`; rank 0 writes `job.json.result.safetensors` (or --result)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from harmprune.distributed.jobfile import load_job
from harmprune.distributed.launch import die_with_parent
from harmprune.distributed.rank import run_rank


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One rank of a distributed attribution job.")
    parser.add_argument("--job", required=True, help="the DistributedJob as JSON (save_job)")
    parser.add_argument("--result", help="where rank 0 writes the result (safetensors)")
    args = parser.parse_args(argv)
    die_with_parent()  # the torchrun agent is our parent: no orphan ranks if it is killed
    job = load_job(args.job)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    run_rank(rank, world, job, args.result or f"{args.job}.result.safetensors")


if __name__ == "__main__":
    main()
