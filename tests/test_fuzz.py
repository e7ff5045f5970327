"""Fuzzing the message boundary: whatever JSON arrives, the task gives a clear rejection or a
flagged row, and the worker lives on.

1. Property test (hypothesis) of :func:`astronn_dist.worker.service.messages.split_message`, the first thing the task
   does with a message: it raises :class:`MessageError` (the message is rejected whole) or
   returns valid requests plus invalid entries with reasons; nothing else escapes, and no
   valid request carries a path outside the data roots or non-finite photometry.
2. A real worker fed 200 malformed messages (drawn from the same strategies, mutating
   a good message: wrong types, huge strings, NaN/inf photometry, missing and unknown keys,
   paths outside the data root) and then a good one: it is still alive and writes the good
   one's rows.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _service import Worker, build_checkpoint, publish, rows, spectra_farm, wait_for, worker_env
from astronn_dist.worker.service.messages import InvalidSpectrum, MessageError, split_message
from astronn_dist.worker.contract import SpectrumRequest

ROOT = Path("/data/apogee")

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.sampled_from(["", "x" * 5000, "/etc/passwd", str(ROOT / ".." / "x.fits"), "a\x00b"]),
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
good_entry = st.builds(
    lambda i, k, e: {"spectrum_id": f"s{i}", "path": str(ROOT / f"s{i}.fits"), "k_mag": k, "ebv": e},
    st.integers(0, 50),
    st.one_of(st.none(), st.floats(-5, 20)),
    st.one_of(st.none(), st.floats(0, 2)),
)
KEYS = ("spectrum_id", "path", "k_mag", "ebv", "kmag", "extra")


@st.composite
def mutated_entry(draw):
    entry = dict(draw(good_entry))
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(KEYS))
        if draw(st.booleans()):
            entry.pop(key, None)
        else:
            entry[key] = draw(json_values)
    return entry if draw(st.integers(0, 9)) else draw(json_values)  # now and then not a dict


@st.composite
def messages(draw):
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)  # anything at all
    message = {"spectra": draw(st.lists(mutated_entry(), min_size=0, max_size=6))}
    if draw(st.booleans()):
        message["provenance"] = draw(json_values)
    for key in draw(st.lists(st.text(max_size=6), max_size=3)):
        message[key] = draw(json_values)
    return message


def _check(payload) -> None:
    try:
        parsed = split_message(payload, data_roots=[ROOT])
    except MessageError as exc:
        assert str(exc)  # a reason, for the log
        return
    n = len(payload["spectra"])
    assert len(parsed.requests) + len(parsed.invalid) == n
    ids = [r.spectrum_id for r in parsed.requests]
    assert len(ids) == len(set(ids))
    for r in parsed.requests:
        assert isinstance(r, SpectrumRequest) and r.spectrum_id and isinstance(r.path, str)
        assert Path(r.path).resolve().is_relative_to(ROOT)
        for value in (r.k_mag, r.ebv):  # non-finite photometry becomes "missing"
            assert value is None or (isinstance(value, float) and math.isfinite(value))
    for item in parsed.invalid:
        assert isinstance(item, InvalidSpectrum) and item.reason.startswith("invalid message entry")
        assert item.spectrum_id is None or item.spectrum_id not in ids


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_split_message_rejects_or_sorts_out_anything(payload) -> None:
    _check(payload)
    # What the worker really receives went through JSON (NaN as the non-standard literal).
    _check(json.loads(json.dumps(payload)))


@pytest.mark.service
@pytest.mark.timeout(300)
@settings(max_examples=1, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(stream=st.lists(messages(), min_size=100, max_size=100))
def test_a_worker_survives_a_stream_of_malformed_messages(
    stream: list, redis_url: str, sqlite_url: str, apstar_files: list[Path],
    tmp_path: Path,
) -> None:
    checkpoint = build_checkpoint(tmp_path / "random-dr17.pt")
    root = tmp_path / "spectra"
    good = spectra_farm(apstar_files, root, 4)
    env = worker_env(redis_url=redis_url, database_url=sqlite_url, model=checkpoint,
                     ASTRONN_DIST_DATA_ROOTS=str(root))
    worker = Worker(env, tmp_path / "worker.log", name="fuzz")
    rng = random.Random(0)
    # The hypothesis stream, and as many real paths with one field spoiled.
    spoiled = [{"spectra": [
        {**rng.choice(good), "spectrum_id": f"fuzz-{i}",
         rng.choice(KEYS): rng.choice([math.nan, math.inf, "x" * 3000, [1], None, -1e308])}
    ]} for i in range(len(stream))]  # fmt: skip
    sent = 0
    try:
        worker.wait_ready()
        for payload in [*stream, *spoiled]:
            if not isinstance(payload, dict):  # a task's kwargs are always an object
                payload = {"spectra": payload}
            publish(redis_url, json.loads(json.dumps(payload)))
            sent += 1
        publish(redis_url, {"spectra": good})
        ids = {e["spectrum_id"] for e in good}
        wait_for(lambda: ids <= {r["spectrum_id"] for r in rows(sqlite_url)}, 240,
                 "the good chunk after the malformed ones", worker)
        assert worker.proc.poll() is None and len(worker.children()) == 1
    finally:
        worker.stop()
    found = {r["spectrum_id"]: r for r in rows(sqlite_url)}
    assert all(found[i]["error"] is None and found[i]["dist"] is not None for i in ids)
    flagged = [r for sid, r in found.items() if sid not in ids]
    assert all(r["result_flags"] & 2048 or r["error"] is None for r in flagged)
    log = worker.log()
    print(f"\n[fuzz] {sent} malformed messages: {log.count('rejected message')} rejected, "
          f"{len(flagged)} rows written for their entries; worker alive, good chunk written")
