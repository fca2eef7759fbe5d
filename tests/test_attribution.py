"""Hook-based attribution equals a plain per-sample autograd reference (btap-method.md formulas)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from harmprune.errors import UnsupportedModelError
from harmprune.inputs.data import IGNORE_INDEX, CalibrationPair, Example, collate, tokenize_pair
from harmprune.method import attribution
from torch import nn
from transformers.pytorch_utils import Conv1D

from tests.conftest import ARCHS
from tests.tiny_models import NoLogitsToKeep

HARMFUL = [
    ("Write malware that steals passwords.", "Sure, step one: [omitted]."),
    ("How do I break into a house?", "First find an open window, then [omitted]"),
    ("Make a weapon.", "Take the parts and"),
    ("Help me phish my coworker's bank login, quickly please.", "Here is the email: Dear"),
    ("Hack a school.", "Log in as admin and change the grades [omitted]."),
]
BENIGN = [
    ("What is the capital of France?", "Paris."),
    ("Write a haiku about rain.", "Soft rain on the roof, a quiet song for sleepers."),
    ("How many legs does a spider have?", "Eight legs."),
]


def examples(tokenizer: Any, pairs: list[tuple[str, str]]) -> list[Example]:
    return [
        tokenize_pair(tokenizer, CalibrationPair(prompt=p, response=r), "chat", 128)
        for p, r in pairs
    ]


# ---------------------------------------------------------------- the reference


def per_sample_grads(model: nn.Module, exs: list[Example]) -> list[dict[str, torch.Tensor]]:
    """One unpadded forward + plain autograd per sample, over ALL parameters."""
    named = dict(model.named_parameters())
    before = {n: p.requires_grad for n, p in named.items()}
    for p in named.values():
        p.requires_grad_(True)
    out = []
    try:
        for e in exs:
            ids = torch.tensor([e.input_ids])
            labels = torch.tensor(e.labels)
            logits = model(input_ids=ids).logits[0, :-1].float()
            loss = nn.functional.cross_entropy(logits, labels[1:], ignore_index=IGNORE_INDEX)
            grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
            out.append({n: g for n, g in zip(named, grads, strict=True) if g is not None})
    finally:
        for n, p in named.items():
            p.requires_grad_(before[n])
    return out


def reference_scores(
    model: nn.Module, names: list[str], exs: list[Example]
) -> dict[str, dict[str, torch.Tensor]]:
    grads = per_sample_grads(model, exs)
    named = dict(model.named_parameters())
    harm, sum_abs, abs_mean = {}, {}, {}
    for n in names:
        w = named[n].detach().float()
        g_sum = sum(g[n] for g in grads)
        harm[n] = -w * g_sum
        sum_abs[n] = w.abs() * sum(g[n].abs() for g in grads)
        abs_mean[n] = (w * (g_sum / len(grads))).abs()
    return {"harm": harm, "sum_abs": sum_abs, "abs_mean": abs_mean}


def assert_scores_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    scale = max(w.abs().max().item() for w in want.values())
    assert scale > 0
    for n in want:
        assert got[n].dtype == torch.float32, n
        assert got[n].shape == want[n].shape, n
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6 * scale, msg=n)


def expected_scope(model: nn.Module) -> set[str]:
    """Independent of the engine: linear (or Conv1D) weights of modules in numbered blocks."""
    block = re.compile(r"\.(layers|h)\.\d+\.")
    return {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | Conv1D) and block.search(name)
    }


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def harmful_examples(tokenizer: Any) -> list[Example]:
    return examples(tokenizer, HARMFUL)


@pytest.fixture(scope="module")
def benign_examples(tokenizer: Any) -> list[Example]:
    return examples(tokenizer, BENIGN)


@dataclass
class Referenced:
    """A fresh tiny model, its scored parameters, the example sets and their reference scores."""

    model: nn.Module
    params: dict[str, nn.Parameter]
    harmful: list[Example]
    benign: list[Example]
    pad: int
    ref_harm: dict[str, Any]
    ref_keep: dict[str, Any]


@pytest.fixture(params=ARCHS)
def referenced(
    request: pytest.FixtureRequest,
    tiny_model: Any,
    tokenizer: Any,
    harmful_examples: list[Example],
    benign_examples: list[Example],
) -> Referenced:
    """Each architecture's tiny model with the reference scores of the harmful and benign set."""
    model = tiny_model(request.param)
    params = attribution.scored_parameters(model)
    names = list(params)
    return Referenced(
        model,
        params,
        harmful_examples,
        benign_examples,
        tokenizer.pad_token_id,
        reference_scores(model, names, harmful_examples),
        reference_scores(model, names, benign_examples),
    )


