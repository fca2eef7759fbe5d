"""A hardened checkpoint written in several safetensors shards (a small `max_shard_size` on a tiny
model, as a large model gets with the default 5GB): it reloads with plain `from_pretrained`, holds
the hardened weights, and restores (from shards, into shards) bit for bit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from harmprune import pipeline
from harmprune.inputs.config import HardenConfig, load_domain
from harmprune.method.pruning import MASK_FILE, load_mask
from harmprune.output.restore import restore_checkpoint
from harmprune.settings import Settings
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

SHARD = "40KB"


def shards(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("model-*.safetensors"))


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in shards(folder) or [folder / "model.safetensors"]:
        out.update(load_file(shard))
    return out


def test_multi_shard_checkpoint_reloads_and_restores_bit_for_bit(
    tiny_model_dir: Any, domain_spec_path: Path, tmp_path: Path
) -> None:
    source = tiny_model_dir("llama")
    settings = Settings(cache_dir=tmp_path / "cache", max_shard_size=SHARD)
    config = HardenConfig(
        model=str(source),
        domain=load_domain(domain_spec_path),
        device="cpu",
        dtype="float32",
        batch_size=2,
    )
    out = tmp_path / "hardened"
    report = pipeline.run(config, settings, out)
    assert report.outcome == "accepted", report.outcome_reason

    # several shards and the index that maps every tensor to its shard
    files = shards(out)
    assert len(files) >= 3, [p.name for p in out.iterdir()]
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in files}
    on_disk = tensors(out)
    assert set(index["weight_map"]) == set(on_disk)

    # plain transformers loads it, and it holds the original with the mask applied
    hardened = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    original = tensors(source)
    mask = load_mask(out / MASK_FILE)
    assert mask.count == report.pruned_count > 0
    state = hardened.state_dict()
    for name, tensor in original.items():
        expected = tensor.flatten().clone()
        if name in mask.entries:
            idx, values = mask.entries[name]
            assert torch.equal(expected[idx], values), name
            expected[idx] = 0
        assert torch.equal(state[name].flatten(), expected), name

    # restore (into shards too) gives the original back bit for bit
    restored = tmp_path / "restored"
    restore_checkpoint(out, restored, max_shard_size=SHARD)
    assert len(shards(restored)) >= 3
    back = tensors(restored)
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name

    # the report binds every shard and the index; the audit streams them against the base
    from harmprune.audit.checks import run_audit

    assert report.binding is not None
    assert set(report.binding.weights) == {p.name for p in files} | {"model.safetensors.index.json"}
    verdict = run_audit(str(out), allow_unsigned=True, base=str(source), settings=settings)
    assert verdict.passed, verdict.model_dump_json(indent=2)
