"""`harmprune audit --rerun`: measure the report's test-set figures again on this machine.

The report holds figures, not prompts, so a rerun needs the job's domain spec (its sha256 must
be the report's). With it and the job's seed the test set is split again exactly as the job
split it, its reference answers are made again by the base model (greedy, as the job made
them), and the teacher-forced figures are measured: harm loss of the original's harmful answers
(plain and prefill) and benign loss, on the base model and on the **published** weights.

Generation judges (refusal, classifier), the controls, the general benign set and benchmarks
are not re-measured: the teacher-forced figures are the ones a different machine reproduces
within a tolerance that can be stated (float rounding, batch padding); greedy generations can
flip a token on other hardware.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from harmprune.audit.checks import RERUN_REL_TOLERANCE, RERUN_RISE_TOLERANCE, Check, within
from harmprune.errors import HarmpruneError
from harmprune.settings import Settings

# (label, how to read it from a ModelMetrics)
FIGURES = (
    ("harm nll (plain)", lambda m: m.harm["nll"]["plain"]),
    ("harm nll (prefill)", lambda m: m.harm["nll"]["prefill"]),
    ("benign loss", lambda m: m.benign_loss),
)


def rerun_check(
    report: Any, published_dir: Path, base_dir: Path | None, spec_path: Path, settings: Settings
) -> Check:
    from harmprune.inputs.config import HardenConfig, load_domain

    try:
        spec = load_domain(spec_path)
    except HarmpruneError as err:
        return Check(name="rerun", ok=False, detail=f"--spec cannot be read: {err}")
    if spec.spec_hash() != report.inputs.spec_hash:
        return Check(
            name="rerun",
            ok=False,
            detail=f"--spec {spec_path.name} is not the job's spec (its sha256 differs)",
        )
    if base_dir is None or report.metrics.hardened is None:
        return Check(name="rerun", ok=False, detail="nothing to re-measure without the base")
    config = HardenConfig(
        model=str(base_dir),
        domain=spec,
        seed=report.inputs.seed,
        dtype=report.inputs.dtype,
        device="cpu" if report.inputs.device == "cpu" else None,
    )
    try:
        original, hardened = measure_again(config, published_dir, settings)
    except HarmpruneError as err:
        return Check(name="rerun", ok=False, detail=f"cannot re-measure: {err}")
    return compare(report.metrics.original, report.metrics.hardened, original, hardened)


def measure_again(config: Any, published_dir: Path, settings: Settings) -> tuple[Any, Any]:
    """(base, published) teacher-forced metrics on the job's test set, rebuilt."""
    from harmprune import pipeline
    from harmprune.inputs.sets import split_sets
    from harmprune.measure.job import build_heldout

    pipeline.seed_everything(config.seed)
    sets = split_sets(config)
    ctx = pipeline.load(config, settings, lambda *_: None, None)
    test = build_heldout(ctx, sets.test_harmful, sets.test_benign, "test")
    assert test is not None  # split_sets always makes a test set
    original = ctx.measure(test, "search")
    load_published(ctx.loaded.model, published_dir)
    return original, ctx.measure(test, "search")


def load_published(model: Any, directory: Path) -> None:
    """The published tensors into `model`, one file at a time (names checked both ways)."""
    import torch
    from harmprune.audit.checks import tensor_files
    from safetensors.torch import load_file

    files = sorted(set(tensor_files(directory).values()))
    expected = set(model.state_dict())
    seen: set[str] = set()
    with torch.no_grad():
        for path in files:
            tensors = load_file(str(path))
            result = model.load_state_dict(tensors, strict=False)
            if result.unexpected_keys:
                raise HarmpruneError(
                    f"published tensors the model lacks: {result.unexpected_keys[:3]}"
                )
            seen |= set(tensors)
    tied = {n for n in expected - seen if n.endswith("lm_head.weight")}
    if expected - seen - tied:
        raise HarmpruneError(f"published files lack tensors: {sorted(expected - seen - tied)[:3]}")
    if tied:
        model.tie_weights()


def compare(report_original: Any, report_hardened: Any, original: Any, hardened: Any) -> Check:
    rows, problems = [], []
    for label, read in FIGURES:
        for model, reported, measured in (
            ("original", read(report_original), read(original)),
            ("hardened", read(report_hardened), read(hardened)),
        ):
            ok = within(measured, reported, RERUN_REL_TOLERANCE)
            rows.append(
                {
                    "figure": label,
                    "model": model,
                    "reported": reported,
                    "measured": measured,
                    "ok": ok,
                }
            )
            if not ok:
                problems.append(
                    f"{label} of the {model} model: {measured:.4g} vs reported {reported:.4g}"
                )
        rise_reported = read(report_hardened) / read(report_original) - 1
        rise_measured = read(hardened) / read(original) - 1
        ok = (
            math.isfinite(rise_measured)
            and abs(rise_measured - rise_reported) <= RERUN_RISE_TOLERANCE
        )
        rows.append(
            {
                "figure": f"{label} rise",
                "model": "hardened",
                "reported": rise_reported,
                "measured": rise_measured,
                "ok": ok,
            }
        )
        if not ok:
            problems.append(f"{label} rise: {rise_measured:+.2%} vs reported {rise_reported:+.2%}")
    tolerance = (
        f"tolerance {RERUN_REL_TOLERANCE:.0%} relative per figure, "
        f"{RERUN_RISE_TOLERANCE * 100:.0f} points on each rise"
    )
    data = {"figures": rows, "tolerance": tolerance}
    if problems:
        return Check(
            name="rerun", ok=False, detail=f"{'; '.join(problems[:3])} ({tolerance})", data=data
        )
    return Check(
        name="rerun",
        ok=True,
        detail=f"{len(rows)} teacher-forced test-set figures reproduce ({tolerance})",
        data=data,
    )
