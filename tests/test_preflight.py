"""Preflight on the config.json of real architectures (tests/fixtures/configs, no download).

Each fixture is the model's published config.json; it is written with a tokenizer_config.json
(with or without a chat template) into a temporary directory and `estimate` instantiates the
model on the meta device. Estimates are cached per session (an 8B-70B meta model takes a moment).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harmprune.errors import ModelLoadError, UnsupportedModelError
from harmprune.inputs.config import HardenConfig, HubDataset
from harmprune.inputs.preflight import (
    CONFIG_FILE_MAX_BYTES,
    Estimate,
    HubUnreachable,
    PreflightRefused,
    calibration_pairs,
    estimate,
    estimate_job,
)
from harmprune.jobs.planning import Plan, Planner, plan_job
from harmprune.jobs.tenants import TenantPolicy
from harmprune.settings import Settings
from huggingface_hub import HfApi

from tests.support.fixtures import hub_server  # noqa: F401  (fixture)
from tests.support.hub_server import HubServer, hub_environment

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
    """`model_dir(name, chat=True)`: config.json + tokenizer_config.json (+ an empty weights
    file: `plan_job` refuses a model directory without safetensors), built once each."""
    made: dict[tuple[str, bool], Path] = {}

    def make(name: str, chat: bool = True) -> Path:
        if (name, chat) not in made:
            d = tmp_path_factory.mktemp(f"{name}-{'chat' if chat else 'plain'}")
            (d / "config.json").write_text((CONFIGS / f"{name}.json").read_text())
            (d / "model.safetensors").touch()
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


# ---------------------------------------------------------------- plan_job: route or refuse


def job_config(model: Path | str, **spec: Any) -> HardenConfig:
    """A job on `model` with 412 + 412 calibration pairs of up to 300 tokens."""
    pairs = [{"prompt": f"p{i}", "response": "r"} for i in range(PAIRS // 2)]
    domain = {"name": "plan", "harmful": pairs, "benign": pairs, "max_length": TOKENS, **spec}
    return HardenConfig(model=str(model), domain=domain)


def plan_settings(tmp_path: Path, **kw: Any) -> Settings:
    return Settings(cache_dir=tmp_path / "cache", gpu_memory_gb=80.0, **kw)


def test_plan_keeps_an_8b_job_on_one_gpu(model_dir: Callable[..., Path], tmp_path: Path) -> None:
    plan = plan_job(
        job_config(model_dir("llama-3.1-8b-instruct")), plan_settings(tmp_path, multi_gpu_count=4)
    )
    assert (plan.queue, plan.devices) == ("gpu", 1)
    assert plan.estimate is not None and plan.estimate.fits and plan.estimate.devices == 1
    assert plan.estimate.peak_memory_gb < 80


def test_plan_routes_a_14b_job_to_the_multi_gpu_workers(
    model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    config = job_config(model_dir("qwen2.5-14b"))
    plan = plan_job(config, plan_settings(tmp_path, multi_gpu_count=4))
    assert (plan.queue, plan.devices) == ("gpu-multi", 4)
    est = plan.estimate
    assert est is not None and est.fits and est.devices == 4
    one_gpu = estimate_job(
        config, model_dir("qwen2.5-14b"), devices=1, device_memory_gb=80, device_kind="x"
    )
    # even recomputed, one GPU is over the 72 GB a plan may use; sharding is what makes it fit
    assert one_gpu.gradient_checkpointing and not one_gpu.fits
    assert one_gpu.peak_memory_gb > 0.9 * 80 > est.peak_memory_gb
    # the same job asked for the multi-GPU queue directly
    direct = plan_job(config, plan_settings(tmp_path, multi_gpu_count=4), "gpu-multi")
    assert direct == plan


def test_plan_refuses_what_no_worker_can_run(
    model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    config = job_config(model_dir("qwen2.5-14b"))
    with pytest.raises(PreflightRefused, match=r"needs about \d+ GB on one device.*FSDP2") as err:
        plan_job(config, plan_settings(tmp_path))  # no multi-GPU workers
    assert err.value.field == "model" and "qwen2.5-14b" in str(err.value)
    with pytest.raises(PreflightRefused, match="no multi-GPU workers") as err:
        plan_job(config, plan_settings(tmp_path), "gpu-multi")
    assert err.value.field == "hardware"
    # 70B: its bf16 weights alone exceed one 80 GB GPU, which elicitation and evaluation need
    big = job_config(model_dir("llama-3.1-70b-instruct"))
    with pytest.raises(PreflightRefused, match=r"weights \(13\d GB\) do not fit one 80 GB"):
        plan_job(big, plan_settings(tmp_path, multi_gpu_count=8))
    # distributed attribution selects per matrix only
    glob = job_config(model_dir("qwen2.5-14b"), pruning={"selection": "global"})
    with pytest.raises(PreflightRefused, match="per_matrix") as err:
        plan_job(glob, plan_settings(tmp_path, multi_gpu_count=4))
    assert err.value.field == "domain.pruning.selection"


def test_plan_refuses_a_chat_job_without_a_chat_template(
    model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    with pytest.raises(PreflightRefused, match="no chat template") as err:
        plan_job(job_config(model_dir("gpt2", chat=False)), plan_settings(tmp_path))
    assert err.value.field == "domain.prompt_format"
    plain = job_config(model_dir("gpt2", chat=False), prompt_format="plain")
    assert plan_job(plain, plan_settings(tmp_path)).queue == "gpu"


def test_plan_on_cpu_has_no_memory_limit_and_plans_fp32(
    model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    # (days on a CPU: the time limit is raised, so only the memory plan is looked at)
    settings = plan_settings(tmp_path, job_soft_time_limit_s=10**8)
    plan = plan_job(job_config(model_dir("qwen2.5-14b")), settings, "cpu")
    assert (plan.queue, plan.devices) == ("cpu", 0)
    assert plan.estimate is not None and plan.estimate.fits
    assert plan.estimate.weights_gb == pytest.approx(plan.estimate.parameters * 4 / GB, abs=0.01)


def test_plan_prices_the_builtin_model_and_refuses_unknown_architectures(
    model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    """The built-in model is planned from its GGUF file's metadata like any other model."""
    plan = plan_job(job_config("smollm2-135m-instruct"), plan_settings(tmp_path))
    assert plan.queue == "gpu" and plan.estimate is not None
    assert plan.estimate.model_type == "llama" and plan.estimate.chat_template
    assert plan.estimate.parameters == pytest.approx(134.5e6, rel=0.01)  # SmolLM2-135M
    assert plan.estimate.job_seconds > 0
    with pytest.raises(UnsupportedModelError, match="'t5'"):
        plan_job(job_config(model_dir("t5-small")), plan_settings(tmp_path))
    with pytest.raises(ModelLoadError, match="not found"):
        plan_job(job_config(tmp_path / "nowhere"), plan_settings(tmp_path))