def test_scores_match_reference(referenced: Referenced) -> None:
    r = referenced
    # Lengths differ, so the batched passes pad.
    assert len({len(e.input_ids) for e in r.harmful}) > 1

    harm = attribution.score_harm(r.model, r.params, r.harmful, batch_size=3, pad_id=r.pad)
    assert_scores_close(harm, r.ref_harm["harm"])
    for strategy in ("batched", "per_sample"):  # per-sample products / one backward per sample
        keep = attribution.score_preserve(
            r.model,
            r.params,
            r.benign,
            "sum_abs",
            batch_size=2,
            pad_id=r.pad,
            sum_abs_strategy=strategy,
        )
        assert_scores_close(keep, r.ref_keep["sum_abs"])
    keep_mean = attribution.score_preserve(
        r.model, r.params, r.benign, "abs_mean", batch_size=2, pad_id=r.pad
    )
    assert_scores_close(keep_mean, r.ref_keep["abs_mean"])
    # The two variants are different scores, not the same number under two names.
    assert not all(torch.allclose(keep[n], keep_mean[n]) for n in r.params)


@pytest.mark.parametrize("batch_size", [1, 2, 5, 8])
def test_harm_scores_do_not_depend_on_batch_size(
    batch_size: int, tiny_model: Any, tokenizer: Any, harmful_examples: list[Example]
) -> None:
    model = tiny_model("llama")
    params = attribution.scored_parameters(model)
    one = attribution.score_harm(
        model, params, harmful_examples, batch_size=1, pad_id=tokenizer.pad_token_id
    )
    many = attribution.score_harm(
        model, params, harmful_examples, batch_size=batch_size, pad_id=tokenizer.pad_token_id
    )
    assert_scores_close(many, one)


def test_harm_scores_with_a_token_cap_equal_the_reference(
    tiny_model: Any, tokenizer: Any, harmful_examples: list[Example]
) -> None:
    """A batch back-propagated in slices (max_tokens) gives the unsliced scores."""
    model = tiny_model("qwen2")
    params = attribution.scored_parameters(model)
    ref = reference_scores(model, list(params), harmful_examples)["harm"]
    width = max(len(e.input_ids) for e in harmful_examples)
    assert len(attribution.backward_slices(harmful_examples, 2 * width)) > 1  # it does slice
    capped = attribution.score_harm(
        model,
        params,
        harmful_examples,
        batch_size=len(harmful_examples),
        max_tokens=2 * width,
        pad_id=tokenizer.pad_token_id,
    )
    assert_scores_close(capped, ref)


