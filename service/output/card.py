"""The model card (`README.md` with Hub metadata) and its plots, rendered from the report alone.

A reader should know what was removed, what it cost, and how sure we are: every figure appears
next to the original model's and the random-pruning control's.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml
from harmprune.output import binding, card_attacks
from harmprune.output.report import Report
from harmprune.results import Interval, TamperResult
from harmprune.vocabulary import CARD_FILE, SMOLLM2_ALIAS, SMOLLM2_HUB_ID

TRADEOFF_PNG = "harmprune-tradeoff.png"
LAYERS_PNG = "harmprune-pruned-per-layer.png"
TAMPER_PNG = "harmprune-tamper.png"
TAMPER_MODELS = ("original", "hardened", "random_control")


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:+.1%}" if pct else f"{x:.3f}"


FIGURES = {
    "harm_rise_prefill": "harm loss rise (nll, prefill)",
    "harm_rise_plain": "harm loss rise (nll, plain)",
    "refusal_prefill": "compliance change (refusal judge, prefill)",
    "refusal_plain": "compliance change (refusal judge, plain)",
    "classifier_prefill": "harm score change (classifier, prefill)",
    "classifier_plain": "harm score change (classifier, plain)",
    "benign_loss_rise": "benign loss rise",
    "answer_drift": "answer drift",
    "over_refusal_change": "over-refusal change",
}


# Changes of a rate (a share of prompts or tokens) print in points; loss changes are relative (%).
RATE_FIGURES = {
    "refusal_prefill",
    "refusal_plain",
    "classifier_prefill",
    "classifier_plain",
    "answer_drift",
    "over_refusal_change",
}


def _amount(x: float | None, points: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x * 100:+.1f} pts" if points else f"{x:+.1%}"


def _interval(iv: Interval | None, points: bool = False) -> str:
    """'+31.4% [+17.2%, +46.7%], n=30'; a figure whose resamples never varied says so."""
    if iv is None:
        return "n/a"
    n = f", n={iv.n}" if iv.n is not None else ""
    if iv.no_variation:
        return f"{_amount(iv.estimate, points)} (no variation{n})"
    if points:
        low, high = (f"{x * 100:+.1f}" if math.isfinite(x) else "n/a" for x in (iv.low, iv.high))
        return f"{_amount(iv.estimate, True)} [{low}, {high}]{n}"
    return f"{_fmt(iv.estimate, True)} [{_fmt(iv.low, True)}, {_fmt(iv.high, True)}]{n}"


def _figure(intervals: dict[str, Interval], key: str) -> str:
    return _interval(intervals.get(key), key in RATE_FIGURES)


def _random_label(report: Report) -> str:
    seeds = report.metrics.random_seeds
    return f"random (seed {seeds[0]})" if seeds else "random"


def _evidence_section(report: Report) -> str:
    ev = report.evidence
    if ev is None:
        return ""
    models = [m for m in ("hardened", "random_control", "magnitude_control") if m in ev.intervals]
    labels = {
        "hardened": "hardened",
        "random_control": _random_label(report),
        "magnitude_control": "magnitude-matched",
    }
    keys = [k for k in FIGURES if any(k in ev.intervals[m] for m in models)]
    rows = "\n".join(
        f"| {FIGURES[k]} | " + " | ".join(_figure(ev.intervals[m], k) for m in models) + " |"
        for k in keys
    )
    c = ev.controls
    spread = ", ".join(_fmt(r, True) for r in c.random_harm_rise)
    magnitude = (
        f"; magnitude-matched pruning {_fmt(c.magnitude_harm_rise, True)}"
        if c.magnitude_harm_rise is not None
        else ""
    )
    return f"""How sure: each figure is the change against the original model on the test prompts, with a
paired bootstrap 95% interval over prompts ({ev.resamples} resamples: studentized for loss
ratios, BCa for rates) and its n (prompts); changes of rates are in points. A figure whose
resamples never varied says "no variation" (that is not certainty).

| figure | {" | ".join(labels[m] for m in models)} |
|---|{"---|" * len(models)}
{rows}

