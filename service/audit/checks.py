"""`harmprune audit`: check a hardened checkpoint someone else made, without the service.

Checks, each a pure function over what was fetched (I/O stays in `run_audit` and the fetchers):

    signature  model.sig verifies with the given public key over every file (none added,
               removed or changed); unsigned fails unless allowed; the report names this signer
    report     report.json parses, is accepted, and has its binding (the hashes below)
    hashes     every weight file, the mask and the other files the report hashes are there and
               hash the same; no weight file the report does not name
    mask       the mask names the report's spec hash and pruned count, per matrix too
    base       the base model is fetched at the recorded commit (Hub) or by the recorded GGUF
               sha256 (the SmolLM2 alias, or a GGUF given with --base)
    weights    tensor by tensor, streamed (one tensor of each file in memory at a time, through
               safetensors' `safe_open`): published == base with exactly the masked entries
               zeroed, the mask's values are the base's, and nothing else differs
    rerun      (--rerun, with the domain spec) the test set is rebuilt and the teacher-forced
               figures of the original and the hardened model are measured again on this
               machine and compared with the report's within a stated tolerance

A verdict is a list of checks; it passes only if every check does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from harmprune.errors import HarmpruneError
from harmprune.inputs.preflight import snapshot_download_errors
from harmprune.inputs.references import Grant, operator_grant
from harmprune.output.binding import UNSIGNED, Binding, is_weight_file
from harmprune.settings import Settings
from harmprune.vocabulary import (
    MASK_FILE,
    REPORT_FILE,
    SIGNATURE_FILE,
    sha256_file,
)
from pydantic import BaseModel, Field

FIRST_FEW = 5
# --rerun: how far a re-measured mean may be from the report's (relative), and the hardened
# model's harm rise from the report's (absolute, in fractions: 0.02 = 2 percentage points).
RERUN_REL_TOLERANCE = 0.02
RERUN_RISE_TOLERANCE = 0.02


class AuditError(HarmpruneError):
    """The audit could not start: the target cannot be found or read."""

    stage = "audit"
    code = "audit_failed"
    user_error = True


class Check(BaseModel):
    name: str
    ok: bool
    detail: str
    data: dict[str, Any] = Field(default_factory=dict)


class Verdict(BaseModel):
    target: str
    revision: str | None = None
    commit: str | None = Field(None, description="The audited repo's commit (Hub targets).")
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def as_json(self) -> dict[str, Any]:
        return {**self.model_dump(mode="json"), "passed": self.passed}


# ------------------------------------------------------------------ fetching (I/O)


def fetch_checkpoint(
    target: str, revision: str | None, settings: Settings
) -> tuple[Path, str | None]:
    """A local directory as is; otherwise a Hub repo id, every file of it at `revision` (a
    file added to the repo must be seen; nothing fetched is ever unpickled or run)."""
    path = Path(target).expanduser()
    if path.is_dir():
        return path, None
    if path.is_absolute() or target.startswith((".", "~")) or target.count("/") != 1:
        raise AuditError(f"{target} is neither a directory nor a Hub repo id (owner/name)")
    from huggingface_hub import snapshot_download

    unreachable = f"{target} is not a local directory and the Hub cannot be reached"
    with snapshot_download_errors(target, AuditError, unreachable):
        local = Path(snapshot_download(target, revision=revision, token=settings.token_value()))
    return local, local.name


def resolve_base(
    report: Any,
    base: str | None,
    settings: Settings,
    base_grant: Callable[[str, str | None], Grant] = operator_grant,
) -> tuple[Path | None, Check]:
    """The base model's local safetensors directory, identified as the report records it.
    `base_grant(reference, commit)`: the policy's grant for a Hub base (the CLI: the user's own;
    the service: the tenant's, which refuses a repo it may not read)."""
    from harmprune.inputs import loading

    src = report.inputs.model
    recorded = src.commit or src.gguf_sha256
    try:
        if base is not None:
            return _given_base(Path(base).expanduser(), report, settings)
        if src.kind == "hub":
            if not src.commit:
                return None, Check(name="base", ok=False, detail="report records no base commit")
            local, got = loading.resolve(base_grant(src.reference, src.commit), settings)
            if got.commit != src.commit:
                return None, _fail_base(f"the Hub gave commit {got.commit}, not {src.commit}")
            return local, Check(
                name="base",
                ok=True,
                detail=f"{src.reference}@{src.commit}",
                data={"commit": src.commit},
            )
        if src.kind in ("alias", "gguf"):
            gguf = loading.smollm2_gguf_path()
            if src.kind == "gguf" and gguf.name != src.reference:
                return None, _fail_base(f"base {src.reference} is a GGUF file: give it with --base")
            return _gguf_base(gguf, src.gguf_sha256, settings)
        return None, _fail_base(
            f"base {src.reference} was a local directory: give it with --base DIR"
        )
    except HarmpruneError as err:
        return None, _fail_base(f"cannot fetch the base ({recorded or src.reference}): {err}")


