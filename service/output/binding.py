"""What ties a report to its checkpoint: the hashes `report.json` records (`Report.binding`).

The save stage hashes every file it wrote before the report (weights, their index, the mask,
config, tokenizer) and records them with the spec's sha256 and the signer's identity; the base
model is named by `inputs.model` (Hub commit, or GGUF sha256). The report, the card and the
plots are written after these hashes and are covered by the signature (`harmprune.output.signing`).

Plain Python and pydantic (no torch): the report types import without it.
"""

from __future__ import annotations

from pathlib import Path

from harmprune.vocabulary import MASK_FILE, SIGNATURE_FILE, sha256_file
from pydantic import BaseModel, ConfigDict, Field

UNSIGNED = "unsigned"
# Weight files of a checkpoint: the shards and the index that names them.
WEIGHT_SUFFIXES = (".safetensors",)
WEIGHT_INDEX = "model.safetensors.index.json"


class Binding(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    spec_sha256: str = Field(description="sha256 of the domain spec's canonical JSON.")
    weights: dict[str, str] = Field(
        description="sha256 of every published weight file (safetensors shards and their index)."
    )
    mask_sha256: str | None = Field(description=f"sha256 of {MASK_FILE} (none: not accepted).")
    files: dict[str, str] = Field(
        default_factory=dict,
        description="sha256 of the other files written before the report (config, tokenizer).",
    )
    base_weights: dict[str, str] | None = Field(
        None,
        description="A local base directory (no Hub commit, no GGUF hash to name it): sha256 of "
        "its safetensors files, so an auditor can check the base they are given.",
    )
    signer: str = Field(
        UNSIGNED,
        description=f"Who signs {SIGNATURE_FILE}: the public key's sha256 fingerprint, or "
        f"'{UNSIGNED}'.",
    )


def is_weight_file(name: str) -> bool:
    return name != MASK_FILE and (name.endswith(WEIGHT_SUFFIXES) or name == WEIGHT_INDEX)


def hash_files(directory: Path) -> dict[str, str]:
    """Relative POSIX path -> sha256 of every file under `directory`, sorted."""
    return {
        path.relative_to(directory).as_posix(): sha256_file(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def bind(
    directory: Path,
    spec_sha256: str,
    signer: str | None,
    base_dir: Path | None = None,
) -> Binding:
    """The binding of what `directory` holds now (before the report and card are written).

    `base_dir`: the base's local directory, hashed only when nothing else can name it."""
    hashes = hash_files(directory)
    return Binding(
        spec_sha256=spec_sha256,
        weights={n: h for n, h in hashes.items() if is_weight_file(n)},
        mask_sha256=hashes.get(MASK_FILE),
        files={n: h for n, h in hashes.items() if not is_weight_file(n) and n != MASK_FILE},
        base_weights=(
            {p.name: sha256_file(p) for p in sorted(base_dir.glob("*.safetensors"))}
            if base_dir is not None
            else None
        ),
        signer=signer or UNSIGNED,
    )


def render_section(binding: Binding | None) -> str:
    """The card's integrity section: who signed it and how to check it."""
    if binding is None:
        return ""
    if binding.signer == UNSIGNED:
        signed = (
            "**unsigned**: this checkpoint carries no signature; nothing shows that its files "
            "are the ones the job wrote."
        )
    else:
        signed = (
            f"signed by `{binding.signer}` (OpenSSF model-signing, `{SIGNATURE_FILE}` over every "
            "file of this repo)."
        )
    return (
        "## Integrity\n\n"
        f"Signature: {signed} `report.json` records the sha256 of every weight file, of the "
        f"mask and of the spec (`{binding.spec_sha256[:16]}`). Check that the weights are the "
        "base model with exactly the masked weights zeroed: `harmprune audit <this repo> "
        "--public-key <signer's key>`.\n\n"
    )
