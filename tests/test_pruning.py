"""Pruning zeroes exactly the selection; the mask restores the original bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from harmprune.method.attribution import scored_parameters
from harmprune.method.pruning import PruneMask, apply_pruning, load_mask, restore_weights, save_mask
from harmprune.method.selection import select_per_matrix


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def assert_bit_equal(model: torch.nn.Module, original: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == original.keys()
    for n, t in state.items():
        assert t.dtype == original[n].dtype, n
        # compare the bits: torch.equal would call -0.0 and 0.0 equal
        assert torch.equal(t.view(torch.uint8), original[n].view(torch.uint8)), n


def random_indices(
    params: dict[str, torch.nn.Parameter], seed: int, fraction: float
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, p) in enumerate(params.items()):
        if i % 3 == 2:
            out[name] = torch.empty(0, dtype=torch.long)  # a matrix with nothing pruned
            continue
        k = max(1, int(fraction * p.numel()))
        out[name] = torch.sort(torch.randperm(p.numel(), generator=g)[:k]).values
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prune_then_restore(arch: str, dtype: torch.dtype, tiny_model: Any) -> None:
    model = tiny_model(arch).to(dtype)
    original = snapshot(model)
    params = scored_parameters(model)
    indices = random_indices(params, seed=3, fraction=0.05)

    mask = apply_pruning(params, indices)
    expected = sum(i.numel() for i in indices.values())
    assert mask.count == expected > 0
    assert set(mask.entries) == {n for n, i in indices.items() if i.numel()}
    state = model.state_dict()
    zeros_introduced = 0
    for name, before in original.items():
        after = state[name]
        changed = after != before
        if name in indices and indices[name].numel():
            flat = after.reshape(-1)
            assert (flat[indices[name]] == 0).all(), name
            # nothing else in the matrix moved
            untouched = torch.ones(flat.numel(), dtype=torch.bool)
            untouched[indices[name]] = False
            assert torch.equal(flat[untouched], before.reshape(-1)[untouched]), name
            idx, values = mask.entries[name]
            assert torch.equal(idx, indices[name])
            assert values.dtype == dtype
            assert torch.equal(values, before.reshape(-1)[indices[name]])
        else:
            assert not changed.any(), name
        zeros_introduced += int(((after == 0) & (before != 0)).sum())
    assert zeros_introduced == mask.count

    restore_weights(params, mask)
    assert_bit_equal(model, original)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mask_file_round_trip(arch: str, tiny_model: Any, tmp_path: Path) -> None:
    model = tiny_model(arch)
    original = snapshot(model)
    params = scored_parameters(model)
    g = torch.Generator().manual_seed(0)
    harm = {n: torch.randn(p.shape, generator=g) for n, p in params.items()}
    keep = {n: torch.rand(p.shape, generator=g) for n, p in params.items()}
    chosen = select_per_matrix(harm, keep, q=0.02, p=0.02)
    mask = apply_pruning(params, {n: s.pruned for n, s in chosen.items()})
    assert mask.count == sum(s.pruned.numel() for s in chosen.values()) > 0

    path = tmp_path / "mask.safetensors"
    save_mask(mask, path, {"q": 0.02, "p": 0.02, "spec_hash": "x"})
    loaded = load_mask(path)
    assert loaded.count == mask.count
    assert set(loaded.entries) == set(mask.entries)
    for name, (idx, values) in mask.entries.items():
        assert torch.equal(loaded.entries[name][0], idx)
        assert torch.equal(loaded.entries[name][1], values)

    # Restore from what the file gives back alone.
    restore_weights(params, loaded)
    assert_bit_equal(model, original)


def test_restore_preserves_negative_zero_and_exact_bits(tmp_path: Path) -> None:
    w = torch.nn.Parameter(torch.tensor([[-0.0, 1e-38, -3.5], [float("nan"), 2.0, 7.0]]))
    before = w.detach().clone()
    params = {"m.layers.0.w.weight": w}
    mask = apply_pruning(params, {"m.layers.0.w.weight": torch.tensor([0, 1, 3])})
    path = tmp_path / "m.safetensors"
    save_mask(mask, path, {})
    restore_weights(params, load_mask(path))
    assert torch.equal(w.detach().view(torch.int32), before.view(torch.int32))


def test_empty_mask(tmp_path: Path) -> None:
    w = torch.nn.Parameter(torch.ones(2, 2))
    mask = apply_pruning({"w": w}, {"w": torch.empty(0, dtype=torch.long)})
    assert mask.count == 0 and mask.entries == {}
    path = tmp_path / "empty.safetensors"
    save_mask(mask, path, {"q": 0.1})
    assert load_mask(path) == PruneMask({})
    assert torch.equal(w.detach(), torch.ones(2, 2))
