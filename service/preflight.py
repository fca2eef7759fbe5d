"""Preflight: can this job run, where, and what will it cost? From config.json and tokenizer
files alone.

No weight is downloaded: the model is instantiated on the meta device (shapes, no memory), which
gives exact parameter and scored-weight counts for any architecture transformers knows. The API
runs `plan_job` before queueing (and picks the queue: one GPU, or the multi-GPU workers), the
pipeline runs it before loading weights, so an impossible job is refused at once.

Memory plan (one GPU): weights in the compute dtype, ONE fp32 score-sized buffer alive at a time
(the harm pass's gradient sum is reduced to per-matrix candidates before the preserve pass), the
activations of one backward (at most `max_backward_tokens` tokens), and fp32 logits. When that
does not fit, gradient checkpointing (`gradient_checkpointing: auto`) keeps only each block's
input and one block's activations at a time, for about a third more compute.
A plan may fill at most 90% of a device's memory (`USABLE_MEMORY`).

Memory plan (N GPUs, FSDP2 attribution): weights and score buffers sharded N ways, plus the
unsharded weights of two decoder blocks (the current one and the prefetched next) and the same
activations on every rank. Elicitation and evaluation run in one process on one GPU, so the
weights must also fit one GPU: models whose weights alone do not are refused (no pipeline-
parallel inference yet).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from harmprune.errors import HarmpruneError, ModelLoadError, UnsupportedModelError
from harmprune.vocabulary import SMOLLM2_ALIAS
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from harmprune.config import AttacksConfig, DomainSpec, HardenConfig
    from harmprune.settings import Settings

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# A job is planned to fill at most this share of a device: the allocator's fragmentation and
# the estimate's own error need the rest (a plan at 99% of the memory is a gamble, not a plan).
USABLE_MEMORY = 0.9
# Sustained bf16 throughput we plan with (about 40% of the dense peak), in TFLOP/s.
PLANNED_TFLOPS = {
    "cpu": 0.05,
    "nvidia-h100": 400.0,
    "nvidia-h200": 400.0,
    "nvidia-l40": 145.0,
    "gpu": 150.0,
}


class Estimate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model_type: str
    parameters: int
    scored_weights: int
    layers: int
    tied_embeddings: bool
    chat_template: bool
    weights_gb: float
    score_buffers_gb: float
    activations_gb: float
    peak_memory_gb: float
    calibration_tokens: int
    attribution_tflop: float
    attribution_seconds: float
    device_kind: str
    devices: int = 1
    gradient_checkpointing: bool = False
    fits: bool
    problems: list[str]
    # harmprune.attacks.pricing.AttacksEstimate as a mapping: typing it here would import the
    # attacks package (torch) into the API process, which never imports torch.
    attacks: dict[str, Any] | None = None


def config_from_files(directory: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise UnsupportedModelError(
            f"unsupported or unreadable config.json: {err}".splitlines()[0]
        ) from None


def has_chat_template(directory: Path) -> bool:
    if (directory / "chat_template.jinja").is_file() or (
        directory / "chat_template.json"
    ).is_file():
        return True
    tok_cfg = directory / "tokenizer_config.json"
    if tok_cfg.is_file():
        return bool(json.loads(tok_cfg.read_text()).get("chat_template"))
    return False


def count_on_meta(config: Any) -> tuple[int, int, int]:
    """(all parameters, scored weights, decoder layers), without allocating any weight."""
    import torch
    from harmprune.attribution import decoder_layers, scored_parameters
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    scored = sum(p.numel() for p in scored_parameters(model).values())
    return total, scored, len(decoder_layers(model))


def estimate(
    directory: Path,
    *,
    calibration_pairs: int,
    tokens_per_pair: int,
    batch_size: int = 8,
    max_backward_tokens: int | None = None,
    dtype: str = "bfloat16",
    device_kind: str = "nvidia-h100",
    device_memory_gb: float = 80.0,
    devices: int = 1,
    need_chat_template: bool = True,
    selection: str = "per_matrix",
    gradient_checkpointing: Literal["auto", "on", "off"] = "off",
    attacks: AttacksConfig | None = None,
) -> Estimate:
    """Check a model directory holding config.json (+ tokenizer files) and plan the job on
    `devices` devices of `device_memory_gb` each (devices > 1: FSDP2 attribution, which does
    not recompute). `gradient_checkpointing: auto` plans recomputation only where the plan
    without it would not fit: recomputing costs time."""
    from harmprune.attacks.pricing import price_attacks
    from harmprune.loading import check_architecture

    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"no config.json in {directory}")
    config = config_from_files(directory)
    check_architecture(config)
    total, scored, layers = count_on_meta(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, vocab = int(text.hidden_size), int(text.vocab_size)
    chat = has_chat_template(directory)
    gb = 1024**3
    weights = total * DTYPE_BYTES[dtype] / gb
    # per-matrix selection reduces each score map as soon as it is computed: one fp32 buffer alive
    buffers = (2 if selection == "global" else 1) * scored * 4 / gb
    # Saved activations per token and layer, ~34*hidden bytes in bf16 for a Llama-style block,
    # plus fp32 logits and their gradient, for the tokens of one backward (a batch above
    # max_backward_tokens is back-propagated in slices; one sequence at least).
    tokens_per_backward = batch_size * tokens_per_pair
    # (FSDP2 ranks back-propagate whole batches: every rank must join the same collectives)
    if max_backward_tokens is not None and devices == 1:
        rows = max(1, min(batch_size, max_backward_tokens // max(1, tokens_per_pair)))
        tokens_per_backward = rows * tokens_per_pair

    def activations_gb(recomputed: bool) -> float:
        # recomputed: every block's input, plus one block's activations while it is recomputed
        saved_layers = 1 + layers / 34 if recomputed else layers
        per_token = 34 * hidden * saved_layers * DTYPE_BYTES[dtype] + 8 * vocab
        return tokens_per_backward * per_token / gb

    def peak_gb(act: float) -> float:
        if devices > 1:  # FSDP2: shards, plus two unsharded blocks (current + prefetched)
            return (weights + buffers) / devices + 2 * weights / max(1, layers) + act + 1.0
        return weights + buffers + act + 1.0  # + CUDA context and allocator slack

    usable = USABLE_MEMORY * device_memory_gb
    checkpointing = devices == 1 and (
        gradient_checkpointing == "on"
        or (gradient_checkpointing == "auto" and peak_gb(activations_gb(False)) > usable)
    )
    act = activations_gb(checkpointing)
    peak = peak_gb(act)
    tokens = calibration_pairs * tokens_per_pair
    # forward + backward (2 + 4 flop per parameter and token), + one more forward if recomputed
    tflop = (8 if checkpointing else 6) * total * tokens / 1e12
    seconds = tflop / PLANNED_TFLOPS.get(device_kind, PLANNED_TFLOPS["gpu"])
    problems = []
    if need_chat_template and not chat:
        problems.append("the tokenizer has no chat template; use prompt_format: plain")
    if devices > 1 and weights + 2.0 > usable:
        problems.append(
            f"its weights ({weights:.0f} GB) do not fit one {device_memory_gb:.0f} GB device, "
            "which elicitation and evaluation need; models this large are not supported yet"
        )
    elif peak > usable:
        where = "on one device" if devices == 1 else f"per device on {devices} devices"
        hint = (
            "use a multi-GPU worker (FSDP2), a smaller max_backward_tokens or max_length"
            if devices == 1
            else "no worker kind of this deployment is large enough"
        )
        problems.append(
            f"needs about {peak:.0f} GB {where} but {device_memory_gb:.0f} GB is available "
            f"({usable:.0f} GB usable); {hint}"
        )
    return Estimate(
        model_type=str(config.model_type),
        parameters=total,
        scored_weights=scored,
        layers=layers,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        chat_template=chat,
        weights_gb=round(weights, 2),
        score_buffers_gb=round(buffers, 2),
        activations_gb=round(act, 2),
        peak_memory_gb=round(peak, 2),
        calibration_tokens=tokens,
        attribution_tflop=round(tflop, 1),
        attribution_seconds=round(seconds, 1),
        device_kind=device_kind,
        devices=devices,
        gradient_checkpointing=checkpointing,
        fits=not problems,
        problems=problems,
        attacks=price_attacks(
            attacks,
            parameters=total,
            layers=layers,
            hidden=hidden,
            vocab=vocab,
            dtype_bytes=DTYPE_BYTES[dtype],
            calibration_prompts=calibration_pairs,
            tokens_per_sequence=tokens_per_pair,
            tflops=PLANNED_TFLOPS.get(device_kind, PLANNED_TFLOPS["gpu"]),
        ),
    )


# ---------------------------------------------------------------- a job's plan: where it runs

QUEUE_CPU, QUEUE_GPU, QUEUE_MULTI_GPU = "cpu", "gpu", "gpu-multi"
CONFIG_FILES = ("config.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json")
# A Hub dataset without `limit` is counted as this many rows in the estimate.
UNLIMITED_DATASET_ROWS = 1000


class PreflightRefused(HarmpruneError):
    """The job cannot run on any worker of this deployment; `field` is the request field."""

    stage = "load"  # raised while the job checks its model, before loading weights
    code = "preflight_refused"
    user_error = True

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class HubUnreachable(HarmpruneError):
    """The Hub could not be asked for the model's config (try again later)."""

    stage = "load"  # raised while the job checks its model, before loading weights
    code = "hub_unreachable"


