"""A password written without its colon (``redis://s3cr3t@host``) is never shown.

redis-py reads ``redis://s3cr3t@host`` as a user name with no password; people write it meaning
the password (Redis' ``requirepass`` has no user).  :func:`worker.core.settings.redact_url` hides
a lone userinfo like a password.  Checked on the function, and through the real `genq` and
`genq-worker` processes against a real Redis that requires that password: they refuse to go on,
say so naming the redacted URL, and print the secret nowhere.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, RedisServer, env_for, genq
from worker.core.settings import redact_url

SECRET = "s3cr3t-lone"


@pytest.mark.parametrize(
    "url,shown",
    [
        ("redis://s3cr3t-lone@redis.internal:6379/0", "redis://:***@redis.internal:6379/0"),
        ("rediss://s3cr3t-lone@redis.example.com:6380/0", "rediss://:***@redis.example.com:6380/0"),
        ("redis://s3cr3t-lone@10.0.0.1", "redis://:***@10.0.0.1"),
        ("redis://s3cr3t-lone/x@h:1/0", "redis://:***@h:1/0"),
    ],
)
def test_a_lone_userinfo_is_hidden_like_a_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert SECRET not in redact_url(url)


def test_a_user_with_a_password_keeps_the_user_name() -> None:
    assert redact_url(f"redis://genq:{SECRET}@h:1/0") == "redis://genq:***@h:1/0"


@pytest.fixture
def guarded(tmp_path: Path) -> RedisServer:
    server = RedisServer(tmp_path / "redis", password=SECRET)
    server.start()
    return server


def test_genq_and_a_worker_never_print_a_lone_password(guarded: RedisServer, tmp_path: Path) -> None:
    """`genq status` and `genq-worker start` given ``redis://<password>@host:port/0`` for a Redis
    that requires that password: both stop with exit status 2, naming the URL as
    ``redis://:***@host:port/0``, with no traceback and no trace of the password."""
    url = f"redis://{SECRET}@127.0.0.1:{guarded.port}/0"
    shown = f"redis://:***@127.0.0.1:{guarded.port}/0"
    try:
        status = genq(url, "status", check=False)
        worker = subprocess.run(
            [sys.executable, "-m", "worker.main", "start", "--profile", "tiny-random", "--mode", "fp32"],
            cwd=REPO,
            env=env_for(url),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        guarded.stop()
    for proc in (status, worker):
        text = proc.stdout + proc.stderr
        assert proc.returncode == 2, text[-2000:]
        assert f"Redis at {shown} refused the credentials" in text, text[-2000:]
        assert SECRET not in text and "Traceback" not in text
