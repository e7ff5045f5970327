"""Watch folders (and a catalog) and enqueue each new or rewritten apStar file once.

Every ``poll_interval`` seconds :meth:`Watcher.poll_once` lists the folders (and stats the
catalog's files), and a file becomes *ready* when

* its (size, mtime) is the same as at the previous poll, it is not empty and its mtime is at
  least ``min_age`` seconds old: a file still being copied keeps changing; and
* an uncompressed FITS file has a size that is a multiple of 2880 bytes (FITS files are made of
  2880-byte blocks; a half-copied file usually is not, and astropy opens it with only a
  warning), unless it has stayed so for ``incomplete_age`` seconds (then it is broken, not
  growing, and the worker records why it cannot be read).

A ready file is enqueued unless it was already handled: the *state* (a Redis hash per model,
``astronn_dist:watch:<model_id>``: path -> "mtime_ns:size" of the version enqueued) has the same
version, or the results table has a row for its spectrum_id and model created after the file's
mtime (``--force`` ignores the table). A file rewritten later (a newer reduction) has a new
version and a newer mtime than its row, so it is enqueued again. The state lives beside the
queue: if Redis loses the queue it loses the state too, and what was queued but not done is sent
again; what is done stays skipped thanks to the table.

Ready files wait in a pending chunk, sent when it holds ``chunk_size`` spectra or its oldest
file has waited ``flush_delay`` seconds, so a lone new file is not kept waiting. The state is
written after the message is sent: a crash in between sends a chunk twice (its rows are
rewritten, not duplicated), never loses one.

A catalog (``--catalog``) gives spectrum_id and photometry to the files it lists, wherever they
are; it is read again when it changes (once it stays unchanged for ``min_age``), so rows added
to it are picked up. Its files need not lie in the watched folders. A changed row of a file
already enqueued is not sent again (the file did not change): ``produce --force`` for those.

Reconcile (the database is the source of truth, Redis only the transport): every
``reconcile_interval`` seconds the watcher looks for files it handled whose spectrum has no row
for the model (or only one older than the file) and no message on the queue or in delivery; a
message lost by the broker (a failover that drops acknowledged writes, a restarted Redis without
persistence) leaves exactly that. It forgets those files (in memory and in the state), so the
next polls send them again, as ``astronn-dist reconcile`` does for a catalog. The first check
comes one interval after the start; before the results table exists nothing is reconciled.

Cost: each poll lists the whole tree (one stat per file): about a second per million files on a
local disk, more on a network file system; choose ``poll_interval`` accordingly.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from astronn_dist.producer.catalog import CatalogError, iter_catalog, scan_spectra
from astronn_dist.producer.enqueue import (
    DEFAULT_CHUNK_SIZE,
    Publisher,
    provenance,
    queued_spectrum_ids,
)
from astronn_dist.worker.contract import SpectrumRequest

if TYPE_CHECKING:
    import redis
    from sqlalchemy.engine import Engine

FITS_BLOCK = 2880
STATE_KEY_PREFIX = "astronn_dist:watch:"
_BATCH = 10_000  # ready files checked against the state and the table per round trip


@dataclass(frozen=True)
class WatchOptions:
    """Timing of the watcher [s] and the message size [spectra]."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    poll_interval: float = 1.0
    min_age: float = 2.0
    flush_delay: float = 2.0
    incomplete_age: float = 300.0
    force: bool = False
    reconcile_interval: float = 600.0  # 0: never


@dataclass
class PollReport:
    """What one poll saw and did (counts of spectra)."""

    files: int = 0
    ready: int = 0
    skipped_done: int = 0
    enqueued: int = 0
    messages: int = 0
    pending: int = 0
    reconciled: int = 0  # handled files found lost (no row, no message) and to be sent again


def version_of(size: int, mtime_ns: int) -> str:
    """The state's version string of a file."""
    return f"{mtime_ns}:{size}"


