"""Spectrum requests -> chunked JSON messages on the Redis queue, skipping what is already done.

    requests ──skip those with a row for this model (unless force)──> chunks of N
             ──astronn_dist.worker.service.messages.make_message──> send_task("astronn_dist.process", queue="astronn_dist")

One broker connection and one kombu producer for the whole run: publishing a message is then an
LPUSH (plus the task-sent event that Flower reads), and a chunk of 128 spectra costs about as
much as a message of one: about 50-80k spectra/s on this 2-core machine, validation included.

Never imports torch: the model id comes from the checkpoint file's bytes (:func:`model_id_of`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from astronn_dist.worker.config import QUEUE, TASK_NAME, Settings
from astronn_dist.worker.contract import UNACKED_KEY, SpectrumRequest
from astronn_dist.worker.service.messages import MAX_CHUNK, make_message

if TYPE_CHECKING:
    import redis
    from celery import Celery
    from sqlalchemy.engine import Engine

DEFAULT_CHUNK_SIZE = 128
"""Spectra per message: big enough that queue overhead vanishes next to a GPU batch (a worker
takes a few hundred messages per second), small enough that a redelivered chunk is cheap."""

_HASH_BLOCK = 1 << 20


class BrokerError(RuntimeError):
    """The broker cannot be reached or refused the message; the text says where and what to do."""


def model_id_of(path: str | Path) -> str:
    """The model id of a checkpoint, as :func:`astronn_dist.worker.science.model.load_model` computes it:
    ``f"{file stem}-{sha256(file bytes)[:12]}"``, without importing torch.

    Raises:
        FileNotFoundError: no file at ``path``.
    """
    path = Path(path)
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(_HASH_BLOCK), b""):
            digest.update(block)
    return f"{path.stem}-{digest.hexdigest()[:12]}"


def mask_url(url: str) -> str:
    """``url`` with its password (``user:PASSWORD@``, ``?password=``) replaced by ``***``,
    for anything printed or logged; each part of a ``;``-separated Sentinel list alike."""
    if ";" in url:
        return ";".join(mask_url(part) for part in url.split(";"))
    scheme, sep, rest = url.partition("://")
    if sep and not rest.startswith("/"):
        userinfo, at, hostpart = rest.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        if at and colon:
            rest = f"{user}:***@{hostpart}"
    masked = f"{scheme}{sep}{rest}"
    return re.sub(r"(?i)([?&](?:password|passwd|pwd)=)[^&]*", r"\1***", masked)


def chunks(requests: Sequence[SpectrumRequest], size: int) -> Iterator[Sequence[SpectrumRequest]]:
    """Consecutive slices of at most ``size`` requests (1 <= size <= MAX_CHUNK)."""
    if not 1 <= size <= MAX_CHUNK:
        raise ValueError(f"chunk size must be between 1 and {MAX_CHUNK}, got {size}")
    for start in range(0, len(requests), size):
        yield requests[start : start + size]


def split_done(
    requests: Sequence[SpectrumRequest], engine: Engine, model_id: str
) -> tuple[list[SpectrumRequest], list[SpectrumRequest]]:
    """(to do, already done): a request is done when the results table has a row for its
    spectrum_id and ``model_id`` (whatever the row's outcome; ``requeue`` redoes failures).

    A database without the results table yet has nothing done.
    """
    from astronn_dist.worker.service.results import has_table

    if not has_table(engine):
        return list(requests), []
    done = _done_ids(requests, engine, model_id)
    todo = [r for r in requests if r.spectrum_id not in done]
    skipped = [r for r in requests if r.spectrum_id in done]
    return todo, skipped


def _done_ids(requests: Sequence[SpectrumRequest], engine: Engine, model_id: str) -> set[str]:
    from astronn_dist.worker.service.results import existing_spectrum_ids

    return existing_spectrum_ids(engine, model_id, [r.spectrum_id for r in requests])


class _DoneFilter:
    """Drops, block by block, the requests that have a row for the model (see
    :func:`split_done`); with ``force`` or before the results table exists, none.
    :meth:`close` disposes of the engine it opened, if it did."""

    def __init__(self, settings: Settings, engine: Engine | None, model_id: str, force: bool) -> None:
        self.settings = settings
        self.engine = engine
        self.model_id = model_id
        self.force = force
        self._own_engine = False
        self._table: bool | None = None  # checked once, at the first block

    def close(self) -> None:
        if self._own_engine and self.engine is not None:
            self.engine.dispose()

    def todo(self, block: Sequence[SpectrumRequest]) -> Sequence[SpectrumRequest]:
        if self.force or not block:
            return block
        if self.engine is None:
            from astronn_dist.worker.service.results import make_engine

            self.engine, self._own_engine = make_engine(self.settings.database_url), True
        if self._table is None:
            from astronn_dist.worker.service.results import has_table

            self._table = has_table(self.engine)
        if not self._table:
            return block
        done = _done_ids(block, self.engine, self.model_id)
        return [r for r in block if r.spectrum_id not in done] if done else block


def redis_client(settings: Settings) -> redis.Redis:
    """A redis-py client on the broker's current primary (for the queue's length, contents and
    the watch state)."""
    from astronn_dist.worker.service.broker import redis_client as broker_client

    return broker_client(settings, timeout_s=30, connect_timeout_s=5)


def queued_spectrum_ids(client: redis.Redis, page: int = 1000) -> set[str]:
    """The spectrum_ids in messages waiting on the queue or delivered and not yet acknowledged
    (kombu keeps those in the ``unacked`` hash until the task returns).

    Reads kombu's Redis envelopes and the Celery protocol v2 body ``[args, kwargs, embed]``;
    messages of any other shape are ignored. Cost: the whole queue crosses the network once,
    a page at a time (only the ids are kept: a queue of a million spectra is ~100 MB of ids).
    """
    ids: set[str] = set()
    length = client.llen(QUEUE)
    for start in range(0, length, page):
        for raw in client.lrange(QUEUE, start, start + page - 1):
            _add_ids(ids, json.loads(raw))
    for raw in client.hvals(UNACKED_KEY):
        delivered = json.loads(raw)  # [message, exchange, routing_key]
        if isinstance(delivered, list) and delivered:
            _add_ids(ids, delivered[0])
    return ids


def _add_ids(ids: set[str], envelope: Any) -> None:
    """The spectrum_ids of one kombu envelope into ``ids`` (none if it is not one of ours)."""
    try:
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        _, kwargs, _ = json.loads(body)
        ids.update(s["spectrum_id"] for s in kwargs["spectra"])
    except (AttributeError, KeyError, TypeError, ValueError):
        pass  # not one of ours


def provenance(source: str, model_id: str | None = None) -> dict[str, Any]:
    """What a message says about where it came from (stored by nobody; read in the logs)."""
    out: dict[str, Any] = {
        "producer": socket.gethostname(),
        "source": source[:1024],
        "enqueued_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if model_id is not None:
        out["model_id"] = model_id
    return out


class Publisher:
    """Sends chunks to the queue over one connection; use as a context manager.

    ``app`` defaults to the service's Celery app (:func:`astronn_dist.worker.service.app.make_app`), so the message
    has exactly the routing, serializer and headers the workers expect.
    """

    def __init__(self, settings: Settings, app: Celery | None = None) -> None:
        if app is None:
            from astronn_dist.worker.service.app import make_app

            app = make_app(settings)
        self.app = app
        self.settings = settings
        self.messages = 0
        self.spectra = 0
        self._producer_cm: Any = None
        self._producer: Any = None

    def __enter__(self) -> Publisher:
        connection = self.app.connection_for_write()
        try:
            connection.ensure_connection(max_retries=1, timeout=5)
        except Exception as exc:
            connection.release()
            raise BrokerError(
                f"cannot reach the broker at {mask_url(self.settings.broker_url)} "
                f"({type(exc).__name__}: {exc}); start Redis or set ASTRONN_DIST_BROKER_URL"
            ) from exc
        connection.release()
        self._producer_cm = self.app.producer_or_acquire()
        self._producer = self._producer_cm.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._producer_cm is not None:
            self._producer_cm.__exit__(*exc_info)
        self._producer_cm = self._producer = None

    def publish(self, chunk: Sequence[SpectrumRequest], extra: dict[str, Any] | None = None) -> str:
        """Send one message carrying ``chunk``; returns its task id."""
        if self._producer is None:
            raise RuntimeError("Publisher.publish outside its 'with' block")
        message = make_message(chunk, extra)
        # A short kwargsrepr (what Flower and the worker log show) spares Celery a saferepr of
        # the whole chunk: a fifth of the publishing CPU time.
        first = chunk[0].spectrum_id if chunk else ""
        summary = f"{{'spectra': <{len(chunk)} spectra from {first[:80]!r}>}}"
        result = self.app.send_task(
            TASK_NAME, kwargs=message, queue=QUEUE, producer=self._producer,
            argsrepr="()", kwargsrepr=summary,
        )
        self.messages += 1
        self.spectra += len(chunk)
        return result.id


@dataclass
class EnqueueReport:
    """What :func:`enqueue` did, in spectra: found; skipped (a row exists for the model);
    queued (already on the queue, with ``skip_queued``); enqueued, in ``messages`` messages.
    seconds: wall time of the checks plus publishing."""

    found: int
    skipped: int
    queued: int
    enqueued: int
    messages: int
    seconds: float
    model_id: str

    @property
    def rate(self) -> float:
        """Spectra enqueued per second."""
        return self.enqueued / self.seconds if self.seconds > 0 else float("inf")


def _blocks_of(
    requests: Sequence[SpectrumRequest] | Iterable[Sequence[SpectrumRequest]],
) -> Iterable[Sequence[SpectrumRequest]]:
    """A list of requests as one block; blocks (e.g. :func:`astronn_dist.producer.catalog.iter_catalog`)
    as they are."""
    if isinstance(requests, Sequence) and (not requests or isinstance(requests[0], SpectrumRequest)):
        return [requests]  # type: ignore[list-item]
    return requests  # type: ignore[return-value]


def enqueue(
    requests: Sequence[SpectrumRequest] | Iterable[Sequence[SpectrumRequest]],
    settings: Settings,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    force: bool = False,
    source: str = "produce",
    engine: Engine | None = None,
    app: Celery | None = None,
    on_progress: Callable[[int], None] | None = None,
    skip_queued: bool = False,
) -> EnqueueReport:
    """Put ``requests`` on the queue in chunks, skipping those already done for the model.

    Blocks are handled one at a time (skip check, then publishing), so a catalog of any size
    goes out in the memory of one block; chunks run on across blocks, so every message but
    the last is full, as for one list.

    Args:
        requests: what to process: a list of requests, or an iterable of lists (blocks, from
            :mod:`astronn_dist.producer.catalog`: ``iter_catalog``, ``gather_blocks``).
        settings: broker and database URLs, and the model (its id decides what is "done").
        chunk_size: spectra per message (1..MAX_CHUNK).
        force: enqueue everything, even spectra with a row for this model.
        source: provenance text (e.g. the catalog's path).
        engine, app: reuse an open database engine / Celery app (default: from settings).
        on_progress: called with the number of spectra of each message sent.
        skip_queued: also skip spectra already waiting on the queue or being processed
            (``reconcile``; reads the whole queue once, at the first block with work left).

    Raises:
        BrokerError: Redis unreachable. FileNotFoundError: the model checkpoint is missing.
        CatalogError: from the blocks, as they are read.
    """
    t0 = time.perf_counter()
    model_id = model_id_of(settings.model_path)
    if not 1 <= chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk size must be between 1 and {MAX_CHUNK}, got {chunk_size}")
    extra = provenance(source, model_id)
    found = skipped = queued = enqueued = 0
    in_queue: set[str] | None = None
    pending: list[SpectrumRequest] = []  # the start of the next chunk, carried across blocks

    with (
        closing(_DoneFilter(settings, engine, model_id, force)) as done_filter,
        Publisher(settings, app) as publisher,
    ):

        def publish(todo: list[SpectrumRequest]) -> None:
            for chunk in chunks(todo, chunk_size):
                publisher.publish(chunk, extra)
                if on_progress is not None:
                    on_progress(len(chunk))

        for block in _blocks_of(requests):
            found += len(block)
            todo = done_filter.todo(block)
            skipped += len(block) - len(todo)
            if skip_queued and todo:
                if in_queue is None:  # bounded by the queue, unlike the catalog
                    in_queue = _queued_now(settings)
                before = len(todo)
                todo = [r for r in todo if r.spectrum_id not in in_queue]
                queued += before - len(todo)
            enqueued += len(todo)
            pending.extend(todo)
            full = len(pending) - len(pending) % chunk_size
            publish(pending[:full])
            del pending[:full]
        publish(pending)
        messages = publisher.messages
    return EnqueueReport(
        found=found,
        skipped=skipped,
        queued=queued,
        enqueued=enqueued,
        messages=messages,
        seconds=time.perf_counter() - t0,
        model_id=model_id,
    )


def _queued_now(settings: Settings) -> set[str]:
    client = redis_client(settings)
    try:
        return queued_spectrum_ids(client)
    finally:
        client.close()