def test_token_cap_bounds_the_planned_activations(
    model_dir: Callable[..., Path],
) -> None:
    d = model_dir("llama-3.1-8b-instruct")
    uncapped = estimate(d, calibration_pairs=PAIRS, tokens_per_pair=TOKENS, batch_size=8)
    capped = estimate(
        d, calibration_pairs=PAIRS, tokens_per_pair=TOKENS, batch_size=8, max_backward_tokens=1024
    )
    # 1024 tokens hold 3 rows of 300: 3/8 of the batch's activations
    assert capped.activations_gb == pytest.approx(uncapped.activations_gb * 3 / 8, rel=0.01)


def test_calibration_pairs_count_hub_datasets_by_their_limit() -> None:
    spec = job_config("m").domain.model_copy(
        update={"harmful": [HubDataset(dataset="org/advbench", limit=100)]}
    )
    assert calibration_pairs(spec) == 100 + PAIRS // 2


def test_plan_reads_only_config_files_from_the_hub(
    hub_server: HubServer,  # noqa: F811
    model_dir: Callable[..., Path],
    tmp_path: Path,
) -> None:
    api = HfApi(token=hub_server.token)
    api.create_repo("org/big-14b", private=True)
    api.upload_folder(repo_id="org/big-14b", folder_path=str(model_dir("qwen2.5-14b")))
    settings = plan_settings(tmp_path, multi_gpu_count=4, hf_token=hub_server.token)
    plan = plan_job(job_config("org/big-14b"), settings)
    assert plan.queue == "gpu-multi" and plan.estimate is not None
    assert plan.estimate.model_type == "qwen2"
    with pytest.raises(ModelLoadError, match="unknown model: org/missing"):
        plan_job(job_config("org/missing"), settings)
    with pytest.raises(ModelLoadError, match="not readable with the operator's token"):
        plan_job(job_config("org/big-14b"), plan_settings(tmp_path, hf_token="hf_wrong"))
    # an API without a token cannot tell a private repo from a missing one: queued unchecked
    anonymous = plan_settings(tmp_path / "anon", multi_gpu_count=4)
    assert plan_job(job_config("org/big-14b"), anonymous) == Plan(
        queue="gpu", devices=1, estimate=None
    )


