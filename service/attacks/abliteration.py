"""Refusal-direction ablation ("abliteration"), as the popular tools do it.

Arditi et al. (2024) found that refusal is mediated by one direction of the residual stream;
FailSpy's abliterator and Heretic (p-e-w) remove it from the weights, with no training:

1. Activations: the residual stream at the LAST prompt token (the position that produces the
   first answer token, chat template and generation prompt included) after every decoder block,
   for the harmful and the benign calibration prompts.
2. Per block, the difference of means (harmful - benign) is a candidate direction. We choose the
   block whose direction best SEPARATES the two sets, measured as Cohen's d of the projections
   onto the direction (difference of the two means over the pooled standard deviation), with the
   direction CROSS-FITTED (estimated on one half of each set and applied to the other half, both
   ways) so that a direction fitted to noise in few prompts does not look separating. The
   projections' AUROC is reported next to it. Candidates are the blocks between 40% and 90% of
   the depth by default (Heretic's range: separation is strongest a little past the middle and
   the last blocks are a poor place to ablate). The direction is then re-estimated on all
   prompts and normalised.
3. Every weight that WRITES to the residual stream is orthogonalised against the direction
   r (unit): token and learned position embeddings, each block's attention output projection and
   MLP output projection, and their biases: W <- W - s * r r^T W (in the orientation where the
   residual dimension is the output), with strength s (1: nothing written has a component along
   r any more, so the model can no longer represent it). GPT-2's Conv1D stores weights
   transposed ([in, out]); tied input/output embeddings are untied for the attack, the output
   head keeping the original matrix (as abliterator, whose TransformerLens model unties them).
   Heretic leaves the embeddings alone and ablates only o_proj/down_proj; FailSpy also ablates
   the embeddings: we follow FailSpy, the stronger attack.

Everything happens in memory: `ablated(...)` saves the writers, orthogonalises, yields, and
copies the saved tensors back (bit for bit), also on errors. No file is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from harmprune.errors import UnsupportedModelError
from harmprune.inputs import data
from harmprune.method.attribution import decoder_layers
from harmprune.results import DirectionRecord as DirectionRecord
from harmprune.results import LayerSeparation as LayerSeparation
from torch import nn

# Leaf names of the modules that add a block's attention or MLP output to the residual stream:
# Llama family (o_proj, down_proj), GPT-2 (c_proj, twice), GPT-NeoX (dense, dense_4h_to_h),
# OPT/Falcon-style (out_proj, fc2, dense_4h_to_h), Mixtral experts (w2).
WRITER_NAMES = frozenset(
    {"o_proj", "down_proj", "c_proj", "dense", "dense_4h_to_h", "out_proj", "fc2", "w2"}
)


# ---------------------------------------------------------------- activations


def last_token_activations(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    fmt: data.PromptFormat,
    batch_size: int,
) -> torch.Tensor:
    """[prompts, blocks, hidden] fp32: each block's output at the prompt's last token."""
    blocks = decoder_layers(model)
    device = next(model.parameters()).device
    texts = [data.format_context(tokenizer, p, fmt) for p in prompts]
    # Same tokenisation as the rest of the engine: the chat template brings its own BOS.
    ids = [tokenizer(t, add_special_tokens=(fmt == "plain"))["input_ids"] for t in texts]
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    handles = [block.register_forward_hook(hook) for block in blocks]
    rows = []
    try:
        with torch.inference_mode():
            for start in range(0, len(ids), batch_size):
                chunk = ids[start : start + batch_size]
                examples = [data.Example(i, [data.IGNORE_INDEX] * len(i)) for i in chunk]
                batch = data.collate(examples, tokenizer.pad_token_id)  # right-padded
                last = torch.tensor([len(i) - 1 for i in chunk])
                captured.clear()
                model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    use_cache=False,
                )
                per_block = [h[torch.arange(len(chunk)), last.to(h.device)] for h in captured]
                rows.append(torch.stack(per_block, dim=1).float().cpu())
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(rows)


# ---------------------------------------------------------------- choosing the direction (pure)


def mean_difference(harmful: torch.Tensor, benign: torch.Tensor) -> torch.Tensor:
    """Unit vector along mean(harmful) - mean(benign) ([n, hidden] inputs)."""
    diff = harmful.mean(0) - benign.mean(0)
    return diff / diff.norm().clamp_min(1e-12)


def cohens_d(a: Sequence[float], b: Sequence[float]) -> float:
    """(mean a - mean b) / pooled standard deviation."""
    na, nb = len(a), len(b)
    ma, mb = sum(a) / na, sum(b) / nb
    var = (sum((x - ma) ** 2 for x in a) + sum((x - mb) ** 2 for x in b)) / max(1, na + nb - 2)
    return (ma - mb) / math.sqrt(var) if var > 0 else math.copysign(math.inf, ma - mb)


def auroc(a: Sequence[float], b: Sequence[float]) -> float:
    """P(x > y) for x from a, y from b (ties count half): the Mann-Whitney statistic."""
    wins = sum((x > y) + 0.5 * (x == y) for x in a for y in b)
    return wins / (len(a) * len(b))


def _halves(n: int, rng: random.Random) -> tuple[list[int], list[int]]:
    order = list(range(n))
    rng.shuffle(order)
    return sorted(order[: n // 2]), sorted(order[n // 2 :])


def cross_fitted_projections(
    harmful: torch.Tensor, benign: torch.Tensor, seed: int
) -> tuple[list[float], list[float]]:
    """Projections of every prompt onto a direction estimated WITHOUT it: each set is split in
    two seeded halves; the direction from halves A scores halves B and vice versa. With fewer
    than 2 prompts in a set there is nothing to hold out: in-sample projections."""
    if len(harmful) < 2 or len(benign) < 2:
        r = mean_difference(harmful, benign)
        return (harmful @ r).tolist(), (benign @ r).tolist()
    rng = random.Random(seed)
    h_a, h_b = _halves(len(harmful), rng)
    b_a, b_b = _halves(len(benign), rng)
    proj_h, proj_b = [], []
    for (fit_h, fit_b), (test_h, test_b) in (((h_a, b_a), (h_b, b_b)), ((h_b, b_b), (h_a, b_a))):
        r = mean_difference(harmful[fit_h], benign[fit_b])
        proj_h += (harmful[test_h] @ r).tolist()
        proj_b += (benign[test_b] @ r).tolist()
    return proj_h, proj_b


def separation_by_layer(
    harmful: torch.Tensor, benign: torch.Tensor, seed: int
) -> list[LayerSeparation]:
    """Cross-fitted Cohen's d and AUROC of every block ([n, blocks, hidden] inputs)."""
    out = []
    for layer in range(harmful.shape[1]):
        ph, pb = cross_fitted_projections(harmful[:, layer], benign[:, layer], seed)
        out.append(LayerSeparation(layer=layer, cohens_d=cohens_d(ph, pb), auroc=auroc(ph, pb)))
    return out


