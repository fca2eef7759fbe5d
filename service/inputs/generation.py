"""Batched greedy generation: left padding, KV cache, stop at EOS.

Prompts are sorted by length so each batch pads little, and answers come back in input order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def generate_greedy(
    model: Any,
    tokenizer: Any,
    contexts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    on_step: Callable[[int, int], None] | None = None,
    add_special_tokens: bool = False,
    max_context_tokens: int | None = None,
    on_cut: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy continuations of already formatted contexts.

    `add_special_tokens`: let the tokenizer add its own (BOS) tokens, as scoring does for the
    plain prompt format (`data.context_ids`); a chat template writes its special tokens itself.
    `max_context_tokens`: a longer context keeps only its last that many tokens (scoring cuts
    contexts from the left too); `on_cut(i)` is told of each context cut.
    """
    if not contexts:
        return []
    encoded = [tokenizer(c, add_special_tokens=add_special_tokens)["input_ids"] for c in contexts]
    if max_context_tokens is not None:
        for i, ids in enumerate(encoded):
            if len(ids) > max_context_tokens:
                encoded[i] = ids[-max_context_tokens:]
                if on_cut is not None:
                    on_cut(i)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    pad_id = tokenizer.pad_token_id
    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    done = 0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(encoded[i])
            ids[row, width - n :] = torch.tensor(encoded[i])
            mask[row, width - n :] = 1
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad_id,
                eos_token_id=eos,
                use_cache=True,
            )
        for row, i in enumerate(batch):
            answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True)
        done += len(batch)
        if on_step:
            on_step(done, len(order))
    return answers


def _eos_ids(model: Any, tokenizer: Any) -> list[int] | None:
    ids: list[int] = []
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.append(configured)
    elif configured:
        ids.extend(configured)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids or None
