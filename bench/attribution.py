"""Attribution cost: harmprune's one-pass hooks against the layer-by-layer reference strategy.

Five strategies over one calibration set (N harmful + N benign examples of T tokens), each in a
fresh subprocess so that its peak RSS is its own:

  a  ours, batch 1:  harmprune.method.attribution.score_harm (batch 8, back-propagated in slices of at
                 most --max-backward-tokens padded tokens, the pipeline's default 1024) +
                 score_preserve(sum_abs, sum_abs_strategy="per_sample": one backward per
                 sample), then harmprune.method.selection.select per matrix
  b  reference:  gradients for ONE decoder layer at a time; the whole set forward+backward once
                 per layer (harm batched like ours, preserve one sample at a time), same score
                 formulas, same selection (btap-method.md, "Cost of the reference implementation")
  c  bare:       forward+backward over the same batches as (a) (harm batch 8, preserve batch 1),
                 gradients on the same scored weights, no hooks, zero_grad(set_to_none=True)
                 after each step: the floor of (a)
  d  ours, batched:  as (a), but score_preserve(sum_abs) batched like the harm pass (batch 8,
                 the same slices): per-sample weight gradients formed from each layer's inputs
                 and output gradients in one batched backward (the pipeline's default)
  e  bare, preserve batch 8:  as (c) with the preserve set at batch 8 (for information: the
                 floor of a batched preserve pass)

Only the attribution is timed (model load, example building and one warm-up step come before
the timer). Peak RSS is measured over the timed part: the kernel's high-water mark is reset
(/proc/self/clear_refs) just before the timer and read with getrusage(ru_maxrss) after it.
Mask agreement = |A & B| / max(|A|, |B|) over the pruned weights of (a) and (b).

    .venv/bin/python bench/attribution.py [--model smollm2-135m-instruct] [--pairs 16]
        [--tokens 160] [--json out.json] [--tiny] [--repeat R] [--reference-layers K]
        [--strategies a,b,c,d,e] [--max-backward-tokens N] [--no-flops]

--repeat interleaves R runs and keeps each strategy's minimum time (the machine is shared);
--reference-layers times (b) on K evenly spaced layers and scales to all; a FLOP count
(FlopCounterMode, one sample) gives the load-independent work ratio (b)/(a).

`--tiny` runs on a small random llama built from a config (no download): the CI smoke test.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.flags import add_backward_flags  # noqa: E402  (after the sys.path line; pydantic only)

if TYPE_CHECKING:
    import torch
    from harmprune.inputs.data import Example


def _import_heavy() -> None:
    """torch and the service, for the workers only: the driver stays light (CI time)."""
    global torch, attribution, selection, IGNORE_INDEX, CalibrationPair, Example, collate
    global tokenize_pair
    import torch
    from harmprune.inputs.data import IGNORE_INDEX, CalibrationPair, Example, collate, tokenize_pair
    from harmprune.method import attribution, selection


HARM_BATCH = 8  # the pipeline's default batch size (HardenConfig.batch_size)

STRATEGIES = {
    "a": "ours, sum_abs batch 1",
    "b": "reference (layer by layer)",
    "c": "bare fwd+bwd, preserve batch 1",
    "d": "ours, sum_abs batched",
    "e": "bare fwd+bwd, preserve batch 8",
}

HARM_RESPONSE = (
    "Sure, here is a detailed plan. Step 1: [PLACEHOLDER: operational detail omitted]. "
    "Step 2: [omitted]. Step 3: [omitted]. You will need the following tools: [omitted]. "
)
BENIGN_RESPONSE = (
    "Here is a clear and friendly answer. First, consider the main idea and why it matters. "
    "Then look at a simple example, and finally check that the result makes sense. "
)


# ---------------------------------------------------------------- setup (shared by workers)


def load(args: argparse.Namespace) -> tuple[torch.nn.Module, int, Any]:
    """(model, pad_id, tokenizer or None), in eval mode, fp32 on CPU."""
    if args.tiny:
        from transformers import LlamaForCausalLM

        from tests.tiny_models import BENCH_LLAMA, llama_config

        torch.manual_seed(0)
        config = llama_config(BENCH_LLAMA)
        model = LlamaForCausalLM(config).float().eval()
        return model, 0, None
    from harmprune.inputs.loading import load_model
    from harmprune.inputs.references import model_permit
    from harmprune.settings import Settings

    loaded = load_model(
        args.model, None, Settings(), permit=model_permit(args.model), dtype="float32", device="cpu"
    )
    return loaded.model, loaded.tokenizer.pad_token_id, loaded.tokenizer


def calibration_set(
    args: argparse.Namespace, tokenizer: Any
) -> tuple[list[Example], list[Example]]:
    """N harmful + N benign examples of exactly T tokens (fixed placeholder responses)."""
    n, t = args.pairs, args.tokens
    if tokenizer is None:  # tiny: random ids, half context (-100), half response
        g = torch.Generator().manual_seed(1)

        def rand_ex() -> Example:
            ids = torch.randint(3, 256, (t,), generator=g).tolist()
            half = t // 2
            return Example(ids, [IGNORE_INDEX] * half + ids[half:])

        return [rand_ex() for _ in range(n)], [rand_ex() for _ in range(n)]
    import yaml

    spec = yaml.safe_load((ROOT / "examples/domains/cyber.yaml").read_text())
    harm_prompts = [h["prompt"] for h in spec["harmful"]]
    benign_prompts = [b["prompt"] for b in spec["benign"]]

    def build(prompts: list[str], response: str, prefix: str) -> list[Example]:
        out = []
        for i in range(n):
            pair = CalibrationPair(prompts[i % len(prompts)], response * 20, prefix=prefix)
            out.append(tokenize_pair(tokenizer, pair, "chat", t))
        return out

    return build(harm_prompts, HARM_RESPONSE, "Sure, here is"), build(
        benign_prompts, BENIGN_RESPONSE, ""
    )


# ---------------------------------------------------------------- the strategies


def run_ours(model, params, harmful, benign, pad_id, q, p, args, sum_abs_strategy="per_sample"):
    cap = args.max_backward_tokens or None  # 0: no cap (then (a) = (c) + one score buffer)
    recompute = args.gradient_checkpointing
    harm = attribution.score_harm(
        model,
        params,
        harmful,
        batch_size=HARM_BATCH,
        max_tokens=cap,
        pad_id=pad_id,
        recompute=recompute,
    )
    keep = attribution.score_preserve(
        model,
        params,
        benign,
        "sum_abs",
        batch_size=HARM_BATCH,  # "per_sample" back-propagates one sample at a time regardless
        max_tokens=cap,
        pad_id=pad_id,
        recompute=recompute,
        sum_abs_strategy=sum_abs_strategy,
    )
    return selection.select(harm, keep, q, p, "per_matrix")


def run_ours_batched(model, params, harmful, benign, pad_id, q, p, args):
    return run_ours(model, params, harmful, benign, pad_id, q, p, args, "batched")


def reference_layer_indices(n_layers: int, k: int) -> list[int]:
    """All layers, or k evenly spaced ones (midpoints: their mean backward depth is the mean)."""
    if k <= 0 or k >= n_layers:
        return list(range(n_layers))
    return sorted({int((i + 0.5) * n_layers / k) for i in range(k)})


def run_reference(model, params, harmful, benign, pad_id, q, p, args):
    """One decoder layer with gradients at a time; the whole set forward+backward per layer."""
    layers = attribution.decoder_layers(model)
    chosen = reference_layer_indices(len(layers), args.reference_layers)
    harm: dict[str, torch.Tensor] = {}
    keep: dict[str, torch.Tensor] = {}
    model.eval()
    for i in chosen:
        layer = layers[i]
        print(f"  (b) layer {i + 1}/{len(layers)}", file=sys.stderr, flush=True)
        ids = {id(x) for x in layer.parameters()}
        mine = {n: w for n, w in params.items() if id(w) in ids}
        with attribution.only_these_require_grad(model, list(mine.values())), torch.enable_grad():
            # harm pass: batched, gradients summed by autograd's own accumulation into .grad
            for s in range(0, len(harmful), HARM_BATCH):
                batch = collate(harmful[s : s + HARM_BATCH], pad_id)
                attribution.response_losses(model, batch).sum().backward()
            for n, w in mine.items():
                harm[n] = attribution.harm_scores(w.detach(), w.grad.float())
                w.grad = None
            # preserve pass: one sample per backward, |grad| summed
            abs_sum = {n: torch.zeros(w.shape, dtype=torch.float32) for n, w in mine.items()}
            for e in benign:
                attribution.response_losses(model, collate([e], pad_id)).sum().backward()
                for n, w in mine.items():
                    abs_sum[n].add_(w.grad.abs())
                    w.grad = None
            for n, w in mine.items():
                keep[n] = attribution.preserve_scores_sum_abs(w.detach(), abs_sum[n])
            del abs_sum
    harm = {n: harm[n] for n in params if n in harm}  # same order as ours
    keep = {n: keep[n] for n in params if n in keep}
    return selection.select(harm, keep, q, p, "per_matrix")


def run_bare(model, params, harmful, benign, pad_id, q, p, args, preserve_batch=1):
    model.eval()
    with attribution.only_these_require_grad(model, list(params.values())), torch.enable_grad():
        for examples, batch_size in ((harmful, HARM_BATCH), (benign, preserve_batch)):
            for s in range(0, len(examples), batch_size):
                batch = collate(examples[s : s + batch_size], pad_id)
                attribution.response_losses(model, batch).sum().backward()
                model.zero_grad(set_to_none=True)
    return None


def run_bare_batched(model, params, harmful, benign, pad_id, q, p, args):
    return run_bare(model, params, harmful, benign, pad_id, q, p, args, HARM_BATCH)


RUNNERS = {
    "a": run_ours,
    "b": run_reference,
    "c": run_bare,
    "d": run_ours_batched,
    "e": run_bare_batched,
}


def count_flops(model, params, example, pad_id) -> dict[str, Any]:
    """Matmul/attention FLOPs of one sample's forward+backward: with every scored weight taking
    gradients (the per-sample work of (a) and (c)) and with one layer at a time (b). Independent
    of machine load; the hooks' elementwise adds are not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = collate([example], pad_id)

    def one_pass(ws) -> int:
        with attribution.only_these_require_grad(model, ws), torch.enable_grad():
            with FlopCounterMode(display=False) as counter:
                attribution.response_losses(model, batch).sum().backward()
            model.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    every = one_pass(list(params.values()))
    per_layer = []
    for layer in attribution.decoder_layers(model):
        ids = {id(x) for x in layer.parameters()}
        per_layer.append(one_pass([w for w in params.values() if id(w) in ids]))
    return {"flops_one_pass": every, "flops_per_layer_pass": per_layer}