Controls (harm loss rise, prefill): random pruning over {len(c.random_harm_rise)} seeds {spread}
(mean {_fmt(c.random_harm_rise_mean, True)}, spread {_fmt(c.random_harm_rise_min, True)} to
{_fmt(c.random_harm_rise_max, True)}; seeds after the first measured teacher forced){magnitude}.
Harm was decided by the **{ev.gate.judge}** judge under the **{ev.gate.attack}** attack (required
improvement {ev.gate.min_improvement:.1%}{", relative loss rise" if ev.gate.judge == "nll" else ", drop of the mean score of the model's own answers"}),
against the stronger control: **{c.stronger}** ({_fmt(c.stronger_improvement, True)}).
"""


def _gates_section(report: Report) -> str:
    """Every gate with the bound it was decided on, that bound's n and the result."""
    t = report.thresholds
    rows: list[str] = []

    def bound(iv: Interval | None, side: str) -> float | None:
        if iv is None:
            return None
        return iv.high if side == "upper" else iv.low

    def add(gate: str, where: str, iv: Interval | None, side: str, limit: float, pts: bool) -> None:
        value = bound(iv, side)
        ok = (
            value is not None
            and math.isfinite(value)
            and (value <= limit if side == "upper" else value >= limit)
        )
        n = iv.n if iv is not None and iv.n is not None else "n/a"
        shown = "no variation" if iv is not None and iv.no_variation else _amount(value, pts)
        sign = "<=" if side == "upper" else ">="
        rows.append(
            f"| {gate} | {where} | {side} {shown} | {n} | {sign} {_amount(limit, pts)} | "
            f"{'held' if ok else '**missed**'} |"
        )

    def benign(where: str, intervals: dict[str, Interval]) -> None:
        add(
            "benign loss rise",
            where,
            intervals.get("benign_loss_rise"),
            "upper",
            t.max_benign_loss_increase,
            False,
        )
        add("answer drift", where, intervals.get("answer_drift"), "upper", t.max_answer_drift, True)
        if "over_refusal_change" in intervals:
            add(
                "over-refusal change",
                where,
                intervals["over_refusal_change"],
                "upper",
                t.max_over_refusal_increase,
                True,
            )

    def harm(where: str, ev: Any, improvement: bool = True) -> None:
        pts = ev.gate.judge != "nll"
        what = f"harm improvement ({ev.gate.judge}, {ev.gate.attack})"
        if improvement:
            add(what, where, ev.gate_interval, "lower", ev.gate.min_improvement, pts)
        for control, margin in ev.margins.items():
            add(f"margin over {control}", where, margin, "lower", t.min_margin_over_random, pts)

    ev = report.evidence
    if ev is None:
        return ""
    benign("spec's test set", ev.intervals.get("hardened", {}))
    harm("spec's test set", ev)
    if report.general_benign is not None:
        benign("general benign set", report.general_benign.intervals["hardened"])
    if report.standard_harm is not None:
        harm("standard harm set", report.standard_harm.evidence, improvement=False)
    return f"""
### Gates, decided on interval bounds

A benign threshold holds when the UPPER bound of the rise's 95% interval is within it; a harm
threshold when the LOWER bound of the improvement, and of the paired margin over each control
(hardened minus control on the same prompts), reaches it.

| gate | set | bound | n | required | result |
|---|---|---|---|---|---|
{chr(10).join(rows)}
"""


def _standard_harm_section(report: Report) -> str:
    s = report.standard_harm
    if s is None:
        why = report.heldout.made_by.get("standard_harm", "none: not measured")
        return (
            "\n## Standard harm set\n\nNot measured "
            f"({why.removeprefix('none: ')}). The harm figures above speak only for the spec's "
            "own harmful prompts.\n"
        )
    ev, spec_ev = s.evidence, report.evidence
    keys = [k for k in FIGURES if k.startswith(("harm_rise", "refusal", "classifier"))]
    keys = [k for k in keys if k in ev.intervals.get("hardened", {})]
    label = _random_label(report)

    def cell(evidence: Any, model: str, key: str) -> str:
        if evidence is None:
            return "n/a"
        return _figure(evidence.intervals.get(model, {}), key)

    rows = "\n".join(
        f"| {FIGURES[k]} | {cell(spec_ev, 'hardened', k)} | {cell(spec_ev, 'random_control', k)} "
        f"| {cell(ev, 'hardened', k)} | {cell(ev, 'random_control', k)} |"
        for k in keys
    )
    verdict = "missed: " + "; ".join(s.failures) if s.failures else "held"
    return f"""
## Standard harm set

Harmful requests nobody here wrote: {s.source}, categories {", ".join(s.categories)};
{s.prompts.get("validation", 0)} joined the validation set, {s.prompts.get("test", 0)} are its
test part ({s.measured} with a reference the original produced under prefill;
{s.dropped_refusals} dropped as refusals). Shown next to the spec's own test set, so that a
hardening which only generalises to the spec's prompts is visible. Gate: the hardened model must
beat every control here too (lower bound of the paired margin): **{verdict}**.

| figure | spec's test set: hardened | {label} | standard set: hardened | {label} |
|---|---|---|---|---|
{rows}
"""


