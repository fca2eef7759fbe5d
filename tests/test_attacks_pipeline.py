"""Attacks through the pipeline (issue #14): a missed attack threshold rejects the job, the
report and card carry the section, and --attacks on the CLI turns the attacks on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from harmprune import pipeline
from harmprune.cli.main import build_config, build_parser
from harmprune.inputs import preflight
from harmprune.output.card_attacks import ATTACKS_PNG
from harmprune.settings import Settings

from tests.conftest import tiny_job_config

REPO = Path(__file__).resolve().parent.parent
TINY_ATTACKS = {
    "abliteration": {"generation": False, "max_harm_after_attack": 1e-9},
    "finetune": {"learning_rates": [1e-3], "steps": [1, 2], "rank": 4, "batch_size": 2},
}


def test_a_missed_attack_threshold_rejects_the_job(
    tiny_model_dir: Any, domain_spec_path: Path, tmp_path: Path
) -> None:
    raw = yaml.safe_load(domain_spec_path.read_text())
    raw["attacks"] = TINY_ATTACKS
    config = tiny_job_config(tiny_model_dir("llama"), raw)
    out = tmp_path / "out"
    report = pipeline.run(config, Settings(cache_dir=tmp_path / "cache"), out)
    assert report.outcome == "rejected"
    assert "abliteration attack" in report.outcome_reason, report.outcome_reason
    attacks = report.attacks
    assert attacks is not None and not attacks.passed
    assert attacks.abliteration is not None and not attacks.abliteration.passed
    assert attacks.finetune is not None and attacks.finetune.passed  # no threshold set
    assert len(attacks.finetune.cells["hardened"]) == 2
    # the grid's worst case is chosen on a validation set made for it; q stays fixed
    assert all(c.validation is not None for c in attacks.finetune.cells["hardened"])
    assert report.heldout.q_chosen_on == "none" and not report.search
    assert "seeded" in report.heldout.made_by["validation"]
    assert not list(out.glob("*.safetensors")), "a rejected job must not publish weights"
    card = (out / "README.md").read_text()
    assert "## Attacks" in card and "**missed**" in card
    assert (out / ATTACKS_PNG).stat().st_size > 5000
    assert "attacks" in report.timings_s


def test_cli_flag_turns_attacks_on_and_preflight_prices_them(
    tiny_model_dir: Any, domain_spec_path: Path, tmp_path: Path
) -> None:
    args = build_parser().parse_args(
        [
            "harden",
            "--model",
            str(tiny_model_dir("llama")),
            "--domain",
            str(domain_spec_path),
            "--out",
            str(tmp_path / "o"),
            "--attacks",
            "abliteration,finetune",
        ]
    )
    config = build_config(args)
    assert config.domain.attacks is not None
    assert config.domain.attacks.abliteration is not None
    assert config.domain.attacks.finetune is not None
    est = preflight.estimate_job(
        config, tiny_model_dir("llama"), devices=0, device_memory_gb=0, device_kind="cpu"
    )
    assert est.attacks is not None and est.attacks["finetune_cells"] == 4
    assert est.attacks["abliteration_memory_gb"] is not None
    plain = build_config(build_parser().parse_args(args_without_attacks(args)))
    assert plain.domain.attacks is None


def args_without_attacks(args: Any) -> list[str]:
    return ["harden", "--model", args.model, "--domain", args.domain, "--out", str(args.out)]


def test_example_domain_with_attacks_validates() -> None:
    from harmprune.inputs.config import load_domain

    spec = load_domain(REPO / "examples" / "domains" / "cyber-attacks.yaml")
    assert spec.attacks is not None
    assert spec.attacks.abliteration is not None and spec.attacks.finetune is not None
    assert len(spec.attacks.finetune.cells()) == 4
