"""Shared fixtures: the real data the repository carries and the real services on this machine."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pytest

from _data import SAMPLES, sample_files  # tests/ is on sys.path

TEST_REDIS_URL = os.environ.get("ASTRONN_DIST_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TEST_POSTGRES_URL = os.environ.get(
    "ASTRONN_DIST_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def _reachable(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=1.0):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def apstar_files() -> list[Path]:
    """The two real DR17 apStar files of ``samples/apstar`` (bulge star, Kepler-field star)."""
    return sample_files()


@pytest.fixture(scope="session")
def sample_dir(apstar_files: list[Path]) -> Path:
    """``samples/apstar``: the folder that holds exactly the real files."""
    return SAMPLES


_REDIS_DB_LOCK: list = []  # the lock file held for the whole session


def _redis_db() -> int:
    """A Redis database number (5..15) no other pytest run on this machine holds, so that
    concurrent runs never consume each other's messages: each holds a lock file for its own
    number for its whole session. ASTRONN_DIST_TEST_REDIS_DB pins it."""
    if "ASTRONN_DIST_TEST_REDIS_DB" in os.environ:
        return int(os.environ["ASTRONN_DIST_TEST_REDIS_DB"])
    if _REDIS_DB_LOCK:
        return _REDIS_DB_LOCK[0][0]
    import fcntl
    import tempfile

    for db in range(5, 16):
        handle = open(Path(tempfile.gettempdir()) / f"astronn-dist-test-redis-db-{db}.lock", "w")  # noqa: SIM115
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _REDIS_DB_LOCK.append((db, handle))
        return db
    pytest.fail("every test Redis database 5..15 is held by another pytest run on this machine")


@pytest.fixture()
def redis_url() -> str:
    """A real Redis, on a database number of its own for this test (flushed before and after)."""
    import redis

    if not _reachable(TEST_REDIS_URL):
        pytest.fail(f"Redis is not reachable at {TEST_REDIS_URL}: start it (see README, Testing)")
    db = _redis_db()
    url = f"{TEST_REDIS_URL.rsplit('/', 1)[0]}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture()
def postgres_url() -> str:
    """A fresh, empty PostgreSQL database of its own for this test, dropped afterwards."""
    import sqlalchemy as sa

    if not _reachable(TEST_POSTGRES_URL):
        pytest.fail(f"PostgreSQL is not reachable at {TEST_POSTGRES_URL}: start it (see README)")
    admin = sa.create_engine(TEST_POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = f"astronn_test_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield TEST_POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture()
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'results.sqlite'}"


@pytest.fixture()
def workers() -> list:
    """Worker processes (tests/_service.Worker) a test starts; all stopped (killed if need be)
    at its end."""
    started: list = []
    yield started
    for w in started:
        w.stop()