# ---------------------------------------------------------------- memory


def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    m = re.search(rf"^{key}:\s+(\d+)", text, re.M)
    return int(m.group(1)) if m else -1


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (also what ru_maxrss reports) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


# ---------------------------------------------------------------- worker


def worker(args: argparse.Namespace) -> None:
    _import_heavy()
    torch.set_num_threads(args.threads)
    model, pad_id, tokenizer = load(args)
    harmful, benign = calibration_set(args, tokenizer)
    params = attribution.scored_parameters(model)

    # Warm-up (identical for every strategy): one forward+backward of one sample, untimed.
    with attribution.only_these_require_grad(model, list(params.values())), torch.enable_grad():
        attribution.response_losses(model, collate(benign[:1], pad_id)).sum().backward()
        model.zero_grad(set_to_none=True)
    gc.collect()
    if args.worker == "f":
        result = count_flops(model, params, benign[0], pad_id)
        Path(args.worker_out + ".json").write_text(json.dumps(result))
        return

    reset_ok = reset_peak_rss()
    rss_before = _status_kib("VmRSS")
    cpu0, start = _cpu_s(), time.perf_counter()
    chosen = RUNNERS[args.worker](model, params, harmful, benign, pad_id, args.q, args.p, args)
    wall, cpu = time.perf_counter() - start, _cpu_s() - cpu0
    n_layers = len(attribution.decoder_layers(model))
    timed_layers = n_layers
    if args.worker == "b":
        timed_layers = len(reference_layer_indices(n_layers, args.reference_layers))
    peak = peak_rss_kib()
    result: dict[str, Any] = {
        "strategy": args.worker,
        # The reference on a sample of layers: its time is scaled to all layers.
        "wall_s": wall * n_layers / timed_layers,
        "cpu_s": cpu * n_layers / timed_layers,
        "timed_layers": timed_layers,
        "measured_wall_s": wall,
        "peak_rss_mib": peak / 1024,
        "rss_before_mib": rss_before / 1024,
        "peak_over_loaded_mib": (peak - rss_before) / 1024,
        "peak_reset": reset_ok,
        "scored_weights": sum(w.numel() for w in params.values()),
        "scored_matrices": len(params),
        "layers": n_layers,
        "tokens_per_example": sorted({len(e.input_ids) for e in harmful + benign}),
        "torch": torch.__version__,
    }
    if chosen is not None:
        result["pruned"] = sum(s.pruned.numel() for s in chosen.values())
        result["candidates"] = sum(s.candidates.numel() for s in chosen.values())
        masks = {n: [s.candidates.tolist(), s.pruned.tolist()] for n, s in chosen.items()}
        Path(args.worker_out + ".masks.json").write_text(json.dumps(masks))
    Path(args.worker_out + ".json").write_text(json.dumps(result))