def test_plan_says_when_the_hub_cannot_be_reached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with HubServer() as server:
        url = server.url
    # huggingface_hub retries a refused connection 5 times with backoff (1+2+4+8+8 s): skip the
    # waiting, not the retries (its module-level `time` is the one patched, for this test only)
    import huggingface_hub.utils._http as hf_http

    monkeypatch.setattr(hf_http.time, "sleep", lambda s: None)
    # the server is gone: connection refused
    with (
        hub_environment(url, tmp_path / "hf_home"),
        pytest.raises(HubUnreachable, match="org/model"),
    ):
        plan_job(job_config("org/model"), plan_settings(tmp_path))


# ---------------------------------------------------------------- gradient checkpointing


def test_checkpointing_keeps_one_block_of_activations_for_a_third_more_compute(
    estimated: Callable[..., Estimate],
) -> None:
    plain = estimated("llama-3.1-8b-instruct", tokens_per_pair=4096, batch_size=1)
    recomputed = estimated(
        "llama-3.1-8b-instruct", tokens_per_pair=4096, batch_size=1, gradient_checkpointing="on"
    )
    assert recomputed.gradient_checkpointing and not plain.gradient_checkpointing
    # 32 blocks' activations become every block's input plus one block: about 1/16 here
    assert recomputed.activations_gb < plain.activations_gb / 6
    assert recomputed.attribution_tflop == pytest.approx(plain.attribution_tflop * 8 / 6, rel=0.01)
    # FSDP2 ranks do not recompute: a multi-device plan never says they do
    sharded = estimated("qwen2.5-14b", devices=4, gradient_checkpointing="on")
    assert not sharded.gradient_checkpointing


