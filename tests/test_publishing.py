"""Publishing: HubPublisher against the test Hub (real huggingface_hub client), LocalPublisher."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from harmprune.errors import PublishError
from harmprune.output.publishing import (
    JOB_MARKER,
    HubPublisher,
    LocalPublisher,
    Publisher,
    PublishResult,
    publish_with_retries,
    tree_digest,
)

from tests.support.fixtures import hub_server  # noqa: F401  (fixture)
from tests.support.hub_server import HubServer, free_port
from tests.tiny_models import build_model

REPO = "harmprune/tiny-hardened"
FAKE_TOKEN = "hf_fakeTokenThatTheServerRejects0123456789"


@pytest.fixture(scope="module")
def tiny_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, tokenizer: Any
) -> tuple[Path, dict[str, Any]]:
    """A saved tiny random Llama (safetensors + tokenizer) and its state dict."""
    model = build_model("llama", tokenizer)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny hardened\n")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return path, state


@pytest.fixture
def model_dir(tiny_checkpoint: tuple[Path, dict[str, Any]], tmp_path: Path) -> Path:
    """A private, writable copy of the tiny checkpoint."""
    return Path(shutil.copytree(tiny_checkpoint[0], tmp_path / "model"))


def _local_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def _commit_calls(server: HubServer) -> int:
    return sum(
        1 for method, path, _ in server.request_log if method == "POST" and "/commit/" in path
    )


# -- Hub --------------------------------------------------------------------------------------------


@pytest.fixture
def publisher(hub_server: HubServer) -> HubPublisher:  # noqa: F811
    """A HubPublisher holding the test Hub's write token."""
    return HubPublisher(token=hub_server.token)


def test_publish_then_load_back_through_the_hub(
    hub_server: HubServer,  # noqa: F811
    publisher: HubPublisher,
    model_dir: Path,
    tiny_checkpoint: tuple[Path, dict[str, Any]],
) -> None:
    from huggingface_hub import HfApi, snapshot_download
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = publisher.publish(model_dir, REPO, private=False, job_id="job-1")

    assert isinstance(result, PublishResult)
    assert not result.reused
    assert re.fullmatch(r"[0-9a-f]{40}", result.commit_sha)
    assert result.url == f"{hub_server.url}/{REPO}"
    assert result.files == sorted(_local_files(model_dir))
    assert "model.safetensors" in result.files
    commits = hub_server.commits(REPO)
    assert len(commits) == 2  # the repo's initial commit + ours
    assert commits[-1].sha == result.commit_sha
    assert commits[-1].title == "harmprune job job-1"
    assert not hub_server.is_private(REPO)
    stored = hub_server.files(REPO)
    for rel, data in _local_files(model_dir).items():
        assert stored[rel] == data

    api = HfApi()  # endpoint from the environment, anonymous
    assert api.model_info(REPO).sha == result.commit_sha
    assert set(result.files) <= set(api.list_repo_files(REPO))
    assert api.list_repo_commits(REPO)[0].title == "harmprune job job-1"

    snapshot = Path(snapshot_download(REPO, revision=result.commit_sha))
    assert Path(snapshot).name == result.commit_sha
    for rel, data in _local_files(model_dir).items():
        assert (snapshot / rel).read_bytes() == data

    loaded = AutoModelForCausalLM.from_pretrained(REPO)
    expected = tiny_checkpoint[1]
    got = loaded.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name

    tokenizer = AutoTokenizer.from_pretrained(REPO)
    assert tokenizer.decode(tokenizer("hello world")["input_ids"]) == "hello world"


def test_republishing_the_same_job_reuses_the_commit(
    hub_server: HubServer,  # noqa: F811
    publisher: HubPublisher,
    model_dir: Path,
) -> None:
    first = publisher.publish(model_dir, REPO, private=False, job_id="12")
    n_commits = len(hub_server.commits(REPO))
    n_commit_calls = _commit_calls(hub_server)

    again = publisher.publish(model_dir, REPO, private=False, job_id="12")
    assert again.reused
    assert again.commit_sha == first.commit_sha
    assert again.files == first.files
    assert len(hub_server.commits(REPO)) == n_commits
    assert _commit_calls(hub_server) == n_commit_calls

    # job "1" is not job "12": the title match is on the whole job id
    (model_dir / "README.md").write_text("# job 1\n")
    other = publisher.publish(model_dir, REPO, private=False, job_id="1")
    assert not other.reused
    assert other.commit_sha != first.commit_sha
    assert hub_server.commits(REPO)[-1].title == "harmprune job 1"
    assert hub_server.files(REPO)["README.md"] == b"# job 1\n"


