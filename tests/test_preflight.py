"""Preflight on the config.json of real architectures (tests/fixtures/configs, no download).

Each fixture is the model's published config.json; it is written with a tokenizer_config.json
(with or without a chat template) into a temporary directory and `estimate` instantiates the
model on the meta device. Estimates are cached per session (an 8B-70B meta model takes a moment).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service.errors import ModelLoadError, UnsupportedModelError
from service.preflight import Estimate, estimate

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
GB = 1024**3

# Published sizes (model cards / safetensors metadata), in parameters.
PUBLISHED = {
    "llama-3.1-8b-instruct": 8.03e9,
    "llama-3.1-70b-instruct": 70.6e9,
    "qwen2.5-14b": 14.7e9,
    "mistral-7b-instruct-v0.3": 7.25e9,
    "gemma-2-9b": 9.24e9,
    "phi-3-mini-4k-instruct": 3.82e9,
    "gpt2": 124.4e6,
}
TIED = {"gemma-2-9b", "gpt2"}
# The reference calibration set: 412 harmful + 412 benign pairs of ~300 tokens.
PAIRS, TOKENS = 824, 300


def decoder_linear_weights(cfg: dict[str, Any]) -> int:
    """Scored weights from the config alone: every linear weight in the decoder blocks
    (attention q/k/v/o + MLP gate/up/down, or GPT-2's c_attn/c_proj/c_fc/c_proj); no biases."""
    if cfg["model_type"] == "gpt2":
        h = cfg["n_embd"]
        return cfg["n_layer"] * (h * 3 * h + h * h + 2 * h * 4 * h)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q_out = cfg["num_attention_heads"] * head_dim
    kv_out = cfg["num_key_value_heads"] * head_dim
    per_layer = h * (q_out + 2 * kv_out) + q_out * h + 3 * h * inter
    return cfg["num_hidden_layers"] * per_layer


def fixture_config(name: str) -> dict[str, Any]:
    return json.loads((CONFIGS / f"{name}.json").read_text())


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`model_dir(name, chat=True)`: config.json + tokenizer_config.json, built once each."""
    made: dict[tuple[str, bool], Path] = {}

    def make(name: str, chat: bool = True) -> Path:
        if (name, chat) not in made:
            d = tmp_path_factory.mktemp(f"{name}-{'chat' if chat else 'plain'}")
            (d / "config.json").write_text((CONFIGS / f"{name}.json").read_text())
            tok: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
            if chat:
                tok["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
            (d / "tokenizer_config.json").write_text(json.dumps(tok))
            made[(name, chat)] = d
        return made[(name, chat)]

    return make


@pytest.fixture(scope="session")
def estimated(model_dir: Callable[..., Path]) -> Callable[..., Estimate]:
    """`estimated(name, chat=True, **kw)`, cached per session."""
    cache: dict[tuple[Any, ...], Estimate] = {}

    def get(name: str, chat: bool = True, **kw: Any) -> Estimate:
        key = (name, chat, tuple(sorted(kw.items())))
        if key not in cache:
            args = {"calibration_pairs": PAIRS, "tokens_per_pair": TOKENS, **kw}
            cache[key] = estimate(model_dir(name, chat), **args)
        return cache[key]

    return get


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_counts_match_published_architecture(estimated: Callable[..., Estimate], name: str) -> None:
    cfg = fixture_config(name)
    est = estimated(name)
    assert est.model_type == cfg["model_type"]
    assert est.parameters == pytest.approx(PUBLISHED[name], rel=0.02)
    assert est.scored_weights == decoder_linear_weights(cfg)
    assert est.scored_weights < est.parameters
    assert est.layers == cfg.get("num_hidden_layers", cfg.get("n_layer"))
    assert est.tied_embeddings is (name in TIED)
    assert est.chat_template
    assert est.calibration_tokens == PAIRS * TOKENS
    # forward + backward = 6 N FLOP per token
    assert est.attribution_tflop == pytest.approx(6 * est.parameters * PAIRS * TOKENS / 1e12, 1e-3)
    assert est.weights_gb == pytest.approx(est.parameters * 2 / GB, abs=0.01)  # bf16


@pytest.mark.parametrize("name", ["gpt2", "phi-3-mini-4k-instruct"])
def test_small_models_fit_one_h100(estimated: Callable[..., Estimate], name: str) -> None:
    est = estimated(name)
    assert est.fits and est.problems == []
    assert est.peak_memory_gb < 80


def test_missing_chat_template_is_a_problem(estimated: Callable[..., Estimate]) -> None:
    est = estimated("gpt2", chat=False)
    assert not est.chat_template
    assert not est.fits
    assert any("chat template" in p for p in est.problems)
    # plain-format jobs need none
    plain = estimated("gpt2", chat=False, need_chat_template=False)
    assert plain.fits and plain.problems == []


def test_chat_template_file_counts(model_dir: Callable[..., Path], tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text((model_dir("gpt2", False) / "config.json").read_text())
    (d / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    est = estimate(d, calibration_pairs=8, tokens_per_pair=64)
    assert est.chat_template and est.fits


@pytest.mark.parametrize(
    ("name", "memory_gb"), [("llama-3.1-70b-instruct", 80.0), ("qwen2.5-14b", 80.0)]
)
def test_too_large_job_does_not_fit(
    estimated: Callable[..., Estimate], name: str, memory_gb: float
) -> None:
    est = estimated(name, device_memory_gb=memory_gb)
    assert not est.fits
    assert est.peak_memory_gb > memory_gb
    [problem] = est.problems
    needed = re.search(r"needs about (\d+) GB", problem)
    assert needed and int(needed.group(1)) == round(est.peak_memory_gb)
    assert f"{memory_gb:.0f} GB" in problem
    assert "FSDP2" in problem  # points at the multi-GPU worker


def test_large_memory_device_fits_70b(estimated: Callable[..., Estimate]) -> None:
    est = estimated("llama-3.1-70b-instruct", device_memory_gb=2000.0)
    assert est.fits and est.problems == []


def test_memory_grows_with_batch(estimated: Callable[..., Estimate]) -> None:
    small = estimated("llama-3.1-8b-instruct", batch_size=1)
    large = estimated("llama-3.1-8b-instruct", batch_size=8)
    assert large.activations_gb > 7 * small.activations_gb
    assert large.peak_memory_gb > small.peak_memory_gb


def test_memory_plan_counts_one_score_buffer(estimated: Callable[..., Estimate]) -> None:
    est = estimated("llama-3.1-8b-instruct")
    assert est.score_buffers_gb == pytest.approx(est.scored_weights * 4 / GB, abs=0.01)
    # so the reference job (Llama-3.1-8B, 412 + 412 pairs, batch 8) fits one 80 GB H100
    assert est.fits, est.problems


@pytest.mark.parametrize(
    ("name", "model_type"), [("t5-small", "t5"), ("bert-base-uncased", "bert")]
)
def test_refused_architecture(model_dir: Callable[..., Path], name: str, model_type: str) -> None:
    with pytest.raises(UnsupportedModelError, match=f"'{model_type}'"):
        estimate(model_dir(name), calibration_pairs=8, tokens_per_pair=64)


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        estimate(tmp_path, calibration_pairs=8, tokens_per_pair=64)
