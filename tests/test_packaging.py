"""The distribution is one import package, `harmprune`, with the example domains inside it, and
the layers import one way (the API process never imports torch; the engine never imports the
service libraries; inside the engine, inputs <- method <- measure <- attacks <- output <-
pipeline <- audit)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import assert_python_imports_none_of, assert_python_runs

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "service"

# The engine's layers, lowest first: a module imports from its own layer or a lower one, lazy
# imports inside functions included. The first layer is shared by all: names, errors, settings
# and the result types (which the report, the card and the API read without torch).
LAYERS: list[tuple[str, ...]] = [
    ("errors", "settings", "vocabulary", "results"),
    ("inputs",),
    ("method", "distributed"),  # distributed: the attribution on FSDP2 ranks
    ("measure",),
    ("attacks",),
    ("output",),
    ("pipeline",),
    ("audit",),  # the rerun re-measures a job's test set with the pipeline's stages
]
# The imports that go up a layer, each for a reason; every one is inside a function.
UPWARD = {
    # the preflight prices a job before any weight is read: the method's parameter shapes, the
    # attacks and the benchmark tasks (inside functions: the API imports the preflight, not torch)
    ("inputs.preflight", "method.attribution"),
    ("inputs.preflight", "attacks.pricing"),
    ("inputs.preflight", "measure.benchmarks"),
}
# ... and one module-level exception: the tamper check is attacks.finetune's fine-tune (which
# itself imports nothing above method) measured on a narrow domain.
UPWARD_AT_IMPORT = {("measure.tamper", "attacks.finetune")}


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
    assert_python_runs(code, cwd=tmp_path)


def test_the_api_process_never_imports_torch() -> None:
    code = (
        "import harmprune.api.main, harmprune.jobs.store, harmprune.workers.client\n"
        "harmprune.api.main.create_app\n"
    )
    assert_python_imports_none_of(("torch", "transformers"), code)


def test_the_engine_imports_no_service_library() -> None:
    pattern = re.compile(r"^\s*(from|import) (redis|celery|fastapi|starlette|uvicorn)\b", re.M)
    offenders = [
        str(path.relative_to(ROOT))
        for path in ENGINE.rglob("*.py")
        if pattern.search(path.read_text())
    ]
    assert offenders == []


def engine_imports() -> list[tuple[str, str, bool]]:
    """(importing module, imported module, below the module's top level: in a function or an `if`)
    for every harmprune import in the engine, both named under harmprune (`inputs.data`)."""
    found = []
    for path in ENGINE.rglob("*.py"):
        module = ".".join(
            p for p in path.relative_to(ENGINE).with_suffix("").parts if p != "__init__"
        )
        tree = ast.parse(path.read_text())
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and (node.module or "").split(".")[0] == "harmprune"
            ):
                base = (node.module or "").removeprefix("harmprune").lstrip(".")
                is_package = (ENGINE / base.replace(".", "/") / "__init__.py").is_file()
                names = (
                    [f"{base}.{a.name}".lstrip(".") for a in node.names] if is_package else [base]
                )
            elif isinstance(node, ast.Import):
                names = [
                    a.name.removeprefix("harmprune.")
                    for a in node.names
                    if a.name.startswith("harmprune.")
                ]
            else:
                continue
            found += [(module, name, id(node) not in top_level) for name in names]
    return found


LAYER_OF = {name: rank for rank, layer in enumerate(LAYERS) for name in layer}


def test_every_engine_module_has_a_layer() -> None:
    tops = {p.stem for p in ENGINE.glob("*.py") if p.stem != "__init__"}
    tops |= {p.parent.name for p in ENGINE.glob("*/__init__.py")}
    assert tops == set(LAYER_OF)


def test_the_engine_layers_import_one_way() -> None:
    upward = []
    for module, imported, lazy in engine_imports():
        going_up = (
            LAYER_OF.get(imported.split(".")[0], len(LAYERS)) > LAYER_OF[module.split(".")[0]]
        )
        allowed = (module, imported) in (UPWARD if lazy else UPWARD_AT_IMPORT)
        if going_up and not allowed:
            upward.append(f"{module} imports {imported}{' (in a function)' if lazy else ''}")
    assert upward == []


def test_the_allowed_upward_imports_are_still_there() -> None:
    found = {(module, imported, lazy) for module, imported, lazy in engine_imports()}
    missing = [pair for pair in UPWARD if (*pair, True) not in found]
    missing += [pair for pair in UPWARD_AT_IMPORT if (*pair, False) not in found]
    assert missing == []


def test_each_engine_subpackage_init_only_says_what_it_owns() -> None:
    """No re-exports: `harmprune.inputs.references` is imported by the API without torch, which a
    re-export of a torch module from `harmprune.inputs` would break."""
    for name in ("inputs", "method", "measure", "output", "audit"):
        tree = ast.parse((ENGINE / name / "__init__.py").read_text())
        assert len(tree.body) == 1 and ast.get_docstring(tree), name
