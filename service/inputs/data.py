"""Stage 2, calibration data: resolve the spec's sources into pairs, elicit missing responses,
and tokenize them with the loss on response tokens only.

A harmful example without a response is completed by the model itself: its answer is forced to
start with a compliance prefix and continued greedily (the paper's self-generated responses).
The prefix is part of the context, never of the scored response.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from harmprune.errors import CalibrationError, SpecError
from harmprune.inputs.config import DomainSpec, Elicitation, HubDataset, Pair, Source
from harmprune.inputs.generation import generate_greedy
from harmprune.inputs.references import Grant, Permit
from harmprune.vocabulary import normalise_prompt
from rapidfuzz import fuzz, process

PromptFormat = Literal["chat", "plain"]
IGNORE_INDEX = -100


@dataclass(frozen=True)
class CalibrationPair:
    """A formatted example: the scored response follows `prefix`, which is context only."""

    prompt: str
    response: str
    prefix: str = ""
    elicited: bool = False


@dataclass(frozen=True)
class Example:
    """Token ids with labels: -100 on context tokens, the token id on response tokens."""

    input_ids: list[int]
    labels: list[int]


# ---------------------------------------------------------------- sources


def load_sources(sources: Sequence[Source], permit: Permit, field: str) -> list[Pair]:
    """Inline pairs as they are; Hub dataset references loaded with `datasets` (network
    needed), only those the job's permit grants (`field` names the list, for the error)."""
    pairs: list[Pair] = []
    for i, source in enumerate(sources):
        if isinstance(source, Pair):
            pairs.append(source)
        else:
            grant = permit.grant("dataset", source.dataset, source.revision, f"{field}.{i}.dataset")
            pairs.extend(_load_hub_dataset(source, grant))
    return pairs


def _load_hub_dataset(ref: HubDataset, grant: Grant) -> list[Pair]:
    if grant.location == "hub" and Path(grant.target).exists():
        # `datasets` looks for a local folder of that name first: a granted Hub id must not
        # read a file of the worker's working directory instead.
        raise SpecError(f"dataset {ref.dataset}: a local path of that name shadows the Hub id")
    try:
        import datasets
    except ImportError:
        raise SpecError(
            f"domain references Hub dataset {ref.dataset}; install harmprune[datasets] on this worker"
        ) from None
    try:
        rows = datasets.load_dataset(grant.target, split=ref.split, revision=ref.revision)
    except Exception as err:  # datasets raises many kinds, all meaning "not loadable here"
        raise SpecError(f"cannot load dataset {ref.dataset}: {type(err).__name__}: {err}") from None
    if ref.prompt_field not in rows.column_names:
        raise SpecError(f"dataset {ref.dataset} has no column '{ref.prompt_field}' (prompt_field)")
    if ref.response_field and ref.response_field not in rows.column_names:
        raise SpecError(
            f"dataset {ref.dataset} has no column '{ref.response_field}' (response_field)"
        )
    n = len(rows) if ref.limit is None else min(ref.limit, len(rows))
    return [
        Pair(
            prompt=str(rows[i][ref.prompt_field]),
            response=str(rows[i][ref.response_field]) if ref.response_field else None,
        )
        for i in range(n)
    ]


# ---------------------------------------------------------------- formatting


def format_context(tokenizer: Any, prompt: str, fmt: PromptFormat) -> str:
    """The text before the response: the chat template's user turn, or the paper's `prompt\\n`."""
    if fmt == "plain":
        return prompt + "\n"
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def adds_special_tokens(fmt: PromptFormat) -> bool:
    """The chat template writes its own special tokens; the plain format gets the tokenizer's
    (BOS for Llama, Gemma, Mistral, ...). Generation and scoring both follow this, so a greedy
    answer is greedy under the very context it is scored in."""
    return fmt == "plain"


def context_ids(tokenizer: Any, text: str, fmt: PromptFormat) -> list[int]:
    return tokenizer(text, add_special_tokens=adds_special_tokens(fmt))["input_ids"]


@dataclass
class GenerationBudget:
    """A job's bound on generation inputs: every context is cut to `max_tokens` tokens (from
    the left, as scoring cuts contexts: the end holds the generation prompt and any forced
    start) so that no prompt defeats the memory plan; `cut` remembers which were."""

    max_tokens: int
    cut: set[str] = field(default_factory=set)  # sha256 of each distinct context cut


_BUDGET: ContextVar[GenerationBudget | None] = ContextVar("generation_budget", default=None)


