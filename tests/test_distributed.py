"""Distributed attribution (FSDP2, 2 CPU processes, gloo) selects exactly what one process does.

One launch runs four jobs in one process group (the processes start once: torch + transformers
imports dominate the cost on a 2-core machine); the single-process reference runs in this process.
The tiny llama has intermediate_size 51, so gate/up are split unevenly across the 2 ranks (26/25
rows), and tied embeddings, so the root shard handles a shared weight.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from harmprune.distributed import DistributedJob, launch
from harmprune.inputs.data import IGNORE_INDEX, Example
from harmprune.method import attribution, selection

from tests.tiny_models import DISTRIBUTED_LLAMA, random_llama

WORLD = 2
Q, P = 0.05, 0.02
BATCH = 2


def build_random_model() -> Any:
    return random_llama(DISTRIBUTED_LLAMA, seed=7)


def save_random_model(path: Path) -> str:
    """A model directory for the ranks (they load local directories only)."""
    build_random_model().save_pretrained(path)
    return str(path)


def make_examples(seed: int, n: int) -> list[Example]:
    """Random ids of varied length; the first third is context (-100), the rest the response."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(10, 24, (1,), generator=g))
        ids = torch.randint(3, DISTRIBUTED_LLAMA["vocab_size"], (length,), generator=g).tolist()
        ctx = length // 3
        out.append(Example(ids, [IGNORE_INDEX] * ctx + ids[ctx:]))
    return out


# Odd counts: the last step leaves rank 1 without a sample (a zero-weighted dummy step).
HARMFUL = make_examples(1, 7)
BENIGN = make_examples(2, 5)


def job(preserve: str, model: str, **kw: Any) -> DistributedJob:
    return DistributedJob(
        model,
        HARMFUL,
        BENIGN,
        q=Q,
        p=P,
        preserve=preserve,  # type: ignore[arg-type]
        batch_size=BATCH,
        pad_id=0,
        threads=1,
        **kw,
    )


