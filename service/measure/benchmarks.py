"""Utility on standard benchmarks with lm-evaluation-harness, on the in-memory model (issue #11).

Usage (5 lines):
    cfg = BenchmarksConfig(tasks=["harmprune_everyday_mc", "harmprune_yesno"], limit=40)
    before = run_benchmarks(model, tokenizer, cfg)   # the model as it is in memory: no reload
    ...prune...; after = run_benchmarks(model, tokenizer, cfg)
    worst = max(d.drop for d in compare_benchmarks(before, after))  # vs max_benchmark_drop
Task names: `local_tasks()` (shipped in harmprune/examples/benchmarks, offline) or lm-eval's.

Built-in lm-eval tasks (boolq, rte, hellaswag, winogrande, arc_challenge, openbookqa, mmlu, ...)
download their datasets from the Hub, so they only run on workers with network; the local tasks
are small multiple-choice sets written for this project and run anywhere.

This module imports neither torch nor lm_eval at import time (the report process imports
`BenchmarkResult` without loading torch): both are imported inside `run_benchmarks`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from harmprune.errors import SpecError
from harmprune.inputs.config import BenchmarksConfig as BenchmarksConfig
from harmprune.inputs.config import Strict
from harmprune.inputs.references import Permit, Reference, not_readable

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

# The metrics reported per task, when the task gives them.
METRICS = ("acc", "acc_norm")
# Few-shot examples are drawn with this seed (lm-eval's default), so runs are comparable.
FEWSHOT_SEED = 1234
# Only for metrics without a closed-form stderr (acc and acc_norm have one).
BOOTSTRAP_ITERS = 1000


class BenchmarkResult(Strict):
    """One metric of one task, with the setup it was measured under."""

    task: str
    metric: str  # "acc" or "acc_norm"
    value: float
    stderr: float | None
    n: int  # items scored (after `limit`; summed over the subtasks of a group)
    num_fewshot: int
    chat_template: bool


@dataclass(frozen=True)
class BenchmarkDrop:
    task: str
    metric: str
    original: float
    hardened: float

    @property
    def drop(self) -> float:
        """How much the hardened model lost (negative: it gained)."""
        return self.original - self.hardened


def local_tasks() -> dict[str, Path]:
    """harmprune's own lm-eval tasks (task name -> YAML), shipped as package data."""
    folder = Path(str(resources.files("harmprune.examples") / "benchmarks"))
    tasks: dict[str, Path] = {}
    for path in sorted(folder.glob("*.yaml")):
        name = yaml.safe_load(path.read_text()).get("task")
        if isinstance(name, str):
            tasks[name] = path
    return tasks


def local_task_config(name: str) -> dict[str, Any]:
    """The task's config as lm-eval reads it, with its data files made absolute.

    lm-eval passes `dataset_kwargs` to `datasets.load_dataset` unchanged, and relative
    `data_files` are resolved against the working directory: the YAML's own folder is meant.
    """
    path = local_tasks()[name]
    # Plain YAML (no include:, no !function), so no lm-eval loader is needed.
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    data_files = config["dataset_kwargs"]["data_files"]
    config["dataset_kwargs"] = {
        **config["dataset_kwargs"],
        "data_files": {split: str(path.parent / file) for split, file in data_files.items()},
    }
    return config


def _not_in_lm_eval(names: list[str]) -> list[str]:
    """Names no file of lm-eval's task folder mentions (certainly unknown), in seconds.

    Building lm-eval's full task index parses ~14,000 YAML files (about 30 s on 2 cores); a
    plain text scan rejects a typo without it."""
    import lm_eval.tasks

    left = set(names)
    for path in Path(lm_eval.tasks.__file__).parent.rglob("*"):
        if not left:
            break
        if path.suffix in (".yaml", ".py") and path.is_file():
            text = path.read_text(errors="ignore")
            left -= {name for name in left if name in text}
    return [name for name in names if name in left]


def check_tasks(names: list[str]) -> TaskManager:
    """An lm-eval TaskManager that knows every name, or a SpecError naming the unknown ones.

    With only local names, lm-eval's built-in tasks are not indexed at all (0.1 s, not 30 s)."""
    from lm_eval.tasks import TaskManager

    local = local_tasks()
    builtin = [name for name in names if name not in local]

    def refuse(unknown: list[str]) -> SpecError:
        return SpecError(
            f"eval.benchmarks.tasks: unknown lm-eval task(s) {', '.join(map(repr, unknown))}; "
            f"harmprune's local tasks are {', '.join(sorted(local))}, built-in ones are "
            "lm-eval's task names (e.g. boolq, hellaswag, mmlu)"
        )

    if unknown := _not_in_lm_eval(builtin):
        raise refuse(unknown)
    manager = TaskManager(include_defaults=bool(builtin))
    known = set(manager.all_tasks)
    if unknown := [name for name in builtin if name not in known]:
        raise refuse(unknown)
    # A tag (e.g. ai2_arc) expands to tasks with no score of its own; a group (mmlu) has one.
    if tags := [name for name in builtin if name in manager.all_tags]:
        raise SpecError(
            f"eval.benchmarks.tasks: {', '.join(map(repr, tags))} is an lm-eval tag with no "
            "score of its own: list its tasks instead"
        )
    return manager