@contextlib.contextmanager
def generation_budget(max_tokens: int) -> Iterator[GenerationBudget]:
    """Within this block (a job: `pipeline.run`), `generate` cuts every context to
    `max_tokens` tokens; the budget counts the distinct contexts it cut."""
    budget = GenerationBudget(max_tokens)
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)


def contexts_cut() -> int:
    """Distinct contexts cut so far in the current generation budget (0 outside one)."""
    budget = _BUDGET.get()
    return len(budget.cut) if budget is not None else 0


def generate(
    model: Any,
    tokenizer: Any,
    contexts: Sequence[str],
    fmt: PromptFormat,
    *,
    max_new_tokens: int,
    batch_size: int,
    on_step: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Greedy continuations of formatted contexts, tokenized exactly as scoring tokenizes them
    (and cut to the job's `generation_budget`, if one is open)."""
    budget = _BUDGET.get()

    def on_cut(context_index: int) -> None:
        if budget is not None:
            budget.cut.add(hashlib.sha256(contexts[context_index].encode()).hexdigest())

    return generate_greedy(
        model,
        tokenizer,
        contexts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        on_step=on_step,
        add_special_tokens=adds_special_tokens(fmt),
        max_context_tokens=budget.max_tokens if budget is not None else None,
        on_cut=on_cut,
    )


# ---------------------------------------------------------------- elicitation


def complete_pairs(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[Pair],
    *,
    harmful: bool,
    fmt: PromptFormat,
    elicitation: Elicitation,
    batch_size: int,
    on_step: Callable[[int, int], None] | None = None,
) -> list[CalibrationPair]:
    """Fill in missing responses from the model (greedy, batched); keep given ones."""
    prefix = elicitation.harmful_prefix if harmful else ""
    missing = [i for i, p in enumerate(pairs) if p.response is None]
    contexts = [format_context(tokenizer, pairs[i].prompt, fmt) + prefix for i in missing]
    generated = generate(
        model,
        tokenizer,
        contexts,
        fmt,
        max_new_tokens=elicitation.max_new_tokens,
        batch_size=batch_size,
        on_step=on_step,
    )
    by_index = dict(zip(missing, generated, strict=True))
    out: list[CalibrationPair] = []
    for i, pair in enumerate(pairs):
        if pair.response is not None:
            out.append(CalibrationPair(prompt=pair.prompt, response=pair.response))
        elif by_index[i].strip():
            out.append(CalibrationPair(pair.prompt, by_index[i], prefix=prefix, elicited=True))
    if not out:
        kind = "harmful" if harmful else "benign"
        raise CalibrationError(f"the model produced no {kind} response to score (all were empty)")
    return out


# ---------------------------------------------------------------- tokenization


def tokenize_pair(
    tokenizer: Any, pair: CalibrationPair, fmt: PromptFormat, max_length: int
) -> Example:
    context = context_ids(tokenizer, format_context(tokenizer, pair.prompt, fmt) + pair.prefix, fmt)
    response = tokenizer(pair.response, add_special_tokens=False)["input_ids"]
    if not response:
        raise CalibrationError(f"a response tokenizes to nothing (prompt: {pair.prompt[:60]!r})")
    # Keep at least half the budget for the response; cut the context from the left.
    response = response[: max(1, max_length - min(len(context), max_length // 2))]
    context = context[-(max_length - len(response)) :]
    return Example(input_ids=context + response, labels=[IGNORE_INDEX] * len(context) + response)


def tokenize_pairs(
    tokenizer: Any, pairs: Sequence[CalibrationPair], fmt: PromptFormat, max_length: int
) -> list[Example]:
    return [tokenize_pair(tokenizer, p, fmt, max_length) for p in pairs]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: padding is masked out of attention and labelled -100."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def calibration_sets(spec: DomainSpec, permit: Permit) -> tuple[list[Pair], list[Pair]]:
    return (
        load_sources(spec.harmful, permit, "domain.harmful"),
        load_sources(spec.benign, permit, "domain.benign"),
    )


# ---------------------------------------------------------------- disjoint sets

# Two prompts are near-duplicates when rapidfuzz's token-set similarity of their KEYS is at
# least this (0-100). A key is the normalised prompt (`normalise_prompt`: NFKC, case folded,
# letters/marks/digits of any script) without the tokens that many prompts of the job share
# ("what", "is", "the", "difference", "between", ...): templates carry no identity, so "What is
# the difference between X and Y?" does not match "... between Z and W?", while "How do I back
# up photos from my phone to my computer?" matches "How do I back up the photos on my phone?".
# Token-set similarity is 100 when one key's tokens are a subset of the other's, so a pair also
# needs keys of comparable length (the shorter at least KEY_LENGTH_RATIO of the longer, in
# tokens): "javascript" is not a near-duplicate of "javascript function adds two numbers". And
# the whole normalised prompts must be similar too (FULL_TEXT_THRESHOLD): "Harmful request
# number 3" and "Benign question number 3" share only their rare token.
NEAR_DUPLICATE_THRESHOLD = 90.0
FULL_TEXT_THRESHOLD = 85.0
KEY_LENGTH_RATIO = 0.5
# A token is common (dropped from keys) when it occurs in at least this share of the prompts
# compared and in at least COMMON_TOKEN_MIN_PROMPTS of them (small pools drop nothing).
COMMON_TOKEN_SHARE = 0.02
COMMON_TOKEN_MIN_PROMPTS = 4


def prompt_keys(prompts: Sequence[str]) -> list[str]:
    """Each prompt's comparison key (see NEAR_DUPLICATE_THRESHOLD); a prompt made only of
    common tokens keeps them all."""
    tokens = [normalise_prompt(p).split() for p in prompts]
    counts = Counter(t for toks in tokens for t in set(toks))
    floor = max(COMMON_TOKEN_MIN_PROMPTS, COMMON_TOKEN_SHARE * len(prompts))
    common = {t for t, n in counts.items() if n >= floor}
    keys = []
    for toks in tokens:
        kept = [t for t in toks if t not in common]
        keys.append(" ".join(kept or toks))
    return keys


def near_duplicate_pairs(
    left: Sequence[str], right: Sequence[str], pool: Sequence[str] | None = None
) -> list[tuple[int, int, float]]:
    """(i, j, similarity) for every left[i] and right[j] that are near-duplicates, most similar
    first (the keys' similarity); token frequencies are counted over `pool` (default: left and
    right)."""
    if not left or not right:
        return []
    # each distinct prompt counts once (left and right may overlap, or be the same list)
    everything = list(dict.fromkeys(pool if pool is not None else [*left, *right]))
    keys = dict(zip(everything, prompt_keys(everything), strict=True))
    left_keys = [keys.get(p) or prompt_keys([p])[0] for p in left]
    right_keys = [keys.get(p) or prompt_keys([p])[0] for p in right]
    scores = process.cdist(
        left_keys,
        right_keys,
        scorer=fuzz.token_set_ratio,
        score_cutoff=NEAR_DUPLICATE_THRESHOLD,
        workers=1,
    )

    def comparable(i: int, j: int) -> bool:
        a, b = len(left_keys[i].split()), len(right_keys[j].split())
        if min(a, b) < KEY_LENGTH_RATIO * max(a, b):
            return False
        full = fuzz.token_set_ratio(normalise_prompt(left[i]), normalise_prompt(right[j]))
        return bool(full >= FULL_TEXT_THRESHOLD)

    hits = [
        (int(i), int(j), float(scores[i, j]))
        for i, j in zip(*scores.nonzero(), strict=True)
        if comparable(int(i), int(j))
    ]
    return sorted(hits, key=lambda h: (-h[2], h[0], h[1]))


def check_disjoint(sets: dict[str, Sequence[Pair]]) -> None:
    """SpecError naming the most similar pair of prompts from two different named sets that are
    near-duplicates (NEAR_DUPLICATE_THRESHOLD; exact repeats included). Prompts within one set
    are not compared with each other."""
    named = [(name, [p.prompt for p in pairs]) for name, pairs in sets.items()]
    pool = [prompt for _, prompts in named for prompt in prompts]
    for a, (name_a, prompts_a) in enumerate(named):
        for name_b, prompts_b in named[a + 1 :]:
            hits = near_duplicate_pairs(prompts_a, prompts_b, pool)
            if hits:
                i, j, score = hits[0]
                raise SpecError(
                    f"near-duplicate prompts in the {name_a} and {name_b} sets (token-set "
                    f"similarity {score:.0f} >= {NEAR_DUPLICATE_THRESHOLD:.0f}): "
                    f"{prompts_a[i][:80]!r} ({name_a}) and {prompts_b[j][:80]!r} ({name_b}). "
                    "Calibration, validation and test prompts must be distinct; reword or "
                    "remove one of them"
                )
