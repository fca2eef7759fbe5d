"""What a hardened model must be: the original with exactly its mask's weights zeroed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from harmprune.method.pruning import MASK_FILE, apply_pruning, load_mask


def assert_hardened_weights(
    original: Any, hardened: Any, mask_dir: Path, expected_pruned: int
) -> None:
    """`hardened` equals `original` (changed in place) with the weights of the mask in
    `mask_dir` zeroed; the mask names `expected_pruned` weights, at least one."""
    mask = load_mask(Path(mask_dir) / MASK_FILE)
    assert mask.count == expected_pruned > 0
    apply_pruning(
        dict(original.named_parameters()), {n: idx for n, (idx, _) in mask.entries.items()}
    )
    expected, got = original.state_dict(), hardened.state_dict()
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor.to(got[name].dtype)), name
