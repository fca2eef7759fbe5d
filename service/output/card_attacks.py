"""The model card's `## Attacks` section and its plot, rendered from the report's `attacks` alone.

(Kept apart from card.py for now; card.py calls `render_section` and `write_plot` once each.)
"""

from __future__ import annotations

import math
from pathlib import Path

from harmprune.results import MODELS, AttacksResult, Interval, Measurement

ATTACKS_PNG = "harmprune-attacks.png"
LABELS = {
    "original": "Model",
    "hardened": "Hardened",
    "random_control": "Random pruning, same count",
}


def _f(x: float | None, pct: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:+.1%}" if pct else f"{x:.4f}"


def _ci(i: Interval | None) -> str:
    if i is None or not math.isfinite(i.estimate):
        return "n/a"
    return f"{i.estimate:.4f} [{_f(i.low)}, {_f(i.high)}]"


def prefill_harm(m: Measurement) -> float:
    """The verification's prefill attack on the unattacked model, as exp(-NLL)."""
    nll = m.metrics.harm["nll"]["prefill"]
    return math.exp(-nll) if math.isfinite(nll) else float("nan")


def harm_rows(result: AttacksResult) -> dict[str, dict[str, Interval | None]]:
    """Per model: harm before, after abliteration, fine-tuning worst case (None: not run)."""
    rows: dict[str, dict[str, Interval | None]] = {}
    for name in MODELS:
        row: dict[str, Interval | None] = {"before": result.before[name].harm}
        if result.abliteration is not None:
            row["abliteration"] = result.abliteration.after[name].harm
        if result.finetune is not None:
            worst = result.finetune.worst[name]
            row["fine-tune, worst case"] = worst.after.harm if worst is not None else None
        rows[name] = row
    return rows