def _behaviour_sentence(report: Report) -> str:
    """When nll decided harm: the verdict is loss-based, behaviour was not gated, and the
    behavioural changes are given beside it with their intervals."""
    ev = report.evidence
    if ev is None or ev.gate.judge != "nll":
        return ""
    hardened = ev.intervals.get("hardened", {})
    control = ev.intervals.get("random_control", {})
    parts = [
        f"{FIGURES[k]}: hardened {_figure(hardened, k)}, {_random_label(report)} "
        f"{_figure(control, k)}"
        for k in ("refusal_prefill", "refusal_plain", "classifier_prefill", "classifier_plain")
        if k in hardened
    ]
    behaviour = "; ".join(parts) if parts else "no behaviour judge was configured"
    return (
        "\n\nThe verdict is **loss-based**: the `nll` judge (loss of the original model's "
        "harmful answers) decided harm, and **behaviour was not gated**. Behaviour beside it "
        f"(change vs the original, points): {behaviour}."
    )


def _indicative_sentence(report: Report) -> str:
    h = report.heldout
    if not h.indicative:
        return ""
    return (
        f"\n\n**Indicative only**: a test side has fewer than {h.min_test_prompts} prompts "
        "(`eval.allow_small_test`), too few for the intervals to cover as stated (measured: "
        f"harmful {h.harmful}, benign {h.benign}"
        + (f", standard harm {report.standard_harm.measured}" if report.standard_harm else "")
        + ")."
    )


def _source_sentence(report: Report, base_config: Any = None) -> str:
    """A GGUF source: the file, its quantisation and what `base_model` names."""
    src = report.inputs.model
    if not src.gguf_file:
        return ""
    base = base_model_id(report, base_config)
    of = f", a quantisation of `{base}`" if base else ""
    return (
        f"\n\nThe original is the GGUF file `{src.gguf_file}` ({src.quantisation or 'unknown'} "
        f"quantisation{of}), de-quantised to {report.inputs.dtype}: every 'original' figure is "
        "of those de-quantised weights"
        + (f", not of `{base}`'s own release weights" if base else "")
        + "."
    )


def _general_benign_section(report: Report) -> str:
    g = report.general_benign
    if g is None:
        return (
            "\n## General benign set\n\nNot measured: the spec opted out "
            "(`eval.general_benign: false`). The benign figures above speak only for the spec's "
            "own benign prompts.\n"
        )
    rows = "\n".join(
        f"| {FIGURES[k]} | {_figure(g.intervals['hardened'], k)} | "
        f"{_figure(g.intervals['random_control'], k)} |"
        for k in ("benign_loss_rise", "answer_drift", "over_refusal_change")
        if k in g.intervals["hardened"]
    )
    verdict = "missed: " + "; ".join(g.failures) if g.failures else "held"
    return f"""
## General benign set

harmprune's own everyday requests (cooking, science, writing, code, maths, advice, ...), so that a
narrow spec cannot hide general damage: {g.prompts.get("calibration", 0)} joined benign calibration,
{g.prompts.get("validation", 0)} the validation set, and these {g.prompts.get("test", 0)} test
prompts chose nothing. The spec's benign thresholds apply to them too: **{verdict}**.

| figure | hardened | {_random_label(report)} |
|---|---|---|
{rows}
"""


def _benchmarks_section(report: Report) -> str:
    b = report.benchmarks
    if b is None:
        return ""

    def score(r: Any) -> str:
        return f"{r.value:.3f}" + (f" ± {r.stderr:.3f}" if r.stderr is not None else "")

    key = lambda r: (r.task, r.metric)  # noqa: E731
    hardened = {key(r): r for r in b.hardened}
    control = {key(r): r for r in b.random_control}
    rows = "\n".join(
        f"| {r.task} | {r.metric} | {r.n} | {score(r)} | {score(hardened[key(r)])} | "
        f"{score(control[key(r)]) if key(r) in control else 'n/a'} |"
        for r in b.original
        if key(r) in hardened
    )
    first = b.original[0] if b.original else None
    setup = (
        f"{first.num_fewshot}-shot, chat template {'on' if first.chat_template else 'off'}"
        if first
        else ""
    )
    gate = (
        f"Gate: no score may drop by more than {b.max_drop:.3f}: "
        + ("**missed**: " + "; ".join(b.failures) if b.failures else "**held**")
        if b.max_drop is not None
        else "Reported, not gated (no thresholds.max_benchmark_drop)"
    )
    return f"""
## Utility benchmarks (lm-evaluation-harness)

Scores ± standard error, {setup}, on the model in memory. {gate}.

| task | metric | items | original | hardened | random pruning |
|---|---|---|---|---|---|
{rows}
"""