class RepoNotVisible(ModelLoadError):
    """No such repo, or a private or gated one the token in use cannot read."""


class Plan(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    queue: str
    devices: int  # GPUs the attribution uses: 0 on CPU, > 1 with FSDP2
    estimate: Estimate | None  # None: no config files to read (the built-in alias, a GGUF file)


def fetch_config_files(model: str, revision: str | None, settings: Settings) -> Path | None:
    """A directory with the model's config.json and tokenizer files, no weights.

    A local directory is used as is; a Hub repo's small files are downloaded into the Hub cache.
    None for the built-in alias and GGUF files (their config is inside the GGUF; the loader
    checks it before any heavy work).
    """
    if model == SMOLLM2_ALIAS or model.endswith(".gguf"):
        return None
    path = Path(model).expanduser()
    if path.is_dir():  # the loader's own checks, in its words
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{model} is a directory without config.json")
        if not any(path.glob("*.safetensors")):
            raise ModelLoadError(
                f"{model} has no *.safetensors weights; pickle checkpoints are refused"
            )
        return path
    if path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1:
        raise ModelLoadError(f"model not found: {model} is neither a directory nor a file")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    directory = None
    for name in CONFIG_FILES:
        try:
            got = hf_hub_download(model, name, revision=revision, token=settings.token_value())
            directory = Path(got).parent
        except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError); as the loader says
            raise HubUnreachable(
                f"unknown model: {model} is not a local path and the Hub cannot be reached"
            ) from None
        except EntryNotFoundError:
            if name == "config.json":
                raise ModelLoadError(f"{model} has no config.json on the Hub") from None
        except RevisionNotFoundError:
            raise ModelLoadError(f"{model} has no revision {revision!r} on the Hub") from None
        except RepositoryNotFoundError:  # also gated repos the operator's token cannot read
            raise RepoNotVisible(
                f"unknown model: {model} was not found on the Hub (or is not readable with the "
                "operator's token)"
            ) from None
        except HfHubHTTPError as err:
            status = getattr(err.response, "status_code", None)
            if status in (401, 403):
                raise RepoNotVisible(
                    f"{model} is not readable with the operator's token (HTTP {status})"
                ) from None
            raise HubUnreachable(
                f"cannot read {model}'s config from the Hub: {type(err).__name__}"
            ) from None
        except OSError as err:
            # huggingface_hub errors carry URLs, never the token.
            raise HubUnreachable(
                f"cannot read {model}'s config from the Hub: {type(err).__name__}"
            ) from None
    return directory