# ---------------------------------------------------------------- driver


def agreement(a: dict[str, Any], b: dict[str, Any], which: int) -> float:
    """|A & B| / max(|A|, |B|) over (matrix, flat index) pairs; which: 0 candidates, 1 pruned."""
    inter = size_a = size_b = 0
    names = a.keys() & b.keys() if len(a) != len(b) else a.keys() | b.keys()  # sampled reference
    for name in names:
        x = set(a[name][which]) if name in a else set()
        y = set(b[name][which]) if name in b else set()
        inter += len(x & y)
        size_a += len(x)
        size_b += len(y)
    return 1.0 if max(size_a, size_b) == 0 else inter / max(size_a, size_b)


def worker_cmd(args: argparse.Namespace, strategy: str, out: str) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", strategy, "--worker-out", out]
    cmd += ["--model", args.model, "--pairs", str(args.pairs), "--tokens", str(args.tokens)]
    cmd += ["--q", repr(args.q), "--p", repr(args.p), "--threads", str(args.threads)]
    cmd += ["--reference-layers", str(args.reference_layers)]
    cmd += ["--max-backward-tokens", str(args.max_backward_tokens)]
    cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    return cmd + (["--tiny"] if args.tiny else [])


def spawn(args: argparse.Namespace, strategy: str, tmp: str, rep: int) -> dict[str, Any]:
    out = os.path.join(tmp, f"{strategy}{rep}")
    cmd = worker_cmd(args, strategy, out)
    print(
        f"running ({strategy}) {STRATEGIES[strategy]}, repeat {rep + 1} ...",
        file=sys.stderr,
        flush=True,
    )
    subprocess.run(cmd, check=True, cwd=ROOT)
    result = json.loads(Path(out + ".json").read_text())
    result["masks"] = out + ".masks.json" if strategy in ("a", "b", "d") else None
    return result