def test_auto_checkpointing_where_long_samples_would_not_fit(
    model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    """Llama-3.1-8B with 4096-token samples: ~80 GB without recomputation (over the 72 GB a
    plan may use on an 80 GB GPU), ~48 GB with it. auto turns it on; off is refused."""
    d = model_dir("llama-3.1-8b-instruct")
    settings = plan_settings(tmp_path)

    def job(mode: str) -> HardenConfig:
        return job_config(d, max_length=4096).model_copy(update={"gradient_checkpointing": mode})

    auto = plan_job(job("auto"), settings)
    assert auto.queue == "gpu" and auto.estimate is not None
    assert auto.estimate.gradient_checkpointing and auto.estimate.fits
    assert auto.estimate.peak_memory_gb < 0.9 * 80
    with pytest.raises(PreflightRefused, match=r"needs about 8\d GB on one device.*72 GB usable"):
        plan_job(job("off"), settings)
    # the reference job fits without: auto does not pay for recomputation it does not need
    short = plan_job(job_config(d), settings)
    assert short.estimate is not None and not short.estimate.gradient_checkpointing
    forced = plan_job(job_config(d).model_copy(update={"gradient_checkpointing": "on"}), settings)
    assert forced.estimate is not None and forced.estimate.gradient_checkpointing


def test_usable_memory_leaves_headroom(estimated: Callable[..., Estimate]) -> None:
    """A plan within a whisker of the device's memory is refused: 14B, recomputed, is ~79 GB."""
    est = estimated("qwen2.5-14b", gradient_checkpointing="on", max_backward_tokens=1024)
    assert 72 < est.peak_memory_gb < 80 and not est.fits
    assert estimated("qwen2.5-14b", device_memory_gb=141.0).fits


# ---------------------------------------------------------------- prices besides the attribution


def test_q_and_p_indices_are_priced(estimated: Callable[..., Estimate]) -> None:
    """Candidate indices are int64 per scored weight at q: q = p = 0.9 on an 8B model needs tens
    of GB more than the reference job, and no longer fits one 80 GB GPU."""
    reference = estimated("llama-3.1-8b-instruct")
    huge = estimated("llama-3.1-8b-instruct", q=0.9, p=0.9)
    assert reference.index_memory_gb < 0.1
    assert huge.index_memory_gb == pytest.approx(
        (0.9 * huge.scored_weights * 8 + 0.9 * huge.scored_weights / 32 * 12) / GB, rel=1e-3
    )
    assert huge.index_memory_gb > 40 and not huge.fits
    assert huge.peak_memory_gb == pytest.approx(
        reference.peak_memory_gb + huge.index_memory_gb, abs=0.1
    )
    glob = estimated("llama-3.1-8b-instruct", q=0.9, p=0.9, selection="global")
    assert glob.index_memory_gb > huge.index_memory_gb


def test_search_candidates_are_priced(estimated: Callable[..., Estimate]) -> None:
    one = estimated("llama-3.1-8b-instruct")
    five = estimated("llama-3.1-8b-instruct", search_candidates=5)
    assert five.search_tflop == pytest.approx(5 * one.search_tflop, rel=1e-3)
    assert five.job_seconds > one.job_seconds
    assert five.attribution_tflop == one.attribution_tflop


def test_the_tamper_method_is_priced(estimated: Callable[..., Estimate]) -> None:
    """Full fine-tuning keeps fp32 weights, gradients and two AdamW moments: 16 bytes per
    parameter, ~120 GB for 8B, which no 80 GB GPU holds; LoRA fits."""
    lora = estimated("llama-3.1-8b-instruct", tamper_method="lora", tamper_steps=20)
    full = estimated("llama-3.1-8b-instruct", tamper_method="full", tamper_steps=20)
    assert lora.fits and lora.tamper_tflop > 0
    assert full.tamper_memory_gb > full.parameters * 16 / GB
    assert not full.fits and "full fine-tuning attack" in full.problems[0]


def test_a_job_over_the_time_limit_is_refused(
    model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    config = job_config(model_dir("llama-3.1-8b-instruct"))
    plan = plan_job(config, plan_settings(tmp_path))
    assert plan.estimate is not None and plan.estimate.job_seconds > 10
    with pytest.raises(PreflightRefused, match="over the job time limit of 10 s") as err:
        plan_job(config, plan_settings(tmp_path, job_soft_time_limit_s=10))
    assert err.value.field == "model"


def test_an_absurd_config_is_refused_before_a_meta_model_is_built(tmp_path: Path) -> None:
    cfg = fixture_config("llama-3.1-8b-instruct") | {"num_hidden_layers": 10_000_000}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    started = time.monotonic()
    with pytest.raises(UnsupportedModelError, match="num_hidden_layers"):
        estimate(tmp_path, calibration_pairs=8, tokens_per_pair=64)
    assert time.monotonic() - started < 5


def test_an_oversized_config_file_is_refused(
    hub_server: HubServer,  # noqa: F811
    model_dir: Callable[..., Path],
    tmp_path: Path,
) -> None:
    """Locally and on the Hub (by the listed size, before any download)."""
    d = tmp_path / "big"
    d.mkdir()
    cfg = fixture_config("gpt2") | {"padding": "x" * (CONFIG_FILE_MAX_BYTES + 1)}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").touch()
    with pytest.raises(PreflightRefused, match="over 1000000 bytes"):
        plan_job(job_config(d), plan_settings(tmp_path))
    HfApi(token=hub_server.token).create_repo("org/big-config")
    HfApi(token=hub_server.token).upload_folder(repo_id="org/big-config", folder_path=str(d))
    settings = plan_settings(tmp_path, hf_token=hub_server.token)
    with pytest.raises(PreflightRefused, match="over 1000000 bytes"):
        plan_job(job_config("org/big-config"), settings)
    assert not list((tmp_path / "hf_home").rglob("config.json"))  # nothing was downloaded


def test_the_planner_bounds_its_children(model_dir: Callable[..., Path], tmp_path: Path) -> None:
    """The API's planner: a child over its memory limit, or over the time limit, is a refusal
    (never a hung or bloated API); the same plan twice answers from the cache in well under a
    millisecond."""
    config = job_config(model_dir("gpt2"))
    policy = TenantPolicy(name="t", read_private=True, read_gated=True)
    starved = Planner(plan_settings(tmp_path, preflight_memory_mb=512))
    with pytest.raises(PreflightRefused, match="memory limit"):
        starved.plan(config, "gpu", policy)
    slow = Planner(plan_settings(tmp_path, preflight_timeout_s=0.01, preflight_processes=1))
    with pytest.raises(PreflightRefused, match="within 0 s"):
        slow.plan(config, "gpu", policy)
    planner = Planner(plan_settings(tmp_path, preflight_processes=1))
    first = planner.plan(config, "gpu", policy)
    assert first.estimate is not None and first.estimate.model_type == "gpt2"
    started = time.perf_counter()
    for _ in range(100):
        assert planner.plan(config, "gpu", policy) == first
    assert (time.perf_counter() - started) / 100 < 1e-3