def test_private_repo_is_invisible_without_a_token(
    hub_server: HubServer,  # noqa: F811
    publisher: HubPublisher,
    model_dir: Path,
) -> None:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import RepositoryNotFoundError

    result = publisher.publish(model_dir, REPO, private=True, job_id="job-private")
    assert hub_server.is_private(REPO)

    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info(REPO)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(REPO, "config.json", token=False)
    raw = httpx.get(f"{hub_server.url}/{REPO}/resolve/main/config.json")
    assert raw.status_code == 404
    assert raw.headers["X-Error-Code"] == "RepoNotFound"

    assert HfApi(token=hub_server.token).model_info(REPO).sha == result.commit_sha
    path = hf_hub_download(REPO, "config.json", token=hub_server.token)
    assert Path(path).read_bytes() == (model_dir / "config.json").read_bytes()


def test_bad_token_is_a_permanent_error_without_the_token(
    hub_server: HubServer,  # noqa: F811
    model_dir: Path,
) -> None:
    publisher = HubPublisher(token=FAKE_TOKEN)
    with pytest.raises(PublishError) as info:
        publisher.publish(model_dir, REPO, private=False, job_id="job-1")

    err = info.value
    assert err.transient is False
    assert err.status_code == 401  # type: ignore[attr-defined]
    assert err.stage == "publish"
    for text in (str(err), repr(err), err.message, repr(err.args)):
        assert FAKE_TOKEN not in text
    assert err.__cause__ is None and err.__suppress_context__
    assert FAKE_TOKEN not in repr(publisher)
    assert not hub_server.has_repo(REPO)


def test_missing_token_is_a_permanent_error(
    hub_server: HubServer,  # noqa: F811
    model_dir: Path,
) -> None:
    with pytest.raises(PublishError) as info:
        HubPublisher(token=None).publish(model_dir, REPO, private=False, job_id="job-1")
    assert info.value.transient is False
    assert not hub_server.has_repo(REPO)


def test_read_only_token_is_a_permanent_error(model_dir: Path, tmp_path: Path) -> None:
    from tests.support.hub_server import hub_environment

    with (
        HubServer(tokens=["hf_writer"], read_only_tokens=["hf_reader"]) as server,
        hub_environment(server.url, tmp_path / "hf_home"),
    ):
        with pytest.raises(PublishError) as info:
            HubPublisher(token="hf_reader").publish(model_dir, REPO, private=False, job_id="j")
        assert info.value.transient is False
        assert info.value.status_code == 403  # type: ignore[attr-defined]
        assert "hf_reader" not in str(info.value)


@pytest.mark.parametrize("status", [500, 503, 429])
def test_failed_commit_is_transient_and_leaves_the_repo_unchanged(
    hub_server: HubServer,  # noqa: F811
    publisher: HubPublisher,
    model_dir: Path,
    status: int,
) -> None:
    publisher.publish(model_dir, REPO, private=False, job_id="job-1")
    commits_before = hub_server.commits(REPO)
    files_before = hub_server.files(REPO)

    (model_dir / "README.md").write_text("# hardened again\n")
    (model_dir / "extra").mkdir()
    (model_dir / "extra" / "notes.txt").write_text("new file\n")
    hub_server.fail_next_commits(1, status=status)
    with pytest.raises(PublishError) as info:
        publisher.publish(model_dir, REPO, private=False, job_id="job-2")

    assert info.value.transient is True
    assert info.value.status_code == status  # type: ignore[attr-defined]
    assert hub_server.token not in str(info.value)
    assert hub_server.commits(REPO) == commits_before
    assert hub_server.files(REPO) == files_before  # no partial files

    retried = publisher.publish(model_dir, REPO, private=False, job_id="job-2")
    assert not retried.reused
    assert hub_server.commits(REPO)[-1].sha == retried.commit_sha
    assert hub_server.files(REPO)["extra/notes.txt"] == b"new file\n"


