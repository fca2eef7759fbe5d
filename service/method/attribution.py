"""Stage 3, attribution: per-weight harm and preserve scores (B-TAP), one backward per batch.

Scores, for each weight W of each scored matrix, over calibration pairs i with response-only
mean cross-entropy L_i:
- harm:               S_harm = -W * sum_i dL_i/dW            (signed)
- preserve, sum_abs:  S_keep = |W| * sum_i |dL_i/dW|         (default)
- preserve, abs_mean: S_keep = |W * mean_i dL_i/dW|          (the authors' later variant)

The reference implementation enables gradients for one decoder layer at a time and runs the
whole set once per layer. Here every scored layer folds its weight's gradient into an fp32
buffer during backward (a custom autograd function in place of its forward: the GEMM that
would make autograd's gradient accumulates into the buffer instead), so one forward+backward
per batch scores every layer and full gradients are never held.

Sums over samples are linear, so the harm pass (and abs_mean) back-propagates a whole batch at
once (the loss is the sum of per-sample means). sum_abs needs each sample's own gradient, and
|.| of a batch gradient is not the sum of per-sample |.|. Two strategies:
- "batched" (default): one batched backward; each scored layer's weight gradient of sample i is
  the product of that sample's output gradients and inputs (dL_i/dW = sum_t dy_it^T x_it), which
  the batched backward already has. A custom autograd function in place of each scored layer's
  forward forms these products in backward for a group of samples at a time (at most
  `per_sample_bytes` of them), folds sum_i |.| into the fp32 buffer and frees them. Autograd's
  own batch gradient of the weight is never computed.
- "per_sample": one backward per sample, |.| of each gradient (the original path, kept for the
  benchmark's comparison).
For the same linearity a batch may be back-propagated in slices with the same scores:
`max_tokens` caps the padded tokens of one backward, which bounds the activation memory (the
attribution's peak) whatever the batch size. One long sequence can still need more activation
memory than the device has: `recompute` keeps only each decoder block's input and recomputes the
block in backward (gradient checkpointing: about a third more compute, the same gradients).

This module keeps the hooks and bookkeeping; the score formulas are plain tensor functions.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from harmprune.errors import AttributionError, JobCancelled, UnsupportedModelError
from harmprune.inputs.data import IGNORE_INDEX, Example, collate
from torch import nn

GradReduction = Literal["sum", "sum_abs"]
SumAbsStrategy = Literal["batched", "per_sample"]

# The per-sample weight gradients of one layer formed at once, in bytes (a group of samples as
# large as fits; one sample at least). 256 MiB: a whole batch of 8 for matrices up to ~8M
# weights in fp32, groups of 2 for Llama-8B's MLP in bf16; within the preflight's 1 GB slack.
PER_SAMPLE_BYTES = 256 * 2**20


# ---------------------------------------------------------------- scope


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks: the ModuleList as long as num_hidden_layers."""
    model_config: Any = model.config  # a transformers PretrainedConfig (nn.Module types it loosely)
    config = (
        model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
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
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _weight(module: nn.Module) -> Any:
    """A linear module's weight (typed loosely: nn.Module attributes are Tensor | Module)."""
    return getattr(module, "weight", None)


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's linear layer, weight stored transposed: [in, out], y = x W + b."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def scored_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every linear weight inside the decoder blocks, by its name in `model.named_parameters()`.

    Embeddings, lm_head, norms and biases are out of scope (the method's definition).
    """
    layers = decoder_layers(model)
    wanted = {
        id(module.weight)
        for block in layers
        for module in block.modules()
        if _is_linear(module) and _weight(module) is not None and _weight(module).dim() == 2
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


def per_sample_abs_grad_sum(
    inputs: torch.Tensor,
    grad_outputs: torch.Tensor,
    *,
    transposed: bool,
    max_bytes: int,
    out: torch.Tensor | None = None,
    scratch: Scratch | None = None,
) -> torch.Tensor:
    """sum_i |dL_i/dW| of one linear layer, fp32, from one batched backward (added into `out`).

    inputs x: [rows, tokens, in], grad_outputs dy: [rows, tokens, out], row i = sample i. Sample
    i's weight gradient is dy_i^T x_i ([out, in]; `transposed`, GPT-2's Conv1D: x_i^T dy_i,
    [in, out]). Positions that feed no scored prediction (a row's padding, everything from its
    last response token on) have dy = 0 exactly and add nothing (x there is finite: right
    padding, causal attention); prompt positions do feed later predictions, as in the unpadded
    per-sample gradient. The products of a group of samples are formed at once, as many as fit
    in `max_bytes` (one at least), in the inputs' dtype (what autograd's own gradient would
    be), in `scratch` when given (reused across layers); |.| is summed in fp32.
    """
    if inputs.dim() != 3 or grad_outputs.dim() != 3 or inputs.shape[:2] != grad_outputs.shape[:2]:
        raise UnsupportedModelError(
            f"per-sample gradients need [batch, tokens, features] inputs and output gradients, "
            f"got {tuple(inputs.shape)} and {tuple(grad_outputs.shape)}; "
            "use sum_abs_strategy='per_sample'"
        )
    left, right = (inputs, grad_outputs) if transposed else (grad_outputs, inputs)
    shape = (left.shape[-1], right.shape[-1])
    if out is None:
        out = torch.zeros(shape, dtype=torch.float32, device=inputs.device)
    per_sample = shape[0] * shape[1] * left.element_size()
    group = max(1, max_bytes // per_sample)
    if scratch is None:
        scratch = Scratch()
    for start in range(0, left.shape[0], group):
        stop = min(start + group, left.shape[0])
        products = scratch.take((stop - start, *shape), left)
        torch.bmm(left[start:stop].transpose(1, 2), right[start:stop], out=products)
        products.abs_()
        for product in products:  # in the order of the batch-1 path; add_ upcasts into fp32
            out.add_(product)
    return out


class Scratch:
    """One reusable buffer for the per-sample products of every layer of a pass.

    A fresh multi-MB tensor per layer costs page faults on every call (CPU allocations that size
    are new mappings); reusing one buffer, grown to the largest group, took 10-25% off the fold
    of SmolLM2's seven layer shapes in a (noisy) CPU micro-benchmark. It holds at most
    `max_bytes`, as the fresh tensors did.
    """

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def take(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        n = math.prod(shape)
        buf = self._buffer
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            self._buffer = buf = None  # free the old one before allocating the larger one
            self._buffer = buf = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf[:n].view(shape)


# ---------------------------------------------------------------- the hook machinery


def response_losses(
    model: nn.Module, batch: dict[str, torch.Tensor], hits_out: list[int] | None = None
) -> torch.Tensor:
    """Per-sample mean cross-entropy over response tokens (labels != -100), in fp32.

    With `hits_out`, also appends (tokens where argmax == label, response tokens) for evaluation.
    """
    logits, labels = scored_logits(model, batch)
    token_loss = nn.functional.cross_entropy(
        logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    scored = labels != IGNORE_INDEX
    if hits_out is not None:
        hits_out.extend([int(((logits.argmax(-1) == labels) & scored).sum()), int(scored.sum())])
    return token_loss.sum(dim=1) / scored.sum(dim=1).clamp(min=1)


def scored_logits(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits and the labels they predict, from the batch's first scored position on.

    Prompt positions carry no loss, so the vocabulary projection (and the softmax after it) runs
    only from the first response label of any row: `logits_to_keep`, which transformers' causal
    LMs take (it also applies their own logit scaling or soft-capping); on a chat-formatted
    batch that skips the prompt's share of both. A forward that does not take it (custom code,
    adapter wrappers) gives full logits, sliced.
    """
    labels = batch["labels"][:, 1:]  # logits at position t predict token t + 1
    scored_at = (labels != IGNORE_INDEX).any(dim=0).nonzero().flatten()
    first = int(scored_at[0]) if scored_at.numel() else labels.shape[1]
    # no KV cache: nothing is generated, and a cache would be filled twice under recomputation
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if first > 0 and takes_logits_to_keep(model):
        keep = batch["input_ids"].shape[1] - first  # >= 1 (0 would mean "all" to transformers)
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits[:, :-1]
    else:
        logits = model(**inputs, use_cache=False).logits[:, first:-1]
    return logits.float(), labels[:, first:]


