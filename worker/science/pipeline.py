"""One batch of spectra -> one result record per spectrum: the function the task layer calls.

    requests ──read_apstar (thread pool)──> good spectra ──normalize──> (M, 7514)
             │                                              ──first_layer──> conv1 (M, 15040)
             │                                              ──predict──> fakemag, err
             └─ SpectrumError ─> no-result record           ──compute_distances──> records

in parts of PART_SPECTRA: the next part is read, normalized and put through the network's
deterministic first layer while this one is predicted.

Photometry: the request's value (from the catalog / message) first; where it is missing (None,
non-finite, or outside the validity window of :mod:`astronn_dist.worker.science.distance`, e.g. APOGEE's -9999.99),
the apStar header's (``K``, ``SFD_EBV``) as read by :func:`astronn_dist.worker.science.spectra.read_apstar`.
Each star keeps its own photometry all the way through.

Errors: what becomes a record, what propagates
------------------------------------------------
Permanent problems of one spectrum become a record with ``FLAG_NO_RESULT`` (so ``flag_bad``),
NaN numbers and ``error`` = the readable reason; the rest of the batch goes on:

* :class:`astronn_dist.worker.science.spectra.SpectrumError`: missing file, empty/truncated/non-FITS file, missing
  HDUs, wrong pixel count, no usable pixels, ... (anything about the file's *content*);
* a network output that is not a finite number (``error`` says so; see astronn_dist.worker.science.distance).

Transient or infrastructure problems propagate, so that the task layer retries the whole batch
(it is idempotent: the same spectra give the same rows):

* ``OSError`` while reading whose errno says the storage, not the file, failed (EIO, ESTALE,
  ETIMEDOUT, EAGAIN, EBUSY, EMFILE/ENFILE, ENOMEM, network-down errnos; see
  :data:`TRANSIENT_ERRNOS`), including one that the reader wrapped in a SpectrumError: the
  OSError found in its ``__cause__`` chain is re-raised;
* ``MemoryError``, ``torch.cuda.OutOfMemoryError`` and any other exception raised by
  normalization or prediction (these affect the batch, not one spectrum);
* any other unexpected exception from the reader (a bug, not bad data).

Timing: ``t_elapsed`` is the batch's wall time (reading, normalization, inference, distances)
divided by the number of requests: in a batched pipeline a per-spectrum share is the honest figure.
"""

from __future__ import annotations

import errno
import math
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from astronn_dist.worker import PIPELINE_VERSION
from astronn_dist.worker.contract import SpectrumRequest
from astronn_dist.worker.science.continuum import continuum_pixels, normalize_flux
from astronn_dist.worker.science.distance import FLAG_NO_RESULT, compute_distances, flags_summary, validate_photometry
from astronn_dist.worker.science.spectra import Spectrum, SpectrumError, read_apstar

if TYPE_CHECKING:  # the pipeline itself never needs torch; the predictor brings it
    from astronn_dist.worker.science.inference import FirstLayer, Predictor

READ_THREADS = 1
"""Threads reading apStar files within a part. Measured on the 2-core development machine
(synthetic files in the page cache, one process with one torch thread, 2 MC passes): 1.00 ms
per spectrum for the whole batch with 1 reading thread, 1.53-2.07 ms with 4. With
astronn_dist.worker.science.fastfits a read is ~0.4 ms of Python holding the GIL, so more threads only contend
with the predictor; on storage with latency (NFS, Lustre), where reads wait with the GIL
released, more threads (``read_threads``) can pay off again. The part being read still
overlaps the part being predicted (one read-ahead thread)."""

TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EIO", "ESTALE", "ETIMEDOUT", "EAGAIN", "EINTR", "EBUSY", "EMFILE", "ENFILE", "ENOMEM",
        "ENOLCK", "ECONNRESET", "ECONNABORTED", "ENETDOWN", "ENETUNREACH", "EHOSTDOWN",
        "EHOSTUNREACH", "EREMOTEIO", "ECOMM",
    )
    if hasattr(errno, name)
)
"""errno values meaning "the storage failed, try again later", not "this file is bad"."""

PART_SPECTRA = {"cpu": 32, "cuda": 512}
"""Spectra per part of a batch (read ahead while the previous part is predicted): on the CPU
enough to give each predictor thread whole spectra, on a GPU enough to fill it."""

NON_FINITE_PREDICTION = "the network returned a non-finite fakemag for this spectrum"


