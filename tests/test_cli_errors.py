"""`harmprune harden` refuses bad input with a clear message, exit code 2, and no output; an
accepted job exits 0, a rejected one 3, a job that fails 1. `harmprune preflight` exits 0 when the
job fits and 2 when it does not."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from harmprune.cli.main import EXIT_JOB_ERROR, EXIT_REJECTED, EXIT_USER_ERROR, main
from safetensors.torch import save_file

from tests.conftest import TINY_DOMAIN
from tests.tiny_models import UNSUPPORTED


def write_spec(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def assert_refused(
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    out: Path,
    *needles: str,
    exit_code: int = EXIT_USER_ERROR,
) -> str:
    """Run the CLI; it must exit `exit_code` (default 2: bad input), name the problem, and leave
    nothing next to `out`."""
    siblings_before = set(out.parent.iterdir()) if out.parent.is_dir() else set()
    rc = main(argv)
    err = capsys.readouterr().err
    assert EXIT_USER_ERROR == 2
    assert rc == exit_code, err
    assert "harmprune: error" in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert not out.exists()
    if out.parent.is_dir():
        left = set(out.parent.iterdir()) - siblings_before
        assert not left, f"left behind: {left}"
        assert not list(out.parent.glob(f".{out.name}.*"))
    return err


def harden(model: Any, domain: Path, out: Path, *extra: str) -> list[str]:
    return [
        "harden",
        "--model",
        str(model),
        "--domain",
        str(domain),
        "--out",
        str(out),
        "--device",
        "cpu",
        *extra,
    ]


@pytest.fixture
def out(tmp_path: Path) -> Path:
    parent = tmp_path / "outputs"
    parent.mkdir()
    return parent / "hardened"


def test_unknown_model(
    capsys: Any, domain_spec_path: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = "no-such-org/no-such-model"
    # Offline, the Hub cannot say whether the repo exists: an environment failure (exit 1, the
    # API's 503), not bad input.
    assert_refused(
        capsys,
        harden(model, domain_spec_path, out),
        out,
        "[load]",
        "unknown model",
        model,
        exit_code=EXIT_JOB_ERROR,
    )


def test_missing_local_model(
    capsys: Any, domain_spec_path: Path, out: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere" / "model"
    assert_refused(capsys, harden(missing, domain_spec_path, out), out, "[load]", "not found")


@pytest.mark.parametrize(
    ("make_config", "needles"), list(UNSUPPORTED.values()), ids=list(UNSUPPORTED)
)
def test_unsupported_architecture(
    make_config: Any,
    needles: list[str],
    capsys: Any,
    domain_spec_path: Path,
    out: Path,
    tmp_path: Path,
) -> None:
    model_dir = tmp_path / "model"
    make_config().save_pretrained(model_dir)
    save_file({"shared.weight": torch.zeros(64, 16)}, str(model_dir / "model.safetensors"))
    assert_refused(capsys, harden(model_dir, domain_spec_path, out), out, "[load]", *needles)


def test_pickle_only_model_is_refused(
    capsys: Any, domain_spec_path: Path, out: Path, tmp_path: Path, tiny_model_dir: Any
) -> None:
    model_dir = tmp_path / "pickled"
    model_dir.mkdir()
    shutil.copy(tiny_model_dir("llama") / "config.json", model_dir)
    torch.save({"x": torch.zeros(1)}, model_dir / "pytorch_model.bin")
    assert_refused(capsys, harden(model_dir, domain_spec_path, out), out, "safetensors")


def test_malformed_yaml(capsys: Any, tmp_path: Path, out: Path, tiny_model_dir: Any) -> None:
    spec = tmp_path / "broken.yaml"
    spec.write_text("name: cyber\nharmful: [\n  - prompt: unclosed\n")
    assert_refused(
        capsys, harden(tiny_model_dir("llama"), spec, out), out, "[spec]", "domain spec", "broken"
    )


def test_spec_not_found(capsys: Any, tmp_path: Path, out: Path, tiny_model_dir: Any) -> None:
    spec = tmp_path / "absent.yaml"
    assert_refused(
        capsys, harden(tiny_model_dir("llama"), spec, out), out, "[spec]", "not found", "absent"
    )


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda s: s.update(unknown_key=1), "unknown_key"),
        (lambda s: s["pruning"].update(qq=0.1), "pruning.qq"),
        (lambda s: s["harmful"][0].update(answer="x"), "harmful.0"),
        (lambda s: s.update(prompt_format="markdown"), "prompt_format"),
        (lambda s: s.pop("name"), "name"),
    ],
)
def test_invalid_spec_names_the_key(
    change: Any, needle: str, capsys: Any, tmp_path: Path, out: Path, tiny_model_dir: Any
) -> None:
    spec = copy.deepcopy(TINY_DOMAIN)
    change(spec)
    path = write_spec(tmp_path / "spec.yaml", spec)
    assert_refused(capsys, harden(tiny_model_dir("llama"), path, out), out, "[spec]", needle)


@pytest.mark.parametrize("which", ["harmful", "benign"])
def test_empty_set(which: str, capsys: Any, tmp_path: Path, out: Path, tiny_model_dir: Any) -> None:
    spec = copy.deepcopy(TINY_DOMAIN)
    spec[which] = []
    path = write_spec(tmp_path / "spec.yaml", spec)
    err = assert_refused(capsys, harden(tiny_model_dir("llama"), path, out), out, "[spec]", which)
    assert "empty" in err


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--q", "2"], "q"),
        (["--q", "0"], "q"),
        (["--q", "1"], "q"),
        (["--p", "-0.1"], "p"),
        (["--p", "1.5"], "p"),
    ],
)
def test_q_p_out_of_range(
    flags: list[str],
    needle: str,
    capsys: Any,
    domain_spec_path: Path,
    out: Path,
    tiny_model_dir: Any,
) -> None:
    err = assert_refused(
        capsys, harden(tiny_model_dir("llama"), domain_spec_path, out, *flags), out, "[spec]"
    )
    assert f"\n{needle}: " in err, err  # one `field: message` line names the option


def test_output_parent_is_a_file(
    capsys: Any, domain_spec_path: Path, tmp_path: Path, tiny_model_dir: Any
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "hardened"
    assert_refused(
        capsys,
        harden(tiny_model_dir("llama"), domain_spec_path, out),
        out,
        "[save]",
        str(out),
        "not a directory",
    )
    assert blocker.read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_output_is_a_file(
    capsys: Any, domain_spec_path: Path, tmp_path: Path, tiny_model_dir: Any
) -> None:
    out = tmp_path / "taken"
    out.write_text("x")
    rc = main(harden(tiny_model_dir("llama"), domain_spec_path, out))
    err = capsys.readouterr().err
    assert rc == EXIT_USER_ERROR and "[save]" in err and "not a directory" in err
    assert out.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_output_in_proc_is_refused(
    capsys: Any, domain_spec_path: Path, tiny_model_dir: Any
) -> None:
    out = Path("/proc/harmprune-test/hardened")
    rc = main(harden(tiny_model_dir("llama"), domain_spec_path, out))
    err = capsys.readouterr().err
    assert rc == EXIT_USER_ERROR and "[save]" in err and "cannot write" in err
    assert not out.exists()


def test_non_empty_output_needs_overwrite(
    capsys: Any, domain_spec_path: Path, out: Path, tiny_model_dir: Any
) -> None:
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    rc = main(harden(tiny_model_dir("llama"), domain_spec_path, out))
    err = capsys.readouterr().err
    assert rc == EXIT_USER_ERROR and "not empty" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert not list(out.parent.glob(f".{out.name}.*"))


def test_missing_chat_template(
    capsys: Any, domain_spec_path: Path, out: Path, tmp_path: Path, tiny_model_dir: Any
) -> None:
    model_dir = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir("llama"), model_dir)
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    config_path = model_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config.pop("chat_template", None)
    config_path.write_text(json.dumps(tok_config))
    err = assert_refused(
        capsys, harden(model_dir, domain_spec_path, out), out, "[load]", "chat template"
    )
    assert "prompt_format: plain" in err  # the message says how to fix it


# ---------------------------------------------------------------- exit codes of whole jobs


def test_accepted_job_exits_0(
    capsys: Any, domain_spec_path: Path, out: Path, tiny_model_dir: Any
) -> None:
    rc = main(harden(tiny_model_dir("llama"), domain_spec_path, out, "--batch-size", "2"))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "-> accepted" in captured.out
    assert json.loads((out / "report.json").read_text())["outcome"] == "accepted"


def test_rejected_job_exits_3_and_writes_no_weights(
    capsys: Any, tmp_path: Path, out: Path, tiny_model_dir: Any
) -> None:
    spec = copy.deepcopy(TINY_DOMAIN)
    spec["thresholds"]["min_harm_increase"] = 1000.0  # no hardening can raise harm that much
    path = write_spec(tmp_path / "reject.yaml", spec)
    rc = main(harden(tiny_model_dir("llama"), path, out, "--batch-size", "2"))
    captured = capsys.readouterr()
    assert rc == EXIT_REJECTED == 3, captured.err
    assert "-> rejected" in captured.out
    assert "min_harm_increase" in captured.out or "harm" in captured.out
    report = json.loads((out / "report.json").read_text())
    assert report["outcome"] == "rejected" and report["outcome_reason"]
    assert not list(out.glob("*.safetensors")), "a rejected job must not write weights"


def test_failing_job_exits_1(capsys: Any, tmp_path: Path, out: Path, tiny_model_dir: Any) -> None:
    """A job that fails on our side (not the user's input): exit 1, `error [stage]`, no output."""
    spec = copy.deepcopy(TINY_DOMAIN)
    spec["harmful"][0]["response"] = ""  # tokenizes to nothing: the calibration stage fails
    path = write_spec(tmp_path / "spec.yaml", spec)
    rc = main(harden(tiny_model_dir("llama"), path, out))
    err = capsys.readouterr().err
    assert rc == EXIT_JOB_ERROR == 1, err
    assert "harmprune: error [elicit]" in err and "tokenizes to nothing" in err
    assert not out.exists() and list(out.parent.iterdir()) == []


# ---------------------------------------------------------------- a .gguf file as --model


def test_missing_gguf_file(capsys: Any, domain_spec_path: Path, out: Path, tmp_path: Path) -> None:
    gguf = tmp_path / "models" / "absent.gguf"
    assert_refused(
        capsys, harden(gguf, domain_spec_path, out), out, "[load]", "GGUF file not found"
    )


def test_unreadable_gguf_file(
    capsys: Any, domain_spec_path: Path, out: Path, tmp_path: Path, isolated_cache: Path
) -> None:
    gguf = tmp_path / "models with space" / "broken.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + b"\0" * 60)  # the magic, then nothing valid
    assert_refused(
        capsys,
        harden(gguf, domain_spec_path, out),
        out,
        "[load]",
        "cannot read GGUF file broken.gguf",
    )
    assert not (isolated_cache / "models").exists() or not any(
        p for p in (isolated_cache / "models").iterdir() if not p.name.startswith(".")
    ), "a failed conversion left a cached model"


# ---------------------------------------------------------------- preflight


def test_preflight_fits_exits_0_with_the_counts(capsys: Any, tiny_model_dir: Any) -> None:
    from harmprune.method.attribution import scored_parameters
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir("llama")
    rc = main(["preflight", "--model-dir", str(model_dir), "--pairs", "8", "--tokens", "32"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads(captured.out)
    assert result["fits"] is True and result["problems"] == []
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert result["parameters"] == sum(p.numel() for p in model.parameters())
    assert result["scored_weights"] == sum(p.numel() for p in scored_parameters(model).values())
    assert result["layers"] == model.config.num_hidden_layers == 2
    assert result["tied_embeddings"] is True and result["chat_template"] is True


def test_preflight_too_large_exits_2(capsys: Any, tiny_model_dir: Any) -> None:
    rc = main(
        [
            "preflight",
            "--model-dir",
            str(tiny_model_dir("llama")),
            "--device-memory-gb",
            "0.000001",
        ]
    )
    captured = capsys.readouterr()
    assert rc == EXIT_USER_ERROR, captured.err
    assert json.loads(captured.out)["fits"] is False
    assert "harmprune: preflight refused" in captured.err


def test_preflight_without_config_exits_2(capsys: Any, tmp_path: Path) -> None:
    rc = main(["preflight", "--model-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == EXIT_USER_ERROR and "[load]" in err and "no config.json" in err
