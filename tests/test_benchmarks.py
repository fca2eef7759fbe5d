"""Utility benchmarks with lm-evaluation-harness (harmprune.measure.benchmarks): real lm-eval on a tiny
random Llama, checked against a direct computation of what lm-eval defines as accuracy."""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from harmprune.errors import SpecError
from harmprune.inputs.references import operator_permit
from harmprune.measure.benchmarks import (
    BenchmarkResult,
    BenchmarksConfig,
    compare_benchmarks,
    local_tasks,
    run_benchmarks,
)
from pydantic import ValidationError

from tests.conftest import assert_python_imports_none_of
from tests.tiny_models import build_model, make_tokenizer

LOCAL = ("harmprune_everyday_mc", "harmprune_yesno")


def _items(task: str) -> list[tuple[str, list[str], int]]:
    """(context, choices, gold) of the task's test split, formatted as its YAML says."""
    folder = local_tasks()[task].parent
    if task == "harmprune_everyday_mc":
        rows = [json.loads(line) for line in (folder / "everyday_mc.test.jsonl").open()]
        return [(f"Question: {r['question']}\nAnswer:", r["choices"], r["answer"]) for r in rows]
    rows = [json.loads(line) for line in (folder / "yesno.test.jsonl").open()]
    return [
        (f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"], r["label"])
        for r in rows
    ]


def _loglikelihood(model: Any, tokenizer: Any, context: str, continuation: str) -> float:
    """lm-eval's loglikelihood for a causal model: encode context and context+continuation, the
    continuation's tokens are the tail of the whole beyond the context's; sum their log-probs."""
    context_ids = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    continuation_ids = whole[len(context_ids) :]
    assert continuation_ids
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits[0, len(context_ids) - 1 :]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return float(logprobs.gather(1, torch.tensor(continuation_ids)[:, None]).sum())


def _direct(
    model: Any, tokenizer: Any, task: str, n: int, *, chat: bool = False
) -> dict[str, float]:
    correct = correct_norm = 0
    for context, choices, gold in _items(task)[:n]:
        if chat:  # the prompt as one user turn; lm-eval then drops the " " before the choice
            context = tokenizer.apply_chat_template(
                [{"role": "user", "content": context}], tokenize=False, add_generation_prompt=True
            )
        delimiter = "" if chat else " "
        lls = [_loglikelihood(model, tokenizer, context, delimiter + c) for c in choices]
        pred = max(range(len(choices)), key=lambda i: lls[i])
        pred_norm = max(range(len(choices)), key=lambda i: lls[i] / len(choices[i]))
        correct += pred == gold
        correct_norm += pred_norm == gold
    return {"acc": correct / n, "acc_norm": correct_norm / n}


@pytest.fixture(scope="module")
def llama() -> tuple[Any, Any]:
    """Seed 2: its answers vary on both tasks (seed 1234 answers "no" to every yes/no item), and
    scoring without lm-eval's " " before each choice gives other accuracies (0.475 and 0.2
    instead of 0.35 and 0.25), so the comparison below can fail."""
    tokenizer = make_tokenizer()
    return build_model("llama", tokenizer, seed=2), tokenizer


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No socket may connect, and the working directory is an empty folder to watch."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _by_key(results: list[BenchmarkResult]) -> dict[tuple[str, str], BenchmarkResult]:
    return {(r.task, r.metric): r for r in results}


def test_local_tasks_score_as_the_direct_computation(llama: tuple[Any, Any], offline: Path) -> None:
    model, tokenizer = llama
    model.train()  # the caller's mode comes back
    before = {k: v.clone() for k, v in model.state_dict().items()}
    started = time.perf_counter()
    results = run_benchmarks(
        model, tokenizer, (cfg := BenchmarksConfig(tasks=list(LOCAL))), operator_permit(cfg)
    )
    print(f"run_benchmarks, 2 tasks x 40 items: {time.perf_counter() - started:.1f} s")
    assert model.training
    model.eval()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert list(offline.iterdir()) == []  # nothing written into the working directory

    got = _by_key(results)
    assert set(got) == {
        ("harmprune_everyday_mc", "acc"),
        ("harmprune_everyday_mc", "acc_norm"),
        ("harmprune_yesno", "acc"),
    }
    for task in LOCAL:
        want = _direct(model, tokenizer, task, 40)
        for (name, metric), result in got.items():
            if name == task:
                assert result.value == pytest.approx(want[metric], abs=1e-9), (task, metric)
                assert result.n == 40
                assert result.num_fewshot == 0
                assert result.chat_template is False
                assert result.stderr is not None and result.stderr > 0


def test_limit_and_chat_template(llama: tuple[Any, Any], offline: Path) -> None:
    model, tokenizer = llama
    config = BenchmarksConfig(tasks=list(LOCAL), limit=7, apply_chat_template=True)
    results = run_benchmarks(model, tokenizer, config, operator_permit(config))
    assert {r.n for r in results} == {7}
    assert all(r.chat_template for r in results)
    for result in results:
        want = _direct(model, tokenizer, result.task, 7, chat=True)
        assert result.value == pytest.approx(want[result.metric], abs=1e-9), result

    shots = BenchmarksConfig(
        tasks=["harmprune_everyday_mc"], limit=3, num_fewshot=2, apply_chat_template=True
    )
    few = run_benchmarks(model, tokenizer, shots, operator_permit(shots))
    assert {(r.n, r.num_fewshot, r.chat_template) for r in few} == {(3, 2, True)}

    drops = compare_benchmarks(results, results)
    assert len(drops) == 3 and all(d.drop == 0 for d in drops)
    with pytest.raises(ValueError, match="different setups"):
        compare_benchmarks(few, results)


def test_a_run_outside_a_git_checkout_prints_nothing_of_lm_evals_own(
    llama: tuple[Any, Any],
    offline: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """lm-eval's git hash of the working directory (`git describe` writes "fatal: not a git
    repository" to the terminal here) and its environment report are skipped, and lm-eval's
    own functions are back after the run."""
    import lm_eval.evaluator as evaluator

    # Without git, or inside a checkout, lm-eval's git call would print nothing: not a test.
    assert shutil.which("git"), "git is needed to show lm-eval's git message is kept off"
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(offline.parent))

    kept = evaluator.get_git_commit_hash, evaluator.add_env_info
    model, tokenizer = llama
    config = BenchmarksConfig(tasks=["harmprune_yesno"], limit=3)
    assert {r.n for r in run_benchmarks(model, tokenizer, config, operator_permit(config))} == {3}
    _, err = capfd.readouterr()
    assert "not a git repository" not in err
    assert (evaluator.get_git_commit_hash, evaluator.add_env_info) == kept


def test_the_module_imports_neither_torch_nor_lm_eval(tmp_path: Path) -> None:
    assert_python_imports_none_of(
        ("torch", "lm_eval", "transformers"), "import harmprune.measure.benchmarks\n", tmp_path
    )


def test_an_unknown_task_is_a_spec_error_naming_it(llama: tuple[Any, Any], offline: Path) -> None:
    model, tokenizer = llama
    config = BenchmarksConfig(tasks=["harmprune_yesno", "no_such_benchmark_xyz"], limit=2)
    started = time.perf_counter()
    with pytest.raises(SpecError, match="no_such_benchmark_xyz") as raised:
        run_benchmarks(model, tokenizer, config, operator_permit(config))
    assert "harmprune_everyday_mc" in str(raised.value)  # the local names are listed
    assert time.perf_counter() - started < 20  # no full parse of lm-eval's 14,000 task files

    plain = make_tokenizer(chat_template=False)
    chat = BenchmarksConfig(tasks=["harmprune_yesno"], apply_chat_template=True)
    with pytest.raises(SpecError, match="no chat template"):
        run_benchmarks(model, plain, chat, operator_permit(chat))


def test_the_config_is_strict() -> None:
    assert BenchmarksConfig().tasks == []
    assert run_benchmarks(None, None, BenchmarksConfig(), operator_permit(BenchmarksConfig())) == []
    for bad in (
        {"limit": 0},
        {"num_fewshot": -1},
        {"batch_size": 0},
        {"task": ["boolq"]},
        {"tasks": ["boolq", "boolq"]},
        {"tasks": [" boolq"]},
    ):
        with pytest.raises(ValidationError):
            BenchmarksConfig.model_validate(bad)
    assert set(local_tasks()) == set(LOCAL)


# ---------------------------------------------------------------- in a job


def test_a_job_scores_the_three_models_and_gates_on_the_drop(
    tmp_path: Path, tiny_model_dir: Any
) -> None:
    from harmprune import pipeline
    from harmprune.inputs.config import DomainSpec, HardenConfig
    from harmprune.output import card
    from harmprune.settings import Settings

    from tests.evidence_fixtures import disjoint_domain

    raw = disjoint_domain()
    raw["eval"]["benchmarks"] = {"tasks": ["harmprune_everyday_mc"], "limit": 6, "batch_size": 4}
    raw["thresholds"] = {**raw["thresholds"], "max_benchmark_drop": 0.0}
    config = HardenConfig(
        model=str(tiny_model_dir("llama")),
        domain=DomainSpec.model_validate(raw),
        device="cpu",
        dtype="float32",
    )
    report = pipeline.run(config, Settings(cache_dir=tmp_path / "c"), tmp_path / "out")
    b = report.benchmarks
    assert b is not None and b.max_drop == 0.0
    for results in (b.original, b.hardened, b.random_control):
        assert {(r.task, r.metric) for r in results} == {
            ("harmprune_everyday_mc", "acc"),
            ("harmprune_everyday_mc", "acc_norm"),
        }
        assert all(r.n == 6 and 0 <= r.value <= 1 for r in results)
    drops = [o.value - h.value for o, h in zip(b.original, b.hardened, strict=True)]
    assert bool(b.failures) == any(d > 0 for d in drops)
    if b.failures:
        assert report.outcome == "rejected" and "benchmark harmprune_everyday_mc" in (
            report.outcome_reason
        )
    assert "## Utility benchmarks (lm-evaluation-harness)" in card.render_card(report)
    assert "benchmarks_original" in report.timings_s and "benchmarks" in report.timings_s


def test_a_misspelt_task_fails_the_job_before_any_weight_is_read(tmp_path: Path) -> None:
    from harmprune import pipeline
    from harmprune.inputs.config import DomainSpec, HardenConfig
    from harmprune.settings import Settings

    from tests.evidence_fixtures import disjoint_domain

    raw = disjoint_domain()
    raw["eval"]["benchmarks"] = {"tasks": ["harmprune_no_such_task"]}
    # The model does not exist: the task check must come first.
    config = HardenConfig(model=str(tmp_path / "absent"), domain=DomainSpec.model_validate(raw))
    with pytest.raises(SpecError, match="harmprune_no_such_task"):
        pipeline.run(config, Settings(cache_dir=tmp_path / "c"), tmp_path / "out")