@dataclass
class ResultRecord:
    """One row of ``astro_nn_dist``. Floats may be NaN (stored as NULL by :meth:`as_row`).

    t_elapsed [s per spectrum]; k_mag, ebv, a_k_mag [mag] as used (missing -> 0). A record
    without a result keeps the photometry its request carried in k_mag and ebv (NaN where it
    carried none), so that a requeue sends exactly the first inputs; its a_k_mag is NaN.
    L_fakemag, L_fakemag_err [fakemag units]; dist, dist_err [pc].
    """

    spectrum_id: str
    path: str
    model_id: str
    pipeline_version: str
    t_elapsed: float
    k_mag: float
    ebv: float
    a_k_mag: float
    L_fakemag: float
    L_fakemag_err: float
    dist: float
    dist_err: float
    result_flags: int
    flag_warn: bool
    flag_bad: bool
    error: str | None
    mc_passes: int
    seed: int
    device: str  # "cpu" or "cuda": where the masks were drawn and the network ran
    mask_rng: str  # the random generator behind the dropout masks

    def as_row(self) -> dict[str, Any]:
        """Plain Python values for the database: NaN/inf floats become None."""
        # A shallow copy: every field is a scalar or a string (asdict's deep copy cost 0.16 ms).
        row = {name: getattr(self, name) for name in _RECORD_FIELDS}
        for key, value in row.items():
            if isinstance(value, float) and not math.isfinite(value):
                row[key] = None
        return row


_RECORD_FIELDS = tuple(f.name for f in fields(ResultRecord))


