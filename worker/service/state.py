"""What one worker process loads once: the predictor, the database engine, the Redis client.

One model per process: each pool process loads the checkpoint once (and creates one database
engine and runs the migrations once), on its own device, in the process itself, never in the
forking parent (a CUDA context does not survive fork). ``warm_up`` loads them in a thread when
the process starts; the first task waits for it if it has not finished. The delivery counts in
Redis (see astronn_dist.worker.service.tasks) live here too.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from astronn_dist.worker.service import metrics
from astronn_dist.worker.config import Settings

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from astronn_dist.worker.science.inference import Predictor

log = logging.getLogger("astronn_dist.worker.service.tasks")

DELIVERY_KEY = "astronn_dist:deliveries:{task_id}:{retries}"
"""Redis key counting the deliveries of one message (task id, retry number)."""

DELIVERY_KEY_MIN_TTL_S = 86_400



def _process_index() -> int:
    """This pool process's index (0..concurrency-1; a replacement takes the index it replaces)."""
    from billiard.process import current_process

    return int(getattr(current_process(), "index", 0) or 0)


def load_predictor(settings: Settings, device_spec: str, index: int,
                   threads: int | None = None) -> Predictor:
    """The model of ``settings`` loaded for pool process ``index`` (its device from
    ``device_spec``, as :func:`astronn_dist.worker.devices.device_of_process` assigns it), ready
    to predict.

    threads: the predictor's CPU workers (None: torch's thread count).
    """
    from astronn_dist.worker.devices import device_of_process
    from astronn_dist.worker.science.inference import Predictor
    from astronn_dist.worker.science.model import load_model

    loaded = load_model(settings.model_path, device=device_of_process(device_spec, index))
    predictor = Predictor(loaded, mc_passes=settings.mc_passes, seed=settings.seed, threads=threads)
    predictor.warm_up()
    return predictor


class WorkerState:
    """What one process loads once: the predictor, the database engine, the Redis client."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pid = os.getpid()
        # One lock per resource: counting a delivery must not wait for a model being loaded.
        self._model_lock = threading.Lock()
        self._db_lock = threading.Lock()
        self._redis_lock = threading.Lock()
        self._predictor: Predictor | None = None
        self._engine: Engine | None = None
        self._migrated = False
        self._redis: Any = None

    def predictor(self) -> Predictor:
        """The loaded model (loaded on first call; a failure is raised, and retried next call)."""
        with self._model_lock:
            if self._predictor is None:
                t0 = time.perf_counter()
                self._predictor = predictor = load_predictor(
                    self.settings, self.settings.device, _process_index())
                seconds = time.perf_counter() - t0
                device, model_id = str(predictor.device), predictor.model_id
                metrics.observe_model_loaded(seconds, device, model_id)
                log.info(
                    "process %d loaded model %s on %s in %.1f s (%d MC passes, seed %d)",
                    self.pid, model_id, device, seconds,
                    self.settings.mc_passes, self.settings.seed,
                    extra={"event": "model_loaded", "model_id": model_id,
                           "device": device, "seconds": round(seconds, 3)},
                )
            return self._predictor

    def device_failed(self) -> bool:
        """Whether this process's GPU stopped working (:func:`astronn_dist.worker.devices.gpu_works`):
        its chunks must then go to a new process. False on the CPU, and before a model is loaded."""
        predictor = self._predictor
        if predictor is None or predictor.device.type != "cuda":
            return False
        from astronn_dist.worker.devices import gpu_works

        return not gpu_works(predictor.device)

    def engine(self) -> Engine:
        """The results database, migrated once per process (retried until it succeeds)."""
        with self._db_lock:
            if self._engine is None:
                from astronn_dist.worker.service.results import dead_client_s, make_engine

                self._engine = make_engine(
                    self.settings.database_url,
                    dead_client_s=dead_client_s(self.settings.visibility_timeout_s),
                )
            if not self._migrated:
                from astronn_dist.worker.service.results import migrate

                migrate(self._engine)
                self._migrated = True
            return self._engine

    def redis(self) -> Any:
        with self._redis_lock:
            if self._redis is None:
                from astronn_dist.worker.service.broker import redis_client

                self._redis = redis_client(self.settings, timeout_s=10, connect_timeout_s=10)
            return self._redis

    def count_delivery(self, task_id: str, retries: int) -> int | None:
        """Increment and return this message's delivery count (None if Redis did not answer:
        then the chunk is processed, as if first delivered)."""
        key = DELIVERY_KEY.format(task_id=task_id, retries=retries)
        ttl = max(
            DELIVERY_KEY_MIN_TTL_S,
            4 * self.settings.visibility_timeout_s * max(self.settings.max_deliveries, 1),
        )
        try:
            pipe = self.redis().pipeline(transaction=True)
            pipe.incr(key)
            pipe.expire(key, ttl)
            count, _ = pipe.execute()
            return int(count)
        except Exception as exc:  # noqa: BLE001 - counting is best effort, processing is not
            log.warning("could not count the delivery of %s in Redis: %s", task_id, exc)
            return None

    def forget_deliveries(self, task_id: str, retries: int) -> None:
        try:
            self.redis().delete(DELIVERY_KEY.format(task_id=task_id, retries=retries))
        except Exception as exc:  # noqa: BLE001 - the key expires anyway
            log.debug("could not delete the delivery count of %s: %s", task_id, exc)

    def warm_up(self) -> None:
        """Load the model and open the database now (in a thread), so the first task need not."""

        def run() -> None:
            t0 = time.perf_counter()
            try:
                predictor = self.predictor()
                self.engine()
            except Exception as exc:  # noqa: BLE001 - the first task retries and reports it
                log.warning("warm-up of process %d: %s: %s", self.pid, type(exc).__name__, exc)
                return
            log.info(
                "process %d warm in %.1f s: model %s on %s, results database migrated",
                self.pid, time.perf_counter() - t0, predictor.model_id, predictor.device,
            )

        threading.Thread(target=run, name="astronn-dist-warm-up", daemon=True).start()


_state: WorkerState | None = None
_state_lock = threading.Lock()


def worker_state(settings: Settings | None = None) -> WorkerState:
    """This process's state (a forked child builds its own: nothing crosses fork).

    ``settings`` default: those of the Celery app the process runs (``app.astronn_settings``,
    set by :func:`astronn_dist.worker.service.app.make_app`), the one way settings reach a pool
    process.
    """
    global _state
    with _state_lock:
        if _state is None or _state.pid != os.getpid():
            if settings is None:
                from celery import current_app

                settings = getattr(current_app, "astronn_settings", None)
                if settings is None:
                    raise RuntimeError(
                        f"the Celery app {current_app.main!r} has no astronn_settings: run the "
                        "worker with astronn-dist worker or celery -A astronn_dist.worker.service.app"
                    )
            _state = WorkerState(settings)
        return _state