def _fail_base(detail: str) -> Check:
    return Check(name="base", ok=False, detail=detail)


def _gguf_base(gguf: Path, recorded: str | None, settings: Settings) -> tuple[Path | None, Check]:
    from harmprune.inputs.loading import convert_gguf

    sha = sha256_file(gguf)
    if sha != recorded:
        return None, _fail_base(
            f"{gguf.name} has sha256 {sha[:16]}, the report {str(recorded)[:16]}"
        )
    local, _ = convert_gguf(gguf, settings.cache_dir)
    return local, Check(
        name="base", ok=True, detail=f"{gguf.name} sha256 {sha[:16]}", data={"gguf_sha256": sha}
    )


def _given_base(path: Path, report: Any, settings: Settings) -> tuple[Path | None, Check]:
    src = report.inputs.model
    if path.suffix == ".gguf" and path.is_file():
        return _gguf_base(path, src.gguf_sha256, settings)
    if not path.is_dir():
        return None, _fail_base(f"--base {path.name} is neither a directory nor a .gguf file")
    binding: Binding | None = report.binding
    if binding is not None and binding.base_weights:
        got = {p.name: sha256_file(p) for p in sorted(path.glob("*.safetensors"))}
        if got != binding.base_weights:
            return None, _fail_base(
                f"--base {path.name}: its weight files are not the recorded base's"
            )
        return path, Check(
            name="base", ok=True, detail=f"{path.name}: weight files match the report"
        )
    return path, Check(
        name="base",
        ok=True,
        detail=f"{path.name} (given with --base; the report records nothing to check it against)",
    )


# ------------------------------------------------------------------ checks (pure)


def check_signature(
    directory: Path,
    binding: Binding | None,
    public_key: Path | None,
    allow_unsigned: bool,
    *,
    allow_symlinks: bool,
) -> Check:
    from harmprune.output import signing

    claimed = binding.signer if binding is not None else None  # None: no readable report
    if not (directory / SIGNATURE_FILE).is_file():
        if claimed not in (UNSIGNED, None):
            return Check(
                name="signature",
                ok=False,
                detail=f"{SIGNATURE_FILE} is missing, but the report says signed by {claimed}",
            )
        if allow_unsigned:
            return Check(name="signature", ok=True, detail="unsigned (allowed: --allow-unsigned)")
        return Check(name="signature", ok=False, detail="unsigned: no model.sig (--allow-unsigned)")
    if public_key is None:
        return Check(
            name="signature",
            ok=False,
            detail=f"signed by {claimed or 'a key'}, but no --public-key was given to verify it "
            "with",
        )
    try:
        identity = signing.fingerprint(public_key.read_bytes())
    except OSError as err:
        raise AuditError(f"--public-key {public_key.name} cannot be read: {err.strerror}") from None
    problems = signing.verify_checkpoint(directory, public_key, allow_symlinks=allow_symlinks)
    if claimed is not None and claimed != identity:
        problems.append(f"the report names signer {claimed}, the key is {identity}")
    if problems:
        return Check(
            name="signature",
            ok=False,
            detail="; ".join(problems[:FIRST_FEW]),
            data={"problems": problems},
        )
    return Check(name="signature", ok=True, detail=f"every file verifies; signer {identity}")


def check_hashes(directory: Path, binding: Binding) -> Check:
    expected = {**binding.weights, **binding.files}
    if binding.mask_sha256 is not None:
        expected[MASK_FILE] = binding.mask_sha256
    mismatched, missing = [], []
    for name, digest in sorted(expected.items()):
        path = directory / name
        if not path.is_file():
            missing.append(name)
        elif sha256_file(path) != digest:
            mismatched.append(name)
    present = {p.name for p in directory.iterdir() if p.is_file() and is_weight_file(p.name)}
    unexpected = sorted(present - set(binding.weights))
    problems = (
        [f"changed: {', '.join(mismatched[:FIRST_FEW])}"] * bool(mismatched)
        + [f"missing: {', '.join(missing[:FIRST_FEW])}"] * bool(missing)
        + [f"weight files the report does not name: {', '.join(unexpected[:FIRST_FEW])}"]
        * bool(unexpected)
    )
    data = {"mismatched": mismatched, "missing": missing, "unexpected": unexpected}
    if problems:
        return Check(name="hashes", ok=False, detail="; ".join(problems), data=data)
    return Check(
        name="hashes", ok=True, detail=f"{len(expected)} files hash as the report says", data=data
    )


