"""The distribution is one import package, `harmprune`, with the example domains inside it, and
the layers import one way (the API process never imports torch; the engine never imports the
service libraries)."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "service"


def test_the_wheel_installs_one_package_with_the_example_domains(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("harmprune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"harmprune", wheel.name.split("-py3")[0] + ".dist-info"}, top
    for expected in (
        "harmprune/examples/domains/cyber.yaml",
        "harmprune/api/main.py",
        "harmprune/workers/tasks.py",
        "harmprune/jobs/store.py",
        "harmprune/cli/main.py",
        "harmprune/pipeline.py",
        "harmprune/py.typed",
        "harmprune/inputs/general_benign.py",
        "harmprune/examples/general_benign.yaml",
        "harmprune/inputs/standard_harm.py",
        "harmprune/examples/harmbench_behaviors.yaml",
        "harmprune/measure/benchmarks.py",
        "harmprune/examples/benchmarks/harmprune_everyday_mc.yaml",
        "harmprune/examples/benchmarks/everyday_mc.test.jsonl",
        "harmprune/examples/benchmarks/harmprune_yesno.yaml",
        "harmprune/examples/benchmarks/yesno.test.jsonl",
    ):
        assert expected in names, expected
    shipped = zipfile.ZipFile(wheel).read("harmprune/examples/general_benign.yaml").decode()
    assert shipped == (ROOT / "examples" / "general_benign.yaml").read_text()


def test_named_domains_resolve_from_any_directory(tmp_path: Path) -> None:
    code = (
        "from harmprune.inputs.config import load_domain, example_domains\n"
        "assert 'cyber' in example_domains(), example_domains()\n"
        "print(load_domain('cyber').harmful[0])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr


def test_the_api_process_never_imports_torch() -> None:
    code = (
        "import sys, harmprune.api.main, harmprune.jobs.store, harmprune.workers.client\n"
        "harmprune.api.main.create_app\n"
        "bad = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


def test_the_engine_imports_no_service_library() -> None:
    pattern = re.compile(r"^\s*(from|import) (redis|celery|fastapi|starlette|uvicorn)\b", re.M)
    offenders = [
        str(path.relative_to(ROOT))
        for path in ENGINE.rglob("*.py")
        if pattern.search(path.read_text())
    ]
    assert offenders == []