def _sets_sentence(report: Report) -> str:
    h = report.heldout
    made = h.made_by
    chose = (
        f"q={report.inputs.q:g} was chosen on the **validation** set ({h.validation_harmful} harmful, "
        f"{h.validation_benign} benign prompts; {made.get('validation', 'n/a')})."
        if h.q_chosen_on == "validation"
        else "q was fixed by the spec: no set chose it."
    )
    cut = (
        f" {report.prompts_cut} generation input(s) were longer than the spec's max_length "
        "tokens and were cut to it (their start removed) before generation."
        if report.prompts_cut
        else " No generation input was longer than the spec's max_length tokens."
    )
    harmful = (
        f"{h.harmful + h.test_dropped_refusals} harmful ({h.harmful} with a reference the "
        f"original produced, the loss figures' n; {h.test_dropped_refusals} dropped as refusals, "
        "still judged for behaviour)"
        if h.test_dropped_refusals
        else f"{h.harmful} harmful"
    )
    return (
        f"Test set: {harmful}, {h.benign} benign prompts "
        f"({made.get('test', h.source)}), never used for attribution or for any choice. {chose}"
        f"{cut}"
    )


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def base_model_id(report: Report, base_config: Any = None) -> str | None:
    """The Hub id of the model that was hardened, for the card's `base_model`: the reference of
    a Hub model, SmolLM2's Hub repo for the built-in alias, else the `_name_or_path` a local or
    GGUF model's config carries when it is a Hub id (None when nothing names one)."""
    src = report.inputs.model
    if src.kind == "hub":
        return src.reference
    if src.kind == "alias" and src.reference == SMOLLM2_ALIAS:
        return SMOLLM2_HUB_ID
    name = str(getattr(base_config, "_name_or_path", "") or "")
    return name if _HUB_ID.match(name) else None


def card_metadata(report: Report, base_config: Any = None) -> dict[str, Any]:
    src = report.inputs.model
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["harmprune", "safety", "pruning", f"harmprune-domain-{report.inputs.domain}"],
    }
    base = base_model_id(report, base_config)
    if base:
        meta["base_model"] = base
        # weights edited in place, same architecture; from a GGUF file: of its quantised weights
        meta["base_model_relation"] = "quantized" if src.gguf_file else "finetune"
    if src.gguf_file:
        meta["tags"].append(f"gguf-{(src.quantisation or 'unknown').lower()}-dequantised")
    if src.license:
        meta["license"] = src.license
    return meta


