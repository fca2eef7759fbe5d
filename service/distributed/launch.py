"""Launchers: `launch` (torch.multiprocessing.spawn, in-process callers and tests) and
`run_torchrun` (torchrun in a subprocess with progress and cancel: the pipeline's path, since
Celery's pool processes are daemonic and may not start multiprocessing children)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from harmprune.distributed.jobfile import (
    DistributedJob,
    DistributedResult,
    load_result,
    save_job,
    save_result,
)
from harmprune.distributed.rank import process_group, run_rank
from harmprune.errors import AttributionError, JobCancelled


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn_entry(rank: int, world: int, jobs: list[DistributedJob], result_dir: str) -> None:
    with process_group(jobs[0], rank, world):  # one group for all the jobs
        results = [run_rank(rank, world, job) for job in jobs]
    if rank == 0:
        for i, result in enumerate(results):
            assert result is not None  # rank 0 always returns its result
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
