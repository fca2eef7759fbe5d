"""Attribution at full scale on one GPU: a random Llama-3.1-8B-shaped model, the reference set.

A prepared script for a lent H100 (no download: the model is built from a LlamaConfig directly
on the GPU in bf16 with random weights; the tokens are random ids). Runs over the SAME
batches, in one process:

  ours         harmprune.pipeline.compute_scores: harmprune.method.attribution.score_harm (batch 8)
               then score_preserve (batch 8; sum_abs by per-sample products of each layer in one
               batched backward, the default), each score map reduced to the per-matrix
               RankedScores as soon as it is computed
  ours_batch1  the same with sum_abs_strategy="per_sample": the sum_abs preserve pass one
               sample per backward (the path before the batched one; sum_abs only,
               --skip-batch1 to leave it out)
  bare         forward+backward over the batches of ours (both sets at batch 8), gradients on
               the same scored weights, no hooks, zero_grad(set_to_none=True) after each step:
               the floor

Reported per run: wall time, peak GPU memory (torch.cuda.max_memory_allocated, reset before the
run), tokens/s and model FLOP utilisation MFU = 6 * N * tokens / time / peak, N = all
parameters, peak = the card's dense bf16 TFLOP/s (989 for H100 SXM, --peak-tflops otherwise).
Goal: the reference job (412 + 412 pairs of ~300 tokens) attributed in 2 minutes; the output
also gives ours_batch1 / ours, the speed-up of the batched sum_abs pass.

    python bench/gpu_attribution.py                      # the 8B-shaped model on cuda
    python bench/gpu_attribution.py --preserve abs_mean  # the batchable preserve variant
    python bench/gpu_attribution.py --tiny --json out.json   # CPU, seconds (the smoke test)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from harmprune import pipeline  # noqa: E402
from harmprune.inputs.data import IGNORE_INDEX, Example, collate  # noqa: E402
from harmprune.method import attribution  # noqa: E402

from bench.flags import add_backward_flags  # noqa: E402
from tests.tiny_models import BENCH_LLAMA_2_LAYERS  # noqa: E402

GOAL_S = 120.0
# Dense bf16 peak TFLOP/s by device name (no sparsity).
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}

# Llama-3.1-8B-Instruct's own config.json (the copy the preflight tests read), its padding and
# end of turn as its chat template uses them; the dtype is the run's (bf16 on CUDA).
LLAMA_31_8B: dict[str, Any] = {
    key: value
    for key, value in json.loads(
        (ROOT / "tests/fixtures/configs/llama-3.1-8b-instruct.json").read_text()
    ).items()
    if key not in ("torch_dtype", "transformers_version")
} | {"eos_token_id": 128009, "pad_token_id": 128004}
TINY = BENCH_LLAMA_2_LAYERS  # tests/tiny_models.py: the configs tests and benchmarks share


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random llama on CPU (seconds)")
    ap.add_argument("--pairs", type=int, help="harmful pairs = benign pairs (default 412; tiny 8)")
    ap.add_argument("--tokens", type=int, help="tokens per pair (default 300; tiny 48)")
    ap.add_argument("--response-tokens", type=int, help="scored tokens per pair (default 2/3)")
    ap.add_argument("--batch", type=int, default=8, help="harm (and abs_mean) batch size")
    add_backward_flags(ap, "ours:")
    ap.add_argument("--preserve", choices=["sum_abs", "abs_mean"], default="sum_abs")
    ap.add_argument("--q", type=float, help="harm fraction (default 1e-5; tiny 0.02)")
    ap.add_argument("--p", type=float, help="preserve fraction (default 5e-5; tiny 0.01)")
    ap.add_argument("--device", help="default: cuda (cpu with --tiny)")
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak for MFU (default by card)")
    ap.add_argument("--skip-bare", action="store_true", help="skip the bare forward+backward run")
    ap.add_argument("--skip-batch1", action="store_true", help="skip ours with sum_abs at batch 1")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (CPU runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args(argv)
    tiny = args.tiny
    args.pairs = args.pairs or (8 if tiny else 412)
    args.tokens = args.tokens or (48 if tiny else 300)
    args.response_tokens = args.response_tokens or max(1, (2 * args.tokens) // 3)
    args.q = args.q if args.q is not None else (0.02 if tiny else 1e-5)
    args.p = args.p if args.p is not None else (0.01 if tiny else 5e-5)
    args.device = args.device or ("cpu" if tiny else "cuda")
    return args


# ---------------------------------------------------------------- setup


def build_model(args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Random weights, built directly on the device (bf16 on GPU, fp32 on CPU)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = TINY if args.tiny else LLAMA_31_8B
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**cfg), dtype=dtype)
    return model.eval(), cfg


def random_examples(n: int, args: argparse.Namespace, vocab: int, seed: int) -> list[Example]:
    """n examples of `tokens` random ids; the loss on the last `response_tokens` only."""
    g = torch.Generator().manual_seed(seed)
    context = max(1, args.tokens - args.response_tokens)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (args.tokens,), generator=g).tolist()
        out.append(Example(ids, [IGNORE_INDEX] * context + ids[context:]))
    return out


def peak_tflops(args: argparse.Namespace) -> tuple[float | None, str]:
    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    if not args.device.startswith("cuda"):
        return None, "unknown (CPU)"
    name = torch.cuda.get_device_name()
    for key, value in PEAK_TFLOPS.items():  # most specific names first
        if key in name:
            return value, f"{key} dense bf16"
    return None, f"unknown card {name!r}"


# ---------------------------------------------------------------- timed runs


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1024**3
    return None


def run_ours(
    model: Any,
    harmful: list[Example],
    benign: list[Example],
    args: argparse.Namespace,
    sum_abs_strategy: str = "batched",
):
    """The pipeline's compute_scores, fed duck-typed stand-ins for its job objects."""
    loaded = SimpleNamespace(model=model, tokenizer=SimpleNamespace(pad_token_id=args.pad_id))
    calibration = SimpleNamespace(harmful_examples=harmful, benign_examples=benign)
    pruning = SimpleNamespace(selection="per_matrix", preserve_score=args.preserve, p=args.p)
    config = SimpleNamespace(
        batch_size=args.batch,
        max_backward_tokens=args.max_backward_tokens or None,
        domain=SimpleNamespace(pruning=pruning),
    )
    marks: dict[str, float] = {}
    n_harm = len(harmful)

    def progress(stage: str, done: int, total: int) -> None:
        if done == n_harm and "harm_done" not in marks:
            _sync(args.device)
            marks["harm_done"] = time.perf_counter()

    _reset_peak(args.device)
    start = time.perf_counter()
    scores = pipeline.compute_scores(
        loaded,  # type: ignore[arg-type]
        calibration,  # type: ignore[arg-type]
        config,  # type: ignore[arg-type]
        args.q,
        progress,
        None,
        recompute=args.gradient_checkpointing,
        sum_abs_strategy=sum_abs_strategy,  # type: ignore[arg-type]
    )
    _sync(args.device)
    end = time.perf_counter()
    chosen = scores.selector.select(args.q)
    harm_done = marks.get("harm_done", start)
    return {
        "wall_s": end - start,
        # harm pass incl. its reduction to ranked candidates is not separable by progress
        # alone: harm_s ends at the last harm backward, preserve_s includes the reduction.
        "harm_s": harm_done - start,
        "preserve_s": end - harm_done,
        "peak_gpu_gib": _peak_gib(args.device),
        "pruned": sum(s.pruned.numel() for s in chosen.values()),
        "candidates": sum(s.candidates.numel() for s in chosen.values()),
        "protected_candidates": sum(s.protected_candidates for s in chosen.values()),
    }