def takes_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


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
def instance_forwards(forwards: dict[nn.Module, Callable[..., Any]]) -> Iterator[None]:
    """Each module's forward replaced by the given function, and put back afterwards.

    A module may already carry an instance-level forward (accelerate's hooks leave one): that one
    is restored, not the class's method.
    """
    saved = {module: module.__dict__.get("forward") for module in forwards}
    for module, forward in forwards.items():
        module.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        for module, before in saved.items():
            if before is None:
                del module.forward
            else:
                module.forward = before  # type: ignore[method-assign]


@contextlib.contextmanager
def recomputed_blocks(model: nn.Module) -> Iterator[None]:
    """Gradient checkpointing of every decoder block, for our passes only and in eval mode.

    transformers' own `gradient_checkpointing_enable` acts in training mode only (dropout on),
    so each block's forward is wrapped here instead: the block's input is saved, its inner
    activations are recomputed during backward (non-reentrant checkpoint: parameter gradients
    arrive even though the embeddings' output does not require grad).
    """
    from torch.utils.checkpoint import checkpoint

    def checkpointed(inner: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)

        return forward

    with instance_forwards({block: checkpointed(block.forward) for block in decoder_layers(model)}):
        yield


@contextlib.contextmanager
def gradients_folded_into(
    params: dict[str, nn.Parameter],
    buffers: dict[str, torch.Tensor],
    *,
    take_abs: bool,
    local: Callable[[torch.Tensor], torch.Tensor] = lambda grad: grad,
) -> Iterator[None]:
    """Each parameter's gradient (|.| of it with `take_abs`) added to its fp32 buffer as soon as
    autograd has accumulated it, then freed: full gradients are never held. `local`: the part of
    the gradient the buffer holds (a DTensor's local shard under FSDP)."""

    def make_hook(buffer: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def fold(param: torch.Tensor) -> None:
            grad = local(param.grad)  # type: ignore[arg-type]
            buffer.add_(grad.abs() if take_abs else grad)  # add_ upcasts bf16 into fp32
            param.grad = None

        return fold

    handles = [
        p.register_post_accumulate_grad_hook(make_hook(buffers[n])) for n, p in params.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# What a scored layer does with its inputs and output gradients in backward: returns the
# weight's gradient to hand to autograd, or None when it consumed them (folded into a buffer).
LayerFold = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | None"]


class _FoldedWeightGrad(torch.autograd.Function):
    """y = the layer's own forward(x); in backward, dL/dx as autograd computes it, and the inputs
    with the output gradients go to the layer's fold (the batch sum, or per-sample |gradients|,
    into a buffer) in place of autograd's batch gradient of the weight.

    x and W are saved with `save_for_backward`, so under gradient checkpointing they are dropped
    and recomputed like any other saved activation (a forward hook holding x would keep it).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        layer_forward: Callable[[torch.Tensor], torch.Tensor],
        transposed: bool,
        fold: LayerFold,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.transposed, ctx.fold = transposed, fold
        return layer_forward(x)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:  # Linear: y = x W^T, dx = dy W; Conv1D: y = x W, dx = dy W^T
            grad_x = grad_y @ (weight.t() if ctx.transposed else weight)
        grad_w = ctx.fold(x, grad_y)
        return grad_x, grad_w if ctx.needs_input_grad[1] else None, None, None, None


def scored_layers(model: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, nn.Module]:
    """The Linear/Conv1D module of every scored weight, by the weight's name."""
    layers = {
        f"{name}.weight": module
        for name, module in model.named_modules()
        if _is_linear(module) and f"{name}.weight" in params
    }
    missing = set(params) - set(layers)
    if missing:
        raise UnsupportedModelError(f"no linear layer owns the scored weights {sorted(missing)}")
    return layers


@contextlib.contextmanager
def layer_gradients_folded(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    fold_for: Callable[[str, bool], LayerFold],
) -> Iterator[None]:
    """Every scored layer's forward runs as `_FoldedWeightGrad`: a batched backward hands each
    layer's inputs and output gradients to `fold_for(weight name, transposed)`.

    The layer's bias must not need a gradient (biases are not scored): the function gives it none.
    """
    forwards = {}
    for name, module in scored_layers(model, params).items():
        bias = getattr(module, "bias", None)
        if bias is not None and bias.requires_grad:
            raise ValueError(f"{name}: folded gradients leave the bias without a gradient")
        transposed = _is_conv1d(module)
        forwards[module] = _folding_forward(module, transposed, fold_for(name, transposed))
    with instance_forwards(forwards):
        yield


def _folding_forward(
    module: nn.Module, transposed: bool, fold: LayerFold
) -> Callable[[torch.Tensor], torch.Tensor]:
    inner = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        # the weight as the module holds it NOW (FSDP swaps in the unsharded one per forward)
        out: torch.Tensor = _FoldedWeightGrad.apply(x, module.weight, inner, transposed, fold)
        return out

    return forward


def fold_per_sample_into(
    buffers: dict[str, torch.Tensor], max_bytes: int
) -> Callable[[str, bool], LayerFold]:
    """The one-device fold: sum_i |dL_i/dW| added straight into the weight's fp32 buffer."""

    scratch = Scratch()

    def fold_for(name: str, transposed: bool) -> LayerFold:
        def fold(x: torch.Tensor, grad_y: torch.Tensor) -> None:
            per_sample_abs_grad_sum(
                x,
                grad_y,
                transposed=transposed,
                max_bytes=max_bytes,
                out=buffers[name],
                scratch=scratch,
            )

        return fold

    return fold_for


def fold_batch_into(buffers: dict[str, torch.Tensor]) -> Callable[[str, bool], LayerFold]:
    """The one-device fold of a plain sum: sum_i dL_i/dW = dy^T x over every row and token,
    accumulated straight into the weight's fp32 buffer by one GEMM (no gradient tensor of its
    own to allocate, no second pass over it to add it)."""

    def fold_for(name: str, transposed: bool) -> LayerFold:
        buffer = buffers[name]

        def fold(x: torch.Tensor, grad_y: torch.Tensor) -> None:
            left, right = (x, grad_y) if transposed else (grad_y, x)
            left, right = left.reshape(-1, left.shape[-1]), right.reshape(-1, right.shape[-1])
            if left.dtype == buffer.dtype:
                buffer.addmm_(left.t(), right)
            else:  # bf16/fp16 weights: the product in their dtype, as autograd's; add_ upcasts
                buffer.add_(left.t() @ right)

        return fold

    return fold_for


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
    sum_abs_strategy: SumAbsStrategy = "batched",
    per_sample_bytes: int = PER_SAMPLE_BYTES,
    on_step: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """sum_i g_i (reduction="sum") or sum_i |g_i| ("sum_abs") per scored matrix, in fp32.

    Each scored layer folds its weight's gradient into the buffer in backward
    (`layer_gradients_folded`): "sum" as one GEMM over the batch; `sum_abs` with
    `sum_abs_strategy="batched"` as per-sample products (at most `per_sample_bytes` at once);
    "per_sample" back-propagates one sample at a time (hooks on the weights' gradients).
    `max_tokens` (padded tokens per backward) splits a batch into equal slices; `recompute`
    checkpoints every decoder block.
    """
    one_by_one = reduction == "sum_abs" and sum_abs_strategy == "per_sample"
    if one_by_one:
        batch_size = 1
    device = next(iter(params.values())).device
    buffers = {
        name: torch.zeros(p.shape, dtype=torch.float32, device=device) for name, p in params.items()
    }
    folding: contextlib.AbstractContextManager[None]
    if one_by_one:
        folding = gradients_folded_into(params, buffers, take_abs=True)
    elif reduction == "sum":
        folding = layer_gradients_folded(model, params, fold_batch_into(buffers))
    else:
        folding = layer_gradients_folded(
            model, params, fold_per_sample_into(buffers, per_sample_bytes)
        )
    was_training = model.training
    model.eval()  # no dropout: scores must be deterministic
    recomputing = recomputed_blocks(model) if recompute else contextlib.nullcontext()
    try:
        # Hooks are registered inside `only_these_require_grad`: torch refuses a hook on a tensor
        # that does not require grad, so a frozen model (requires_grad=False) would fail.
        with (
            only_these_require_grad(model, list(params.values())),
            torch.enable_grad(),
            recomputing,
            folding,
        ):
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


def check_finite(scores: dict[str, torch.Tensor], kind: str) -> None:
    """AttributionError naming every matrix whose `kind` scores hold a NaN or an infinity: a
    NaN never ranks, so selection would silently take nothing (or garbage) from that matrix.
    One reduction per matrix (a sum is non-finite iff some element is, short of overflow at
    ~3e38); the elements are counted only on failure."""
    bad = [n for n, s in scores.items() if not bool(torch.isfinite(s.sum()))]
    if not bad:
        return
    counts = [
        f"{n} ({int((~torch.isfinite(scores[n])).sum())} of {scores[n].numel()})" for n in bad
    ]
    shown = ", ".join(counts[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
    raise AttributionError(
        f"non-finite {kind} scores (NaN or infinity) in {len(bad)} of {len(scores)} matrices: "
        f"{shown}. The weights or gradients overflowed (try dtype float32) or are corrupt; "
        "nothing was pruned"
    )


def harm_score_map(
    params: dict[str, nn.Parameter], grad_sums: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """S_harm per matrix, computed IN PLACE in the gradient buffers (no second full buffer);
    non-finite scores refuse the job (`check_finite`)."""
    for n, buf in grad_sums.items():
        buf.mul_(params[n].detach()).neg_()
    check_finite(grad_sums, "harm")
    return grad_sums


def preserve_score_map(
    params: dict[str, nn.Parameter],
    grads: dict[str, torch.Tensor],
    variant: Literal["sum_abs", "abs_mean"],
    n_examples: int,
) -> dict[str, torch.Tensor]:
    """S_keep per matrix, IN PLACE in the gradient buffers; non-finite scores refuse the job."""
    for n, buf in grads.items():
        w = params[n].detach()
        if variant == "sum_abs":
            buf.mul_(w.abs())
        else:
            buf.div_(n_examples).mul_(w).abs_()
    check_finite(grads, "preserve")
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