class WatchState:
    """Which version of each file was enqueued, in a Redis hash per model (see module doc)."""

    def __init__(self, client: redis.Redis, model_id: str) -> None:
        self.client = client
        self.key = STATE_KEY_PREFIX + model_id

    def get_many(self, paths: Sequence[str]) -> list[str | None]:
        if not paths:
            return []
        values = self.client.hmget(self.key, list(paths))
        return [v.decode() if v is not None else None for v in values]

    def set_many(self, versions: dict[str, str]) -> None:
        if versions:
            self.client.hset(self.key, mapping=versions)

    def forget(self, paths: Sequence[str]) -> None:
        if paths:
            self.client.hdel(self.key, *paths)

    def __len__(self) -> int:
        return int(self.client.hlen(self.key))


def rows_created(engine: Engine, model_id: str, spectrum_ids: Sequence[str]) -> dict[str, float]:
    """spectrum_id -> when its row for ``model_id`` was written [s since the epoch, UTC]."""
    from astronn_dist.worker.service.results import created_times

    return {sid: t.timestamp() for sid, t in created_times(engine, model_id, spectrum_ids).items()}


@dataclass
class _Candidate:
    request: SpectrumRequest
    size: int
    mtime_ns: int

    @property
    def version(self) -> str:
        return version_of(self.size, self.mtime_ns)


@dataclass
class _Pending:
    items: list[tuple[SpectrumRequest, str]] = field(default_factory=list)  # (request, version)
    since: float | None = None