def check_mask(mask: Any, metadata: dict[str, Any], report: Any) -> Check:
    problems = []
    if metadata.get("spec_hash") != report.inputs.spec_hash:
        problems.append("the mask's spec hash is not the report's")
    if mask.count != report.pruned_count:
        problems.append(
            f"the mask holds {mask.count} weights, the report says {report.pruned_count}"
        )
    per_matrix = {m.name: m.pruned for m in report.modules if m.pruned}
    got = {n: int(idx.numel()) for n, (idx, _) in mask.entries.items()}
    differ = sorted(n for n in set(per_matrix) | set(got) if per_matrix.get(n) != got.get(n))
    if differ:
        problems.append(f"per-matrix counts differ: {', '.join(differ[:FIRST_FEW])}")
    if problems:
        return Check(name="mask", ok=False, detail="; ".join(problems))
    return Check(name="mask", ok=True, detail=f"{mask.count} weights in {len(got)} matrices")


def tensor_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (headers only; no tensor is read)."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for path in sorted(directory.glob("*.safetensors")):
        if path.name == MASK_FILE:
            continue
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                where[name] = path
    return where


def compare_tensor(published: Any, base: Any, mask_entry: Any) -> dict[str, int]:
    """Counts for one tensor: elements that differ outside the mask, masked elements that are
    not zero, mask values that are not the base's."""
    import torch

    expected = base.to(published.dtype).reshape(-1).clone()
    got = published.reshape(-1)
    counts = {"outside_mask": 0, "masked_not_zero": 0, "mask_values_not_base": 0}
    if mask_entry is not None:
        idx, values = mask_entry
        idx = idx.to(torch.long)
        counts["mask_values_not_base"] = int((values.to(base.dtype) != base.reshape(-1)[idx]).sum())
        counts["masked_not_zero"] = int((got[idx] != 0).sum())
        expected[idx] = got[idx]  # judged by the two counts above, not as "outside"
    counts["outside_mask"] = int((~_same(got, expected)).sum())
    return counts


def _same(a: Any, b: Any) -> Any:
    """Bitwise-equal elements (NaN equals NaN here: a copied NaN is not a change)."""
    import torch

    return (a == b) | (torch.isnan(a) & torch.isnan(b)) if a.is_floating_point() else a == b


def check_weights(published_dir: Path, base_dir: Path, mask: Any) -> Check:
    """Stream every tensor of the published files against the base's (see the module doc)."""
    from safetensors import safe_open

    published, base = tensor_files(published_dir), tensor_files(base_dir)
    totals = {"outside_mask": 0, "masked_not_zero": 0, "mask_values_not_base": 0}
    bad: dict[str, list[str]] = {k: [] for k in totals}
    missing = sorted(set(base) - set(published))
    extra = sorted(set(published) - set(base))
    unknown_mask = sorted(set(mask.entries) - set(published))
    shapes: list[str] = []
    with ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def handle(path: Path) -> Any:
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
            return handles[path]

        for name in sorted(set(published) & set(base)):
            got, want = (
                handle(published[name]).get_tensor(name),
                handle(base[name]).get_tensor(name),
            )
            if got.shape != want.shape:
                shapes.append(name)
                continue
            for key, n in compare_tensor(got, want, mask.entries.get(name)).items():
                totals[key] += n
                if n:
                    bad[key].append(name)
            del got, want
    problems = []
    if totals["outside_mask"]:
        problems.append(
            f"{totals['outside_mask']} weights outside the mask differ from the base "
            f"({', '.join(bad['outside_mask'][:FIRST_FEW])})"
        )
    if totals["masked_not_zero"]:
        problems.append(
            f"{totals['masked_not_zero']} masked weights are not zero "
            f"({', '.join(bad['masked_not_zero'][:FIRST_FEW])})"
        )
    if totals["mask_values_not_base"]:
        problems.append(
            f"{totals['mask_values_not_base']} mask values are not the base's "
            f"({', '.join(bad['mask_values_not_base'][:FIRST_FEW])})"
        )
    for label, names in (
        ("tensors of the base missing", missing),
        ("tensors the base lacks", extra),
        ("mask names tensors not published", unknown_mask),
        ("shapes differ", shapes),
    ):
        if names:
            problems.append(f"{label}: {', '.join(names[:FIRST_FEW])}")
    data = {
        "tensors": len(set(published) & set(base)),
        **totals,
        "first": {k: v[:FIRST_FEW] for k, v in bad.items()},
        "missing": missing,
        "extra": extra,
    }
    if problems:
        return Check(name="weights", ok=False, detail="; ".join(problems), data=data)
    return Check(
        name="weights",
        ok=True,
        detail=f"{data['tensors']} tensors: the base with exactly the {mask.count} masked weights zeroed",
        data=data,
    )


