"""Stage 3, attribution: per-weight harm and preserve scores (B-TAP), one backward per batch.

Scores, for each weight W of each scored matrix, over calibration pairs i with response-only
mean cross-entropy L_i:
- harm:               S_harm = -W * sum_i dL_i/dW            (signed)
- preserve, sum_abs:  S_keep = |W| * sum_i |dL_i/dW|         (default)
- preserve, abs_mean: S_keep = |W * mean_i dL_i/dW|          (the authors' later variant)

The reference implementation enables gradients for one decoder layer at a time and runs the
whole set once per layer. Here every scored weight gets a post-accumulate-grad hook that folds
its gradient into an fp32 buffer the moment autograd produces it and frees it, so one
forward+backward per batch scores every layer and full gradients are never held.

Sums over samples are linear, so the harm pass (and abs_mean) back-propagates a whole batch at
once (the loss is the sum of per-sample means). sum_abs needs each sample's own gradient, so that
pass back-propagates one sample at a time. For the same reason a batch may be back-propagated in
slices with the same scores: `max_tokens` caps the padded tokens of one backward, which bounds
the activation memory (the attribution's peak) whatever the batch size. One long sequence can
still need more activation memory than the device has: `recompute` keeps only each
decoder block's input and recomputes the block in backward (gradient checkpointing: about a
third more compute, the same gradients).

This module keeps the hooks and bookkeeping; the score formulas are plain tensor functions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from harmprune.data import IGNORE_INDEX, Example, collate
from harmprune.errors import JobCancelled, UnsupportedModelError
from torch import nn

GradReduction = Literal["sum", "sum_abs"]


# ---------------------------------------------------------------- scope


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks: the ModuleList as long as num_hidden_layers."""
    config = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    n_layers = getattr(config, "num_hidden_layers", None)
    candidates = [
        m
        for m in model.modules()
        if isinstance(m, nn.ModuleList) and len(m) == n_layers and n_layers
    ]
    if not candidates:
        raise UnsupportedModelError(
            f"unsupported architecture '{config.model_type}': no stack of {n_layers} decoder blocks found"
        )
    return max(candidates, key=lambda m: sum(p.numel() for p in m.parameters()))


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D  # GPT-2's transposed linear layer

    return isinstance(module, nn.Linear | Conv1D)


