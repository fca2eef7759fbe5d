"""Tokens/s of harmprune's batched greedy generation against one-prompt-at-a-time `generate`.

Same prompts, same model, greedy both ways; the script also counts how many answers are
identical (left padding can flip a near-tie; the count is printed, not hidden).

    .venv/bin/python bench/generation.py [--prompts 32] [--new-tokens 48] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from harmprune.inputs import data
from harmprune.inputs.config import load_domain
from harmprune.inputs.generation import generate_greedy
from harmprune.inputs.loading import load_model
from harmprune.inputs.references import model_permit
from harmprune.settings import Settings


def one_at_a_time(model, tokenizer, contexts, max_new_tokens):
    answers, tokens = [], 0
    for c in contexts:
        ids = tokenizer(c, add_special_tokens=False, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(
                **ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[0, ids["input_ids"].shape[1] :]
        tokens += new.numel()
        answers.append(tokenizer.decode(new, skip_special_tokens=True))
    return answers, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model(
        args.model, None, Settings(), permit=model_permit(args.model), device="cpu", dtype="float32"
    )
    spec = load_domain("cyber")
    prompts = [p.prompt for p in spec.harmful + spec.benign + spec.eval.harmful + spec.eval.benign]
    prompts = (prompts * (args.prompts // len(prompts) + 1))[: args.prompts]
    contexts = [data.format_context(loaded.tokenizer, p, "chat") for p in prompts]

    start = time.perf_counter()
    single, single_tokens = one_at_a_time(loaded.model, loaded.tokenizer, contexts, args.new_tokens)
    t_single = time.perf_counter() - start

    start = time.perf_counter()
    batched = generate_greedy(
        loaded.model,
        loaded.tokenizer,
        contexts,
        max_new_tokens=args.new_tokens,
        batch_size=args.batch_size,
    )
    t_batched = time.perf_counter() - start
    batched_tokens = sum(
        len(loaded.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in batched
    )

    same = sum(a == b for a, b in zip(single, batched, strict=True))
    result = {
        "prompts": len(prompts),
        "max_new_tokens": args.new_tokens,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "one_at_a_time_s": round(t_single, 2),
        "one_at_a_time_tok_s": round(single_tokens / t_single, 1),
        "batched_s": round(t_batched, 2),
        "batched_tok_s": round(batched_tokens / t_batched, 1),
        "speedup": round(t_single / t_batched, 2),
        "identical_answers": same,
    }
    print("| strategy | wall s | tokens/s |\n|---|---|---|")
    print(
        f"| one prompt at a time | {result['one_at_a_time_s']} | {result['one_at_a_time_tok_s']} |"
    )
    print(
        f"| batched (batch {args.batch_size}) | {result['batched_s']} | {result['batched_tok_s']} |"
    )
    print(f"speed-up {result['speedup']}x; identical answers {same}/{len(prompts)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