def test_connection_error_is_transient(
    hub_server: HubServer,  # noqa: F811
    model_dir: Path,
) -> None:
    publisher = HubPublisher(token=hub_server.token, endpoint=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(PublishError) as info:
        publisher.publish(model_dir, REPO, private=False, job_id="job-1")
    assert info.value.transient is True
    assert hub_server.token not in str(info.value)


def test_publish_with_retries_retries_transient_errors_only(
    hub_server: HubServer,  # noqa: F811
    publisher: HubPublisher,
    model_dir: Path,
) -> None:
    sleeps: list[float] = []
    hub_server.fail_next_commits(2, status=503)
    result = publish_with_retries(
        publisher,
        model_dir,
        REPO,
        private=False,
        job_id="job-r",
        attempts=3,
        backoff_s=0.5,
        sleep=sleeps.append,
    )
    assert sleeps == [0.5, 1.0]
    assert not result.reused
    assert [c.title for c in hub_server.commits(REPO)].count("harmprune job job-r") == 1

    hub_server.fail_next_commits(5, status=503)
    sleeps.clear()
    (model_dir / "README.md").write_text("# other\n")
    with pytest.raises(PublishError) as info:
        publish_with_retries(
            publisher,
            model_dir,
            REPO,
            private=False,
            job_id="job-s",
            attempts=2,
            sleep=sleeps.append,
        )
    assert info.value.transient and len(sleeps) == 1

    sleeps.clear()
    with pytest.raises(PublishError) as info:
        publish_with_retries(
            HubPublisher(token=FAKE_TOKEN),
            model_dir,
            REPO,
            private=False,
            job_id="job-t",
            sleep=sleeps.append,
        )
    assert not info.value.transient and sleeps == []


def test_publishers_satisfy_the_protocol(tmp_path: Path) -> None:
    assert isinstance(HubPublisher(token="x", endpoint="http://127.0.0.1:1"), Publisher)
    assert isinstance(LocalPublisher(tmp_path), Publisher)


def test_empty_or_missing_folder_is_a_permanent_error(tmp_path: Path) -> None:
    publisher = HubPublisher(token="x", endpoint="http://127.0.0.1:1")
    for folder in (tmp_path / "missing", tmp_path):
        with pytest.raises(PublishError) as info:
            publisher.publish(folder, REPO, private=False, job_id="j")
        assert not info.value.transient


# -- local --------------------------------------------------------------------------------------------


def test_local_publisher_publishes_and_reuses(model_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "published"
    publisher = LocalPublisher(root)
    result = publisher.publish(model_dir, "org/tiny", private=False, job_id="job-1")

    target = root / "org" / "tiny"
    assert not result.reused
    # the URL names the repo and its tree digest, never the worker's filesystem path
    assert result.url == f"local://org/tiny@{result.commit_sha}"
    assert str(root) not in result.url and publisher.directory("org/tiny") == target
    assert result.files == sorted(_local_files(model_dir))
    assert result.commit_sha == tree_digest(model_dir, result.files)
    assert re.fullmatch(r"[0-9a-f]{64}", result.commit_sha)
    assert (target / JOB_MARKER).read_text().strip() == "job-1"
    published = _local_files(target)
    published.pop(JOB_MARKER)
    assert published == _local_files(model_dir)

    mtime = (target / "config.json").stat().st_mtime_ns
    again = publisher.publish(model_dir, "org/tiny", private=False, job_id="job-1")
    assert again.reused and again.commit_sha == result.commit_sha
    assert (target / "config.json").stat().st_mtime_ns == mtime

    (model_dir / "README.md").write_text("# v2\n")
    newer = publisher.publish(model_dir, "org/tiny", private=False, job_id="job-2")
    assert not newer.reused and newer.commit_sha != result.commit_sha
    assert (target / "README.md").read_text() == "# v2\n"
    assert (target / JOB_MARKER).read_text().strip() == "job-2"
    assert sorted(p.name for p in (root / "org").iterdir() if not p.name.endswith(".lock")) == [
        "tiny"
    ]


def test_local_publisher_is_atomic(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "published"
    publisher = LocalPublisher(root)
    first = publisher.publish(model_dir, "org/tiny", private=False, job_id="job-1")
    before = _local_files(root / "org" / "tiny")

    copied: list[str] = []
    real_copy2 = shutil.copy2

    def failing_copy2(src: Any, dst: Any, **kwargs: Any) -> Any:
        if copied:
            raise OSError(28, "No space left on device")
        copied.append(str(src))
        return real_copy2(src, dst, **kwargs)

    monkeypatch.setattr(shutil, "copy2", failing_copy2)
    (model_dir / "README.md").write_text("# v2\n")
    with pytest.raises(PublishError) as info:
        publisher.publish(model_dir, "org/tiny", private=False, job_id="job-2")
    assert not info.value.transient
    assert _local_files(root / "org" / "tiny") == before  # old version intact
    with pytest.raises(PublishError):
        publisher.publish(model_dir, "org/fresh", private=False, job_id="job-3")
    assert not (root / "org" / "fresh").exists()  # nothing half-written
    leftovers = [p.name for p in (root / "org").iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []

    monkeypatch.undo()
    again = publisher.publish(model_dir, "org/tiny", private=False, job_id="job-1")
    assert again.reused and again.commit_sha == first.commit_sha


@pytest.mark.parametrize(
    "repo_id", ["../escape", "org/..", "/abs/path", "a/b/c", "org/.hidden", ""]
)
def test_local_publisher_rejects_bad_repo_ids(
    model_dir: Path, tmp_path: Path, repo_id: str
) -> None:
    with pytest.raises(PublishError):
        LocalPublisher(tmp_path / "root").publish(model_dir, repo_id, private=False, job_id="j")
    assert not (tmp_path / "escape").exists()


def test_publish_error_keeps_transient_through_pickle() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(PublishError("boom", transient=True)))
    assert err.transient is True and str(err) == "boom"
    assert PublishError("x").transient is False


def test_republish_removes_stale_files_and_fixes_visibility(
    hub_server: HubServer,  # noqa: F811
    publisher: HubPublisher,
    model_dir: Path,
) -> None:
    """An earlier publish's files that the new checkpoint lacks are deleted in the same commit
    (an old single-file model beside new shards would win at load time); the repo ends with the
    visibility the new job asked for."""
    (model_dir / "model-old-extra.safetensors").write_bytes(b"stale weights")
    publisher.publish(model_dir, REPO, private=False, job_id="first")
    assert "model-old-extra.safetensors" in hub_server.files(REPO)
    assert not hub_server.is_private(REPO)

    (model_dir / "model-old-extra.safetensors").unlink()
    second = publisher.publish(model_dir, REPO, private=True, job_id="second")
    assert hub_server.is_private(REPO)  # the existing public repo was made private
    published = set(hub_server.files(REPO)) - {".gitattributes"}
    assert published == set(second.files) == set(_local_files(model_dir))
    assert hub_server.commits(REPO)[-1].title == "harmprune job second"

    publisher.publish(model_dir, REPO, private=False, job_id="third")
    assert not hub_server.is_private(REPO)


def test_a_cancel_before_the_commit_publishes_nothing(
    hub_server: HubServer,  # noqa: F811
    publisher: HubPublisher,
    model_dir: Path,
    tmp_path: Path,
) -> None:
    from harmprune.errors import JobCancelled

    with pytest.raises(JobCancelled):
        publisher.publish(
            model_dir, REPO, private=True, job_id="cancelled", should_cancel=lambda: True
        )
    assert _commit_calls(hub_server) == 0
    assert not any(c.title == "harmprune job cancelled" for c in hub_server.commits(REPO))
    local = LocalPublisher(tmp_path / "published")
    with pytest.raises(JobCancelled):
        local.publish(model_dir, REPO, private=True, job_id="c", should_cancel=lambda: True)
    assert not (tmp_path / "published" / REPO).exists()