# Each distributed job of the `distributed` fixture -> the `reference` variant it must equal.
JOB_REFERENCE = {
    "sum_abs": "sum_abs",
    "sum_abs_capped": "sum_abs",
    "sum_abs_abs_reduce": "sum_abs",
    "abs_mean": "abs_mean",
    "sum_abs_replicate": "sum_abs",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_random_model(tmp_path_factory.mktemp("dist-model"))


@pytest.fixture(scope="module")
def distributed(model_dir: str) -> dict[str, Any]:
    jobs = {
        # per-sample products of each rank's batch (the default), protected ∩ candidates
        "sum_abs": job("sum_abs", model_dir),
        "sum_abs_capped": job("sum_abs", model_dir, per_sample_bytes=1),  # one sample at a time
        "sum_abs_abs_reduce": job("sum_abs", model_dir, sum_abs_mode="abs_reduce"),
        "abs_mean": job("abs_mean", model_dir, protected="full"),
        "sum_abs_replicate": job("sum_abs", model_dir, sum_abs_mode="replicate", protected="full"),
    }
    results = launch(WORLD, list(jobs.values()))
    return dict(zip(jobs, results, strict=True))


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    """The single-process path: full score maps, then select_per_matrix."""
    torch.set_num_threads(1)
    model = build_random_model()
    params = attribution.scored_parameters(model)
    harm = attribution.score_harm(model, params, HARMFUL, batch_size=BATCH, pad_id=0)
    out: dict[str, Any] = {}
    for variant in ("sum_abs", "abs_mean"):
        # sum_abs: one backward per sample, independent of the batched per-sample products
        keep = attribution.score_preserve(
            model,
            params,
            BENIGN,
            variant,
            batch_size=BATCH,
            pad_id=0,
            sum_abs_strategy="per_sample",
        )
        out[variant] = {
            "harm": harm,
            "keep": {n: k.clone() for n, k in keep.items()},
            "selection": selection.select_per_matrix(harm, keep, Q, P),
            "protected": {
                n: selection.top_k_indices(s, selection.count_for(P, s.numel()))
                for n, s in keep.items()
            },
        }
    return out


@pytest.mark.parametrize(("key", "variant"), JOB_REFERENCE.items())
def test_distributed_masks_equal_single_process(
    distributed: dict[str, Any], reference: dict[str, Any], key: str, variant: str
) -> None:
    result, ref = distributed[key], reference[variant]["selection"]
    assert result.world_size == WORLD
    assert set(result.pruned) == set(ref)
    total = 0
    for name, sel in ref.items():
        assert torch.equal(result.pruned[name], sel.pruned), name
        # the harm ranking (RankedScores) holds exactly the single-process candidates
        got = torch.sort(result.scores.harm_ranked[name]).values
        assert torch.equal(got, sel.candidates), name
        total += sel.pruned.numel()
    assert total > 0 and result.pruned_count == total
    # the preserve score did protect some candidates, or the test would not check it
    assert sum(s.protected_candidates for s in ref.values()) > 0


@pytest.mark.parametrize(("key", "variant"), JOB_REFERENCE.items())
def test_distributed_score_values_equal_single_process(
    distributed: dict[str, Any], reference: dict[str, Any], key: str, variant: str
) -> None:
    """Masks are blind to a uniform scale: the values catch a left-over 1/world (FSDP2's default
    gradient average) or a |g_a + g_b| where sum_abs needs |g_a| + |g_b|."""
    result, ref = distributed[key], reference[variant]
    for name, idx in result.scores.harm_ranked.items():
        want_h = ref["harm"][name].reshape(-1)[idx]
        want_k = ref["keep"][name].reshape(-1)[idx]
        torch.testing.assert_close(result.harm_values[name], want_h, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(result.candidate_keep_values[name], want_k, rtol=1e-4, atol=1e-7)


def test_sum_abs_modes(distributed: dict[str, Any]) -> None:
    assert distributed["sum_abs"].sum_abs_mode == "batched"  # data parallel, batched, exact
    assert distributed["sum_abs_abs_reduce"].sum_abs_mode == "abs_reduce"  # data parallel, exact
    assert distributed["sum_abs_replicate"].sum_abs_mode == "replicate"
    assert distributed["abs_mean"].sum_abs_mode == "n/a"


@pytest.mark.parametrize(
    ("key", "variant"), [("abs_mean", "abs_mean"), ("sum_abs_replicate", "sum_abs")]
)
def test_full_protected_set_equals_single_process(
    distributed: dict[str, Any], reference: dict[str, Any], key: str, variant: str
) -> None:
    got, want = distributed[key].scores.protected, reference[variant]["protected"]
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_job_and_result_files_are_json_and_safetensors(
    distributed: dict[str, Any], tmp_path: Path
) -> None:
    """What torchrun's ranks read and write: no pickle, and the round trip is exact."""
    import json

    from harmprune.distributed import load_job, load_result, save_job, save_result
    from safetensors import safe_open

    for original in (job("sum_abs", "/models/m", progress_path="/p"), job("abs_mean", "/m")):
        path = tmp_path / "job.json"
        save_job(original, path)
        assert json.loads(path.read_text())["harmful"][0]["input_ids"] == HARMFUL[0].input_ids
        assert load_job(path) == original
    result = distributed["abs_mean"]  # protected="full": every field holds tensors
    path = tmp_path / "result.safetensors"
    save_result(result, path)
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["result"])["world_size"] == WORLD
    back = load_result(path)
    assert (back.pruned_count, back.world_size, back.sum_abs_mode) == (
        result.pruned_count,
        result.world_size,
        result.sum_abs_mode,
    )
    assert back.timings_s == result.timings_s and back.scores.sizes == result.scores.sizes
    assert back.scores.q_max == result.scores.q_max
    for mine, theirs in (
        (back.scores.harm_ranked, result.scores.harm_ranked),
        (back.scores.protected, result.scores.protected),
        (back.pruned, result.pruned),
        (back.harm_values, result.harm_values),
        (back.candidate_keep_values, result.candidate_keep_values),
    ):
        assert mine.keys() == theirs.keys() and len(mine) > 0
        for name in theirs:
            assert torch.equal(mine[name], theirs[name]), name