def run_bare(model: Any, harmful: list[Example], benign: list[Example], args: argparse.Namespace):
    params = list(attribution.scored_parameters(model).values())
    _reset_peak(args.device)
    start = time.perf_counter()
    with attribution.only_these_require_grad(model, params), torch.enable_grad():
        for examples, batch in ((harmful, args.batch), (benign, args.batch)):
            for s in range(0, len(examples), batch):
                b = {
                    k: v.to(args.device)
                    for k, v in collate(examples[s : s + batch], args.pad_id).items()
                }
                attribution.response_losses(model, b).sum().backward()
                model.zero_grad(set_to_none=True)
            if examples is harmful:
                _sync(args.device)
                harm_done = time.perf_counter()
    _sync(args.device)
    end = time.perf_counter()
    return {
        "wall_s": end - start,
        "harm_s": harm_done - start,
        "preserve_s": end - harm_done,
        "peak_gpu_gib": _peak_gib(args.device),
    }


def warm_up(model: Any, examples: list[Example], args: argparse.Namespace) -> None:
    """One untimed forward+backward per batch shape (cuBLAS handles, kernels, allocator)."""
    params = list(attribution.scored_parameters(model).values())
    with attribution.only_these_require_grad(model, params), torch.enable_grad():
        for n in sorted({1, min(args.batch, len(examples))}):
            b = {k: v.to(args.device) for k, v in collate(examples[:n], args.pad_id).items()}
            attribution.response_losses(model, b).sum().backward()
            model.zero_grad(set_to_none=True)
    _sync(args.device)


# ---------------------------------------------------------------- report


def throughput(run: dict[str, Any], tokens: int, n_params: int, peak: float | None) -> None:
    run["tokens"] = tokens
    run["tokens_per_s"] = tokens / run["wall_s"]
    run["tflops"] = 6 * n_params * tokens / run["wall_s"] / 1e12
    run["mfu"] = run["tflops"] / peak if peak else None


def goal_verdict(report: dict[str, Any]) -> dict[str, Any]:
    runs = report["runs"]
    ours = runs["ours"]
    verdict: dict[str, Any] = {"seconds": GOAL_S, "wall_s": ours["wall_s"]}
    verdict["met"] = ours["wall_s"] <= GOAL_S
    if "ours_batch1" in runs:
        verdict["batch1_vs_batched"] = runs["ours_batch1"]["wall_s"] / ours["wall_s"]
        verdict["batch1_met"] = runs["ours_batch1"]["wall_s"] <= GOAL_S
    return verdict


