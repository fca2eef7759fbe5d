"""`harmprune` command line. Heavy imports (torch, transformers) are deferred so --help is instant.

harmprune harden --model M --domain SPEC --out DIR    run a whole job in-process (no services)
harmprune restore --checkpoint DIR --out DIR           undo the pruning with the saved mask
harmprune audit REPO_OR_DIR --public-key KEY            check a hardened checkpoint you did not make
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

EXIT_USER_ERROR = 2
EXIT_JOB_ERROR = 1
EXIT_REJECTED = 3


class StageBars:
    """Renders (stage, done, total) progress events as one tqdm bar per stage."""

    def __init__(self) -> None:
        self.stage: str | None = None
        self.bar: Any = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(
                total=max(total, 1),
                desc=f"{stage:<9}",
                unit="step",
                leave=True,
                file=sys.stderr,
                dynamic_ncols=True,
                disable=False,  # LIBRARY_BARS_OFF's TQDM_DISABLE is for the libraries' bars
            )
        if self.bar.total != max(total, 1):
            self.bar.total = max(total, 1)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class OneLineLogHandler(logging.Handler):
    """Warnings logged during a job (harmprune's, the libraries', Python warnings) as one line
    each, `harmprune: warning [logger]: message`, written between bar redraws (tqdm.write)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            lines = record.getMessage().strip().splitlines()
            if record.name == "py.warnings":  # "file:line: Category: text" + the source line
                lines = lines[:1]
            text = " ".join(line.strip() for line in lines if line.strip())
            if record.exc_info and record.exc_info[1] is not None:
                error = record.exc_info[1]
                text += f" ({type(error).__name__}: {error})"
            tqdm.write(f"harmprune: {record.levelname.lower()} [{record.name}]: {text}", sys.stderr)
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def library_output_as_lines() -> Iterator[None]:
    """While a job runs: third-party log records and Python warnings through OneLineLogHandler."""
    from harmprune.jobs.logs import route_library_logs

    route_library_logs()
    handler = OneLineLogHandler()
    root = logging.getLogger()
    root.addHandler(handler)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)


