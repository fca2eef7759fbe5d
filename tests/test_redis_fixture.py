"""The session's Redis (tests/service_stack.py `session_redis`): the running one when it answers,
else a private redis-server for the session, else a failure that says how to install Redis.

Each case runs in a fresh interpreter, because the choice is made once per process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis

from tests.service_stack import REDIS_URL_ENV, ROOT, free_port

PROBE = textwrap.dedent(
    """
    import json, sys
    import redis
    from tests.service_stack import session_redis, stop_session_redis

    chosen = session_redis()
    url = chosen.url()
    ok = redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    pid = chosen.server.proc.pid if chosen.server else None
    data_dir = str(chosen.server.data_dir) if chosen.server else None
    stop_session_redis()
    print(json.dumps({"url": url, "ping": ok, "pid": pid, "data_dir": data_dir}))
    """
)


def probe(env_update: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **env_update, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_private_redis_server_is_started_when_none_answers() -> None:
    import json

    dead = free_port()  # nothing listens there
    done = probe({REDIS_URL_ENV: f"redis://127.0.0.1:{dead}"})
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["ping"] is True and got["pid"] is not None
    assert got["url"].startswith("redis://127.0.0.1:") and got["url"].endswith("/15")
    port = int(got["url"].split(":")[2].split("/")[0])
    assert port != dead
    # stopped and removed with the session
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=port, socket_connect_timeout=1).ping()
    assert not Path(got["data_dir"]).exists()


def test_the_running_redis_is_used_when_it_answers(redis_url: str) -> None:
    import json

    base = redis_url.rsplit("/", 1)[0]
    done = probe({REDIS_URL_ENV: base})
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got == {"url": f"{base}/15", "ping": True, "pid": None, "data_dir": None}


def test_no_redis_at_all_fails_with_how_to_install_it(tmp_path: Path) -> None:
    # A PATH with this Python but without redis-server, and nothing on the probed port.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    assert shutil.which("redis-server", path=str(bin_dir)) is None
    done = probe({REDIS_URL_ENV: f"redis://127.0.0.1:{free_port()}", "PATH": str(bin_dir)})
    assert done.returncode == 1
    assert "Failed:" in done.stderr
    assert "apt-get install redis-server" in done.stderr
    assert "brew install redis" in done.stderr
