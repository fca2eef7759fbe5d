"""pytest fixtures around the test Hub (tests/support/hub_server.py).

Use them from a test module with `from tests.support.fixtures import hub_server  # noqa: F401`
(plus `# noqa: F811` on the test parameter that shadows it), or list `tests.support.fixtures` in
the root conftest's `pytest_plugins`. `tests.support` imports need the repo root on sys.path:
`python -m pytest` from the root (as the Makefile does) provides it; plain `pytest` does not.

`hub_server` starts a fresh, empty `HubServer` per test and, for the duration of the test, points
`huggingface_hub` and transformers at it in-process: it sets HF_ENDPOINT, HF_HUB_OFFLINE=0 and a fresh
HF_HOME (under tmp_path) in the environment, removes HF_TOKEN, and patches the values
`huggingface_hub` copied from the environment at import time (`constants.ENDPOINT`,
`constants.HUGGINGFACE_CO_URL_TEMPLATE`, `constants.HF_HUB_OFFLINE`, the cache/token paths, the
module-level `HfApi` and transformers' cached `HfApi`); see `hub_environment()`. All of it is undone
after the test. Subprocesses started during the test inherit the environment variables.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.hub_server import HubServer, hub_environment


@pytest.fixture
def hub_server(tmp_path: Path) -> Iterator[HubServer]:
    """A running, empty test Hub; `HF_ENDPOINT` points at it. Write with `hub_server.token`."""
    with HubServer() as server, hub_environment(server.url, tmp_path / "hf_home"):
        yield server