def candidate_layers(n_layers: int, window: tuple[float, float]) -> list[int]:
    """Blocks between window[0] and window[1] of the depth; all blocks if none falls inside
    (very shallow models)."""
    last = n_layers - 1
    inside = [i for i in range(n_layers) if window[0] * last <= i <= window[1] * last]
    return inside or list(range(n_layers))


def choose_layer(separations: Sequence[LayerSeparation], candidates: Sequence[int]) -> int:
    """The candidate block with the largest separation (Cohen's d); ties: the earlier block."""
    by_layer = {s.layer: s for s in separations}
    return max(candidates, key=lambda i: (by_layer[i].cohens_d, -i))


# ---------------------------------------------------------------- the residual writers


@dataclass(frozen=True)
class Writer:
    """A tensor that is added to the residual stream, and where the residual dimension is."""

    name: str
    tensor: torch.Tensor  # a parameter of the model, edited in place
    residual_axis: int  # 0: Linear weight [hidden, in]; -1: embeddings, Conv1D [in, hidden], bias


def _output_dim_and_axis(module: nn.Module) -> tuple[int, int] | None:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):  # weight [in, out]
        return int(module.nf), -1
    if isinstance(module, nn.Linear):  # weight [out, in]
        return int(module.out_features), 0
    return None


