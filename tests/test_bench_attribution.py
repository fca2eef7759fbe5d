"""Smoke test of bench/attribution.py on a tiny random llama: it runs, and the one-pass hooks
(batch-1 and batched sum_abs) select the same weights as the layer-by-layer reference strategy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_attribution_tiny_agrees_with_reference(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "bench" / "attribution.py"), "--tiny"]
    # One thread: a correctness smoke test, fast even on a busy 2-core machine.
    cmd += ["--pairs", "4", "--tokens", "32", "--threads", "1", "--no-flops"]
    cmd += ["--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "mask agreement" in proc.stdout

    report = json.loads(out.read_text())
    assert set(report["strategies"]) == {"a", "b", "c", "d", "e"}
    a, b, d = (report["strategies"][k] for k in "abd")
    assert a["pruned"] > 0, "nothing pruned: the agreement below would be vacuous"
    assert a["pruned"] == b["pruned"] == d["pruned"]
    summary = report["summary"]
    assert summary["mask_agreement"] >= 0.999
    assert summary["candidate_agreement"] >= 0.999
    # the batched sum_abs path selects exactly what batch 1 and the reference select
    assert summary["batched_mask_agreement"] == 1.0
    assert summary["batched_candidate_agreement"] == 1.0
    assert summary["batched_vs_batch1_agreement"] == 1.0
    assert report["config"]["preserve_batch"]["d"] == 8
    for key in ("batched_speedup_vs_reference", "batched_time_vs_bare", "batched_vs_bare_b8"):
        assert summary[key] > 0, key
    assert "ours, sum_abs batched" in proc.stdout
    for r in report["strategies"].values():
        assert r["wall_s"] > 0 and r["peak_rss_mib"] > 0