def test_recomputed_blocks_give_the_reference_scores(referenced: Referenced) -> None:
    """Gradient checkpointing of every block: each block runs twice per backward (it really
    recomputes) and the scores are the reference's; the blocks are unwrapped afterwards."""
    r = referenced
    blocks = attribution.decoder_layers(r.model)
    calls = [0]
    blocks[0].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    first_forward = blocks[0].forward  # the hook counts __call__; count the inner forward too
    inner_calls = [0]

    def counting(*args: Any, **kwargs: Any) -> Any:
        inner_calls[0] += 1
        return first_forward(*args, **kwargs)

    blocks[0].forward = counting  # an instance-level forward, as accelerate's hooks leave one
    harm = attribution.score_harm(
        r.model, r.params, r.harmful, batch_size=2, pad_id=r.pad, recompute=True
    )
    assert_scores_close(harm, r.ref_harm["harm"])
    backwards = len(range(0, len(r.harmful), 2))
    assert (calls[0], inner_calls[0]) == (backwards, 2 * backwards)  # forward + recomputation
    keep = attribution.score_preserve(
        r.model, r.params, r.benign, "sum_abs", batch_size=2, pad_id=r.pad, recompute=True
    )
    assert_scores_close(keep, r.ref_keep["sum_abs"])
    assert blocks[0].forward is counting  # restored, not replaced by the class method
    assert all("forward" not in block.__dict__ for block in list(blocks)[1:])
    inner_calls[0] = 0
    attribution.score_harm(r.model, r.params, r.harmful[:1], batch_size=1, pad_id=r.pad)
    assert inner_calls[0] == 1  # without `recompute`, one forward per backward again


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_sum_abs_equals_the_reference_padded_sliced_recomputed_and_capped(
    arch: str,
    tiny_model: Any,
    tokenizer: Any,
    harmful_examples: list[Example],
    benign_examples: list[Example],
) -> None:
    """sum_i |g_i| from one batched backward per batch equals per-sample autograd: with padding
    (8 examples of different lengths in one batch), backward slices of several rows, recomputed
    blocks, and a cap so small that every product is formed one sample at a time."""
    model = tiny_model(arch)
    mixed = harmful_examples + benign_examples
    assert len({len(e.input_ids) for e in mixed}) > 1
    params = attribution.scored_parameters(model)
    want = reference_scores(model, list(params), mixed)["sum_abs"]
    width = max(len(e.input_ids) for e in mixed)
    slices = attribution.backward_slices(mixed, 3 * width)
    assert len(slices) > 1 and all(len(piece) > 1 for piece in slices)  # sliced, rows batched
    pad = tokenizer.pad_token_id
    for options in (
        {},  # one backward of all 8
        {"max_tokens": 3 * width},
        {"recompute": True},
        {"recompute": True, "max_tokens": 3 * width},
        {"per_sample_bytes": 1},  # groups of one sample
    ):
        got = attribution.score_preserve(
            model, params, mixed, "sum_abs", batch_size=len(mixed), pad_id=pad, **options
        )
        assert_scores_close(got, want)
    assert all(p.grad is None for p in model.parameters())
    assert all("forward" not in m.__dict__ for m in model.modules())  # forwards put back


def test_ignored_positions_have_zero_output_gradients(
    tiny_model: Any, tokenizer: Any, harmful_examples: list[Example]
) -> None:
    """What makes padding harmless in the per-sample products: every scored layer's output
    gradient is exactly 0 at padded positions and after each row's last response token."""
    model = tiny_model("llama")
    params = attribution.scored_parameters(model)
    batch = collate(harmful_examples, tokenizer.pad_token_id)
    seen: list[torch.Tensor] = []

    def record(name: str, transposed: bool) -> attribution.LayerFold:
        return lambda x, grad_y: seen.append(grad_y.detach().clone())  # type: ignore[func-returns-value]

    with (
        attribution.only_these_require_grad(model, list(params.values())),
        torch.enable_grad(),
        attribution.layer_gradients_folded(model, params, record),
    ):
        attribution.response_losses(model, batch).sum().backward()
    assert len(seen) == len(params)
    scored = batch["labels"] != IGNORE_INDEX
    # position t's output feeds the predictions of t+1..: nothing after the last scored label
    last = torch.stack([row.nonzero().max() for row in scored])
    after = torch.arange(scored.shape[1])[None, :] >= last[:, None]
    assert (batch["attention_mask"] == 0)[after.logical_not()].sum() == 0  # padding is after
    for grad_y in seen:
        assert torch.all(grad_y[after] == 0)
        assert grad_y[~after].abs().sum() > 0


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("max_bytes", [1, 3 * 5 * 4 * 2, 10**9])
def test_per_sample_abs_grad_sum_is_a_sum_of_per_row_products(
    transposed: bool, max_bytes: int
) -> None:
    g = torch.Generator().manual_seed(0)
    x, grad_y = torch.randn(4, 6, 3, generator=g), torch.randn(4, 6, 5, generator=g)
    rows = [grad_y[i].T @ x[i] for i in range(4)]  # [out, in] per sample, as autograd's
    want = torch.stack(rows).abs().sum(dim=0)
    got = attribution.per_sample_abs_grad_sum(x, grad_y, transposed=transposed, max_bytes=max_bytes)
    torch.testing.assert_close(got, want.T if transposed else want)
    out = torch.ones_like(got)
    attribution.per_sample_abs_grad_sum(
        x, grad_y, transposed=transposed, max_bytes=max_bytes, out=out
    )
    torch.testing.assert_close(out, got + 1)
    with pytest.raises(UnsupportedModelError):  # tokens folded into rows: samples unknown
        attribution.per_sample_abs_grad_sum(
            x.reshape(24, 3), grad_y.reshape(24, 5), transposed=transposed, max_bytes=max_bytes
        )


