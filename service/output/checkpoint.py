"""Stage 6, saving: a complete checkpoint directory or nothing.

Everything is written into a hidden sibling directory and renamed into place at the end, so a
crash, an error or a cancellation never leaves a half-written checkpoint at the target path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harmprune.errors import OutputError


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Fail before any heavy work if the target cannot be written."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"output directory {out} is not empty (use --overwrite to replace it)")
    parent = out.resolve().parent
    # FIX(tests): a parent that exists as a regular file was reported as "does not exist".
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"cannot write {out}: {parent} is a file, not a directory")
    if not parent.is_dir():
        raise OutputError(f"cannot write {out}: parent directory {parent} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".harmprune-probe-"):
            pass
    except OSError as err:
        raise OutputError(f"cannot write into {parent}: {err.strerror}") from None


@contextlib.contextmanager
def staged_output(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory; on success it replaces `out`, on any error it is removed."""
    check_output_dir(out, overwrite)
    staging = out.resolve().parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        if out.exists():
            trash = out.resolve().parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, trash)
            os.replace(staging, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def save_checkpoint(model: Any, tokenizer: Any, directory: Path, max_shard_size: str) -> None:
    """safetensors shards (explicit shard size), config, generation config, tokenizer.

    Tied embeddings are saved once and stay tied: the method never prunes embeddings, and
    `save_pretrained` drops the tied duplicate that safetensors would refuse.
    """
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(directory)


def write_json(path: Path, data: Any) -> None:
    # strict JSON: a NaN or Infinity left in `data` is an error, never a non-standard token
    path.write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")