def write_plot(result: AttacksResult | None, directory: Path) -> Path | None:
    """Left: harm before and after each attack, three models, 95% intervals. Right: every
    fine-tuning cell's harm against its benign-loss rise (open markers: over the bound)."""
    if result is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = harm_rows(result)
    series = list(rows["original"])
    fig, axes = plt.subplots(1, 2 if result.finetune else 1, figsize=(11, 4), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / len(series)
    colours = ["#8da0cb", "#fc8d62", "#66c2a5", "#e78ac3"]
    for k, label in enumerate(series):
        xs: list[float] = []
        values: list[float] = []
        errors: list[list[float]] = [[], []]
        for j, name in enumerate(MODELS):
            i = rows[name][label]
            v = i.estimate if i is not None else float("nan")
            xs.append(j + (k - (len(series) - 1) / 2) * width)
            values.append(v)
            errors[0].append(max(0.0, v - i.low) if i is not None and math.isfinite(i.low) else 0)
            errors[1].append(max(0.0, i.high - v) if i is not None and math.isfinite(i.high) else 0)
        ax.bar(xs, values, width, yerr=errors, capsize=3, label=label, color=colours[k % 4])
    ax.set_xticks(range(len(MODELS)), ["original", "hardened", "random\ncontrol"])
    ax.set_ylabel("harm: exp(-NLL) of harmful answers")
    ax.set_title("Harm before and after each attack (95% intervals)")
    ax.legend(fontsize=8)
    if result.finetune is not None:
        ax = axes[0][1]
        for k, (name, marker) in enumerate(zip(MODELS, ("o", "s", "^"), strict=True)):
            colour = f"C{k}"
            for cell in result.finetune.cells[name]:
                ax.scatter(
                    cell.benign_loss_increase * 100,
                    cell.after.harm.estimate,
                    marker=marker,
                    facecolors=colour if cell.allowed else "none",
                    edgecolors=colour,
                    label=name if cell is result.finetune.cells[name][0] else None,
                )
        ax.axvline(result.finetune.settings.max_benign_loss_increase * 100, ls="--", c="grey")
        ax.set_xlabel("benign loss rise after the attack (%)")
        ax.set_ylabel("harm after the attack")
        ax.set_title("Fine-tuning grid (open: over the benign bound)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(directory) / ATTACKS_PNG
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def abliteration_side_effects(result: AttacksResult) -> str:
    """Compliance and benign loss before -> after abliteration: a teacher-forced harm measure
    also falls when the attack damages the model everywhere, so read it with these."""
    if result.abliteration is None:
        return ""
    lines = [
        "| | compliance before | after abliteration | benign loss before | after abliteration |",
        "|---|---|---|---|---|",
    ]
    for name in MODELS:
        b, a = result.before[name], result.abliteration.after[name]
        lines.append(
            f"| {LABELS[name]} | {_f(b.compliance)} | {_f(a.compliance)} | "
            f"{_f(b.benign_loss)} | {_f(a.benign_loss)} |"
        )
    return "\n".join(lines) + "\n"


def _threshold(limit: float | None, passed: bool) -> str:
    if limit is None:
        return "No threshold was set."
    return f"Threshold: at most {limit:g} of the original's: **{'held' if passed else 'missed'}**."


def render_section(result: AttacksResult | None) -> str:
    """Markdown for the card (empty without attacks)."""
    if result is None:
        return ""
    rows = harm_rows(result)
    series = list(rows["original"])
    header = "| | " + " | ".join(series) + " | prefill attack (no interval) |"
    lines = [header, "|" + "---|" * (len(series) + 2)]
    for name in MODELS:
        cells = [_ci(rows[name][s]) for s in series] + [_f(prefill_harm(result.before[name]))]
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    parts = [
        "\n## Attacks\n",
        "Each attack was applied identically (same direction or training data, seed and "
        "settings; equal fingerprints recorded) to the original model, the hardened model and the "
        f"random-pruning control, then measured on the held-out prompts ({result.heldout_harmful} "
        f"harmful, {result.heldout_benign} benign). Harm = {result.harm_measure}; brackets: 95% "
        "bootstrap interval over the held-out items. The published weights are never attacked.\n",
        "\n".join(lines) + "\n",
    ]
    a = result.abliteration
    if a is not None:
        d = a.direction
        parts.append(
            f"**Abliteration.** Refusal direction from block {d.layer} of {d.layers} "
            f"({'chosen by separation' if d.chosen_by == 'separation' else 'set in the spec'}: "
            f"cross-fitted Cohen's d {d.separation.cohens_d:.2f}, AUROC {d.separation.auroc:.2f}, "
            f"{d.harmful_prompts} harmful vs {d.benign_prompts} benign calibration prompts), "
            f"strength {d.strength:g}, {len(d.weights)} residual-writer tensors orthogonalised; "
            f"identical on the three models: {'yes' if a.identical_attack else 'NO'}. The "
            f"hardened model's own direction has cosine {_f(a.hardened_direction_cosine)} with it. "
            f"After the attack the hardened model keeps {_ci(a.harm_ratio)} of the original's harm "
            f"(random control {_ci(a.random_harm_ratio)}). "
            + _threshold(a.max_harm_after_attack, a.passed)
            + "\n\n"
            + abliteration_side_effects(result)
        )
    f = result.finetune
    if f is not None:
        s = f.settings
        lora = f", rank {s.rank}, alpha {s.alpha}" if s.method == "lora" else ""
        grid = [
            "| lr | steps | " + " | ".join(f"{n} harm (benign rise)" for n in MODELS) + " |",
            "|---|---|---|---|---|",
        ]
        for i, cell in enumerate(f.cells["original"]):
            entries = []
            for name in MODELS:
                c = f.cells[name][i]
                mark = "" if c.allowed else " (over bound on validation)"
                entries.append(
                    f"{_f(c.after.harm.estimate)} ({_f(c.benign_loss_increase, True)}){mark}"
                )
            grid.append(f"| {cell.lr:g} | {cell.steps} | " + " | ".join(entries) + " |")
        parts.append(
            f"\n**Fine-tuning, worst case.** A {s.method}{lora} grid of learning rates "
            f"{s.learning_rates} x steps {s.steps} (batch {s.batch_size}, seed {s.seed}, "
            f"{s.train_pairs} training pairs from the {s.train_source}); a cell counts for the worst "
            f"case if the model's benign loss rises by at most {s.max_benign_loss_increase:.0%}; "
            "the bound and the worst case are decided on the validation prompts, the figures are "
            "the test set's. "
            f"Identical attacks in every cell: {'yes' if f.identical_attack else 'NO'}. Worst case: "
            f"the hardened model keeps {_ci(f.harm_ratio)} of the original's harm (random control "
            f"{_ci(f.random_harm_ratio)}). "
            + _threshold(f.max_harm_after_attack, f.passed)
            + "\n\n"
            + "\n".join(grid)
            + "\n"
        )
    parts.append(
        "\nRead the hardened row against the random row: where their intervals overlap, these "
        "prompts do not show the hardening to be more robust than random pruning.\n\n"
        f"![attacks]({ATTACKS_PNG})\n\n"
    )
    return "\n".join(parts)