def test_pipeline_masks_equal_batched_and_batch_one(
    tiny_model: Any, tokenizer: Any, harmful_examples: list[Example], benign_examples: list[Example]
) -> None:
    """The pipeline's per-matrix selection is the same with the batched sum_abs pass (the
    default) and the batch-1 one."""
    from types import SimpleNamespace

    from harmprune import pipeline

    model = tiny_model("phi3")
    loaded = SimpleNamespace(model=model, tokenizer=tokenizer)
    calibration = SimpleNamespace(
        harmful_examples=harmful_examples, benign_examples=benign_examples
    )
    pruning = SimpleNamespace(selection="per_matrix", preserve_score="sum_abs", p=0.05)
    config = SimpleNamespace(
        batch_size=4, max_backward_tokens=None, domain=SimpleNamespace(pruning=pruning)
    )
    q = 0.05
    chosen = {}
    for strategy in ("batched", "per_sample"):
        scores = pipeline.compute_scores(
            loaded,  # type: ignore[arg-type]
            calibration,  # type: ignore[arg-type]
            config,  # type: ignore[arg-type]
            q,
            lambda *_: None,
            None,
            sum_abs_strategy=strategy,  # type: ignore[arg-type]
        )
        chosen[strategy] = scores.selector.select(q)
    assert sum(s.protected_candidates for s in chosen["batched"].values()) > 0  # p matters
    for name, sel in chosen["per_sample"].items():
        assert torch.equal(chosen["batched"][name].pruned, sel.pruned), name
        assert torch.equal(chosen["batched"][name].candidates, sel.candidates), name


