"""The command-line flags the attribution benchmarks share (bench/attribution.py and
bench/gpu_attribution.py): the backward-pass settings of the pipeline they time, with its
defaults, so both benchmarks time the same thing when run without flags."""

from __future__ import annotations

import argparse

from harmprune.inputs.config import HardenConfig


def add_backward_flags(ap: argparse.ArgumentParser, whose: str) -> None:
    """`--max-backward-tokens` (the pipeline's default; 0: no cap) and
    `--gradient-checkpointing` (the pipeline's `on`); `whose` says in the help which of the
    benchmark's strategies they apply to."""
    default = HardenConfig.model_fields["max_backward_tokens"].default
    ap.add_argument(
        "--max-backward-tokens",
        type=int,
        default=default,
        help=f"{whose} cap on padded tokens per backward (the pipeline's default {default}); "
        "0: no cap",
    )
    ap.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help=f"{whose} recompute each decoder block in backward (the pipeline's `on`)",
    )