def residual_writers(model: nn.Module) -> list[Writer]:
    """Embeddings (token, learned positions), then per block the attention and MLP output
    projections with their biases. Raises if a block shows fewer than two writers."""
    hidden = int(_input_embeddings(model).weight.shape[1])
    names = {id(p): n for n, p in model.named_parameters()}
    blocks = decoder_layers(model)
    in_blocks = {id(m) for block in blocks for m in block.modules()}
    writers: list[Writer] = []
    for module in model.modules():
        if not isinstance(module, nn.Embedding) or id(module) in in_blocks:
            continue
        if module.weight.shape[1] == hidden:
            writers.append(Writer(names[id(module.weight)], module.weight, -1))
    for i, block in enumerate(blocks):
        found = 0
        for leaf, module in block.named_modules():
            shape = _output_dim_and_axis(module)
            if leaf.rsplit(".", 1)[-1] not in WRITER_NAMES or shape is None or shape[0] != hidden:
                continue
            writers.append(Writer(names[id(module.weight)], module.weight, shape[1]))
            bias = getattr(module, "bias", None)
            if bias is not None:
                writers.append(Writer(names[id(bias)], bias, -1))
            found += 1
        if found < 2:
            raise UnsupportedModelError(
                f"abliteration: block {i} has {found} recognised residual writer(s) "
                f"(expected attention and MLP output projections named {sorted(WRITER_NAMES)})"
            )
    return writers


def orthogonalise_(writer: Writer, direction: torch.Tensor, strength: float) -> None:
    """In place: remove `strength` x the writer's component along the unit `direction`."""
    w = writer.tensor.data
    r = direction.to(device=w.device, dtype=torch.float32)
    w32 = w.float()
    if w.dim() == 1:
        w32 -= strength * (w32 @ r) * r
    elif writer.residual_axis == 0:
        w32 -= strength * torch.outer(r, r @ w32)
    else:
        w32 -= strength * torch.outer(w32 @ r, r)
    w.copy_(w32.to(w.dtype))


def residual_component(writer: Writer, direction: torch.Tensor) -> torch.Tensor:
    """What the writer still writes along `direction` (0 after a full-strength ablation)."""
    w = writer.tensor.detach().float()
    r = direction.to(device=w.device, dtype=torch.float32)
    if w.dim() == 1:
        return (w @ r).reshape(1)
    return r @ w if writer.residual_axis == 0 else w @ r


def direction_fingerprint(
    direction: torch.Tensor, layer: int, strength: float, weights: Sequence[str]
) -> str:
    digest = hashlib.sha256(direction.detach().float().cpu().contiguous().numpy().tobytes())
    digest.update(json.dumps([layer, strength, list(weights)]).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- the attack


def _input_embeddings(model: nn.Module) -> Any:
    return getattr(model, "get_input_embeddings")()  # noqa: B009 (any transformers model)


def _tied_output_embeddings(model: nn.Module) -> Any:
    """The output head if it shares the input embedding matrix, else None."""
    get = getattr(model, "get_output_embeddings", None)
    out = get() if get is not None else None
    if out is not None and out.weight is _input_embeddings(model).weight:
        return out
    return None


@contextlib.contextmanager
def ablated(model: nn.Module, direction: torch.Tensor, strength: float) -> Iterator[list[str]]:
    """Orthogonalise every residual writer of `model` against `direction`, yield their names,
    and put every tensor back bit for bit on exit (the output head is re-tied)."""
    tied_head = _tied_output_embeddings(model)
    shared = tied_head.weight if tied_head is not None else None
    writers = residual_writers(model)
    saved = [w.tensor.detach().clone() for w in writers]
    try:
        if tied_head is not None:
            # The head reads the residual with the ORIGINAL matrix: untie it for the attack.
            tied_head.weight = nn.Parameter(tied_head.weight.detach().clone(), requires_grad=False)
        with torch.no_grad():
            for writer in writers:
                orthogonalise_(writer, direction, strength)
        yield [w.name for w in writers]
    finally:
        with torch.no_grad():
            for writer, original in zip(writers, saved, strict=True):
                writer.tensor.data.copy_(original)
        if tied_head is not None:
            tied_head.weight = shared


def find_direction(
    harmful: torch.Tensor,
    benign: torch.Tensor,
    *,
    window: tuple[float, float],
    layer: int | None,
    seed: int,
) -> tuple[torch.Tensor, int, list[LayerSeparation]]:
    """(unit direction, its block, every block's separation) from [n, blocks, hidden]
    activations; `layer` given: that block, else the best-separating candidate."""
    n_layers = harmful.shape[1]
    if layer is not None and layer >= n_layers:
        raise UnsupportedModelError(f"abliteration.layer {layer}: the model has {n_layers} blocks")
    separations = separation_by_layer(harmful, benign, seed)
    chosen = (
        layer
        if layer is not None
        else choose_layer(separations, candidate_layers(n_layers, window))
    )
    return mean_difference(harmful[:, chosen], benign[:, chosen]), chosen, separations