def _add_harden(sub: Any) -> None:
    p = sub.add_parser("harden", help="Harden a model for a domain, in-process (no services).")
    p.add_argument(
        "--model",
        required=True,
        help="Hub repo id, local directory, .gguf file, or smollm2-135m-instruct",
    )
    p.add_argument("--revision", help="Hub revision (commit, branch or tag)")
    p.add_argument(
        "--domain",
        required=True,
        help="Domain spec (YAML/JSON path) or an example name (e.g. cyber)",
    )
    p.add_argument("--out", required=True, type=Path, help="Output directory (must be empty)")
    p.add_argument("--q", type=float, help="Harm candidate fraction (overrides the spec)")
    p.add_argument("--p", type=float, help="Protected fraction (overrides the spec)")
    p.add_argument("--selection", choices=["per_matrix", "global"])
    p.add_argument("--preserve-score", choices=["sum_abs", "abs_mean"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=8)
    _add_memory_options(p)
    p.add_argument(
        "--attribution-processes",
        type=_at_least_one,
        default=1,
        help="FSDP2 ranks for the attribution (one per GPU; torchrun); default 1: in process",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="Run the model repo's code (also needs HARMPRUNE_ALLOW_REMOTE_CODE=true)",
    )
    p.add_argument("--overwrite", action="store_true", help="Replace a non-empty --out")
    p.add_argument(
        "--signing-key",
        type=Path,
        help="Sign the checkpoint (model.sig) with this elliptic-curve PEM private key "
        "(default: HARMPRUNE_SIGNING_KEY; neither: unsigned)",
    )
    p.add_argument(
        "--attacks",
        type=lambda text: [a.strip() for a in text.split(",") if a.strip()],
        help="Attacks to run after hardening, e.g. abliteration,finetune (settings from the "
        "spec's attacks: section, defaults otherwise)",
    )
    p.set_defaults(func=cmd_harden)


def _add_memory_options(parser: argparse.ArgumentParser) -> None:
    """The attribution's memory knobs (HardenConfig's), shared by `harden` and `preflight`."""
    parser.add_argument(
        "--max-backward-tokens",
        type=int,
        default=1024,
        help="Padded tokens per attribution backward; larger batches are sliced with the same scores (0: no cap)",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        choices=["auto", "on", "off"],
        default="auto",
        help="Recompute decoder blocks in the attribution's backward (auto: only if the "
        "preflight estimate does not fit the GPU otherwise)",
    )


def _at_least_one(text: str) -> int:
    value = int(text) if text.strip().lstrip("-").isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _add_restore(sub: Any) -> None:
    p = sub.add_parser("restore", help="Undo a hardening with its mask (bit-exact).")
    p.add_argument("--checkpoint", required=True, type=Path, help="A hardened checkpoint directory")
    p.add_argument("--out", required=True, type=Path, help="Where to write the restored model")
    p.set_defaults(func=cmd_restore)


def _add_preflight(sub: Any) -> None:
    p = sub.add_parser(
        "preflight", help="Check a model and estimate memory and time, from config files alone."
    )
    p.add_argument(
        "--model-dir",
        required=True,
        type=Path,
        help="Directory with config.json (+ tokenizer files); no weights needed",
    )
    p.add_argument("--pairs", type=int, default=824, help="Calibration pairs (harmful + benign)")
    p.add_argument("--tokens", type=int, default=300, help="Tokens per pair")
    p.add_argument("--batch-size", type=int, default=8)
    _add_memory_options(p)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device-kind", default="nvidia-h100")
    p.add_argument("--device-memory-gb", type=float, default=80.0)
    p.add_argument(
        "--devices", type=_at_least_one, default=1, help="GPUs (more than 1: FSDP2 attribution)"
    )
    p.add_argument("--plain", action="store_true", help="The spec uses prompt_format: plain")
    p.set_defaults(func=cmd_preflight)


def cmd_preflight(args: argparse.Namespace) -> int:
    from harmprune.inputs.preflight import estimate

    result = estimate(
        args.model_dir,
        calibration_pairs=args.pairs,
        tokens_per_pair=args.tokens,
        batch_size=args.batch_size,
        max_backward_tokens=args.max_backward_tokens or None,
        dtype=args.dtype,
        device_kind=args.device_kind,
        device_memory_gb=args.device_memory_gb,
        devices=args.devices,
        need_chat_template=not args.plain,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    print(result.model_dump_json(indent=2))
    if not result.fits:
        print("harmprune: preflight refused: " + "; ".join(result.problems), file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def build_config(args: argparse.Namespace) -> Any:
    from harmprune.errors import SpecError
    from harmprune.inputs.config import format_validation_error, harden_config, load_domain
    from pydantic import ValidationError

    spec = load_domain(args.domain)
    overrides = {
        k: v
        for k, v in {
            "q": args.q,
            "p": args.p,
            "selection": args.selection,
            "preserve_score": args.preserve_score,
        }.items()
        if v is not None
    }
    if args.attacks:
        from harmprune.attacks import select_attacks

        spec = spec.model_copy(update={"attacks": select_attacks(spec.attacks, args.attacks)})
    try:
        if overrides:
            pruning = spec.pruning.model_validate({**spec.pruning.model_dump(), **overrides})
            spec = spec.model_copy(update={"pruning": pruning})
        return harden_config(
            args.model,
            spec,
            revision=args.revision,
            device=args.device,
            seed=args.seed,
            dtype=args.dtype,
            trust_remote_code=args.trust_remote_code,
            batch_size=args.batch_size,
            gradient_checkpointing=args.gradient_checkpointing,
            max_backward_tokens=args.max_backward_tokens or None,  # 0: no cap
        )
    except ValidationError as err:
        raise SpecError(f"invalid options:\n{format_validation_error(err)}") from None


# The stage bars are the only progress display. tqdm reads TQDM_* once, when first imported
# (in a `harmprune` process: during the job): every library's bar starts disabled, lm-eval's
# too (its task builder's has no switch of its own). datasets reads its variable when loaded.
LIBRARY_BARS_OFF = {"TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


def cmd_harden(args: argparse.Namespace) -> int:
    added = {name: value for name, value in LIBRARY_BARS_OFF.items() if name not in os.environ}
    os.environ.update(added)
    try:
        return _harden(args)
    finally:  # main() called inside another program leaves its environment as it was
        for name in added:
            os.environ.pop(name, None)


def _harden(args: argparse.Namespace) -> int:
    from harmprune.pipeline import run
    from harmprune.settings import Settings

    config = build_config(args)
    settings = Settings(**({"signing_key": args.signing_key} if args.signing_key else {}))
    if settings.signing_key is not None:  # a bad key fails now, not after the whole job
        from harmprune.output.signing import signer_identity

        signer_identity(settings.signing_key)
    _quiet_library_bars()
    bars = StageBars()
    try:
        with library_output_as_lines():
            report = run(
                config,
                settings,
                args.out,
                on_progress=bars,
                overwrite=args.overwrite,
                attribution_processes=args.attribution_processes,
            )
    finally:
        bars.close()
    print_summary(report, args.out)
    return 0 if report.outcome == "accepted" else EXIT_REJECTED


def _quiet_library_bars() -> None:
    """Our stage bars are the progress display; transformers' and the Hub client's would
    interleave. Their own switches too: TQDM_DISABLE misses when tqdm was imported before
    cmd_harden (main() called inside another program)."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()


def print_summary(report: Any, out: Path) -> None:
    print(
        f"\nharmprune: {report.inputs.model.reference} hardened for '{report.inputs.domain}'"
        f" -> {report.outcome}"
    )
    if report.outcome_reason:
        print(f"  reason: {report.outcome_reason}")
    print(f"  weights scored: {report.scored_count:,}")
    print(f"  weights pruned: {report.pruned_count:,} ({report.pruned_fraction:.6%})")
    by_kind: dict[str, int] = {}
    for m in report.modules:
        by_kind[m.kind] = by_kind.get(m.kind, 0) + m.pruned
    print("  pruned per module kind: " + ", ".join(f"{k}={v}" for k, v in sorted(by_kind.items())))
    per_layer: dict[int, int] = {}
    for m in report.modules:
        if m.layer is not None:
            per_layer[m.layer] = per_layer.get(m.layer, 0) + m.pruned
    print("  pruned per layer: " + " ".join(f"{k}:{v}" for k, v in sorted(per_layer.items())))
    print(f"  checkpoint: {out}/  (mask: harmprune-mask.safetensors, report: report.json)")


def cmd_restore(args: argparse.Namespace) -> int:
    from harmprune.output.restore import restore_checkpoint

    restore_checkpoint(args.checkpoint, args.out)
    print(f"restored original weights into {args.out}")
    return 0


Registrar = Callable[[Any], None]


def _add_audit(sub: Any) -> None:
    """audit (harmprune.cli.audit)."""
    from harmprune.cli.audit import register

    register(sub)


def _add_service_commands(sub: Any) -> None:
    """serve, worker, submit, status, pull, cancel (harmprune.cli.service)."""
    from harmprune.cli.service import register

    register(sub)


REGISTRARS: list[Registrar] = [_add_harden, _add_restore, _add_preflight, _add_service_commands]
REGISTRARS.append(_add_audit)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harmprune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for register in REGISTRARS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from harmprune.errors import HarmpruneError

    try:
        return int(args.func(args))
    except HarmpruneError as err:
        print(f"harmprune: error [{err.stage}]: {err}", file=sys.stderr)
        return EXIT_USER_ERROR if err.user_error else EXIT_JOB_ERROR
    except KeyboardInterrupt:
        print("harmprune: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
