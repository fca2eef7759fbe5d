"""`harmprune harden`'s terminal output is harmprune's own: one progress bar per stage and
`harmprune: ...` lines, with no bar, log line or warning from lm-eval, transformers, datasets or
the Hub client in between (issue 23). The library logs of a worker stay JSON lines."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml
from harmprune.cli.main import library_output_as_lines

from tests.conftest import TINY_DOMAIN
from tests.support.smollm2 import run_cli

# A StageBars line: "<stage>: NN%|<bar>| done/total [<times>, <rate> step/s]" (unit "step";
# third-party bars count "it" or "examples").
STAGE_BAR = re.compile(r"^[a-z_]+ *: +\d+%\|[^|]*\| *\d+/\d+ \[[^\]]*step[^\]]*\] *$")
# lm-eval runs `git describe` for its results' metadata with stderr left open and no switch to
# skip it: outside a git checkout git says so. Allowed, nothing else.
LM_EVAL_GIT_LINE = "fatal: not a git repository"


def test_harden_prints_only_its_stage_bars_and_lines(tmp_path: Path, tiny_model_dir: Any) -> None:
    spec = copy.deepcopy(TINY_DOMAIN)
    # lm-eval (its task builder, HFLM and evaluator) and datasets run three times in the job
    spec["eval"]["benchmarks"] = {"tasks": ["harmprune_everyday_mc"], "limit": 2, "batch_size": 2}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "hardened"
    model = tiny_model_dir("llama")
    argv = ["harden", "--model", str(model), "--domain", str(spec_path), "--out", str(out)]
    run = run_cli(
        [*argv, "--device", "cpu", "--batch-size", "2"],
        env={"HARMPRUNE_CACHE_DIR": str(tmp_path / "cache")},
        timeout=300,
    )
    assert run.returncode == 0, run.explain()
    report = json.loads((out / "report.json").read_text())
    assert report["benchmarks"]["original"], "lm-eval did not run: the test would prove nothing"

    for needle in ("Running loglikelihood requests", "Tokenizing inputs", "it/s]", "\x1b["):
        assert needle not in run.stderr, run.explain()
    lines = [line.strip() for line in run.stderr.splitlines() if line.strip()]
    foreign = [
        line
        for line in lines
        if not STAGE_BAR.match(line)
        and not line.startswith("harmprune: ")
        and not line.startswith(LM_EVAL_GIT_LINE)
    ]
    assert not foreign, "\n".join(foreign)
    stages = {line.split(":")[0].strip() for line in lines if STAGE_BAR.match(line)}
    assert {"load", "evaluate", "verify", "save"} <= stages, stages
    assert "-> accepted" in run.stdout


def test_library_warnings_in_a_worker_are_json_lines() -> None:
    """What a worker's job process does at start (workers/app.py: JSON logging from Celery's
    setup, then route_library_logs): transformers' and the Hub client's warnings, which go to
    handlers of their own by default, come out as JSON lines like every other record."""
    code = (
        "import logging\n"
        "from harmprune.jobs.logs import configure_json_logging, route_library_logs\n"
        "configure_json_logging()\n"
        "route_library_logs()\n"
        "from transformers.utils import logging as hf_logging\n"
        "from huggingface_hub.utils import logging as hub_logging\n"
        "hf_logging.get_logger('transformers.modeling_utils').warning('from transformers')\n"
        "hub_logging.get_logger('huggingface_hub.file_download').warning('from the hub')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    lines = proc.stderr.splitlines()
    records = [json.loads(line) for line in lines]  # every line is JSON
    assert [(r["logger"], r["message"]) for r in records] == [
        ("transformers.modeling_utils", "from transformers"),
        ("huggingface_hub.file_download", "from the hub"),
    ]


def test_warnings_during_a_job_still_show_one_line_each(capsys: pytest.CaptureFixture[str]) -> None:
    """Quiet is not silent: a library's warning and a Python warning reach the user, each as one
    `harmprune: warning [...]` line."""
    from transformers.utils import logging as hf_logging

    with library_output_as_lines():
        hf_logging.get_logger("transformers.generation").warning("first line\nsecond line")
        warnings.warn("a deprecated option", FutureWarning, stacklevel=1)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0] == "harmprune: warning [transformers.generation]: first line second line"
    assert lines[1].startswith("harmprune: warning [py.warnings]: ")
    assert lines[1].endswith("FutureWarning: a deprecated option")
