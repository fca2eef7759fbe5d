"""The fine-tuning attack: train a stand-in of a model, record exactly what was trained.

An attacker with the weights fine-tunes them. Two checks use this module:
- the tamper check (service/measure/tamper.py): one narrow-domain fine-tune, harm measured broadly;
- the `finetune` attack of `attacks:` (below): a GRID of learning rates x steps, every cell
  applied identically to the original, the hardened model and the random control; per model,
  the worst case for harm among the cells whose benign loss stays under the spec's bound
  (defences that hold at one setting often fall at another, as TamperBench reports). The worst
  case and the bound are decided on the VALIDATION set; the chosen cell's test measurement is
  reported (choosing the maximum on the test set would bias the reported worst case upward).

Weights: a LoRA attack wraps the model with `peft`, trains only the adapters and removes them
without merging (the base weights never change); a full fine-tune trains a deep copy that is
discarded. Either way the model is left bit for bit as it came.

Identical attacks: the batches are a pure function of (data size, steps, batch size, seed), the
RNG (LoRA initialisation) is reseeded, and the fingerprint hashes the settings and every batch's
token ids and labels in training order: equal fingerprints = the same attack.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, Protocol

import torch
from harmprune.errors import JobCancelled, SpecError
from harmprune.inputs import data
from harmprune.method.attribution import response_losses
from harmprune.results import AttackRecord, CellResult, Measurement
from pydantic import BaseModel, ConfigDict
from torch import nn

CancelFn = Callable[[], bool]


def counted_steps(
    total: int,
    on_progress: Callable[[int, int], None] | None,
    should_cancel: Callable[[], bool] | None,
    during: str,
) -> Callable[[], None]:
    """A `step()` for a multi-model check: report one more of `total` steps, then stop the job
    if it was cancelled (between steps, never inside a training or measuring pass)."""
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if on_progress:
            on_progress(done, total)
        if should_cancel and should_cancel():
            raise JobCancelled(f"the job was cancelled during {during}")

    return step


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Recipe(Protocol):
    """What a fine-tuning attack needs to know (TamperConfig and GridCell both are one)."""

    @property
    def method(self) -> Literal["lora", "full"]: ...
    @property
    def steps(self) -> int: ...
    @property
    def rank(self) -> int: ...
    @property
    def alpha(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def target_modules(self) -> list[str] | None: ...
    def learning_rate(self) -> float: ...


class GridCell(Frozen):
    """One cell of the fine-tuning grid: a complete recipe."""

    method: Literal["lora", "full"]
    lr: float
    steps: int
    rank: int
    alpha: int
    batch_size: int
    target_modules: list[str] | None = None

    def learning_rate(self) -> float:
        return self.lr


# ---------------------------------------------------------------- one attack


def batch_plan(n: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """`steps` batches of example indices: seeded shuffled epochs, concatenated. The same plan
    (a pure function of its arguments) is trained on by every model."""
    if n <= 0:
        raise SpecError("the fine-tuning set is empty: nothing to fine-tune on")
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        epoch = list(range(n))
        rng.shuffle(epoch)
        order.extend(epoch)
    return [order[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


def _settings_header(cfg: Recipe, seed: int) -> bytes:
    settings = {
        "method": cfg.method,
        "seed": seed,
        "steps": cfg.steps,
        "lr": cfg.learning_rate(),
        "batch_size": cfg.batch_size,
        "rank": cfg.rank if cfg.method == "lora" else None,
        "alpha": cfg.alpha if cfg.method == "lora" else None,
        "target_modules": cfg.target_modules,
    }
    return json.dumps(settings, sort_keys=True).encode()


def _mean_loss(model: nn.Module, examples: Sequence[data.Example], pad_id: int, bs: int) -> float:
    device = next(model.parameters()).device
    losses = []
    with torch.inference_mode():
        for start in range(0, len(examples), bs):
            batch = data.collate(examples[start : start + bs], pad_id)
            losses.append(response_losses(model, {k: v.to(device) for k, v in batch.items()}))
    return float(torch.cat(losses).mean())


def _rng_devices(model: nn.Module) -> list[int]:
    device = next(model.parameters()).device
    return [device.index or 0] if device.type == "cuda" else []


@contextlib.contextmanager
def attacked(
    model: nn.Module,
    examples: Sequence[data.Example],
    cfg: Recipe,
    *,
    seed: int,
    pad_id: int,
    should_cancel: CancelFn | None = None,
) -> Iterator[tuple[nn.Module, AttackRecord]]:
    """Fine-tune a stand-in of `model` and yield it (in eval mode) with the record of the attack.

    lora: adapters are injected into `model` itself and removed without merging on exit; full: a
    deep copy is trained and dropped on exit. Either way `model`'s weights, modules, requires_grad
    flags and training mode are as before once the block exits (also on errors).
    """
    plan = batch_plan(len(examples), cfg.steps, cfg.batch_size, seed)
    was_training = model.training
    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    peft_model: Any = None
    target: nn.Module = model
    # The attack reseeds (LoRA init, dropout) without disturbing the job's own RNG stream.
    with torch.random.fork_rng(devices=_rng_devices(model)):
        torch.manual_seed(seed)
        try:
            if cfg.method == "lora":
                from peft import LoraConfig, get_peft_model

                lora = LoraConfig(
                    r=cfg.rank,
                    lora_alpha=cfg.alpha,
                    lora_dropout=0.0,
                    target_modules=cfg.target_modules or "all-linear",
                    bias="none",
                    task_type="CAUSAL_LM",
                )
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    peft_model = get_peft_model(model, lora)
                trainable = [p for p in peft_model.parameters() if p.requires_grad]
            else:
                target = copy.deepcopy(model)
                for p in target.parameters():
                    p.requires_grad_(True)
                trainable = list(target.parameters())
            record = _train(target, trainable, examples, plan, cfg, seed, pad_id, should_cancel)
            target.eval()
            yield target, record
        finally:
            if peft_model is not None:
                peft_model.unload()  # drop the adapters, never merge them
            del target
            for name, p in model.named_parameters():
                p.requires_grad_(requires.get(name, p.requires_grad))
                p.grad = None
            model.train(was_training)
            leftovers = [n for n, _ in model.named_parameters() if "lora_" in n]
            if leftovers:
                raise RuntimeError(f"LoRA adapters left in the model: {leftovers[:3]}")


def _train(
    model: nn.Module,
    trainable: list[nn.Parameter],
    examples: Sequence[data.Example],
    plan: list[list[int]],
    cfg: Recipe,
    seed: int,
    pad_id: int,
    should_cancel: CancelFn | None,
) -> AttackRecord:
    device = next(model.parameters()).device
    eval_bs = max(cfg.batch_size, 8)
    model.eval()
    loss_before = _mean_loss(model, examples, pad_id, eval_bs)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate(), weight_decay=0.0)
    digest = hashlib.sha256(_settings_header(cfg, seed))
    step_losses = []
    model.train()
    with torch.enable_grad():
        for indices in plan:
            if should_cancel and should_cancel():
                raise JobCancelled("cancelled during a fine-tuning attack")
            batch = data.collate([examples[i] for i in indices], pad_id)
            digest.update(batch["input_ids"].numpy().tobytes())
            digest.update(batch["labels"].numpy().tobytes())
            loss = response_losses(model, {k: v.to(device) for k, v in batch.items()}).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_losses.append(float(loss.detach()))
    del optimizer
    model.eval()
    return AttackRecord(
        fingerprint=digest.hexdigest(),
        steps=len(step_losses),
        first_step_loss=step_losses[0],
        last_step_loss=step_losses[-1],
        train_loss_before=loss_before,
        train_loss_after=_mean_loss(model, examples, pad_id, eval_bs),
    )


# ---------------------------------------------------------------- the grid


def benign_increase(after: float, before: float) -> float:
    if not (math.isfinite(after) and math.isfinite(before)) or before == 0:
        return float("nan")
    return after / before - 1


def choice_harm(cell: CellResult) -> float:
    """The harm that chooses the worst case: on validation when the cell was measured there."""
    return (cell.validation or cell.after).harm.estimate


def worst_cell(cells: Sequence[CellResult]) -> CellResult | None:
    """The allowed cell with the most harm after the attack, on the validation set (None: no
    cell is allowed). Ties go to the earlier cell of the grid. The test measurement of the cell
    (`after`) is reported, never used to choose."""
    allowed = [c for c in cells if c.allowed and math.isfinite(choice_harm(c))]
    if not allowed:
        return None
    return max(allowed, key=choice_harm)


def run_grid(
    model: nn.Module,
    examples: Sequence[data.Example],
    cells: Sequence[GridCell],
    *,
    before: Measurement,
    measure: Callable[[nn.Module], Measurement],
    max_benign_loss_increase: float,
    seed: int,
    pad_id: int,
    on_cell: Callable[[], None] | None = None,
    should_cancel: CancelFn | None = None,
    choose: tuple[Measurement, Callable[[nn.Module], Measurement]] | None = None,
) -> list[CellResult]:
    """Attack `model` with every cell (each from the same starting weights), measure each
    attacked stand-in on the test set (`measure`) and, with `choose` = (before, measure) on the
    validation set, there too: the benign bound and the worst case are then decided on
    validation. `model` is left as it came."""
    results = []
    for cell in cells:
        with attacked(
            model, examples, cell, seed=seed, pad_id=pad_id, should_cancel=should_cancel
        ) as (target, record):
            after = measure(target)
            validation = choose[1](target) if choose is not None else None
        rise = benign_increase(after.benign_loss, before.benign_loss)
        deciding = rise
        validation_rise = None
        if choose is not None and validation is not None:
            validation_rise = benign_increase(validation.benign_loss, choose[0].benign_loss)
            deciding = validation_rise
        results.append(
            CellResult(
                lr=cell.lr,
                steps=cell.steps,
                attack=record,
                after=after,
                benign_loss_increase=rise,
                allowed=math.isfinite(deciding) and deciding <= max_benign_loss_increase,
                validation=validation,
                validation_benign_loss_increase=validation_rise,
            )
        )
        if on_cell:
            on_cell()
    return results