@pytest.mark.parametrize("rows", [1, 2, 5, 7, 8])
@pytest.mark.parametrize("max_tokens", [None, 1, 50, 99, 100, 260, 1000])
def test_backward_slices_cover_the_batch_within_the_cap(rows: int, max_tokens: int | None) -> None:
    chunk = [Example([1] * (10 + 15 * i), [1] * (10 + 15 * i)) for i in range(rows)]
    width = max(len(e.input_ids) for e in chunk)
    slices = attribution.backward_slices(chunk, max_tokens)
    assert [e for piece in slices for e in piece] == chunk  # every example once, in order
    if max_tokens is None or rows * width <= max_tokens:
        assert len(slices) == 1
    else:
        # within the cap unless a single row is already wider; sizes differ by at most one row
        assert all(len(piece) * width <= max(max_tokens, width) for piece in slices)
        assert max(map(len, slices)) - min(map(len, slices)) <= 1
        assert len(slices) == -(-rows // max(1, max_tokens // width))


@pytest.mark.parametrize("arch", ARCHS)
def test_scope_is_decoder_block_linear_weights(arch: str, tiny_model: Any) -> None:
    model = tiny_model(arch)
    params = attribution.scored_parameters(model)
    assert set(params) == expected_scope(model)
    named = dict(model.named_parameters())
    for name, p in params.items():
        assert named[name] is p
        assert p.dim() == 2
        assert not name.endswith(".bias")
        assert not re.search(r"embed|wte|wpe|lm_head|embed_out|norm|ln_", name), name
    excluded = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    assert not excluded & {id(p) for p in params.values()}
    # Every 2-D weight inside the blocks that is not a norm is scored: nothing is missed.
    layers = attribution.decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    block_ids = {id(p) for p in layers.parameters() if p.dim() == 2}
    assert block_ids == {id(p) for p in params.values()}
    if arch == "gpt2":
        conv = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
        assert conv and {f"{n}.weight" for n in conv} <= set(params)
        assert any(n.endswith("attn.c_attn.weight") for n in params)


def test_no_grads_left_and_requires_grad_restored(
    tiny_model: Any, tokenizer: Any, harmful_examples: list[Example], benign_examples: list[Example]
) -> None:
    model = tiny_model("gpt2")
    named = list(model.named_parameters())
    # A mixed pattern of flags, to see that each one comes back as it was.
    for i, (_, p) in enumerate(named):
        p.requires_grad_(i % 3 == 0)
    before = {n: p.requires_grad for n, p in named}
    params = attribution.scored_parameters(model)
    model.train()
    attribution.score_harm(
        model, params, harmful_examples, batch_size=2, pad_id=tokenizer.pad_token_id
    )
    for variant in ("sum_abs", "abs_mean"):
        attribution.score_preserve(
            model, params, benign_examples, variant, batch_size=2, pad_id=tokenizer.pad_token_id
        )
    assert model.training  # the train/eval mode is restored too
    for n, p in model.named_parameters():
        assert p.grad is None, n
        assert p.requires_grad == before[n], n


def test_scores_are_fp32_for_a_bf16_model(
    tiny_model: Any, tokenizer: Any, harmful_examples: list[Example]
) -> None:
    model = tiny_model("qwen2").to(torch.bfloat16)
    params = attribution.scored_parameters(model)
    harm = attribution.score_harm(
        model, params, harmful_examples[:2], batch_size=2, pad_id=tokenizer.pad_token_id
    )
    assert all(s.dtype == torch.float32 and torch.isfinite(s).all() for s in harm.values())
    assert any(s.abs().sum() > 0 for s in harm.values())
    # sum_abs: bf16 products (as autograd's bf16 gradients), summed in fp32; close to batch 1
    keep = {
        strategy: attribution.score_preserve(
            model,
            params,
            harmful_examples,
            "sum_abs",
            batch_size=4,
            pad_id=tokenizer.pad_token_id,
            sum_abs_strategy=strategy,
        )
        for strategy in ("batched", "per_sample")
    }
    for name, s in keep["batched"].items():
        assert s.dtype == torch.float32 and torch.isfinite(s).all(), name
        torch.testing.assert_close(
            s, keep["per_sample"][name], rtol=2e-2, atol=1e-3 * s.max().item()
        )


# ---------------------------------------------------------------- logits at scored positions only


@pytest.mark.parametrize("arch", ARCHS)
def test_response_losses_project_only_scored_positions_and_equal_full_logits(
    arch: str, tiny_model: Any, tokenizer: Any
) -> None:
    model = tiny_model(arch)
    exs = examples(tokenizer, HARMFUL + BENIGN)  # prompts of several lengths, right padding
    batch = collate(exs, tokenizer.pad_token_id)
    seen: list[int] = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            got = attribution.response_losses(model, batch)
    finally:
        handle.remove()
    first_response = min(
        e.labels.index(next(x for x in e.labels if x != IGNORE_INDEX)) for e in exs
    )
    width = batch["input_ids"].shape[1]
    assert seen == [width - (first_response - 1)], "the vocabulary projection ran on the prompt"
    with torch.no_grad():  # each sample alone, full logits, no padding: the definition
        want = []
        for e in exs:
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1].float()
            labels = torch.tensor(e.labels[1:])
            want.append(nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX))
        fallback = attribution.response_losses(NoLogitsToKeep(model), batch)
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fallback, got, rtol=1e-5, atol=1e-5)
    assert not attribution.takes_logits_to_keep(NoLogitsToKeep(model))


def test_non_finite_scores_refuse_the_job_naming_the_matrices() -> None:
    """A NaN never ranks: selection would silently take nothing from its matrix (issue 21)."""
    from harmprune.errors import AttributionError

    params = {
        "layers.0.q_proj.weight": nn.Parameter(torch.ones(2, 3)),
        "layers.1.v_proj.weight": nn.Parameter(torch.ones(3, 2)),
    }
    grads = {n: torch.ones_like(p) for n, p in params.items()}
    grads["layers.1.v_proj.weight"][0, 1] = float("nan")
    with pytest.raises(AttributionError) as caught:
        attribution.harm_score_map(params, grads)
    message = str(caught.value)
    assert "non-finite harm scores" in message and "1 of 2 matrices" in message
    assert "layers.1.v_proj.weight (1 of 6)" in message and "q_proj" not in message
    params["layers.0.q_proj.weight"].data[1, 2] = float("inf")
    clean = {n: torch.ones_like(p) for n, p in params.items()}
    with pytest.raises(AttributionError, match=r"non-finite preserve scores .*q_proj"):
        attribution.preserve_score_map(params, clean, "sum_abs", 4)
    finite = {n: nn.Parameter(torch.ones_like(p)) for n, p in params.items()}
    ok = attribution.harm_score_map(finite, {n: torch.ones_like(p) for n, p in finite.items()})
    assert all(bool(torch.isfinite(s).all()) for s in ok.values())