TASKS_FIELD = "domain.eval.benchmarks.tasks"


def task_dataset_references(
    names: list[str], manager: TaskManager | None = None
) -> list[Reference]:
    """The Hub datasets the built-in lm-eval tasks among `names` read (a group: its tasks'), as
    references for the access policy: a task is a reference to the data it downloads. A task
    whose data cannot be told from its config (a Python-defined task) is not readable."""
    local = local_tasks()
    builtin = [(i, name) for i, name in enumerate(names) if name not in local]
    if not builtin:
        return []
    manager = manager or check_tasks(names)
    out: list[Reference] = []

    def visit(name: str, where: str, depth: int) -> None:
        entry = manager.task_index.get(name)
        cfg = getattr(entry, "cfg", None)
        if not isinstance(cfg, dict) or depth > 8:
            raise not_readable(where)
        path = cfg.get("dataset_path")
        if path is not None:
            kwargs = cfg.get("dataset_kwargs") or {}
            revision = kwargs.get("revision") if isinstance(kwargs, dict) else None
            out.append(Reference("dataset", str(path), revision, where))
        members = cfg.get("task")
        for member in members if isinstance(members, list) else []:
            if isinstance(member, dict) and member.get("dataset_path") is not None:
                out.append(Reference("dataset", str(member["dataset_path"]), None, where))
                continue  # an inline task definition inside the group
            sub = member.get("task") if isinstance(member, dict) else member
            if not isinstance(sub, str):
                raise not_readable(where)
            visit(sub, where, depth + 1)
        if path is None and not isinstance(members, list):
            raise not_readable(where)

    for i, name in builtin:
        visit(name, f"{TASKS_FIELD}.{i}", 0)
    return out


def run_benchmarks(
    model: Any, tokenizer: Any, config: BenchmarksConfig, permit: Permit, device: Any = None
) -> list[BenchmarkResult]:
    """Score the in-memory `model` on `config.tasks` with `lm_eval.simple_evaluate`.

    Only tasks the job's permit grants run, and a built-in task only when the permit also grants
    every dataset it reads. The model is wrapped (not copied, not reloaded) in lm-eval's HFLM; it
    runs in eval mode without gradients and gets back its training mode and device afterwards.
    `device`: where to run (default: where the model is). The tokenizer is copied: lm-eval may
    set its pad token.
    """
    if not config.tasks:
        return []
    if config.apply_chat_template and not getattr(tokenizer, "chat_template", None):
        raise SpecError(
            "eval.benchmarks.apply_chat_template: the model's tokenizer has no chat template"
        )
    for i, name in enumerate(config.tasks):
        permit.grant("task", name, None, f"{TASKS_FIELD}.{i}")
    manager = check_tasks(config.tasks)
    for ref in task_dataset_references(config.tasks, manager):
        permit.grant("dataset", ref.name, ref.revision, ref.field)

    import lm_eval
    import torch

    local = local_tasks()
    specs: list[str | dict[str, Any]] = [
        local_task_config(name) if name in local else name for name in config.tasks
    ]
    was_training = model.training
    home = next(model.parameters()).device
    target = torch.device(device) if device is not None else home
    try:
        if target != home:
            model.to(target)
        with torch.no_grad(), _without_call_warnings(), _without_environment_report():
            lm = _quiet_hflm()(
                pretrained=model,
                tokenizer=copy.deepcopy(tokenizer),
                batch_size=config.batch_size,
            )
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=specs,
                num_fewshot=config.num_fewshot,
                limit=config.limit,
                apply_chat_template=config.apply_chat_template,
                fewshot_as_multiturn=config.apply_chat_template and config.num_fewshot > 0,
                task_manager=manager,
                log_samples=False,
                bootstrap_iters=BOOTSTRAP_ITERS,
                # no global seeding: lm-eval would reseed random, numpy and torch
                random_seed=None,
                numpy_random_seed=None,
                torch_random_seed=None,
                fewshot_random_seed=FEWSHOT_SEED,
            )
    finally:
        if target != home:
            model.to(home)
        model.train(was_training)
    assert out is not None  # None only on non-zero ranks of a distributed run
    return [
        result
        for name in config.tasks
        for result in _results(out, name, chat_template=config.apply_chat_template)
    ]