def scored_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every linear weight inside the decoder blocks, by its name in `model.named_parameters()`.

    Embeddings, lm_head, norms and biases are out of scope (the method's definition).
    """
    layers = decoder_layers(model)
    wanted = {
        id(module.weight)
        for block in layers
        for module in block.modules()
        if _is_linear(module) and module.weight is not None and module.weight.dim() == 2
    }
    named = {name: p for name, p in model.named_parameters() if id(p) in wanted}
    if not named:
        raise UnsupportedModelError("no linear weights found inside the decoder blocks")
    return named


# ---------------------------------------------------------------- scores (pure)


def harm_scores(weight: torch.Tensor, grad_sum: torch.Tensor) -> torch.Tensor:
    return -(weight.float() * grad_sum)


def preserve_scores_sum_abs(weight: torch.Tensor, abs_grad_sum: torch.Tensor) -> torch.Tensor:
    return weight.float().abs() * abs_grad_sum


def preserve_scores_abs_mean(weight: torch.Tensor, grad_sum: torch.Tensor, n: int) -> torch.Tensor:
    return (weight.float() * (grad_sum / n)).abs()


# ---------------------------------------------------------------- the hook machinery


def response_losses(
    model: nn.Module, batch: dict[str, torch.Tensor], hits_out: list[int] | None = None
) -> torch.Tensor:
    """Per-sample mean cross-entropy over response tokens (labels != -100), in fp32.

    With `hits_out`, also appends (tokens where argmax == label, response tokens) for evaluation.
    """
    # no KV cache: nothing is generated, and a cache would be filled twice under recomputation
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    token_loss = nn.functional.cross_entropy(
        logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    scored = labels != IGNORE_INDEX
    if hits_out is not None:
        hits_out.extend([int(((logits.argmax(-1) == labels) & scored).sum()), int(scored.sum())])
    return token_loss.sum(dim=1) / scored.sum(dim=1).clamp(min=1)


@contextlib.contextmanager
def only_these_require_grad(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Gradients for the scored weights alone: no work or memory spent on embeddings and norms."""
    before = {id(p): p.requires_grad for p in model.parameters()}
    keep = {id(p) for p in params}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p in model.parameters():
            p.requires_grad_(before[id(p)])
            p.grad = None


@contextlib.contextmanager
def recomputed_blocks(model: nn.Module) -> Iterator[None]:
    """Gradient checkpointing of every decoder block, for our passes only and in eval mode.

    transformers' own `gradient_checkpointing_enable` acts in training mode only (dropout on),
    so each block's forward is wrapped here instead: the block's input is saved, its inner
    activations are recomputed during backward (non-reentrant checkpoint: parameter gradients
    arrive even though the embeddings' output does not require grad).
    """
    from torch.utils.checkpoint import checkpoint

    blocks = list(decoder_layers(model))
    # a block may already carry an instance-level forward (accelerate's hooks): put it back after
    saved = [block.__dict__.get("forward") for block in blocks]
    for block in blocks:
        inner = block.forward

        def checkpointed(*args: Any, _inner: Callable[..., Any] = inner, **kwargs: Any) -> Any:
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed  # type: ignore[method-assign]
    try:
        yield
    finally:
        for block, forward in zip(blocks, saved, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward  # type: ignore[method-assign]


def accumulate_gradients(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    examples: Sequence[Example],
    *,
    reduction: GradReduction,
    batch_size: int,
    pad_id: int,
    max_tokens: int | None = None,
    recompute: bool = False,
    on_step: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """sum_i g_i (reduction="sum") or sum_i |g_i| ("sum_abs") per scored matrix, in fp32.

    `sum_abs` forces one sample per backward: |.| of a batch gradient is not the sum of |.|.
    `max_tokens` (padded tokens per backward) splits a batch into equal slices; `recompute`
    checkpoints every decoder block (`recomputed_blocks`).
    """
    if reduction == "sum_abs":
        batch_size = 1
    device = next(iter(params.values())).device
    buffers = {
        name: torch.zeros(p.shape, dtype=torch.float32, device=device) for name, p in params.items()
    }

    def make_hook(buffer: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def fold(param: torch.Tensor) -> None:
            grad = param.grad
            if reduction == "sum_abs":
                buffer.add_(grad.abs())  # type: ignore[union-attr]
            else:
                buffer.add_(grad)  # type: ignore[arg-type]  # add_ upcasts bf16 into fp32
            param.grad = None  # free it now: full gradients are never held

        return fold

    # Hooks are registered inside `only_these_require_grad`: torch refuses a hook on a tensor
    # that does not require grad, so a frozen model (requires_grad=False) would fail.
    handles: list[Any] = []
    was_training = model.training
    model.eval()  # no dropout: scores must be deterministic
    recomputing = recomputed_blocks(model) if recompute else contextlib.nullcontext()
    try:
        with (
            only_these_require_grad(model, list(params.values())),
            torch.enable_grad(),
            recomputing,
        ):
            for n, p in params.items():
                handles.append(p.register_post_accumulate_grad_hook(make_hook(buffers[n])))
            for start in range(0, len(examples), batch_size):
                if should_cancel and should_cancel():
                    raise JobCancelled("cancelled during attribution")
                chunk = examples[start : start + batch_size]
                for piece in backward_slices(chunk, max_tokens):
                    batch = {k: v.to(device) for k, v in collate(piece, pad_id).items()}
                    response_losses(model, batch).sum().backward()
                if on_step:
                    on_step(min(start + batch_size, len(examples)), len(examples))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return buffers


def backward_slices(chunk: Sequence[Example], max_tokens: int | None) -> list[Sequence[Example]]:
    """The batch in as few equal slices as keep rows x padded length <= max_tokens (>= 1 row)."""
    width = max(len(e.input_ids) for e in chunk)
    if max_tokens is None or len(chunk) * width <= max_tokens:
        return [chunk]
    n_slices = -(-len(chunk) // max(1, max_tokens // width))
    rows = -(-len(chunk) // n_slices)  # equal slices, never more rows than the budget allows
    return [chunk[i : i + rows] for i in range(0, len(chunk), rows)]


def harm_score_map(
    params: dict[str, nn.Parameter], grad_sums: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """S_harm per matrix, computed IN PLACE in the gradient buffers (no second full buffer)."""
    for n, buf in grad_sums.items():
        buf.mul_(params[n].detach()).neg_()
    return grad_sums


def preserve_score_map(
    params: dict[str, nn.Parameter],
    grads: dict[str, torch.Tensor],
    variant: Literal["sum_abs", "abs_mean"],
    n_examples: int,
) -> dict[str, torch.Tensor]:
    """S_keep per matrix, IN PLACE in the gradient buffers."""
    for n, buf in grads.items():
        w = params[n].detach()
        if variant == "sum_abs":
            buf.mul_(w.abs())
        else:
            buf.div_(n_examples).mul_(w).abs_()
    return grads


def score_harm(
    model: nn.Module, params: dict[str, nn.Parameter], examples: Sequence[Example], **kw: Any
) -> dict[str, torch.Tensor]:
    """S_harm for every scored matrix (one batched pass over the harmful set)."""
    grads = accumulate_gradients(model, params, examples, reduction="sum", **kw)
    return harm_score_map(params, grads)


def score_preserve(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    examples: Sequence[Example],
    variant: Literal["sum_abs", "abs_mean"],
    **kw: Any,
) -> dict[str, torch.Tensor]:
    """S_keep for every scored matrix (one pass over the benign set)."""
    reduction: GradReduction = "sum_abs" if variant == "sum_abs" else "sum"
    grads = accumulate_gradients(model, params, examples, reduction=reduction, **kw)
    return preserve_score_map(params, grads, variant, len(examples))
