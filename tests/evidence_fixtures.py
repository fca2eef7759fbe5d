"""Tiny domains whose calibration, validation and test prompts are disjoint (the engine refuses
a spec whose held-out prompts repeat calibration prompts).

The held-out prompts reword the calibration prompts and keep their given answers, so that pruning
the top harm weights of a random model still raises the held-out harmful loss (first order) and
the mechanics tests reach an accepted job.
"""

from __future__ import annotations

import copy
from typing import Any

from tests.conftest import TINY_BENIGN_GIVEN, TINY_DOMAIN, TINY_HARMFUL_GIVEN, reword


def reworded(pairs: list[dict[str, Any]], suffix: str) -> list[dict[str, Any]]:
    """The prompts reworded for the `suffix` set (conftest.REWORDED): not near-duplicates."""
    return reword(pairs, suffix)


def disjoint_domain(**changes: Any) -> dict[str, Any]:
    """TINY_DOMAIN with reworded test (and validation) prompts; `changes` override top keys."""
    raw = copy.deepcopy(TINY_DOMAIN)
    raw["eval"] = {
        **raw["eval"],
        "harmful": reworded(TINY_HARMFUL_GIVEN, "test"),
        "benign": reworded(TINY_BENIGN_GIVEN, "test"),
        "validation": {
            "harmful": reworded(TINY_HARMFUL_GIVEN, "validation"),
            "benign": reworded(TINY_BENIGN_GIVEN, "validation"),
        },
    }
    raw.update(changes)
    return raw


def bos_tokenizer() -> Any:
    """The tests' byte-level tokenizer, made to add BOS like Llama's, Gemma's or Mistral's."""
    from tokenizers import processors

    from tests.conftest import make_tokenizer

    tok = make_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A",
        pair="<|bos|> $A <|bos|> $B",
        special_tokens=[("<|bos|>", tok.bos_token_id)],
    )
    return tok
