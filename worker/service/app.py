"""The Celery application: broker, queue, serializer, acknowledgements, prefetch.

Every app is built explicitly by :func:`make_app` from a :class:`Settings`: ``astronn-dist
worker`` from its flags, the producer from its own. ``celery -A astronn_dist.worker.service.app
worker`` reads the module attribute ``app``, built on that first read from the environment
(:meth:`Settings.from_env`); importing this module builds nothing, so no settings are read at
import. Importing it never imports torch, nor the task module: the worker imports
``astronn_dist.worker.service.tasks`` itself (``include``) when it starts. Pool processes fork
with the app and read their settings from ``app.astronn_settings``.

Why each setting (the failure model: a chunk of spectra is minutes of work, a worker can die at
any point, and every spectrum must end with exactly one row):

* JSON only (``task_serializer``, ``accept_content``): a message is data from anyone who can write
  to Redis; unpickling it would run their code. A pickled message is refused by the consumer
  (logged as "Received and deleted unknown message ... ContentDisallowed") and never executed.
* No result backend (``result_backend=None``, ``task_ignore_result``): results go to the SQL
  table; a second store would only fill Redis.
* ``task_acks_late`` + ``task_reject_on_worker_lost``: the message is acknowledged only after the
  task returned, i.e. after its rows were committed. If the pool process dies (SIGKILL, OOM
  killer) the message is requeued at once; if the whole worker (or its machine) dies, Redis
  gives it back after the visibility timeout. Rows are upserts, so a redelivered chunk rewrites
  the same rows.
* ``worker_prefetch_multiplier=1`` and ``worker_disable_prefetch``: a chunk holds a few hundred
  spectra (minutes of CPU); a worker that reserved more chunks than it has processes would sit on
  them while idle workers starve, and each reserved chunk's visibility clock already runs (a
  reserved message that waits longer than the visibility timeout is delivered a second time).
  With both, a worker takes a message only when a process is free.
* ``worker_send_task_events`` / ``task_send_sent_event``: Flower and ``celery events`` show
  progress; ``broker_connection_retry_on_startup``: a worker started before Redis waits for it.

The visibility timeout (Redis "ack emulation": a delivered message is kept in the ``unacked``
hash, and any consumer puts it back in the queue once it is older than the timeout) is set in
every place it is read, see :func:`broker_transport_options`.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from astronn_dist.worker.service import logs
from astronn_dist.worker.service.broker import broker_ssl_options, kombu_broker, publish_retry_policy
from astronn_dist.worker.config import QUEUE, TASK_NAME, Settings

RESTORE_INTERVAL_MAX_S = 10
"""Longest period between two sweeps for expired unacked messages (kombu's default period)."""


def restore_interval_s(visibility_timeout_s: int) -> int:
    """Seconds between sweeps that requeue expired unacked messages (1 to 10).

    A dead worker's message is back in the queue at most ``visibility_timeout + this`` seconds
    after it was delivered, as long as one worker runs. A tenth of the timeout keeps the
    overshoot small for short timeouts; a sweep is one ZRANGE on Redis, so even every second is
    cheap.
    """
    return max(1, min(RESTORE_INTERVAL_MAX_S, visibility_timeout_s // 10))


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """kombu Redis transport options: the visibility timeout and the sweeps that enforce it.

    Where the timeout is read (kombu 5.7 ``kombu/transport/redis.py``; celery 5.7 itself reads
    no ``visibility_timeout`` anywhere, it hands ``broker_transport_options`` to kombu):

    * ``visibility_timeout``: ``QoS.restore_visible`` requeues unacked messages delivered more
      than this many seconds ago. Every consumer of this broker that sweeps (workers, and any
      ``celery -A ...`` tool that consumes) must use the same value: one with a shorter timeout
      would requeue chunks that are still running (celery/celery#7651, #5935). So the producer
      and tools must build their app with :func:`make_app` too.
    * ``unacked_restore_interval`` / ``unacked_restore_throttle``: the sweep runs on a timer in
      the worker's event loop, and only every Nth call really scans Redis. Both defaulted to 10,
      so an expired message waited up to ~100 s more whatever the timeout
      (celery/kombu#2558, which made them options). Throttle 1, interval from
      :func:`restore_interval_s`.
    * ``unacked_restore_limit``: how many expired messages one sweep requeues; left at kombu
      5.7's default ``None`` (all of them). It used to be 10 per sweep, which let the unacked
      hash grow without bound (celery/kombu#164).
    * ``unacked_mutex_expire``: sweeps take a Redis lock so only one consumer restores at a
      time; a consumer killed while holding it blocks all sweeps until it expires (default 300
      s). Kept no longer than the visibility timeout.

    Also bound by the timeout (enforced in ``astronn_dist.worker.service.tasks``): a retry's countdown (an ETA message
    is held unacked by the worker until it is due, so a countdown longer than the timeout gets
    it delivered twice: celery/celery#4766, #6236) and a chunk's run time.
    """
    vt = int(settings.visibility_timeout_s)
    if vt < 1:
        raise ValueError(f"ASTRONN_DIST_VISIBILITY_TIMEOUT must be >= 1 s, got {vt}")
    return {
        "visibility_timeout": vt,
        "unacked_restore_interval": restore_interval_s(vt),
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": max(1, min(300, vt)),
    }


def make_app(settings: Settings | None = None) -> Celery:
    """The Celery app for ``settings`` (default: :meth:`Settings.from_env`).

    The settings object is kept as ``app.astronn_settings`` for the task layer (not in
    ``app.conf``: ``celery inspect conf`` serializes the configuration as JSON).
    """
    settings = settings if settings is not None else Settings.from_env()
    broker_url, sentinel_options = kombu_broker(settings)  # a Sentinel URL: master_name & co.
    transport = {**broker_transport_options(settings), **sentinel_options}
    app = Celery("astronn_dist", broker=broker_url, include=["astronn_dist.worker.service.tasks"])
    exchange = Exchange(QUEUE, type="direct")
    app.conf.update(
        # Serialization: JSON only, both ways.
        task_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        # Results live in the SQL table.
        result_backend=None,
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        # At-least-once delivery; the upsert makes it exactly-once in effect.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        # One chunk at a time per process (see the module docstring).
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
        # Routing: one queue.
        task_default_queue=QUEUE,
        task_default_exchange=QUEUE,
        task_default_routing_key=QUEUE,
        task_queues=(Queue(QUEUE, exchange, routing_key=QUEUE),),
        task_routes={TASK_NAME: {"queue": QUEUE, "routing_key": QUEUE}},
        task_create_missing_queues=False,
        # Broker connection.
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport,
        # No result backend is configured; should one be added (Redis), it reads the same
        # timeout (celery docs, "Visibility timeout"; celery/celery#9264).
        result_backend_transport_options={"visibility_timeout": transport["visibility_timeout"]},
        # Monitoring (Flower).
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=False,
        worker_hijack_root_logger=True,
        # A chunk's rows are already its result; keep the workers' memory steady.
        worker_max_tasks_per_child=None,
        enable_utc=True,
    )
    ssl_options = broker_ssl_options(settings.broker_url)
    if ssl_options is not None:
        app.conf.broker_use_ssl = ssl_options
    retry_policy = publish_retry_policy(settings)
    if retry_policy is not None:  # Sentinel: a publish rides through a failover
        app.conf.task_publish_retry_policy = retry_policy
    app.astronn_settings = settings  # type: ignore[attr-defined]
    logs.configure(settings.log_format)  # takes effect when a worker sets up its loggers
    return app


_from_environment: Celery | None = None


def __getattr__(name: str) -> Any:
    """``app``: the app of ``celery -A astronn_dist.worker.service.app ...``, from the
    environment, built at the first read (PEP 562), not at import."""
    global _from_environment
    if name == "app":
        if _from_environment is None:
            _from_environment = make_app()
        return _from_environment
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