def calibration_pairs(spec: DomainSpec) -> int:
    """Harmful + benign calibration pairs the job will use (an upper bound: held-out split)."""
    from harmprune.config import HubDataset

    return sum(
        (s.limit or UNLIMITED_DATASET_ROWS) if isinstance(s, HubDataset) else 1
        for s in (*spec.harmful, *spec.benign)
    )


def estimate_job(
    config: HardenConfig,
    directory: Path,
    *,
    devices: int,
    device_memory_gb: float,
    device_kind: str,
) -> Estimate:
    """`estimate` for this job's calibration set and batch on `devices` GPUs (0: the CPU)."""
    spec = config.domain
    on_gpu = devices > 0
    dtype = config.dtype if config.dtype != "auto" else "bfloat16" if on_gpu else "float32"
    return estimate(
        directory,
        calibration_pairs=calibration_pairs(spec),
        tokens_per_pair=spec.max_length,
        batch_size=config.batch_size,
        max_backward_tokens=config.max_backward_tokens,
        dtype=dtype,
        device_kind=device_kind if on_gpu else "cpu",
        device_memory_gb=device_memory_gb if on_gpu else float("inf"),
        devices=max(1, devices),
        need_chat_template=spec.prompt_format == "chat",
        selection=spec.pruning.selection,
        gradient_checkpointing=config.gradient_checkpointing,
        attacks=spec.attacks,
    )


