"""Smoke test of bench/attribution.py on a tiny random llama: it runs, and the one-pass hooks
select the same weights as the layer-by-layer reference strategy."""

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
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "mask agreement" in proc.stdout

    report = json.loads(out.read_text())
    assert set(report["strategies"]) == {"a", "b", "c"}
    a, b = report["strategies"]["a"], report["strategies"]["b"]
    assert a["pruned"] > 0, "nothing pruned: the agreement below would be vacuous"
    assert a["pruned"] == b["pruned"]
    assert report["summary"]["mask_agreement"] >= 0.999
    assert report["summary"]["candidate_agreement"] >= 0.999
    for r in report["strategies"].values():
        assert r["wall_s"] > 0 and r["peak_rss_mib"] > 0
