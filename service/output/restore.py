"""Undo a hardening: load the checkpoint, put the mask's original values back, save elsewhere."""

from __future__ import annotations

from pathlib import Path

import torch
from harmprune.errors import ModelLoadError
from harmprune.method.pruning import MASK_FILE, load_mask, restore_weights
from harmprune.output.checkpoint import save_checkpoint, staged_output


def restore_checkpoint(checkpoint: Path, out: Path, max_shard_size: str = "5GB") -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mask_path = checkpoint / MASK_FILE
    if not mask_path.is_file():
        raise ModelLoadError(f"{checkpoint} has no {MASK_FILE}: not a harmprune checkpoint")
    with staged_output(out) as staging:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype="auto", use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        params = dict(model.named_parameters())
        mask = load_mask(mask_path)
        missing = [n for n in mask.entries if n not in params]
        if missing:
            raise ModelLoadError(f"mask names weights the model lacks: {missing[:3]}")
        restore_weights(params, mask)
        with torch.no_grad():
            save_checkpoint(model, tokenizer, staging, max_shard_size)
