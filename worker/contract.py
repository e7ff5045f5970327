"""The contracts every part of astronn-dist shares (docs/DESIGN.md), in one place, importing
nothing heavy (no numpy, no torch): the producer, the messages and the results store use them
without loading the science core.

The request a message carries, the flag bits and their names, the size limits of a message,
the names of the queue, the task and the results table, and the pixel counts of a spectrum.
"""

from __future__ import annotations

from dataclasses import dataclass

# -- the spectrum a message asks for ----------------------------------------------------------


@dataclass(frozen=True)
class SpectrumRequest:
    """One spectrum to process, as the message carries it.

    k_mag, ebv: catalog 2MASS Ks and E(B-V) [mag]; None (or NaN) = use the apStar header's.
    """

    spectrum_id: str
    path: str
    k_mag: float | None = None
    ebv: float | None = None


# -- flags (result_flags) ---------------------------------------------------------------------

FLAG_FAKEMAG_UNRELIABLE = 1 << 0  # L_fakemag_err >= 0.2 * L_fakemag
FLAG_MISSING_PHOTOMETRY = 1 << 1  # Ks missing
FLAG_MISSING_EXTINCTION = 1 << 2  # E(B-V) missing
FLAG_NO_RESULT = 1 << 11  # the spectrum could not be loaded or processed

FLAG_NAMES = {
    FLAG_FAKEMAG_UNRELIABLE: "flag_fakemag_unreliable",
    FLAG_MISSING_PHOTOMETRY: "flag_missing_photometry",
    FLAG_MISSING_EXTINCTION: "flag_missing_extinction",
    FLAG_NO_RESULT: "flag_no_result",
}
"""result_flags bit -> the name of its boolean column."""

FLAG_MEANINGS = {
    FLAG_FAKEMAG_UNRELIABLE: "fakemag unreliable: L_fakemag_err >= 0.2 L_fakemag",
    FLAG_MISSING_PHOTOMETRY: "missing photometry: no 2MASS Ks (0 used)",
    FLAG_MISSING_EXTINCTION: "missing extinction: no E(B-V) (0 used)",
    FLAG_NO_RESULT: "no result: the spectrum could not be loaded or processed",
}
"""result_flags bit -> what it means (exports write these beside the bits)."""

WARN_MASK = FLAG_MISSING_EXTINCTION
"""flag_warn = result_flags & WARN_MASK != 0."""
BAD_MASK = FLAG_FAKEMAG_UNRELIABLE | FLAG_MISSING_PHOTOMETRY | FLAG_NO_RESULT
"""flag_bad = result_flags & BAD_MASK != 0."""

# -- names ------------------------------------------------------------------------------------

QUEUE = "astronn_dist"
TASK_NAME = "astronn_dist.process"
TABLE_NAME = "astro_nn_dist"
UNACKED_KEY = "unacked"
"""kombu's Redis hash of messages delivered and not yet acknowledged (its default ``unacked_key``)."""

# -- limits of a message ----------------------------------------------------------------------

MAX_CHUNK = 1000
"""Most spectra in one message. A chunk is one batch in memory (about 8575 x 8 B x 4 arrays, plus
the (N, 7514) network input and MC activations), and one unit of redelivery: bigger chunks are
slower to redo after a worker dies. The producer's usual size is a few hundred."""
MAX_ID_CHARS = 256
"""Longest spectrum_id (the results table's key column is VARCHAR of this length)."""
MAX_PATH_CHARS = 4096
"""Longest path (PATH_MAX on Linux)."""

# -- pixels -----------------------------------------------------------------------------------

N_PIXELS = 8575
"""Pixels of the apStar log-lambda grid (log10 lambda = 4.179 + 6e-6 i)."""
N_NORMALIZED = 7514
"""Pixels after the chip gaps are removed: the continuum-normalized spectrum, the network input."""
