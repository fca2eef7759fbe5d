"""Preflight: can this job run, and what will it cost? From config.json and tokenizer files alone.

No weight is downloaded: the model is instantiated on the meta device (shapes, no memory), which
gives exact parameter and scored-weight counts for any architecture transformers knows. The API
runs this before queueing, the CLI before loading, so an impossible job is refused at once.

Memory plan (one GPU): weights in the compute dtype, ONE fp32 score-sized buffer alive at a time
(the harm pass's gradient sum is reduced to per-matrix candidates before the preserve pass), the
preserve buffer, activations of one batch with gradient checkpointing off, and fp32 logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from service.errors import ModelLoadError, UnsupportedModelError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Sustained bf16 throughput we plan with (about 40% of the dense peak), in TFLOP/s.
PLANNED_TFLOPS = {
    "cpu": 0.05,
    "nvidia-h100": 400.0,
    "nvidia-h200": 400.0,
    "nvidia-l40": 145.0,
    "gpu": 150.0,
}


class Estimate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model_type: str
    parameters: int
    scored_weights: int
    layers: int
    tied_embeddings: bool
    chat_template: bool
    weights_gb: float
    score_buffers_gb: float
    activations_gb: float
    peak_memory_gb: float
    calibration_tokens: int
    attribution_tflop: float
    attribution_seconds: float
    device_kind: str
    fits: bool
    problems: list[str]


def config_from_files(directory: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise UnsupportedModelError(
            f"unsupported or unreadable config.json: {err}".splitlines()[0]
        ) from None


def has_chat_template(directory: Path) -> bool:
    if (directory / "chat_template.jinja").is_file() or (
        directory / "chat_template.json"
    ).is_file():
        return True
    tok_cfg = directory / "tokenizer_config.json"
    if tok_cfg.is_file():
        return bool(json.loads(tok_cfg.read_text()).get("chat_template"))
    return False


def count_on_meta(config: Any) -> tuple[int, int, int]:
    """(all parameters, scored weights, decoder layers), without allocating any weight."""
    import torch
    from transformers import AutoModelForCausalLM

    from service.attribution import decoder_layers, scored_parameters

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    scored = sum(p.numel() for p in scored_parameters(model).values())
    return total, scored, len(decoder_layers(model))


def estimate(
    directory: Path,
    *,
    calibration_pairs: int,
    tokens_per_pair: int,
    batch_size: int = 8,
    dtype: str = "bfloat16",
    device_kind: str = "nvidia-h100",
    device_memory_gb: float = 80.0,
    need_chat_template: bool = True,
    selection: str = "per_matrix",
) -> Estimate:
    """Check a model directory holding config.json (+ tokenizer files) and plan the job."""
    from service.loading import check_architecture

    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"no config.json in {directory}")
    config = config_from_files(directory)
    check_architecture(config)
    total, scored, layers = count_on_meta(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, vocab = int(text.hidden_size), int(text.vocab_size)
    chat = has_chat_template(directory)
    gb = 1024**3
    weights = total * DTYPE_BYTES[dtype] / gb
    # per-matrix selection reduces each score map as soon as it is computed: one fp32 buffer alive
    buffers = (2 if selection == "global" else 1) * scored * 4 / gb
    # Saved activations per token and layer, ~34*hidden bytes in bf16 for a Llama-style block,
    # plus fp32 logits and their gradient for one batch.
    act = (
        batch_size * tokens_per_pair * (34 * hidden * layers * DTYPE_BYTES[dtype] + 8 * vocab) / gb
    )
    peak = weights + buffers + act + 1.0  # + CUDA context and allocator slack
    tokens = calibration_pairs * tokens_per_pair
    tflop = 6 * total * tokens / 1e12  # forward + backward
    seconds = tflop / PLANNED_TFLOPS.get(device_kind, PLANNED_TFLOPS["gpu"])
    problems = []
    if need_chat_template and not chat:
        problems.append("the tokenizer has no chat template; use prompt_format: plain")
    if peak > device_memory_gb:
        problems.append(
            f"needs about {peak:.0f} GB on one device but {device_memory_gb:.0f} GB is available; "
            "use a multi-GPU worker (FSDP2) or a smaller calibration batch"
        )
    return Estimate(
        model_type=str(config.model_type),
        parameters=total,
        scored_weights=scored,
        layers=layers,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        chat_template=chat,
        weights_gb=round(weights, 2),
        score_buffers_gb=round(buffers, 2),
        activations_gb=round(act, 2),
        peak_memory_gb=round(peak, 2),
        calibration_tokens=tokens,
        attribution_tflop=round(tflop, 1),
        attribution_seconds=round(seconds, 1),
        device_kind=device_kind,
        fits=not problems,
        problems=problems,
    )