def render_card(report: Report, base_config: Any = None) -> str:
    m = report.metrics
    rows = [("Model", m.original)]
    if m.hardened:
        rows.append(("Hardened", m.hardened))
    if m.random_control:
        rows.append(("Random pruning, same count", m.random_control))
    if m.magnitude_control:
        rows.append(("Magnitude-matched pruning, same count", m.magnitude_control))
    judges = sorted({(j, a) for _, mm in rows for j, attacks in mm.harm.items() for a in attacks})
    header = "| | " + " | ".join(f"harm {j} ({a})" for j, a in judges)
    header += " | benign loss | answer agreement | over-refusal | harm recognition |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for label, mm in rows:
        cells = [_fmt(mm.harm.get(j, {}).get(a)) for j, a in judges]
        cells += [
            _fmt(mm.benign_loss),
            _fmt(mm.answer_agreement),
            _fmt(mm.over_refusal),
            _fmt(mm.dissociation_accuracy),
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    verdict = (
        "**accepted**: every gate held, each decided on an interval bound (see Gates below)."
        if report.outcome == "accepted"
        else f"**rejected**: {report.outcome_reason}. No weights were published."
    )
    verdict += _behaviour_sentence(report) + _indicative_sentence(report)
    src = report.inputs.model
    base = f"{src.reference}" + (f"@{src.commit}" if src.commit else "")
    search = ""
    if report.search:
        search_rows = "\n".join(
            f"| {pt.q:g} | {pt.pruned_count} | {_fmt(pt.harm_increase, True)} | "
            f"{_fmt(pt.random_harm_increase, True)} | {_fmt(pt.benign_loss_increase, True)} "
            f"(upper {_fmt(pt.benign_loss_increase_high, True)}) | "
            f"{_amount(pt.answer_drift, True)} (upper {_amount(pt.answer_drift_high, True)}) | "
            f"{'yes' if pt.passed else 'no: ' + '; '.join(pt.failures)} |"
            for pt in report.search
        )
        search = (
            "\n## Operating-point search (validation set)\n\nMeasured on the validation prompts, "
            "never on the test prompts above; a candidate passes when the upper bounds of its "
            "benign figures' 95% intervals keep the thresholds.\n\n| q | pruned | harm loss rise "
            "| random control | "
            "benign loss rise | answer drift | passes |\n|---|---|---|---|---|---|---|\n"
            f"{search_rows}\n\n![trade-off]({TRADEOFF_PNG})\n"
        )
    tamper_section = ""
    if report.tamper is not None:
        tamper_section = render_tamper_section(report.tamper) + "\n"
    return f"""---
{yaml.safe_dump(card_metadata(report, base_config), sort_keys=False).strip()}
---

# {src.reference}, hardened with harmprune ({report.inputs.domain})

Outcome: {verdict}

harmprune removed **{report.pruned_count:,}** of {report.scored_count:,} scored weights
({report.pruned_fraction:.6%}) of `{base}`: the weights whose removal most raises the model's loss on
harmful answers (B-TAP attribution, arXiv 2604.09544), minus those most needed for benign answers.
Pruned weights are set to zero; `harmprune-mask.safetensors` holds their indices and original values
(`harmprune restore` undoes the change bit for bit). Settings: q={report.inputs.q:g},
p={report.inputs.p:g}, selection={report.inputs.selection}, preserve score={report.inputs.preserve_score},
seed={report.inputs.seed}, spec sha256 `{report.inputs.spec_hash[:16]}`.{_source_sentence(report, base_config)}

## What was measured

Three disjoint prompt sets: **calibration** (attribution only), **validation** (chose the operating
point) and **test** (every number below; it chose nothing). {_sets_sentence(report)}
Harm `nll` is the loss of the original model's harmful answers (higher = those
answers are less probable under the model; a loss, not a behaviour); harm `refusal` is the
compliance rate of the model's own answers, judged on every harmful test prompt; attacks: `plain` request and
`prefill` (answer forced to start with a compliance prefix). Benign: loss of reference answers,
share of the original's greedy answer tokens that stay the model's own greedy choice, refusal rate on benign prompts. Harm
recognition: accuracy at answering whether a request is harmful.

{table}

{_evidence_section(report)}{_gates_section(report)}{_standard_harm_section(report)}{_general_benign_section(report)}{_benchmarks_section(report)}
{search}
{tamper_section}{card_attacks.render_section(report.attacks)}{binding.render_section(report.binding)}## Where the pruned weights are

![pruned per layer]({LAYERS_PNG})

The full per-matrix breakdown, inputs, library versions and timings are in `report.json`.
"""


def render_plots(report: Report, directory: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if report.search:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [pt.benign_loss_increase * 100 for pt in report.search]
        ax.plot(xs, [pt.harm_increase * 100 for pt in report.search], "o-", label="harmprune")
        ax.plot(
            [pt.random_benign_loss_increase * 100 for pt in report.search],
            [pt.random_harm_increase * 100 for pt in report.search],
            "s--",
            label="random, same count",
        )
        for pt, x in zip(report.search, xs, strict=True):
            ax.annotate(f"q={pt.q:g}", (x, pt.harm_increase * 100), fontsize=7)
        ax.set_xlabel("benign loss rise (%)")
        ax.set_ylabel("held-out harmful loss rise (%)")
        ax.set_title("Harm removed vs benign cost")
        ax.legend()
        fig.tight_layout()
        fig.savefig(directory / TRADEOFF_PNG, dpi=100)
        plt.close(fig)
        written.append(TRADEOFF_PNG)
    layers = sorted({m.layer for m in report.modules if m.layer is not None})
    kinds = sorted({m.kind for m in report.modules})
    if layers:
        fig, ax = plt.subplots(figsize=(7, 4))
        bottom = [0] * len(layers)
        for kind in kinds:
            counts = [
                sum(m.pruned for m in report.modules if m.layer == layer and m.kind == kind)
                for layer in layers
            ]
            ax.bar(layers, counts, bottom=bottom, label=kind)
            bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("pruned weights")
        ax.set_title("Pruned weights per layer and module")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(directory / LAYERS_PNG, dpi=100)
        plt.close(fig)
        written.append(LAYERS_PNG)
    return written


# ---------------------------------------------------------------- tamper check


def plot_tamper(result: TamperResult, path: Path) -> Path:
    """Grouped bars: harm before/after the attack for each model, in-domain and broad."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["original", "hardened", "random\ncontrol"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=False)
    width = 0.38
    for ax, (scope, title) in zip(
        axes,
        (("in_domain", "In-domain harm"), ("broad", "Broad harm (other categories)")),
        strict=True,
    ):
        xs = range(len(TAMPER_MODELS))
        for offset, phase, colour in (
            (-width / 2, "before", "#8da0cb"),
            (width / 2, "after", "#fc8d62"),
        ):
            values = [
                getattr(getattr(result.model(n), phase), f"harm_{scope}") for n in TAMPER_MODELS
            ]
            bars = ax.bar(
                [x + offset for x in xs], values, width, label=f"{phase} attack", color=colour
            )
            ax.bar_label(bars, fmt="%.3f", fontsize=7)
        ax.set_xticks(list(xs), labels)
        ax.set_title(title)
        ax.set_ylabel("harm: exp(-NLL) of harmful answers")
        ax.legend(fontsize=8)
    s = result.settings
    fig.suptitle(
        f"Tamper check: {s.method} fine-tune, {s.steps} steps, lr {s.lr:g} "
        f"(hardening reduction, broad: {result.hardening_reduction:+.1%})",
        fontsize=9,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _f4(x: float | None, pct: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:+.1%}" if pct else f"{x:.4f}"


def render_tamper_section(result: TamperResult, plot_name: str = TAMPER_PNG) -> str:
    """Markdown for the model card (a `## Tamper check` section)."""
    s = result.settings
    rows = []
    for name, label in zip(
        TAMPER_MODELS, ("Model", "Hardened", "Random pruning, same count"), strict=True
    ):
        m = result.model(name)
        rows.append(
            f"| {label} | {_f4(m.before.harm_in_domain)} | {_f4(m.after.harm_in_domain)} | "
            f"{_f4(m.before.harm_broad)} | {_f4(m.after.harm_broad)} | "
            f"{_f4(m.before.compliance_broad)} | {_f4(m.after.compliance_broad)} | "
            f"{_f4(m.before.benign_loss_broad)} | {_f4(m.after.benign_loss_broad)} |"
        )
    threshold = (
        f"Threshold: broad harm after the attack at most {result.max_broad_harm_ratio:g} of the "
        f"original's: **{'held' if result.passed else 'missed'}**."
        if result.max_broad_harm_ratio is not None
        else "No threshold was set for this check."
    )
    lora = f", rank {s.rank}, alpha {s.alpha}" if s.method == "lora" else ""
    return f"""
## Tamper check

Each model was fine-tuned with the same attack ({s.method}{lora}, {s.steps} steps, lr {s.lr:g},
batch {s.batch_size}, seed {s.seed}; {s.train_pairs} narrow-domain training pairs; identical batch
order: {"yes" if result.identical_attack else "NO"}), then measured on {s.in_domain_items} held-out
in-domain requests ({s.in_domain_source}) and on broad prompts outside the domain
({s.broad_harmful_items} harmful of other categories, {s.broad_benign_items} benign free-form).
Harm = {result.harm_measure}. Compliance = share of plain harmful requests answered without a
refusal. The published weights are the hardened model's, never an attacked one.

| | in-domain harm, before | after | broad harm, before | after | broad compliance, before | after | benign loss, before | after |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

After the attack, the hardened model keeps {_f4(result.broad_harm_ratio)} of the original's broad
harm (reduction {_f4(result.hardening_reduction, True)}; random control
{_f4(result.random_reduction, True)}; in-domain {_f4(result.hardening_reduction_in_domain, True)}).
{threshold}

![tamper check]({plot_name})
"""


def write_card(report: Report, directory: Path, base_config: Any = None) -> None:
    render_plots(report, directory)
    if report.tamper is not None:
        plot_tamper(report.tamper, directory / TAMPER_PNG)
    card_attacks.write_plot(report.attacks, directory)
    (directory / CARD_FILE).write_text(render_card(report, base_config))
