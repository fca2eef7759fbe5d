"""Report types import without torch (a reader of report.json needs no ML stack)."""

from __future__ import annotations

import subprocess
import sys


def test_report_and_card_import_without_torch() -> None:
    code = (
        "import sys, harmprune.output.report, harmprune.results, harmprune.measure.stats, harmprune.output.card; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