def a_priori(n_params: int, tokens: int, args: argparse.Namespace) -> str:
    """What to expect before running: planned sustained TFLOP/s from the preflight."""
    from harmprune.inputs.preflight import PLANNED_TFLOPS

    planned = PLANNED_TFLOPS["nvidia-h100" if args.device.startswith("cuda") else "cpu"]
    tflop = 6 * n_params * tokens / 1e12
    return f"plan: {tflop:.3g} TFLOP per run at {planned:g} TFLOP/s sustained ~ {tflop / planned:.3g} s"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: use --tiny (CPU) or --device cpu", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    model, cfg = build_model(args)
    _sync(args.device)
    build_s = time.perf_counter() - t0
    args.pad_id = cfg["pad_token_id"]
    harmful = random_examples(args.pairs, args, cfg["vocab_size"], args.seed + 1)
    benign = random_examples(args.pairs, args, cfg["vocab_size"], args.seed + 2)
    n_params = sum(p.numel() for p in model.parameters())
    scored = sum(p.numel() for p in attribution.scored_parameters(model).values())
    h_tokens = sum(len(e.input_ids) for e in harmful)
    b_tokens = sum(len(e.input_ids) for e in benign)
    peak, peak_source = peak_tflops(args)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(
        f"{device_name}: {n_params / 1e9:.2f} B parameters ({scored / 1e9:.2f} B scored), "
        f"{args.pairs} + {args.pairs} pairs x {args.tokens} tokens, preserve {args.preserve}, "
        f"built in {build_s:.1f} s",
        flush=True,
    )
    print(a_priori(n_params, h_tokens + b_tokens, args), flush=True)
    warm_up(model, harmful, args)

    runs: dict[str, dict[str, Any]] = {"ours": run_ours(model, harmful, benign, args)}
    print(f"ours: {runs['ours']['wall_s']:.1f} s", flush=True)
    if args.preserve == "sum_abs" and not args.skip_batch1:
        runs["ours_batch1"] = run_ours(model, harmful, benign, args, "per_sample")
        print(f"ours_batch1: {runs['ours_batch1']['wall_s']:.1f} s", flush=True)
    if not args.skip_bare:
        runs["bare"] = run_bare(model, harmful, benign, args)
        print(f"bare: {runs['bare']['wall_s']:.1f} s", flush=True)
    for run in runs.values():
        throughput(run, h_tokens + b_tokens, n_params, peak)

    report: dict[str, Any] = {
        "device": device_name,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "model": {
            "parameters": n_params,
            "scored_weights": scored,
            "layers": cfg["num_hidden_layers"],
            "hidden_size": cfg["hidden_size"],
            "build_s": build_s,
        },
        "calibration": {
            "harmful": len(harmful),
            "benign": len(benign),
            "tokens_per_pair": args.tokens,
            "response_tokens": args.response_tokens,
            "harmful_tokens": h_tokens,
            "benign_tokens": b_tokens,
            "batch": args.batch,
            "max_backward_tokens": args.max_backward_tokens or None,
            "gradient_checkpointing": args.gradient_checkpointing,
            "preserve": args.preserve,
            "benign_batch": args.batch,
            "benign_batch_ours_batch1": 1 if args.preserve == "sum_abs" else args.batch,
        },
        "selection": {"q": args.q, "p": args.p},
        "peak_tflops": peak,
        "peak_tflops_source": peak_source,
        "runs": runs,
    }
    report["selection"]["pruned"] = runs["ours"]["pruned"]
    if "ours_batch1" in runs:
        report["selection"]["pruned_ours_batch1"] = runs["ours_batch1"]["pruned"]
    if "bare" in runs:
        report["time_vs_bare"] = runs["ours"]["wall_s"] / runs["bare"]["wall_s"]
    report["goal"] = goal_verdict(report)
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def table(report: dict[str, Any]) -> str:
    def fmt(v: Any, spec: str) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    rows = [
        "| run | wall s | harm pass s | preserve pass s | peak GPU GiB | tokens/s | TFLOP/s | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["runs"].items():
        rows.append(
            f"| {name} | {r['wall_s']:.2f} | {r['harm_s']:.2f} | {r['preserve_s']:.2f} "
            f"| {fmt(r['peak_gpu_gib'], '.1f')} | {r['tokens_per_s']:.0f} "
            f"| {r['tflops']:.1f} | {fmt(r['mfu'], '.1%')} |"
        )
    g = report["goal"]
    lines = [
        "\n".join(rows),
        f"pruned {report['selection']['pruned']} weights at q={report['selection']['q']}, "
        f"p={report['selection']['p']}",
        f"goal {g['seconds']:.0f} s: {'met' if g['met'] else 'MISSED'} ({g['wall_s']:.1f} s)",
    ]
    if "time_vs_bare" in report:
        lines.append(f"ours / bare: {report['time_vs_bare']:.2f}")
    if "batch1_vs_batched" in g:
        lines.append(
            f"ours_batch1 / ours (sum_abs one sample per backward / batched): "
            f"{g['batch1_vs_batched']:.2f}; goal with batch 1: "
            f"{'met' if g['batch1_met'] else 'MISSED'}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