def _transient_cause(exc: BaseException) -> BaseException | None:
    """The transient OSError/MemoryError behind ``exc`` (itself or its cause chain), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MemoryError):
            return current
        if (
            isinstance(current, OSError)
            and not isinstance(current, SpectrumError)
            and current.errno in TRANSIENT_ERRNOS
        ):
            return current
        current = current.__cause__ or current.__context__
    return None


def _read(path: str) -> Spectrum | SpectrumError:
    """Read one file; a permanent failure is returned, a transient one raised."""
    try:
        return read_apstar(path)
    except SpectrumError as exc:
        cause = _transient_cause(exc)
        if cause is None:
            return exc
        # A fresh exception of the same kind (OSError(errno, ...) picks the same subclass, e.g.
        # TimeoutError), chained to the SpectrumError: re-raising the cause itself "from exc"
        # would make a cycle in the exception chain.
        if isinstance(cause, MemoryError):
            raise MemoryError(str(exc)) from exc
        assert isinstance(cause, OSError)
        raise OSError(cause.errno, f"{cause.strerror or cause} ({exc.reason})", exc.path) from exc


def _read_all(paths: Sequence[str], threads: int) -> list[Spectrum | SpectrumError]:
    if threads <= 1 or len(paths) <= 1:
        return [_read(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(threads, len(paths))) as pool:
        # map() keeps the order and re-raises the first transient error in order.
        return list(pool.map(_read, paths))


def _choose(request_values: Sequence[float | None], header_values: Sequence[float | None],
            *, is_k: bool) -> list[float]:
    """Per star, the request's photometry if present and valid, else the header's, else NaN
    (missing). One validation for the whole part (a call per star cost ~25 us a spectrum)."""
    req = [_as_sent(value) for value in request_values]
    other = [0.0 if is_k else np.nan] * len(req)  # the value of the other band, not looked at
    k_missing, ebv_missing = validate_photometry(req, other) if is_k else validate_photometry(other, req)
    missing = k_missing if is_k else ebv_missing
    return [r if not m or h is None else float(h)
            for r, m, h in zip(req, missing.tolist(), header_values)]


def process_batch(
    requests: Sequence[SpectrumRequest], predictor: Predictor, *, read_threads: int = READ_THREADS
) -> list[ResultRecord]:
    """Distances for a batch of spectra: one record per request, in request order.

    The batch goes through in parts of :data:`PART_SPECTRA` (by device): while the predictor
    works on one part, a thread reads and normalizes the next, so the cores (or the GPU) do
    not wait for the files. Each spectrum's numbers do not depend on the parts (its masks are
    its own; normalization is per spectrum).

    Args:
        requests: the spectra, each with its own identity, path and (optional) photometry.
        predictor: a loaded :class:`astronn_dist.worker.science.inference.Predictor` (its model_id, mc_passes and
            seed go into every record).
        read_threads: threads reading files (1 = read in the preparing thread).

    Returns:
        ``len(requests)`` records; unreadable spectra get a no-result record with the reason.

    Raises:
        OSError, MemoryError, torch errors, ...: transient failures (see the module docstring);
        the task layer retries the batch.
    """
    t0 = time.perf_counter()
    size = PART_SPECTRA.get(predictor.device.type, PART_SPECTRA["cpu"])
    parts = [requests[i : i + size] for i in range(0, len(requests), size)]
    records: list[ResultRecord] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="astronn-read") as ahead:
        future = ahead.submit(_prepare, parts[0], predictor, read_threads) if parts else None
        for k, part in enumerate(parts):
            prepared = future.result()  # re-raises a transient read error of this part
            if k + 1 < len(parts):
                future = ahead.submit(_prepare, parts[k + 1], predictor, read_threads)
            records += _finish(part, prepared, predictor)
    per_spectrum = (time.perf_counter() - t0) / max(len(requests), 1)
    for record in records:
        record.t_elapsed = per_spectrum
    return records


@dataclass
class _Prepared:
    """A part read and prepared: each request's Spectrum or SpectrumError, and the network's
    first layer (Predictor.first_layer of the normalized flux) of the M good ones."""

    loaded: list[Spectrum | SpectrumError]
    good: list[int]
    first: FirstLayer | None


def _prepare(requests: Sequence[SpectrumRequest], predictor: Predictor, read_threads: int
             ) -> _Prepared:
    """Read, normalize and run the first layer, in the preparing thread: its torch calls then
    do not wait for the GIL held by the reading (they did in the predicting thread)."""
    loaded = _read_all([r.path for r in requests], read_threads)
    good = [i for i, item in enumerate(loaded) if isinstance(item, Spectrum)]
    first = None
    if good:
        first = predictor.first_layer(normalize_spectra([loaded[i] for i in good]))  # type: ignore[misc]
    return _Prepared(loaded=loaded, good=good, first=first)


def normalize_spectra(spectra: Sequence[Spectrum]) -> np.ndarray:
    """The continuum-normalized flux of M spectra: (M, 7514) float64 (M >= 1).

    The normalized error is not made, and each spectrum's error is derived at the continuum
    pixels only (:meth:`Spectrum.err_at`): the same flux as ``normalize(flux, err, bitmask)``,
    bit for bit, without two powers over every pixel.
    """
    pixels = continuum_pixels()
    return normalize_flux(
        np.stack([s.flux for s in spectra]),  # (M, 8575)
        np.stack([s.err_at(pixels) for s in spectra]),  # (M, 532)
        np.stack([s.bitmask for s in spectra]),
    )


def _finish(
    requests: Sequence[SpectrumRequest], prepared: _Prepared, predictor: Predictor
) -> list[ResultRecord]:
    """Predict the good spectra of a prepared part; one record per request (t_elapsed NaN)."""
    loaded, good = prepared.loaded, prepared.good
    common = {"pipeline_version": PIPELINE_VERSION, **predictor.provenance()}
    records: list[ResultRecord | None] = [None] * len(requests)

    if good:
        spectra: list[Spectrum] = [loaded[i] for i in good]  # type: ignore[misc]
        prediction = predictor.predict(prepared.first, [requests[i].spectrum_id for i in good])
        k_mag = _choose([requests[i].k_mag for i in good], [s.k_mag for s in spectra], is_k=True)
        ebv = _choose([requests[i].ebv for i in good], [s.ebv for s in spectra], is_k=False)
        fakemag = np.asarray(prediction.fakemag, dtype=np.float64)
        fakemag_err = np.asarray(prediction.fakemag_err, dtype=np.float64)
        dist = compute_distances(fakemag, fakemag_err, k_mag, ebv)
        for j, i in enumerate(good):
            flags = int(dist.result_flags[j])
            failed = bool(flags & FLAG_NO_RESULT)  # a non-finite prediction: keep what was sent
            records[i] = ResultRecord(
                spectrum_id=requests[i].spectrum_id,
                path=requests[i].path,
                t_elapsed=math.nan,  # process_batch fills it in, once the batch's time is known
                k_mag=_as_sent(requests[i].k_mag) if failed else float(dist.k_mag[j]),
                ebv=_as_sent(requests[i].ebv) if failed else float(dist.ebv[j]),
                a_k_mag=math.nan if failed else float(dist.a_k_mag[j]),
                L_fakemag=float(fakemag[j]),
                L_fakemag_err=float(fakemag_err[j]),
                dist=float(dist.dist[j]),
                dist_err=float(dist.dist_err[j]),
                result_flags=flags,
                flag_warn=bool(dist.flag_warn[j]),
                flag_bad=bool(dist.flag_bad[j]),
                error=NON_FINITE_PREDICTION if failed else None,
                **common,
            )

    for i, item in enumerate(loaded):
        if isinstance(item, SpectrumError):
            records[i] = no_result_record(requests[i], item.reason, predictor.provenance())

    assert all(r is not None for r in records)  # every request is either good or a SpectrumError
    return records  # type: ignore[return-value]


def _as_sent(value: float | None) -> float:
    """A request's photometry as a record float: the value as given, NaN for none."""
    return math.nan if value is None else float(value)


def no_result_record(
    request: SpectrumRequest, reason: str, provenance: Mapping[str, Any]
) -> ResultRecord:
    """The record of a spectrum that gets no distance: flag_no_result, the reason, NaN numbers,
    and the photometry the request carried (as given, before any header substitution).

    provenance: model_id, mc_passes, seed, device, mask_rng (``Predictor.provenance()``)."""
    warn, bad = flags_summary(FLAG_NO_RESULT)
    nan = math.nan
    return ResultRecord(
        spectrum_id=request.spectrum_id,
        path=request.path,
        pipeline_version=PIPELINE_VERSION,
        t_elapsed=nan,
        k_mag=_as_sent(request.k_mag),
        ebv=_as_sent(request.ebv),
        a_k_mag=nan,
        L_fakemag=nan,
        L_fakemag_err=nan,
        dist=nan,
        dist_err=nan,
        result_flags=FLAG_NO_RESULT,
        flag_warn=bool(warn),
        flag_bad=bool(bad),
        error=reason,
        **provenance,
    )
