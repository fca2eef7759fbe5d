"""Generation inputs are cut to the spec's max_length tokens (issue 20, finding 5): a 1.9 MB prompt
reached `generate` as 20,003 tokens and defeated the memory plan. The report and the card say how
many inputs were cut."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from harmprune import pipeline
from harmprune.inputs import data
from harmprune.output import card
from harmprune.settings import Settings

from tests.conftest import TINY_DOMAIN, tiny_job_config
from tests.tiny_models import build_model

LONG = "Explain, in great detail and at length, " + "why the sky is blue and " * 100 + "why?"


def spy_on_generate(model: Any) -> list[int]:
    """The width of every batch `model.generate` receives."""
    widths: list[int] = []
    real = model.generate

    def spy(**kw: Any) -> Any:
        widths.append(int(kw["input_ids"].shape[1]))
        return real(**kw)

    model.generate = spy
    return widths


def test_generation_inputs_are_cut_to_the_budget(tokenizer: Any) -> None:
    model = build_model("llama", tokenizer)
    widths = spy_on_generate(model)
    long_context = data.format_context(tokenizer, LONG, "chat")
    assert len(tokenizer(long_context, add_special_tokens=False)["input_ids"]) > 1000
    short = data.format_context(tokenizer, "Hi?", "chat")
    with data.generation_budget(64) as budget:
        data.generate(
            model, tokenizer, [long_context, short], "chat", max_new_tokens=2, batch_size=2
        )
        data.generate(model, tokenizer, [long_context], "chat", max_new_tokens=2, batch_size=1)
        assert data.contexts_cut() == 1 and len(budget.cut) == 1  # the same input, counted once
    assert widths == [64, 64]
    data.generate(model, tokenizer, [short], "chat", max_new_tokens=2, batch_size=1)
    assert data.contexts_cut() == 0  # outside a job's budget nothing is counted (or cut)


def test_a_job_cuts_long_prompts_and_says_so(tiny_model_dir: Any, tmp_path: Path) -> None:
    spec = copy.deepcopy(TINY_DOMAIN)
    spec["eval"]["harmful"].append({"prompt": LONG})  # elicited from the model: generated
    spec["eval"] |= {"general_benign": False, "controls": {"random_seeds": 1}}
    config = tiny_job_config(tiny_model_dir("llama"), spec)
    report = pipeline.run(config, Settings(cache_dir=tmp_path / "cache"), tmp_path / "out")
    assert report.prompts_cut >= 1
    text = card.render_card(report)
    assert (
        f"{report.prompts_cut} generation input(s) were longer than the spec's max_length" in text
    )
    assert data.contexts_cut() == 0  # the budget ends with the job
