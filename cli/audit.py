"""`harmprune audit`: check a hardened checkpoint you did not make (harmprune.audit.checks does it).

Exit codes: 0 every check holds, 3 a check failed (the verdict says which), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_AUDIT_FAILED = 3


def register(sub: Any) -> None:
    p = sub.add_parser(
        "audit",
        help="Check a hardened checkpoint: signature, report hashes, and that its weights are "
        "the base with exactly the masked weights zeroed.",
    )
    p.add_argument("target", metavar="REPO_OR_DIR", help="A Hub repo id or a checkpoint directory")
    p.add_argument("--revision", help="Hub revision of the checkpoint (commit, branch or tag)")
    p.add_argument("--public-key", type=Path, help="The signer's PEM public key")
    p.add_argument(
        "--allow-unsigned", action="store_true", help="Pass a checkpoint without model.sig"
    )
    p.add_argument(
        "--base",
        help="The base model, where the report cannot name one to fetch: a directory or a "
        ".gguf file (checked against the hashes the report records)",
    )
    p.add_argument(
        "--rerun",
        action="store_true",
        help="Re-measure the report's test-set loss figures on this machine (needs --spec)",
    )
    p.add_argument(
        "--spec",
        type=Path,
        help="The job's domain spec, for --rerun (its sha256 must be the report's)",
    )
    p.add_argument("--json", type=Path, metavar="OUT", help="Write the verdict as JSON here")
    p.set_defaults(func=cmd_audit)


def cmd_audit(args: argparse.Namespace) -> int:
    from harmprune.audit.checks import render_table, run_audit
    from harmprune.errors import SpecError

    if args.public_key is not None and not args.public_key.is_file():
        raise SpecError(f"--public-key: {args.public_key} is not a file")
    if args.rerun and args.spec is None:
        raise SpecError("--rerun needs --spec: the job's domain spec (the report holds no prompts)")
    if args.spec is not None and not args.spec.is_file():
        raise SpecError(f"--spec: {args.spec} is not a file")
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # the verdict table is the output
    verdict = run_audit(
        args.target,
        revision=args.revision,
        public_key=args.public_key,
        allow_unsigned=args.allow_unsigned,
        base=args.base,
        rerun_spec=args.spec if args.rerun else None,
    )
    for line in render_table(verdict):
        print(line)
    if args.json is not None:
        args.json.write_text(json.dumps(verdict.as_json(), indent=2) + "\n")
    sys.stdout.flush()
    return 0 if verdict.passed else EXIT_AUDIT_FAILED
