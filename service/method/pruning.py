"""Stage 5, pruning: zero the selected weights and keep a sparse mask that undoes it.

The mask (`harmprune-mask.safetensors`) holds, per pruned matrix, the flat indices and the
original values, so the change is auditable and `restore` gives back the original bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from harmprune.vocabulary import MASK_FILE as MASK_FILE  # re-exported (shared name)
from safetensors.torch import load_file, save_file
from torch import nn


@dataclass(frozen=True)
class PruneMask:
    """name -> (flat indices, original values in the weight's dtype)."""

    entries: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def count(self) -> int:
        return sum(idx.numel() for idx, _ in self.entries.values())


def apply_pruning(params: dict[str, nn.Parameter], indices: dict[str, torch.Tensor]) -> PruneMask:
    """Zero `indices` of each matrix in place; return what was there."""
    entries = {}
    with torch.no_grad():
        for name, idx in indices.items():
            if idx.numel() == 0:
                continue
            flat = params[name].view(-1)
            idx = idx.to(flat.device)
            entries[name] = (idx.cpu().clone(), flat[idx].cpu().clone())
            flat[idx] = 0
    return PruneMask(entries)


def restore_weights(params: dict[str, nn.Parameter], mask: PruneMask) -> None:
    with torch.no_grad():
        for name, (idx, values) in mask.entries.items():
            flat = params[name].view(-1)
            flat[idx.to(flat.device)] = values.to(flat.device, flat.dtype)


def save_mask(mask: PruneMask, path: Path, metadata: dict[str, object]) -> None:
    tensors = {}
    for name, (idx, values) in mask.entries.items():
        tensors[f"{name}.indices"] = idx.contiguous()
        tensors[f"{name}.values"] = values.contiguous()
    # safetensors metadata is str -> str
    save_file(tensors, str(path), metadata={"harmprune": json.dumps(metadata, sort_keys=True)})


def load_mask(path: Path) -> PruneMask:
    tensors = load_file(str(path))
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    return PruneMask({n: (tensors[f"{n}.indices"], tensors[f"{n}.values"]) for n in names})
