"""What the attacks cost, for the preflight: from sizes alone (no weights, no torch).

Memory is what an attack needs ABOVE the model's own weights (which the job holds anyway);
time is the attack itself at the preflight's planned throughput (the measurements after each
attack are evaluations like the verification's and are not included).

- abliteration: a saved copy of every residual writer (token embeddings, plus about a third of
  the decoder weights: attention and MLP output projections in a Llama-style block) and the
  last-token activations of every block for every calibration prompt; time: forward passes over
  the calibration prompts on the original and the hardened model.
- finetune, one grid cell: LoRA keeps the adapters with their gradients and two AdamW moments
  (about 7 adapted matrices of rank r per block) plus the activations of one training batch;
  a full fine-tune trains a deep copy (copy, gradients, two AdamW moments: 4x the weights) plus
  the same activations. Time: forward + backward (6 flop per parameter and token) per step, and
  at least the planned minimum per step (small models do not reach the planned throughput).
"""

from __future__ import annotations

from typing import Any

from harmprune.inputs.config import AttacksConfig
from pydantic import BaseModel, ConfigDict, Field

GB = 1024**3
# Llama-style blocks: o_proj (h x h) + down_proj (h x 8/3 h) of about 4 h^2 + 8 h^2 weights.
WRITER_SHARE_OF_BLOCKS = 1 / 3
ADAPTED_MATRICES_PER_BLOCK = 7  # q, k, v, o, gate, up, down


class AttacksEstimate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    abliteration_memory_gb: float | None = Field(None, description="Above the model's weights.")
    abliteration_seconds: float | None = None
    finetune_cells: int = 0
    finetune_cell_memory_gb: float | None = Field(None, description="Largest cell, above weights.")
    finetune_cell_seconds: float | None = Field(None, description="Training of the largest cell.")
    finetune_seconds: float | None = Field(None, description="Every cell, on the three models.")


def training_activations_gb(
    batch: int, tokens: int, layers: int, hidden: int, vocab: int, dtype_bytes: int
) -> float:
    """Saved activations of one training batch (the preflight's per-token rule) + fp32 logits."""
    return batch * tokens * (34 * hidden * layers * dtype_bytes + 8 * vocab) / GB


def price_attacks(
    cfg: AttacksConfig | None,
    *,
    parameters: int,
    layers: int,
    hidden: int,
    vocab: int,
    dtype_bytes: int,
    calibration_prompts: int,
    tokens_per_sequence: int,
    tflops: float,
    min_step_seconds: float = 0.0,
) -> dict[str, Any] | None:
    """The estimate for the spec's `attacks:` (None without one) as the preflight stores it
    (AttacksEstimate's fields). Pure arithmetic. A training step takes at least
    `min_step_seconds` whatever its flops (harmprune.inputs.preflight.MIN_STEP_SECONDS)."""
    if cfg is None:
        return None
    flops_per_second = tflops * 1e12
    out: dict[str, float | int | None] = {}
    if cfg.abliteration is not None:
        embeddings = vocab * hidden
        writers = embeddings + WRITER_SHARE_OF_BLOCKS * max(0, parameters - embeddings)
        activations = calibration_prompts * layers * hidden * 4
        out["abliteration_memory_gb"] = round((writers * dtype_bytes + activations) / GB, 3)
        # the original's activations give the direction; the hardened model's, the cosine
        passes = 2 * calibration_prompts * tokens_per_sequence
        out["abliteration_seconds"] = round(2 * parameters * passes / flops_per_second, 1)
    ft = cfg.finetune
    if ft is not None:
        acts = training_activations_gb(
            ft.batch_size, tokens_per_sequence, layers, hidden, vocab, dtype_bytes
        )
        if ft.method == "lora":
            adapters = ADAPTED_MATRICES_PER_BLOCK * layers * ft.rank * 2 * hidden
            state = adapters * (4 + 4 + 4 + 4) / GB  # fp32 weights, gradients, two moments
        else:
            state = 4 * parameters * dtype_bytes / GB
        steps_all = sum(steps for _, steps in ft.cells())
        flop_per_step = 6 * parameters * ft.batch_size * tokens_per_sequence
        out["finetune_cells"] = len(ft.cells())
        out["finetune_cell_memory_gb"] = round(state + acts, 3)
        step_seconds = max(flop_per_step / flops_per_second, min_step_seconds)
        out["finetune_cell_seconds"] = round(max(ft.steps) * step_seconds, 1)
        out["finetune_seconds"] = round(3 * steps_all * step_seconds, 1)
    return AttacksEstimate.model_validate(out).model_dump()