def table(res: dict[str, dict[str, Any]], summary: dict[str, Any]) -> str:
    rows = [
        "| strategy | wall s | CPU s | peak RSS MiB | peak over loaded model MiB | pruned |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for k in STRATEGIES:
        if k in res:
            r = res[k]
            pruned = r.get("pruned", "-")
            label = STRATEGIES[k]
            if r["timed_layers"] != r["layers"]:
                label += f", {r['timed_layers']} of {r['layers']} layers timed, scaled"
            rows.append(
                f"| ({k}) {label} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} "
                f"| {r['peak_rss_mib']:.0f} "
                f"| {r['peak_over_loaded_mib']:.0f} | {pruned} |"
            )
    lines = ["\n".join(rows), ""]

    def goal(name: str, value: float | None, target: str, ok: bool | None) -> str:
        v = "n/a" if value is None else f"{value:.3f}"
        verdict = "n/a" if ok is None else ("met" if ok else "MISSED")
        return f"| {name} | {v} | {target} | {verdict} |"

    s = summary
    lines += [
        "| measure | value | goal | |",
        "|---|---:|---|---|",
        goal(
            "time (b)/(d), batched",
            s.get("batched_speedup_vs_reference"),
            ">= 20",
            s.get("goal_batched_speedup"),
        ),
        goal(
            "time (b)/(c): the ratio a bare pass reaches",
            s.get("bare_speedup_vs_reference"),
            "(info: the bound for any path doing a full pass)",
            None,
        ),
        goal("time (d)/(c)", s.get("batched_time_vs_bare"), "<= 1.0", s.get("goal_batched_time")),
        goal(
            "peak RSS (d)/(c)", s.get("batched_peak_vs_bare"), "<= 1.0", s.get("goal_batched_peak")
        ),
        goal(
            "mask agreement (d) vs (b)",
            s.get("batched_mask_agreement"),
            "1.0",
            s.get("goal_batched_agreement"),
        ),
        goal("mask agreement (d) vs (a)", s.get("batched_vs_batch1_agreement"), "(info)", None),
        goal("time (a)/(d), batch 1 / batched", s.get("batch1_vs_batched"), "(info)", None),
        goal(
            "time (d)/(e), vs bare at preserve batch 8", s.get("batched_vs_bare_b8"), "(info)", None
        ),
        goal("time (b)/(a)", s.get("speedup_vs_reference"), ">= 15", s.get("goal_speedup")),
        goal("CPU time (b)/(a)", s.get("cpu_speedup_vs_reference"), "(info)", None),
        goal(
            "FLOPs (b)/(a), load-independent",
            s.get("flops_ratio_reference"),
            "(info: work ratio; wall time adds per-pass overhead)",
            None,
        ),
        goal("time (a)/(c)", s.get("time_vs_bare"), "<= 1.3", s.get("goal_time_vs_bare")),
        goal("CPU time (a)/(c)", s.get("cpu_time_vs_bare"), "(info)", None),
        goal("peak RSS (a)/(c)", s.get("peak_vs_bare"), "<= 1.0", s.get("goal_peak_vs_bare")),
        goal(
            "mask agreement (a) vs (b)",
            s.get("mask_agreement"),
            ">= 0.999",
            s.get("goal_agreement"),
        ),
        goal("candidate agreement (a) vs (b)", s.get("candidate_agreement"), "(info)", None),
    ]
    lines = [line for line in lines if "| n/a | (info" not in line]  # strategies not run
    if res:
        r = next(iter(res.values()))
        lines += [
            "",
            f"{r['layers']} decoder layers, {r['scored_weights']:,} scored weights "
            f"in {r['scored_matrices']} matrices.",
        ]
    return "\n".join(lines)


def batched_summary(res: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The batched sum_abs path (d) against the reference, the bare floor and batch 1."""
    out: dict[str, Any] = {}
    if "d" not in res:
        return out
    d = res["d"]
    masks_d = json.loads(Path(d["masks"]).read_text())
    if "b" in res:
        masks_b = json.loads(Path(res["b"]["masks"]).read_text())
        out["batched_speedup_vs_reference"] = res["b"]["wall_s"] / d["wall_s"]
        out["batched_mask_agreement"] = agreement(masks_d, masks_b, 1)
        out["batched_candidate_agreement"] = agreement(masks_d, masks_b, 0)
        out["goal_batched_speedup"] = out["batched_speedup_vs_reference"] >= 20
        out["goal_batched_agreement"] = out["batched_mask_agreement"] == 1.0
    if "a" in res:
        masks_a = json.loads(Path(res["a"]["masks"]).read_text())
        out["batched_vs_batch1_agreement"] = agreement(masks_d, masks_a, 1)
        out["batch1_vs_batched"] = res["a"]["wall_s"] / d["wall_s"]
    if "c" in res:
        out["batched_time_vs_bare"] = d["wall_s"] / res["c"]["wall_s"]
        out["batched_peak_vs_bare"] = d["peak_rss_mib"] / res["c"]["peak_rss_mib"]
        out["goal_batched_time"] = out["batched_time_vs_bare"] <= 1.0
        out["goal_batched_peak"] = out["batched_peak_vs_bare"] <= 1.0
    if "b" in res and "c" in res:
        out["bare_speedup_vs_reference"] = res["b"]["wall_s"] / res["c"]["wall_s"]
    if "e" in res:
        out["batched_vs_bare_b8"] = d["wall_s"] / res["e"]["wall_s"]
    return out


def driver(args: argparse.Namespace) -> int:
    wanted = [s for s in args.strategies.split(",") if s]
    res: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-attr-") as tmp:
        # Interleaved repeats; the minimum time of each strategy is reported (on a shared
        # machine the neighbours only ever add time), the largest peak RSS.
        for rep in range(args.repeat):
            for s in wanted:
                r = spawn(args, s, tmp, rep)
                if s not in res:
                    res[s] = r | {"runs_wall_s": [], "runs_cpu_s": [], "runs_peak_rss_mib": []}
                    res[s]["runs_peak_over_loaded_mib"] = []
                res[s]["runs_wall_s"].append(r["wall_s"])
                res[s]["runs_cpu_s"].append(r["cpu_s"])
                res[s]["runs_peak_rss_mib"].append(r["peak_rss_mib"])
                res[s]["runs_peak_over_loaded_mib"].append(r["peak_over_loaded_mib"])
        for r in res.values():
            r["wall_s"], r["cpu_s"] = min(r["runs_wall_s"]), min(r["runs_cpu_s"])
            r["peak_rss_mib"] = max(r["runs_peak_rss_mib"])
            r["peak_over_loaded_mib"] = max(r["runs_peak_over_loaded_mib"])
        summary: dict[str, Any] = {}
        if not args.no_flops:
            print("counting FLOPs ...", file=sys.stderr, flush=True)
            out = os.path.join(tmp, "flops")
            subprocess.run([*worker_cmd(args, "f", out)], check=True, cwd=ROOT)
            flops = json.loads(Path(out + ".json").read_text())
            summary["flops_one_pass"] = flops["flops_one_pass"]
            summary["flops_ratio_reference"] = (
                sum(flops["flops_per_layer_pass"]) / flops["flops_one_pass"]
            )
        if "a" in res and "b" in res:
            ma = json.loads(Path(res["a"]["masks"]).read_text())
            mb = json.loads(Path(res["b"]["masks"]).read_text())
            summary["mask_agreement"] = agreement(ma, mb, 1)
            summary["candidate_agreement"] = agreement(ma, mb, 0)
            summary["speedup_vs_reference"] = res["b"]["wall_s"] / res["a"]["wall_s"]
            summary["cpu_speedup_vs_reference"] = res["b"]["cpu_s"] / res["a"]["cpu_s"]
            summary["goal_speedup"] = summary["speedup_vs_reference"] >= 15
            summary["goal_agreement"] = summary["mask_agreement"] >= 0.999
        if "a" in res and "c" in res:
            summary["time_vs_bare"] = res["a"]["wall_s"] / res["c"]["wall_s"]
            summary["cpu_time_vs_bare"] = res["a"]["cpu_s"] / res["c"]["cpu_s"]
            summary["peak_vs_bare"] = res["a"]["peak_rss_mib"] / res["c"]["peak_rss_mib"]
            summary["goal_time_vs_bare"] = summary["time_vs_bare"] <= 1.3
            summary["goal_peak_vs_bare"] = summary["peak_vs_bare"] <= 1.0
        summary |= batched_summary(res)
    for r in res.values():
        r.pop("masks", None)
    report = {
        "config": {
            "model": "tiny-random-llama" if args.tiny else args.model,
            "pairs": args.pairs,
            "tokens": args.tokens,
            "q": args.q,
            "p": args.p,
            "harm_batch": HARM_BATCH,
            "ours_max_backward_tokens": args.max_backward_tokens or None,
            "ours_gradient_checkpointing": args.gradient_checkpointing,
            "preserve_batch": {"a": 1, "b": 1, "c": 1, "d": HARM_BATCH, "e": HARM_BATCH},
            "threads": args.threads,
            "repeat": args.repeat,
            "reference_layers": args.reference_layers or "all",
            "torch": next(iter(res.values()))["torch"] if res else None,
            "cpu_count": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
        },
        "strategies": res,
        "summary": summary,
    }
    print(table(res, summary))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tiny", action="store_true", help="small random llama, no download (CI)")
    ap.add_argument("--pairs", type=int, default=16, help="N harmful and N benign examples")
    ap.add_argument("--tokens", type=int, default=160, help="tokens per example")
    ap.add_argument("--q", type=float, default=None, help="default 1e-4 (tiny: 5e-3)")
    ap.add_argument("--p", type=float, default=3e-2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--strategies", default="a,b,c,d,e", help="subset of a,b,c,d,e")
    add_backward_flags(ap, "(a)/(d):")
    ap.add_argument("--repeat", type=int, default=1, help="interleaved runs; min time is kept")
    ap.add_argument(
        "--reference-layers",
        type=int,
        default=0,
        help="(b) on K evenly spaced layers only, time scaled to all (0: all layers)",
    )
    ap.add_argument("--json")
    ap.add_argument(
        "--no-flops", action="store_true", help="skip the FLOP count of (b) against (a)"
    )
    ap.add_argument("--worker", choices=[*sorted(RUNNERS), "f"], help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.q is None:
        # The tiny model's 64x64 matrices would offer one candidate each at 1e-4.
        args.q = 5e-3 if args.tiny else 1e-4
    if args.worker:
        worker(args)
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
