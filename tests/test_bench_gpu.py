"""Smoke test of bench/gpu_attribution.py --tiny on CPU: it runs and reports sane numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_attribution_bench_tiny_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_attribution.py"), "--tiny"]
    cmd += ["--threads", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "goal 120 s" in proc.stdout

    report = json.loads(out.read_text())
    assert report["device"] == "cpu"
    assert report["model"]["parameters"] > report["model"]["scored_weights"] > 0
    cal = report["calibration"]
    assert cal["preserve"] == "sum_abs" and cal["benign_batch"] == cal["batch"] == 8
    assert cal["benign_batch_ours_batch1"] == 1
    assert cal["harmful_tokens"] == cal["harmful"] * cal["tokens_per_pair"]
    assert set(report["runs"]) == {"ours", "ours_batch1", "bare"}
    for run in report["runs"].values():
        assert run["wall_s"] > 0 and run["harm_s"] > 0 and run["preserve_s"] > 0
        assert run["tokens"] == cal["harmful_tokens"] + cal["benign_tokens"]
        assert run["tokens_per_s"] > 0 and run["tflops"] > 0
        assert run["peak_gpu_gib"] is None and run["mfu"] is None  # CPU: no GPU, no peak
    ours, batch1 = report["runs"]["ours"], report["runs"]["ours_batch1"]
    assert ours["pruned"] > 0 and report["selection"]["pruned"] == ours["pruned"]
    assert ours["candidates"] >= ours["pruned"]
    # the batched sum_abs pass selects what the batch-1 pass selects
    assert (batch1["pruned"], batch1["candidates"]) == (ours["pruned"], ours["candidates"])
    assert batch1["protected_candidates"] == ours["protected_candidates"]
    assert report["time_vs_bare"] > 0
    goal = report["goal"]
    assert goal["seconds"] == 120 and isinstance(goal["met"], bool)
    assert goal["batch1_vs_batched"] > 0 and isinstance(goal["batch1_met"], bool)
    assert "ours_batch1 / ours" in proc.stdout


def test_gpu_attribution_bench_recomputed_selects_the_same(tmp_path: Path) -> None:
    """--gradient-checkpointing: ours recomputes the blocks and prunes the same number."""
    runs = {}
    for name, extra in (("plain", []), ("recomputed", ["--gradient-checkpointing"])):
        out = tmp_path / f"{name}.json"
        cmd = [sys.executable, str(ROOT / "bench" / "gpu_attribution.py"), "--tiny"]
        cmd += ["--threads", "1", "--skip-bare", "--skip-batch1", "--json", str(out), *extra]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[name] = json.loads(out.read_text())
    assert runs["recomputed"]["calibration"]["gradient_checkpointing"] is True
    assert runs["plain"]["calibration"]["gradient_checkpointing"] is False
    assert runs["recomputed"]["selection"] == runs["plain"]["selection"]