class Watcher:
    """Polls folders and a catalog, enqueues ready files in chunks (see the module doc).

    Args:
        dirs: folders to watch (recursively).
        publisher: an entered :class:`astronn_dist.producer.enqueue.Publisher`.
        state: the enqueued versions (:class:`WatchState`).
        model_id: the model whose results count as done.
        engine: the results database (None: no table check); before ``migrate`` has created
            the table nothing counts as done.
        catalog: optional catalog file (see the module doc).
        options: timing and chunk size.
        log: where progress lines go.
        clock: the time [s since the epoch] (tests may pass their own).

    Raises:
        CatalogError: a folder that does not exist, or a catalog that cannot be read now.
    """

    def __init__(
        self,
        dirs: Sequence[str | Path],
        *,
        publisher: Publisher,
        state: WatchState,
        model_id: str,
        engine: Engine | None = None,
        catalog: str | Path | None = None,
        options: WatchOptions = WatchOptions(),
        log: Callable[[str], None] = print,
        clock: Callable[[], float] = time.time,
    ) -> None:
        for d in dirs:
            if not os.path.isdir(d):
                raise CatalogError(f"{d}: not a folder (watch takes folders of apStar files)")
        if not dirs and catalog is None:
            raise CatalogError("nothing to watch: give folders, or --catalog FILE")
        self.dirs = [str(d) for d in dirs]
        self.publisher = publisher
        self.state = state
        self.model_id = model_id
        self.engine = engine
        self.options = options
        self.log = log
        self.clock = clock
        self.catalog = Path(catalog) if catalog is not None else None
        self.totals = PollReport()
        self._observed: dict[str, tuple[int, int]] = {}  # path -> (size, mtime_ns) last poll
        self._handled: dict[str, str] = {}  # path -> version enqueued or found done
        self._pending = _Pending()
        self._pending_paths: set[str] = set()
        self._catalog_rows: dict[str, SpectrumRequest] = {}
        self._catalog_version: tuple[int, int] | None = None
        self._catalog_observed: tuple[int, int] | None = None
        self._stop = threading.Event()
        self._table_seen = False
        self._extra = provenance("watch " + " ".join(self.dirs), model_id)
        self._last_reconcile = clock()
        if self.catalog is not None:
            self._load_catalog(self._stat_catalog())

    # ---------------------------------------------------------------------------- catalog

    def _stat_catalog(self) -> tuple[int, int] | None:
        assert self.catalog is not None
        try:
            st = self.catalog.stat()
        except FileNotFoundError:
            if self._catalog_version is None:
                raise CatalogError(f"{self.catalog}: catalog not found") from None
            return None
        return (st.st_size, st.st_mtime_ns)

    def _load_catalog(self, version: tuple[int, int] | None) -> None:
        # Block by block into the path -> request map (the map is what the polls need; no
        # list of the whole catalog beside it).
        rows: dict[str, SpectrumRequest] = {}
        count = added = 0
        for block in iter_catalog(self.catalog):  # type: ignore[arg-type]
            count += len(block)
            added += sum(1 for r in block if r.path not in self._catalog_rows)
            rows.update((r.path, r) for r in block)
        self._catalog_rows = rows
        self._catalog_version = version
        self.log(f"catalog {self.catalog}: {count} rows ({added} new)")

    def _refresh_catalog(self, now: float) -> None:
        version = self._stat_catalog()
        if version is None or version == self._catalog_version:
            return
        previous, self._catalog_observed = self._catalog_observed, version
        if previous != version or now - version[1] / 1e9 < self.options.min_age:
            return  # still changing: read it once it is settled
        try:
            self._load_catalog(version)
        except CatalogError as exc:
            self._catalog_version = version  # do not retry until it changes again
            self.log(f"warning: keeping the previous catalog: {exc}")

    # ---------------------------------------------------------------------------- polling

    def _candidates(self) -> dict[str, _Candidate]:
        found: dict[str, _Candidate] = {}
        for folder in self.dirs:
            for f in scan_spectra(folder):
                if self._stop.is_set():
                    return found
                found[f.path] = _Candidate(SpectrumRequest(f.spectrum_id, f.path), f.size, f.mtime_ns)
        for path, request in self._catalog_rows.items():
            # The catalog's identity and photometry win over the folder's defaults.
            known = found.get(path)
            if known is not None:
                found[path] = _Candidate(request, known.size, known.mtime_ns)
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue  # not there yet
            found[path] = _Candidate(request, st.st_size, st.st_mtime_ns)
        return found

    def _is_ready(self, path: str, c: _Candidate, now: float) -> bool:
        previous = self._observed.get(path)
        self._observed[path] = (c.size, c.mtime_ns)
        if previous != (c.size, c.mtime_ns) or c.size == 0:
            return False
        age = now - c.mtime_ns / 1e9
        if age < self.options.min_age:
            return False
        if path.endswith((".fits", ".fit", ".fts")) and c.size % FITS_BLOCK:
            return age >= self.options.incomplete_age
        return True

    def _not_done(self, ready: list[_Candidate], report: PollReport) -> list[_Candidate]:
        """Drop the ready files whose version was enqueued already or whose row is newer."""
        out: list[_Candidate] = []
        for start in range(0, len(ready), _BATCH):
            batch = ready[start : start + _BATCH]
            versions = self.state.get_many([c.request.path for c in batch])
            fresh = []
            for c, v in zip(batch, versions):
                if v == c.version:
                    self._handled[c.request.path] = v
                    self._observed.pop(c.request.path, None)
                else:
                    fresh.append(c)
            created: dict[str, float] = {}
            if not self.options.force and fresh and self._table_exists():
                created = rows_created(self.engine, self.model_id, [c.request.spectrum_id for c in fresh])
            done: dict[str, str] = {}
            for c in fresh:
                row_time = created.get(c.request.spectrum_id)
                if row_time is not None and row_time >= c.mtime_ns / 1e9:
                    done[c.request.path] = c.version
                else:
                    out.append(c)
            self.state.set_many(done)  # next time (or after a restart) no table query
            for path, v in done.items():
                self._handled[path] = v
                self._observed.pop(path, None)
            report.skipped_done += len(batch) - len(fresh) + len(done)
        return out

    def _table_exists(self) -> bool:
        """Whether the results table exists (checked until it does: ``migrate`` may come later)."""
        if self.engine is None:
            return False
        if not self._table_seen:
            from astronn_dist.worker.service.results import has_table

            self._table_seen = has_table(self.engine)
        return self._table_seen

    def _reconcile(self, candidates: dict[str, _Candidate], now: float) -> int:
        """Forget handled files with neither a row nor a message (see the module doc); their
        next polls send them again. Returns how many."""
        interval = self.options.reconcile_interval
        if interval <= 0 or now - self._last_reconcile < interval or not self._table_exists():
            return 0
        self._last_reconcile = now
        handled = [c for path, c in candidates.items() if self._handled.get(path) == c.version]
        created = rows_created(self.engine, self.model_id, [c.request.spectrum_id for c in handled])
        lost = [
            c for c in handled
            if created.get(c.request.spectrum_id, -1.0) < c.mtime_ns / 1e9
        ]  # fmt: skip
        if lost:  # read the queue only when the table says something is missing
            queued = queued_spectrum_ids(self.state.client)
            lost = [c for c in lost if c.request.spectrum_id not in queued]
        paths = [c.request.path for c in lost]
        for path in paths:
            del self._handled[path]
        self.state.forget(paths)
        if paths:
            self.log(f"reconcile: {len(paths)} spectra have no row and no message; sending again")
        return len(paths)

    def poll_once(self) -> PollReport:
        """List the folders once, queue up the ready files, send full (or overdue) chunks."""
        report = PollReport()
        now = self.clock()
        if self.catalog is not None:
            self._refresh_catalog(now)
        candidates = self._candidates()
        report.files = len(candidates)
        ready = [
            c
            for path, c in candidates.items()
            if self._handled.get(path) != c.version
            and path not in self._pending_paths
            and self._is_ready(path, c, now)
        ]
        if not self._stop.is_set():  # (a scan cut short by stop() lists only some files)
            # Forget files that vanished, so that a file copied again is watched afresh.
            for path in [p for p in self._observed if p not in candidates]:
                del self._observed[path]
        report.ready = len(ready)
        report.reconciled = self._reconcile(candidates, now)
        fresh = self._not_done(ready, report)
        for c in fresh:
            if not self._pending.items:
                self._pending.since = now
            self._pending.items.append((c.request, c.version))
            self._pending_paths.add(c.request.path)
        if fresh:
            self.log(f"{len(fresh)} spectra ready ({len(self._pending.items)} pending)")
        self._flush(report, now, everything=False)
        report.pending = len(self._pending.items)
        self._add_to_totals(report)
        return report

    def flush(self) -> PollReport:
        """Send every pending file now (at shutdown)."""
        report = PollReport()
        self._flush(report, self.clock(), everything=True)
        self._add_to_totals(report)
        return report

    def _flush(self, report: PollReport, now: float, *, everything: bool) -> None:
        size = self.options.chunk_size
        pending = self._pending
        overdue = pending.since is not None and now - pending.since >= self.options.flush_delay
        while pending.items and (len(pending.items) >= size or overdue or everything):
            chunk, pending.items = pending.items[:size], pending.items[size:]
            self.publisher.publish([r for r, _ in chunk], self._extra)
            versions = {r.path: v for r, v in chunk}
            self.state.set_many(versions)
            for path, v in versions.items():
                self._handled[path] = v
                self._observed.pop(path, None)
                self._pending_paths.discard(path)
            report.enqueued += len(chunk)
            report.messages += 1
        if not pending.items:
            pending.since = None
        if report.enqueued:
            self.log(f"enqueued {report.enqueued} spectra in {report.messages} messages")

    def _add_to_totals(self, report: PollReport) -> None:
        for name in ("ready", "skipped_done", "enqueued", "messages", "reconciled"):
            setattr(self.totals, name, getattr(self.totals, name) + getattr(report, name))
        self.totals.files = report.files or self.totals.files
        self.totals.pending = len(self._pending.items)

    # ---------------------------------------------------------------------------- loop

    def stop(self) -> None:
        """Ask :meth:`run` to finish (safe from a signal handler)."""
        self._stop.set()

    def run(self) -> PollReport:
        """Poll until :meth:`stop`; then send what is pending and return the totals."""
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self.options.poll_interval)
        self.flush()
        return self.totals