# lm-eval warnings about how this module calls it, on every run: harmprune passes an
# in-memory model on purpose and sets num_fewshot explicitly (0 included). Nothing for a user.
CALL_WARNINGS = (
    "Passed an already-initialized model through `pretrained`",
    "`pretrained` model kwarg is not of type `str`",
    "Overwriting default num_fewshot of ",
)
LM_EVAL_CALL_LOGGERS = ("lm_eval.models.huggingface", "lm_eval.evaluator")


def _not_a_call_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(CALL_WARNINGS)


@contextlib.contextmanager
def _without_call_warnings() -> Iterator[None]:
    """Drops CALL_WARNINGS (only those: other lm-eval warnings still reach the handlers)."""
    loggers = [logging.getLogger(name) for name in LM_EVAL_CALL_LOGGERS]
    for logger in loggers:
        logger.addFilter(_not_a_call_warning)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(_not_a_call_warning)


@contextlib.contextmanager
def _without_environment_report() -> Iterator[None]:
    """lm-eval's evaluator ends each run by adding the git hash of the working directory
    (`git describe` prints "fatal: not a git repository" to the terminal outside a checkout)
    and torch's environment report (`collect_env`: pip, conda and driver subprocesses; 2.2 s
    the first time in a process, 0.3 s after, measured idle on the 2-core dev machine) to its
    results. harmprune reads neither (the report records its own versions), so both
    are skipped for the call and put back after it."""
    import lm_eval.evaluator as evaluator

    kept = evaluator.get_git_commit_hash, evaluator.add_env_info
    evaluator.get_git_commit_hash = lambda: None
    evaluator.add_env_info = lambda storage: None
    try:
        yield
    finally:
        evaluator.get_git_commit_hash, evaluator.add_env_info = kept


@functools.cache
def _quiet_hflm() -> type:
    """lm-eval's HFLM without its per-request progress bars ("Tokenizing inputs", "Running
    loglikelihood requests"): the pipeline reports progress per stage (the CLI's bars, the job
    store), and a worker's log is JSON lines. lm-eval's evaluator calls these methods without
    `disable_tqdm`, so it is set here."""
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):  # type: ignore[misc]
        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = True) -> Any:
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = True) -> Any:
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests: list[Any], disable_tqdm: bool = True) -> Any:
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM


def _results(out: dict[str, Any], name: str, *, chat_template: bool) -> list[BenchmarkResult]:
    scores = out["results"].get(name)
    if scores is None:  # a group without an aggregate score
        raise SpecError(f"eval.benchmarks.tasks: {name!r} has no score of its own")
    results = []
    for metric in METRICS:
        value = scores.get(f"{metric},none")
        if value is None:
            continue
        stderr = scores.get(f"{metric}_stderr,none")
        results.append(
            BenchmarkResult(
                task=name,
                metric=metric,
                value=float(value),
                stderr=_number(stderr),
                n=_count(out, name),
                num_fewshot=_shots(out, name),
                chat_template=chat_template,
            )
        )
    if not results:
        raise SpecError(f"eval.benchmarks.tasks: task {name!r} reports neither acc nor acc_norm")
    return results


def _number(value: Any) -> float | None:
    """lm-eval's stderr: a float, a numpy scalar, or "N/A"."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _leaves(out: dict[str, Any], name: str) -> list[str]:
    children = out.get("group_subtasks", {}).get(name) or []
    return [leaf for child in children for leaf in _leaves(out, child)] if children else [name]


def _count(out: dict[str, Any], name: str) -> int:
    samples = out.get("n-samples", {})
    return sum(int(samples[leaf]["effective"]) for leaf in _leaves(out, name) if leaf in samples)


def _shots(out: dict[str, Any], name: str) -> int:
    shots = {int(out.get("n-shot", {}).get(leaf, 0)) for leaf in _leaves(out, name)}
    return max(shots) if shots else 0


def compare_benchmarks(
    original: list[BenchmarkResult], hardened: list[BenchmarkResult]
) -> list[BenchmarkDrop]:
    """Per task and metric, the original and hardened scores (same tasks, same setup)."""
    after = {(r.task, r.metric): r for r in hardened}
    drops = []
    for before in original:
        key = (before.task, before.metric)
        if key not in after:
            raise ValueError(f"hardened results lack {before.task} {before.metric}")
        other = after[key]
        setup = (before.n, before.num_fewshot, before.chat_template)
        if setup != (other.n, other.num_fewshot, other.chat_template):
            raise ValueError(f"{before.task}: measured under different setups")
        drops.append(BenchmarkDrop(before.task, before.metric, before.value, other.value))
    return drops
