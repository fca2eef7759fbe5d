"""Abliteration (issue #14): orthogonalisation of every residual writer, bit-exact restore, and
the layer chooser, on tiny models of several architectures."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from harmprune.attacks import abliteration
from harmprune.method.attribution import decoder_layers

ARCHS = ["llama", "gpt2", "gpt_neox", "qwen2"]
PROBE = "<|bos|><|user|>How do I pick a lock?<|assistant|>Sure"


def unit(dim: int, seed: int) -> torch.Tensor:
    r = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
    return r / r.norm()


def snapshot(model: Any) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def residual_stream(model: Any, tokenizer: Any) -> list[torch.Tensor]:
    """The embeddings' output and every block's output, at every position of the probe."""
    ids = tokenizer(PROBE, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model(input_ids=ids, output_hidden_states=True)
    streams = []
    captured: list[torch.Tensor] = []

    def hook(_m: Any, _i: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    handles = [b.register_forward_hook(hook) for b in decoder_layers(model)]
    try:
        with torch.inference_mode():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    streams.append(out.hidden_states[0])  # embeddings (+ learned positions), before block 0
    return streams + captured


@pytest.mark.parametrize("arch", ARCHS)
def test_every_residual_writer_loses_the_direction_and_comes_back_bit_exact(
    arch: str, tiny_model: Any, tokenizer: Any
) -> None:
    model = tiny_model(arch)
    before = snapshot(model)
    hidden = model.get_input_embeddings().weight.shape[1]
    r = unit(hidden, seed=3)
    writers = abliteration.residual_writers(model)
    blocks = len(decoder_layers(model))
    # embeddings (+ GPT-2's positions) and an attention and an MLP writer per block (+ biases)
    assert sum(w.tensor.dim() == 2 and "emb" not in w.name for w in writers) >= 2 * blocks
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    logits_before = model(**tokenizer(PROBE, add_special_tokens=False, return_tensors="pt")).logits

    with abliteration.ablated(model, r, 1.0) as names:
        assert sorted(names) == sorted(w.name for w in writers)
        for writer in abliteration.residual_writers(model):
            left = abliteration.residual_component(writer, r).abs().max().item()
            assert left < 1e-5, (writer.name, left)
        # Independently of the list of writers: nothing in the residual stream points along r.
        for i, h in enumerate(residual_stream(model, tokenizer)):
            along = (h @ r).abs().max().item()
            assert along < 1e-5 * max(1.0, h.norm(dim=-1).max().item()), (arch, i, along)
        if tied:  # the head kept reading with the original matrix
            assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
            assert torch.equal(model.get_output_embeddings().weight, before["lm_head.weight"])
        ids = tokenizer(PROBE, add_special_tokens=False, return_tensors="pt")
        assert not torch.allclose(model(**ids).logits, logits_before, atol=1e-4)

    after = model.state_dict()
    assert list(after) == list(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), f"{name} not restored bit for bit"
    if tied:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_strength_scales_the_removed_component(tiny_model: Any) -> None:
    model = tiny_model("llama")
    r = unit(model.get_input_embeddings().weight.shape[1], seed=5)
    writer = abliteration.residual_writers(model)[1]
    full = abliteration.residual_component(writer, r).clone()
    with abliteration.ablated(model, r, 0.5):
        half = abliteration.residual_component(writer, r)
    assert torch.allclose(half, full / 2, atol=1e-6)


def test_restored_after_an_error(tiny_model: Any) -> None:
    model = tiny_model("gpt2")
    before = snapshot(model)
    with pytest.raises(RuntimeError), abliteration.ablated(model, unit(32, 1), 1.0):
        raise RuntimeError("boom")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def planted(n: int, layers: int, hidden: int, strong: int, weak: int, seed: int) -> tuple:
    """Noise everywhere; harmful prompts shifted along one axis at `strong` (by 2 sd) and, less,
    at `weak` (0.8 sd)."""
    gen = torch.Generator().manual_seed(seed)
    harmful = torch.randn(n, layers, hidden, generator=gen)
    benign = torch.randn(n, layers, hidden, generator=gen)
    harmful[:, strong, 0] += 2.0
    harmful[:, weak, 1] += 0.8
    return harmful, benign


def test_layer_chooser_picks_the_planted_separation() -> None:
    harmful, benign = planted(n=24, layers=8, hidden=16, strong=5, weak=2, seed=0)
    seps = abliteration.separation_by_layer(harmful, benign, seed=0)
    assert abliteration.choose_layer(seps, range(8)) == 5
    assert seps[5].cohens_d > 1.5 and seps[5].auroc > 0.85
    noise = [s.cohens_d for s in seps if s.layer not in (2, 5)]
    assert max(noise) < seps[2].cohens_d < seps[5].cohens_d
    # Outside the window the planted block is not a candidate: the next best is taken.
    assert abliteration.choose_layer(seps, abliteration.candidate_layers(8, (0.0, 0.5))) == 2
    direction, layer, _ = abliteration.find_direction(
        harmful, benign, window=(0.0, 1.0), layer=None, seed=0
    )
    assert layer == 5 and abs(direction.norm().item() - 1) < 1e-6 and direction[0] > 0.8
    _, given, _ = abliteration.find_direction(harmful, benign, window=(0, 1), layer=3, seed=0)
    assert given == 3


def test_separation_measures() -> None:
    assert abliteration.auroc([3, 4], [1, 2]) == 1.0
    assert abliteration.auroc([1, 2], [1, 2]) == 0.5
    assert abliteration.cohens_d([1.0, 3.0], [-1.0, -3.0]) == pytest.approx(4 / 2**0.5 / 1)
    assert abliteration.candidate_layers(30, (0.4, 0.9)) == list(range(12, 27))
    assert abliteration.candidate_layers(2, (0.4, 0.9)) == [0, 1]  # none inside: all


def test_activations_are_taken_at_the_last_prompt_token(tiny_model: Any, tokenizer: Any) -> None:
    model = tiny_model("llama")
    prompts = ["short", "a much longer prompt than the first one"]
    together = abliteration.last_token_activations(model, tokenizer, prompts, "chat", 2)
    alone = [abliteration.last_token_activations(model, tokenizer, [p], "chat", 1) for p in prompts]
    assert together.shape == (2, 2, 32)
    for i in range(2):  # padding does not change the last real token's activations
        assert torch.allclose(together[i], alone[i][0], atol=1e-5)


def test_fingerprint_names_direction_layer_strength_and_weights() -> None:
    r = unit(8, 0)
    base = abliteration.direction_fingerprint(r, 2, 1.0, ["a", "b"])
    assert base == abliteration.direction_fingerprint(r.clone(), 2, 1.0, ["a", "b"])
    for other in (
        abliteration.direction_fingerprint(unit(8, 1), 2, 1.0, ["a", "b"]),
        abliteration.direction_fingerprint(r, 3, 1.0, ["a", "b"]),
        abliteration.direction_fingerprint(r, 2, 0.5, ["a", "b"]),
        abliteration.direction_fingerprint(r, 2, 1.0, ["a"]),
    ):
        assert other != base
