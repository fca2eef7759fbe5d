"""`harmprune audit` on a tiny model hardened from the test Hub and signed with an operator key.

One hardening per module (a tiny Llama served by the loopback Hub at a pinned commit, the real
`huggingface_hub` client, the real model-signing library); each test copies the checkpoint and
changes one thing: the audit passes on the untouched copy and fails, naming the reason, on each
change. The signature also verifies with model-signing's own verifier, and a checkpoint
published to the test Hub is audited end to end by its repo id.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import model_signing
import pytest
import torch
from harmprune import pipeline
from harmprune.audit.checks import Verdict, run_audit
from harmprune.cli.main import main
from harmprune.inputs.config import DomainSpec, HardenConfig
from harmprune.method.pruning import MASK_FILE, load_mask
from harmprune.output.binding import UNSIGNED, Binding, render_section
from harmprune.output.publishing import JOB_MARKER, HubPublisher, LocalPublisher
from harmprune.output.signing import sign_checkpoint, signer_identity
from harmprune.settings import Settings
from harmprune.vocabulary import SIGNATURE_FILE
from safetensors.torch import load_file, save_file

from tests.conftest import TINY_DOMAIN
from tests.support.hub_server import HubServer, hub_environment
from tests.support.keys import write_key_pair

BASE_REPO = "acme/tiny-llama"
WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class Hardened:
    out: Path
    key: Path
    public_key: Path
    other_key: Path
    other_public_key: Path
    hub: HubServer
    pinned: str  # the base commit the job hardened
    retrained: str  # a later commit of the base, other weights
    settings: Settings


@pytest.fixture(scope="module")
def hardened(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Callable[[str], Path]
) -> Iterator[Hardened]:
    tmp = tmp_path_factory.mktemp("audit")
    with HubServer() as hub, hub_environment(hub.url, tmp / "hf_home"):
        source = tiny_model_dir("llama")
        pinned = hub.add_repo(
            BASE_REPO, {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()}
        )
        retrained = {k: v * 1.5 for k, v in load_file(source / WEIGHTS).items()}
        save_file(retrained, str(tmp / "retrained.safetensors"), metadata={"format": "pt"})
        later = hub.push(
            BASE_REPO, {WEIGHTS: (tmp / "retrained.safetensors").read_bytes()}, "Retrain"
        )
        key, public_key = write_key_pair(tmp, "operator")
        other_key, other_public_key = write_key_pair(tmp, "someone-else")
        settings = Settings(cache_dir=tmp / "cache", hub_enabled=True)
        config = HardenConfig(
            model=BASE_REPO,
            revision=pinned,
            domain=DomainSpec.model_validate(TINY_DOMAIN),
            device="cpu",
            dtype="float32",
            batch_size=2,
        )
        out = tmp / "hardened"
        signing_settings = settings.model_copy(update={"signing_key": key})
        report = pipeline.run(config, signing_settings, out)
        assert report.outcome == "accepted", report.outcome_reason
        yield Hardened(
            out, key, public_key, other_key, other_public_key, hub, pinned, later, settings
        )


@pytest.fixture
def copy(hardened: Hardened, tmp_path: Path) -> Path:
    """A private copy of the hardened checkpoint, to change."""
    return Path(shutil.copytree(hardened.out, tmp_path / "checkpoint"))


def audit(hardened: Hardened, target: Path | str, **kw: object) -> Verdict:
    kw.setdefault("public_key", hardened.public_key)
    return run_audit(str(target), settings=hardened.settings, **kw)  # type: ignore[arg-type]


def failed(verdict: Verdict) -> dict[str, str]:
    assert not verdict.passed
    return {c.name: c.detail for c in verdict.checks if not c.ok}


def first_masked(directory: Path) -> tuple[str, int, float]:
    """A masked weight: its tensor, flat index and original value."""
    mask = load_mask(directory / MASK_FILE)
    name, (idx, values) = next(iter(mask.entries.items()))
    return name, int(idx[0]), float(values[0])


def rewrite_weights(directory: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(directory / WEIGHTS)
    change(tensors)
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})


def test_the_untouched_checkpoint_passes_and_the_cli_writes_the_verdict(
    hardened: Hardened, copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = copy.parent / "verdict.json"
    code = main(["audit", str(copy), "--public-key", str(hardened.public_key), "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    verdict = json.loads(out.read_text())
    assert verdict["passed"] is True
    names = [c["name"] for c in verdict["checks"]]
    assert names == ["signature", "report", "hashes", "mask", "base", "weights"]
    weights = verdict["checks"][-1]["data"]
    assert weights["outside_mask"] == weights["masked_not_zero"] == 0 and weights["tensors"] > 0
    assert f"{BASE_REPO}@{hardened.pinned}" in printed and "audit PASSED" in printed


def test_the_report_binds_the_files_and_the_card_names_the_signer(hardened: Hardened) -> None:
    report = json.loads((hardened.out / "report.json").read_text())
    binding = Binding.model_validate(report["binding"])
    assert report["inputs"]["model"]["commit"] == hardened.pinned
    assert set(binding.weights) == {WEIGHTS} and binding.mask_sha256 is not None
    assert binding.spec_sha256 == report["inputs"]["spec_hash"]
    assert binding.signer == signer_identity(hardened.key)
    card = (hardened.out / "README.md").read_text()
    assert binding.signer in card
    for text in (card, (hardened.out / "report.json").read_text()):  # the key stays the worker's
        assert str(hardened.key) not in text and hardened.key.name not in text
    unsigned = binding.model_copy(update={"signer": UNSIGNED})
    assert "**unsigned**" in render_section(unsigned)


def test_the_signature_verifies_with_model_signings_own_verifier(
    hardened: Hardened, copy: Path
) -> None:
    verifier = model_signing.verifying.Config().use_elliptic_key_verifier(
        public_key=hardened.public_key
    )
    verifier.verify(copy, copy / SIGNATURE_FILE)
    (copy / "README.md").write_text((copy / "README.md").read_text() + "\nedited\n")
    with pytest.raises(ValueError, match=r"README\.md"):
        verifier.verify(copy, copy / SIGNATURE_FILE)


def test_a_weight_outside_the_mask_changed_fails(hardened: Hardened, copy: Path) -> None:
    masked = load_mask(copy / MASK_FILE).entries
    name = next(n for n in load_file(copy / WEIGHTS) if n not in masked)

    def bump(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name].view(-1)[0] += 1.0

    rewrite_weights(copy, bump)
    verdict = audit(hardened, copy)
    reasons = failed(verdict)
    assert WEIGHTS in reasons["signature"] and WEIGHTS in reasons["hashes"]
    assert (
        reasons["weights"].startswith("1 weights outside the mask differ")
        and name in reasons["weights"]
    )


def test_a_masked_weight_restored_fails(hardened: Hardened, copy: Path) -> None:
    name, index, value = first_masked(copy)

    def restore(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name].view(-1)[index] = value

    rewrite_weights(copy, restore)
    weights = next(c for c in audit(hardened, copy).checks if c.name == "weights")
    assert not weights.ok and weights.data["masked_not_zero"] == 1
    assert weights.data["outside_mask"] == 0 and name in weights.detail


@pytest.mark.parametrize("edited", ["report.json", "README.md"])
def test_an_edited_report_or_card_fails(hardened: Hardened, copy: Path, edited: str) -> None:
    if edited == "report.json":  # a better benign figure than was measured
        report = json.loads((copy / edited).read_text())
        report["metrics"]["hardened"]["benign_loss"] *= 0.5
        (copy / edited).write_text(json.dumps(report, indent=2) + "\n")
    else:
        card = (copy / edited).read_text()
        (copy / edited).write_text(card.replace("harmprune removed", "harmprune carefully removed"))
    reasons = failed(audit(hardened, copy))
    assert set(reasons) == {"signature"}, reasons
    assert reasons["signature"] == f"changed after signing: {edited}"


def test_a_file_added_or_removed_fails(hardened: Hardened, copy: Path) -> None:
    (copy / "extra.safetensors").write_bytes((copy / WEIGHTS).read_bytes())
    reasons = failed(audit(hardened, copy))
    assert reasons["signature"] == "added after signing: extra.safetensors"
    assert "extra.safetensors" in reasons["hashes"]

    (copy / "extra.safetensors").unlink()
    (copy / "tokenizer.json").unlink()
    reasons = failed(audit(hardened, copy))
    assert reasons["signature"] == "missing since signing: tokenizer.json"
    assert reasons["hashes"] == "missing: tokenizer.json"


def test_a_different_base_commit_fails_even_when_re_signed(hardened: Hardened, copy: Path) -> None:
    """The key holder says the weights come from another commit of the base: the signature
    and the hashes hold, the weights do not."""
    report = json.loads((copy / "report.json").read_text())
    report["inputs"]["model"]["commit"] = hardened.retrained
    (copy / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    sign_checkpoint(copy, hardened.key)
    verdict = audit(hardened, copy)
    reasons = failed(verdict)
    assert set(reasons) == {"weights"}, reasons
    assert "outside the mask differ" in reasons["weights"]
    base = next(c for c in verdict.checks if c.name == "base")
    assert base.data["commit"] == hardened.retrained


def test_a_signature_made_with_another_key_fails(hardened: Hardened, copy: Path) -> None:
    sign_checkpoint(copy, hardened.other_key)
    reasons = failed(audit(hardened, copy))
    assert set(reasons) == {"signature"} and "Key mismatch" in reasons["signature"]
    # with the other key's public half it verifies, but the report names another signer
    reasons = failed(audit(hardened, copy, public_key=hardened.other_public_key))
    assert "the report names signer" in reasons["signature"]


def test_a_removed_signature_or_no_key_fails(hardened: Hardened, copy: Path) -> None:
    reasons = failed(audit(hardened, copy, public_key=None))
    assert "no --public-key" in reasons["signature"]
    (copy / SIGNATURE_FILE).unlink()
    reasons = failed(audit(hardened, copy, allow_unsigned=True))
    assert "model.sig is missing, but the report says signed" in reasons["signature"]

    # an unsigned checkpoint (its report says so) passes only with --allow-unsigned
    report = json.loads((copy / "report.json").read_text())
    report["binding"]["signer"] = UNSIGNED
    (copy / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    assert failed(audit(hardened, copy, public_key=None))["signature"].startswith("unsigned")
    assert audit(hardened, copy, public_key=None, allow_unsigned=True).passed


def test_a_locally_published_checkpoint_passes(hardened: Hardened, tmp_path: Path) -> None:
    """The local publisher adds its job-id marker beside the files; the signature ignores it."""
    LocalPublisher(tmp_path / "published").publish(
        hardened.out, "acme/hardened", private=True, job_id="local-job"
    )
    published = tmp_path / "published" / "acme" / "hardened"
    assert (published / JOB_MARKER).is_file()
    assert audit(hardened, published).passed


def test_a_checkpoint_published_to_the_hub_is_audited_by_repo_id(
    hardened: Hardened, capsys: pytest.CaptureFixture[str]
) -> None:
    published = HubPublisher(token=hardened.hub.token).publish(
        hardened.out, "acme/tiny-llama-hardened", private=False, job_id="audit-job"
    )
    assert SIGNATURE_FILE in published.files
    args = ["audit", "acme/tiny-llama-hardened", "--public-key", str(hardened.public_key)]
    assert main([*args, "--revision", published.commit_sha]) == 0, capsys.readouterr().out
    assert (
        f"audit PASSED: acme/tiny-llama-hardened@{published.commit_sha}" in capsys.readouterr().out
    )

    # a later commit to the repo changes the card: the head no longer verifies
    hardened.hub.push("acme/tiny-llama-hardened", {"README.md": b"# trust me\n"}, "Edit card")
    assert main(args) == 3
    assert "changed after signing: README.md" in capsys.readouterr().out


def test_a_bad_signing_key_or_target_is_a_user_error(
    hardened: Hardened,
    tiny_model_dir: Callable[[str], Path],
    domain_spec_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    not_a_key = tmp_path / "key.pem"
    not_a_key.write_text("not a key")
    args = ["harden", "--model", str(tiny_model_dir("llama")), "--domain", str(domain_spec_path)]
    assert main([*args, "--out", str(tmp_path / "out"), "--signing-key", str(not_a_key)]) == 2
    assert not (tmp_path / "out").exists()
    # a worker with an unusable key does not start (rather than fail every job at its end)
    monkeypatch.setenv("HARMPRUNE_SIGNING_KEY", str(not_a_key))
    assert main(["worker", "--queues", "cpu"]) == 2
    assert "signing key key.pem is not an unencrypted PEM private key" in capsys.readouterr().err
    assert main(["audit", str(tmp_path / "nowhere")]) == 2


def test_rerun_reproduces_the_test_set_figures_and_catches_an_edited_one(
    hardened: Hardened, copy: Path, domain_spec_path: Path, tmp_path: Path
) -> None:
    verdict = audit(hardened, copy, rerun_spec=domain_spec_path)
    rerun = next(c for c in verdict.checks if c.name == "rerun")
    assert verdict.passed and rerun.ok, rerun.detail
    assert {r["figure"] for r in rerun.data["figures"]} >= {"harm nll (prefill)", "benign loss"}

    # the key holder claims a better benign loss than the weights give
    report = json.loads((copy / "report.json").read_text())
    report["metrics"]["hardened"]["benign_loss"] *= 0.9
    (copy / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    sign_checkpoint(copy, hardened.key)
    reasons = failed(audit(hardened, copy, rerun_spec=domain_spec_path))
    assert set(reasons) == {"rerun"} and "benign loss of the hardened model" in reasons["rerun"]

    other = tmp_path / "other.yaml"
    other.write_text(domain_spec_path.read_text().replace("tiny-test", "other-test"))
    reasons = failed(audit(hardened, copy, rerun_spec=other))
    assert "is not the job's spec" in reasons["rerun"]
    assert main(["audit", str(copy), "--rerun"]) == 2


@pytest.mark.services
def test_post_v1_audits_runs_the_audit_on_a_cpu_worker(
    hardened: Hardened, tmp_path: Path, redis_url: str
) -> None:
    """The API queues the audit of a published repo; a real worker (cpu queue) runs it and the
    verdict comes back like a job's result. A repo without the signer's key is `rejected`."""
    from fastapi.testclient import TestClient
    from harmprune.api.main import create_app

    from tests.service_stack import WorkerProcess, bearer, redis_namespace, stack_settings, wait_for

    repo = "acme/tiny-llama-audited"
    HubPublisher(token=hardened.hub.token).publish(hardened.out, repo, private=False, job_id="j")
    with redis_namespace("audit", redis_url) as ns:
        settings = stack_settings(ns, tmp_path, hub_enabled=True)
        worker = WorkerProcess(settings, tmp_path / "worker.log", queues="cpu").start()
        try:
            with TestClient(create_app(settings, sweep=False)) as client:

                def submit(body: dict[str, object]) -> dict[str, object]:
                    r = client.post("/v1/audits", json=body, headers=bearer())
                    assert r.status_code == 202, r.text
                    assert r.headers["Location"] == f"/v1/audits/{r.json()['id']}"
                    return r.json()

                def ended(audit_id: object) -> dict[str, object] | None:
                    got = client.get(f"/v1/audits/{audit_id}", headers=bearer()).json()
                    return got if got["state"] not in ("queued", "running") else None

                key = hardened.public_key.read_text()
                signed = submit({"repo_id": repo, "public_key": key})
                without_key = submit({"repo_id": repo})
                done = wait_for(lambda: ended(signed["id"]), 120, what="audit")
                assert done["state"] == "succeeded" and done["passed"] is True, (
                    done,
                    worker.log_tail(),
                )
                verdict = done["verdict"]
                assert isinstance(verdict, dict) and verdict["passed"] is True
                refused = wait_for(lambda: ended(without_key["id"]), 120, what="audit")
                assert refused["state"] == "rejected" and refused["passed"] is False
                assert "no --public-key" in json.dumps(refused["verdict"])

                other = client.get(f"/v1/audits/{signed['id']}", headers=bearer("beta"))
                assert other.status_code == 404
                bad = client.post(
                    "/v1/audits", json={"repo_id": repo, "public_key": "x"}, headers=bearer()
                )
                assert bad.status_code == 422 and "public_key" in bad.text
                # a repo the tenant may not read (here: none such) is refused on the worker
                missing = submit({"repo_id": "acme/nothing-here"})
                refused = wait_for(lambda: ended(missing["id"]), 120, what="audit")
                assert refused["state"] == "failed" and refused["passed"] is None
                assert refused["error"]["code"] == "not_permitted", refused
        finally:
            worker.stop()
