"""End to end: the installed `harmprune` console script hardens the real SmolLM2-135M-Instruct,
given as the `.gguf` file a user downloads (the `smollm2-135m-instruct` alias of `make demo`
resolves to the same file; the service end-to-end test uses the alias).

All tests here read the session's one run (`smollm2_run` in tests/conftest.py: a test-sized
version of the cyber example domain); the first of them pays for it (minutes on 2 CPU cores),
hence the long timeouts."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from harmprune.method.pruning import MASK_FILE, load_mask
from harmprune.output.report_json import load_report
from safetensors.torch import load_file

from tests.conftest import SmolLM2Run
from tests.support.smollm2 import run_cli

# The first test here runs the session's SmolLM2 job inside its own time limit.
# `make test` runs a module's tests in one process (--dist loadfile): the run is made once.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's safetensors files (one or many shards)."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        if shard.name != MASK_FILE:
            tensors.update(load_file(shard))
    return tensors


def test_harden_exits_0_and_prints_the_summary(smollm2_run: SmolLM2Run) -> None:
    run = smollm2_run.run
    assert run.returncode == 0, run.explain()
    report = json.loads((smollm2_run.out / "report.json").read_text())
    assert f"-> {report['outcome']}" in run.stdout
    assert f"weights pruned: {report['pruned_count']:,}" in run.stdout
    assert f"weights scored: {report['scored_count']:,}" in run.stdout
    per_layer = re.search(r"pruned per layer: (.*)", run.stdout)
    assert per_layer is not None
    counts = [int(x.split(":")[1]) for x in per_layer.group(1).split()]
    assert sum(counts) == sum(m["pruned"] for m in report["modules"] if m["layer"] is not None)
    assert not list(smollm2_run.out.parent.glob(".hardened.*")), "staging left behind"


def test_report_fits_the_schema_and_is_accepted(smollm2_run: SmolLM2Run) -> None:
    assert smollm2_run.run.returncode == 0, smollm2_run.run.explain()
    report = load_report((smollm2_run.out / "report.json").read_text())
    assert report.outcome == "accepted", report.outcome_reason
    assert report.inputs.model.kind == "gguf"
    assert report.inputs.model.reference == smollm2_run.gguf.name
    assert report.inputs.domain == "cyber-test"
    assert report.inputs.device == "cpu"
    assert 0 < report.pruned_count < report.scored_count
    assert report.pruned_fraction == pytest.approx(report.pruned_count / report.scored_count)
    assert sum(m.pruned for m in report.modules) == report.pruned_count
    assert sum(m.scored for m in report.modules) == report.scored_count
    # 4 harmful answers elicited from the model, 1 given; benign answers all given
    assert report.calibration.harmful_pairs == 5 and report.calibration.harmful_elicited == 4
    assert report.calibration.benign_pairs == 4 and report.calibration.benign_elicited == 0
    assert report.heldout.source == "spec"
    assert (report.heldout.harmful, report.heldout.benign) == (4, 4)
    for name in ("original", "hardened", "random_control"):
        metrics = getattr(report.metrics, name)
        assert metrics is not None, name
        for field, value in metrics.model_dump().items():
            if isinstance(value, float):
                assert math.isfinite(value), (name, field, value)
    # what the hardening did, measured (the run is accepted under the example's thresholds;
    # measured: x3.4 and x0.99): the harmful answers became much less likely, and not because
    # any pruning of as many weights would do that
    original, hardened = report.metrics.original, report.metrics.hardened
    random_control = report.metrics.random_control
    assert hardened is not None and random_control is not None
    prefill = original.harm["nll"]["prefill"]
    assert hardened.harm["nll"]["prefill"] > 2 * prefill
    assert abs(random_control.harm["nll"]["prefill"] - prefill) < 0.1 * prefill
    assert hardened.benign_loss < 1.05 * original.benign_loss
    # the mask holds exactly the pruned weights
    mask = load_mask(smollm2_run.out / MASK_FILE)
    assert mask.count == report.pruned_count


def test_checkpoint_loads_with_tied_embeddings_and_generates(smollm2_run: SmolLM2Run) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert smollm2_run.run.returncode == 0, smollm2_run.run.explain()
    model = AutoModelForCausalLM.from_pretrained(smollm2_run.out)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_run.out)
    assert model.config.tie_word_embeddings
    assert (
        model.get_input_embeddings().weight.data_ptr()
        == model.get_output_embeddings().weight.data_ptr()
    )
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        generated = model.generate(**ids, max_new_tokens=8, do_sample=False)
    new_tokens = generated[0, ids["input_ids"].shape[1] :]
    assert new_tokens.numel() > 0
    assert "Paris" in tokenizer.decode(new_tokens, skip_special_tokens=True)


def test_hardened_weights_are_the_original_with_the_mask_applied(
    smollm2_run: SmolLM2Run, smollm2_original: Path
) -> None:
    assert smollm2_run.run.returncode == 0, smollm2_run.run.explain()
    original, hardened = weights(smollm2_original), weights(smollm2_run.out)
    assert original.keys() == hardened.keys()
    mask = load_mask(smollm2_run.out / MASK_FILE)
    changed = 0
    for name, tensor in original.items():
        got = hardened[name]
        if name in mask.entries:
            idx, values = mask.entries[name]
            flat = tensor.flatten()
            assert torch.equal(flat[idx], values), f"{name}: the mask keeps other values"
            assert torch.all(got.flatten()[idx] == 0), f"{name}: a masked weight is not zero"
            expected = flat.clone()
            expected[idx] = 0
            assert torch.equal(got.flatten(), expected), f"{name}: unmasked weights changed"
            changed += int((flat[idx] != 0).sum())
        else:
            assert torch.equal(got, tensor), f"{name} changed but is not in the mask"
    assert changed > 0


def test_restore_gives_back_the_original_bit_for_bit(
    smollm2_run: SmolLM2Run, smollm2_original: Path, tmp_path: Path
) -> None:
    assert smollm2_run.run.returncode == 0, smollm2_run.run.explain()
    restored = tmp_path / "restored"
    run = run_cli(["restore", "--checkpoint", str(smollm2_run.out), "--out", str(restored)])
    assert run.returncode == 0, run.explain()
    assert f"restored original weights into {restored}" in run.stdout
    original, got = weights(smollm2_original), weights(restored)
    assert original.keys() == got.keys()
    for name, tensor in original.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), f"{name} differs from the original"
    assert not (restored / MASK_FILE).exists()


def test_model_card_names_the_source_and_the_outcome(smollm2_run: SmolLM2Run) -> None:
    assert smollm2_run.run.returncode == 0, smollm2_run.run.explain()
    card = (smollm2_run.out / "README.md").read_text()
    report = json.loads((smollm2_run.out / "report.json").read_text())
    assert card.startswith("---\n")
    assert "library_name: transformers" in card
    assert f"# {smollm2_run.gguf.name}, hardened with harmprune (cyber-test)" in card
    assert "Outcome: **accepted**: every gate held, each decided on an interval bound" in card
    assert "**Indicative only**" in card  # a test-sized spec (allow_small_test)
    assert "GGUF file" in card and "quantisation" in card
    assert f"{report['pruned_count']:,}" in card
    assert str(smollm2_run.out.parent) not in card  # no local paths


def test_the_unsigned_checkpoint_audits_against_the_gguf_base(
    smollm2_run: SmolLM2Run, smollm2_cache_dir: Path
) -> None:
    """`harmprune audit` finds the base by the GGUF sha256 the report records and checks every
    tensor: SmolLM2 with exactly the masked weights zeroed. No key was given: the card says
    unsigned (without --allow-unsigned that fails: tests/test_audit.py)."""
    from harmprune.audit.checks import run_audit
    from harmprune.settings import Settings

    assert smollm2_run.run.returncode == 0, smollm2_run.run.explain()
    settings = Settings(cache_dir=smollm2_cache_dir)
    verdict = run_audit(str(smollm2_run.out), allow_unsigned=True, settings=settings)
    assert verdict.passed, verdict.model_dump_json(indent=2)
    weights = next(c for c in verdict.checks if c.name == "weights")
    assert weights.data["tensors"] >= 272 and weights.data["outside_mask"] == 0
    assert "**unsigned**" in (smollm2_run.out / "README.md").read_text()
    assert verdict.checks[0].detail == "unsigned (allowed: --allow-unsigned)"