# ------------------------------------------------------------------ the audit


def run_audit(
    target: str,
    *,
    revision: str | None = None,
    public_key: Path | None = None,
    allow_unsigned: bool = False,
    base: str | None = None,
    rerun_spec: Path | None = None,
    settings: Settings | None = None,
    on_check: Callable[[Check], None] | None = None,
    base_grant: Callable[[str, str | None], Grant] = operator_grant,
) -> Verdict:
    """Every check over `target` (a directory or a Hub repo id); see the module doc.

    `base_grant(repo_id, commit)`: the access policy's grant for the base model's Hub repo
    (the service applies the tenant's policy; the CLI reads what the user's token reads)."""
    from harmprune.method.pruning import load_mask
    from harmprune.output.report_json import load_report
    from pydantic import ValidationError

    settings = settings or Settings()
    directory, commit = fetch_checkpoint(target, revision, settings)
    checks: list[Check] = []

    def add(check: Check) -> None:
        checks.append(check)
        if on_check is not None:
            on_check(check)

    def verdict() -> Verdict:
        return Verdict(target=target, revision=revision, commit=commit, checks=checks)

    try:
        report = load_report((directory / REPORT_FILE).read_text())  # strict JSON, nulls
    except (OSError, ValidationError, ValueError) as err:
        report, unreadable = None, str(err).splitlines()[0]
    add(
        check_signature(
            directory,
            report.binding if report is not None else None,
            public_key,
            allow_unsigned,
            allow_symlinks=commit is not None,
        )
    )
    if report is None:
        add(Check(name="report", ok=False, detail=f"{REPORT_FILE} cannot be read: {unreadable}"))
        return verdict()
    if report.binding is None or report.outcome != "accepted":
        why = "it records no hashes (binding)" if report.binding is None else "it was rejected"
        add(Check(name="report", ok=False, detail=f"{REPORT_FILE} cannot be audited: {why}"))
        return verdict()
    add(Check(name="report", ok=True, detail=f"accepted; {report.pruned_count} weights pruned"))
    add(check_hashes(directory, report.binding))
    mask_path = directory / MASK_FILE
    if not mask_path.is_file():
        add(Check(name="mask", ok=False, detail=f"{MASK_FILE} is missing"))
        return verdict()
    mask = load_mask(mask_path)
    add(check_mask(mask, _mask_metadata(mask_path), report))
    base_dir, base_check = resolve_base(report, base, settings, base_grant)
    add(base_check)
    if base_dir is not None:
        add(check_weights(directory, base_dir, mask))
    if rerun_spec is not None:
        from harmprune.audit.rerun import rerun_check

        add(rerun_check(report, directory, base_dir, rerun_spec, settings))
    return verdict()


def _mask_metadata(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    try:
        value = json.loads(meta.get("harmprune", "{}"))
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def render_table(verdict: Verdict) -> Iterator[str]:
    """The short verdict table the CLI prints."""
    width = max((len(c.name) for c in verdict.checks), default=5)
    for check in verdict.checks:
        yield f"  {check.name:<{width}}  {'ok  ' if check.ok else 'FAIL'}  {check.detail}"
    yield f"audit {'PASSED' if verdict.passed else 'FAILED'}: {verdict.target}" + (
        f"@{verdict.commit}" if verdict.commit else ""
    )


def within(measured: float, reported: float, rel: float) -> bool:
    if not (math.isfinite(measured) and math.isfinite(reported)):
        return False
    return abs(measured - reported) <= rel * max(abs(reported), 1e-12)
