"""The whole job on tiny models: counts, report.json, reload, tied embeddings, restore."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from harmprune import pipeline
from harmprune.cli.main import main
from harmprune.inputs.config import HardenConfig, load_domain
from harmprune.method.pruning import MASK_FILE, apply_pruning, load_mask
from harmprune.settings import Settings
from transformers import AutoModelForCausalLM

PIPELINE_ARCHS = ["llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "gpt_neox"]
TIED = {"llama", "gpt2", "gemma"}
PROBE = "<|bos|><|user|>What is 2+2?<|assistant|>Four, and"


def load(path: Path) -> Any:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


def logits(model: Any, tokenizer: Any) -> torch.Tensor:
    ids = tokenizer(PROBE, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


@pytest.fixture
def harden(
    tiny_model_dir: Any, domain_spec_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Any:
    """Run the pipeline; return (report, out dir, the in-memory model that was saved)."""

    def go(
        arch: str, domain: Any = None, out_name: str | None = None, **config_kw: Any
    ) -> tuple[Any, Path, Any]:
        saved: dict[str, Any] = {}
        real_save = pipeline.save_checkpoint

        def save_and_keep(model: Any, *args: Any, **kw: Any) -> None:
            saved["model"] = model  # the in-memory pruned model (`run` does not return it)
            real_save(model, *args, **kw)

        monkeypatch.setattr(pipeline, "save_checkpoint", save_and_keep)
        config = HardenConfig(
            model=str(tiny_model_dir(arch)),
            domain=domain or load_domain(domain_spec_path),
            device="cpu",
            dtype="float32",
            batch_size=2,
            **config_kw,
        )
        out = tmp_path / (out_name or f"hardened-{arch}")
        report = pipeline.run(config, Settings(cache_dir=tmp_path / "cache"), out)
        assert report.outcome == "accepted", report.outcome_reason
        return report, out, saved["model"]

    return go


@pytest.mark.parametrize("arch", PIPELINE_ARCHS)
def test_pipeline_end_to_end(
    arch: str, harden: Any, tiny_model_dir: Any, tokenizer: Any, tmp_path: Path
) -> None:
    report, out, in_memory = harden(arch)
    source = tiny_model_dir(arch)

    # ---- report
    assert report.pruned_count > 0
    on_disk = json.loads((out / "report.json").read_text())
    assert isinstance(on_disk["pruned_count"], int) and isinstance(on_disk["scored_count"], int)
    assert on_disk["pruned_count"] == report.pruned_count
    assert on_disk["scored_count"] == report.scored_count
    assert sum(m["pruned"] for m in on_disk["modules"]) == report.pruned_count
    assert sum(m["scored"] for m in on_disk["modules"]) == report.scored_count
    assert not list(tmp_path.glob(f".{out.name}.*"))  # no staging left behind

    # ---- the checkpoint: exactly the mask's weights were zeroed, nothing else moved
    original = load(source)
    hardened = load(out)
    mask = load_mask(out / MASK_FILE)
    assert mask.count == report.pruned_count
    orig_state, hard_state = original.state_dict(), hardened.state_dict()
    assert orig_state.keys() == hard_state.keys()
    zeros_introduced = 0
    for name, before in orig_state.items():
        after = hard_state[name]
        changed = torch.nonzero((after != before).reshape(-1)).flatten()
        if name in mask.entries:
            idx, values = mask.entries[name]
            assert torch.equal(changed, idx), name
            assert torch.equal(values, before.reshape(-1)[idx]), name
        else:
            assert changed.numel() == 0, name
        zeros_introduced += int(((after == 0) & (before != 0)).sum())
    assert zeros_introduced == report.pruned_count == mask.count

    # ---- reload == the in-memory pruned model, and == original + mask
    expected = logits(in_memory, tokenizer)
    assert torch.equal(logits(hardened, tokenizer), expected)
    rebuilt = load(source)
    apply_pruning(dict(rebuilt.named_parameters()), {n: i for n, (i, _) in mask.entries.items()})
    assert torch.equal(logits(rebuilt, tokenizer), expected)
    assert not torch.equal(logits(original, tokenizer), expected)

    # ---- tied embeddings stay tied
    if arch in TIED:
        assert hardened.config.tie_word_embeddings
        assert (
            hardened.get_input_embeddings().weight.data_ptr()
            == hardened.get_output_embeddings().weight.data_ptr()
        )

    # ---- restore gives back the original, bit for bit
    restored_dir = tmp_path / f"restored-{arch}"
    assert main(["restore", "--checkpoint", str(out), "--out", str(restored_dir)]) == 0
    restored = load(restored_dir)
    restored_state = restored.state_dict()
    assert restored_state.keys() == orig_state.keys()
    for name, t in orig_state.items():
        assert restored_state[name].dtype == t.dtype, name
        assert torch.equal(restored_state[name].view(torch.uint8), t.view(torch.uint8)), name
    if arch in TIED:
        assert (
            restored.get_input_embeddings().weight.data_ptr()
            == restored.get_output_embeddings().weight.data_ptr()
        )


def test_pipeline_global_selection_and_abs_mean(harden: Any, domain_spec_path: Path) -> None:
    spec = load_domain(domain_spec_path)
    pruning = spec.pruning.model_copy(update={"selection": "global", "preserve_score": "abs_mean"})
    report, out, _ = harden("qwen2", domain=spec.model_copy(update={"pruning": pruning}))
    assert (report.inputs.selection, report.inputs.preserve_score) == ("global", "abs_mean")
    assert report.pruned_count == load_mask(out / MASK_FILE).count > 0
    # one ranking over all scored weights: q of the total are candidates, spread unevenly (a
    # per-matrix selection would give every matrix exactly its own q share)
    from harmprune.method.selection import count_for

    q = spec.pruning.q
    assert sum(m.candidates for m in report.modules) == count_for(q, report.scored_count)
    assert any(m.candidates != count_for(q, m.scored) for m in report.modules)


def test_pipeline_is_deterministic(harden: Any) -> None:
    first, out1, _ = harden("gpt2", out_name="first")
    second, out2, _ = harden("gpt2", out_name="second")
    m1, m2 = load_mask(out1 / MASK_FILE), load_mask(out2 / MASK_FILE)
    assert first.pruned_count == second.pruned_count
    assert m1.entries.keys() == m2.entries.keys()
    for n in m1.entries:
        assert torch.equal(m1.entries[n][0], m2.entries[n][0])


def test_gradient_checkpointing_prunes_the_same_weights(
    harden: Any, domain_spec_path: Path
) -> None:
    """Recomputed blocks (with a token cap that slices the batch) select the very same mask;
    the report says the attribution recomputed. On the CPU `auto` leaves it off."""
    plain, out1, _ = harden("llama", out_name="plain")
    recomputed, out2, _ = harden(
        "llama", out_name="recomputed", gradient_checkpointing="on", max_backward_tokens=16
    )
    assert not plain.inputs.gradient_checkpointing and recomputed.inputs.gradient_checkpointing
    m1, m2 = load_mask(out1 / MASK_FILE), load_mask(out2 / MASK_FILE)
    assert plain.pruned_count == recomputed.pruned_count > 0
    assert m1.entries.keys() == m2.entries.keys()
    for n in m1.entries:
        assert torch.equal(m1.entries[n][0], m2.entries[n][0]), n
    # and the CLI flag reaches the job's config
    from harmprune.cli.main import build_config, build_parser

    argv = ["harden", "--model", "m", "--domain", str(domain_spec_path), "--out", "o"]
    argv += ["--gradient-checkpointing", "on", "--max-backward-tokens", "0"]
    args = build_parser().parse_args(argv)
    config = build_config(args)
    assert (config.gradient_checkpointing, config.max_backward_tokens) == ("on", None)