def _refuse_unless_fits(config: HardenConfig, est: Estimate) -> None:
    if not est.chat_template and config.domain.prompt_format == "chat":
        raise PreflightRefused(
            "domain.prompt_format",
            f"{config.model} has no chat template; use prompt_format: plain",
        )
    if not est.fits:
        raise PreflightRefused("model", f"{config.model} " + "; ".join(est.problems))


def plan_job(config: HardenConfig, settings: Settings, hardware: str | None = None) -> Plan:
    """Check the job's model from its config files and choose the queue it runs on.

    `hardware` is what the job asked for (None: the operator's default). A GPU job whose
    attribution does not fit one GPU goes to the multi-GPU workers if the deployment has them
    (`multi_gpu_count`); a job that fits no worker is refused with what is missing.
    """
    queue = hardware or settings.default_hardware
    if queue == QUEUE_MULTI_GPU and settings.multi_gpu_count < 2:
        raise PreflightRefused("hardware", "this deployment has no multi-GPU workers")
    devices = {QUEUE_CPU: 0, QUEUE_GPU: 1}.get(queue, settings.multi_gpu_count)
    try:
        directory = fetch_config_files(config.model, config.revision, settings)
    except RepoNotVisible:
        if settings.token_value() is not None:
            raise
        # An API without a Hub token cannot see private repos the workers' token may read:
        # queue unchecked (the worker's own preflight runs before it loads any weight).
        directory = None
    if directory is None:
        return Plan(queue=queue, devices=devices, estimate=None)

    def on(devices: int) -> Estimate:
        return estimate_job(
            config,
            directory,
            devices=devices,
            device_memory_gb=settings.gpu_memory_gb,
            device_kind=settings.gpu_kind,
        )

    est = on(devices)
    if est.chat_template and not est.fits and queue == QUEUE_GPU and settings.multi_gpu_count > 1:
        if config.domain.pruning.selection == "global":
            raise PreflightRefused(
                "domain.pruning.selection",
                f"{est.problems[0]}; distributed attribution supports per_matrix selection only",
            )
        queue, devices = QUEUE_MULTI_GPU, settings.multi_gpu_count
        est = on(devices)
    _refuse_unless_fits(config, est)
    return Plan(queue=queue, devices=devices, estimate=est)


def check_before_loading(
    config: HardenConfig, settings: Settings, attribution_processes: int = 1
) -> Estimate | None:
    """The pipeline's own preflight, on this machine, before any weight is read: architecture,
    chat template, and (on CUDA) the memory of the device it will use."""
    directory = fetch_config_files(config.model, config.revision, settings)
    if directory is None:
        return None
    import torch

    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda" and torch.cuda.is_available()
    memory = torch.cuda.get_device_properties(device).total_memory / 1024**3 if on_gpu else 0.0
    est = estimate_job(
        config,
        directory,
        devices=max(1, attribution_processes) if on_gpu else 0,
        device_memory_gb=memory,
        device_kind=settings.gpu_kind,
    )
    _refuse_unless_fits(config, est)
    return est
