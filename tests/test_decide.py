"""astronn_dist.worker.service.decide: what the task does with a chunk, as pure functions of the delivery count and
the failure (the task only acts on these decisions)."""

from __future__ import annotations

import errno

import pytest
import sqlalchemy as sa

from astronn_dist.worker.service.decide import (
    RETRY_BACKOFF_MAX_S,
    Action,
    Stage,
    describe,
    on_delivery,
    on_failure,
    retry_countdown,
)


def _unavailable() -> sa.exc.OperationalError:
    return sa.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))


@pytest.mark.parametrize("deliveries, action", [(1, Action.PROCESS), (5, Action.PROCESS), (6, Action.PARK)])
def test_a_chunk_is_parked_after_max_deliveries(deliveries: int, action: Action) -> None:
    decision = on_delivery(deliveries, 5, "t-1")
    assert decision.action is action
    if action is Action.PARK:
        assert decision.reason == "worker died 5 times processing this chunk (task t-1); parked after 5 deliveries"


@pytest.mark.parametrize("stage, reason", [
    (Stage.LOAD_MODEL, "cannot load the model"),
    (Stage.OPEN_DATABASE, "cannot open the database"),
    (Stage.WRITE_PARKED, "cannot write the parked chunk's rows"),
    (Stage.WRITE_FAILED, "cannot write the failed chunk's rows"),
])
def test_infrastructure_failures_are_retried_without_limit(stage: Stage, reason: str) -> None:
    decision = on_failure(RuntimeError("x"), stage, retries=10_000, max_retries=5, attempts=10_001)
    assert (decision.action, decision.reason) == (Action.RETRY, reason)


def test_an_unreachable_database_is_retried_without_limit() -> None:
    for stage in (Stage.OPEN_DATABASE, Stage.PROCESS):
        decision = on_failure(_unavailable(), stage, retries=99, max_retries=5, attempts=100)
        assert (decision.action, decision.reason) == (Action.RETRY, "database unavailable")


def test_other_failures_are_retried_then_given_up() -> None:
    storage = OSError(errno.EIO, "Input/output error")
    assert on_failure(storage, Stage.PROCESS, retries=4, max_retries=5, attempts=5).action is Action.RETRY
    given_up = on_failure(storage, Stage.PROCESS, retries=5, max_retries=5, attempts=6)
    assert given_up.action is Action.GIVE_UP
    assert given_up.reason == "gave up after 6 attempts: OSError: [Errno 5] Input/output error"


def test_backoff_is_exponential_capped_and_jittered() -> None:
    for retries in range(12):
        ceiling = min(RETRY_BACKOFF_MAX_S, 1800 / 2, 2.0 * 2**retries)
        waits = {retry_countdown(retries, 1800) for _ in range(50)}
        assert all(ceiling / 2 <= w <= ceiling for w in waits) and len(waits) > 1
    assert max(retry_countdown(20, 60) for _ in range(50)) <= 30  # half the visibility timeout


def test_describe_is_one_line() -> None:
    assert describe(ValueError("first\nsecond")) == "ValueError: first"
    assert describe(KeyError()) == "KeyError"
