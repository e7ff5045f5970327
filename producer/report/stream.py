"""Accumulators that see the results a block at a time and keep bounded memory.

* :class:`Histogram`: fixed bin edges chosen before the first row; counts are exact, with the
  values below the first edge and above the last counted apart (never dropped silently).
* :class:`Reservoir`: a uniform random sample of at most ``capacity`` items (Algorithm R,
  vectorized per block, seeded: the same rows give the same sample). While fewer than
  ``capacity`` items were seen it holds all of them, in order, so what is computed from it is
  exact; past that it is a sample.
* :class:`BinnedStats`: per bin of an x value, the exact count, the exact 1-sigma coverage
  (share of ``|z| <= 1``) and a :class:`Reservoir` of the offsets and z-scores for the medians
  and the robust scatter (exact up to ``capacity`` per bin, sampled past it).
* :class:`RateCounter`: rows per time interval (the interval grows tenfold whenever more than
  :data:`RateCounter.MAX_BINS` intervals are in use) and rows, spectrum time and first/last
  write per worker host.

Everything here is numpy on arrays of shape (n,) for one block; no database, no plotting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
import numpy as np

SAMPLE_SIZE = 20_000
"""Items a reservoir keeps: a scatter plot of 20,000 points is legible, and a median of 20,000
is known to about 1 % of the spread (sampling error 1.25 sigma / sqrt(n))."""

ONE_SIGMA = 0.682689492137086
"""Share of a normal distribution within 1 sigma of its mean (erf(1/sqrt(2)))."""


class Histogram:
    """Counts of values in fixed bins.

    Args:
        edges: bin edges, increasing, shape (n_bins + 1,). log: edges are in log10 of the
            values (the values are positive quantities such as distances); a value <= 0 is
            counted in ``below``.
    """

    def __init__(self, edges: Sequence[float], log: bool = False) -> None:
        self.edges = np.asarray(edges, dtype=np.float64)
        self.log = log
        self.counts = np.zeros(len(self.edges) - 1, dtype=np.int64)
        self.below = 0
        self.above = 0
        self.missing = 0
        """Values that are NaN or None (no value)."""

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        finite = np.isfinite(values)
        self.missing += int((~finite).sum())
        values = values[finite]
        if self.log:
            positive = values > 0
            self.below += int((~positive).sum())
            values = np.log10(values[positive])
        self.below += int((values < self.edges[0]).sum())
        self.above += int((values > self.edges[-1]).sum())
        counts, _ = np.histogram(values, bins=self.edges)
        self.counts += counts

    @property
    def total(self) -> int:
        """Finite values counted (in bins, below and above)."""
        return int(self.counts.sum()) + self.below + self.above


class Reservoir:
    """A uniform sample of at most ``capacity`` rows of ``width`` values each (float64).

    ``sample`` has shape (min(seen, capacity), width). Exact (every row, in order) while
    ``seen <= capacity``.
    """

    def __init__(self, capacity: int = SAMPLE_SIZE, width: int = 1, seed: int = 0) -> None:
        self.capacity = capacity
        self.width = width
        self.seen = 0
        self._data = np.empty((capacity, width), dtype=np.float64)
        self._rng = np.random.default_rng(seed)

    def add(self, *columns: np.ndarray) -> None:
        rows = np.column_stack([np.asarray(c, dtype=np.float64) for c in columns]).reshape(-1, self.width)
        n = len(rows)
        if not n:
            return
        free = max(0, min(self.capacity - self.seen, n))
        self._data[self.seen : self.seen + free] = rows[:free]
        rest = rows[free:]
        if len(rest):
            # Algorithm R: the t-th row seen (0-based) takes a random slot j < t + 1 if j < capacity.
            t = self.seen + free + np.arange(len(rest))
            slots = (self._rng.random(len(rest)) * (t + 1)).astype(np.int64)
            kept = slots < self.capacity
            self._data[slots[kept]] = rest[kept]
        self.seen += n

    @property
    def exact(self) -> bool:
        """Whether the sample holds every row seen."""
        return self.seen <= self.capacity

    @property
    def sample(self) -> np.ndarray:
        return self._data[: min(self.seen, self.capacity)]


def robust_sigma(values: np.ndarray) -> float:
    """1.4826 x the median absolute deviation: the standard deviation of a normal
    distribution, unmoved by outliers. NaN for no values."""
    if not len(values):
        return float("nan")
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


@dataclass
class BinStats:
    """The numbers of one bin (or of all rows): what the report shows."""

    label: str
    n: int
    coverage: float
    """Share of rows with |z| <= 1 (exact); expect 0.683 for honest 1-sigma errors."""
    median_offset: float
    """Median of the fractional offsets (exact when ``exact``)."""
    median_z: float
    scatter: float
    """Robust scatter (1.4826 MAD) of the fractional offsets."""
    exact: bool
    """Whether the medians and the scatter used every row (else a uniform sample)."""


class BinnedStats:
    """Coverage, median offset and scatter of (offset, z) pairs, per bin of x and over all.

    Args:
        edges: bin edges of x, increasing; values outside go to the first / last bin (the
            edges may be -inf / inf). unit: what x is, for the bin labels.
    """

    def __init__(self, edges: Sequence[float], unit: str = "", capacity: int = SAMPLE_SIZE, seed: int = 0) -> None:
        self.edges = np.asarray(edges, dtype=np.float64)
        self.unit = unit
        n_bins = len(self.edges) - 1
        self.n = np.zeros(n_bins + 1, dtype=np.int64)  # the last: x unknown
        self.inside = np.zeros(n_bins + 1, dtype=np.int64)
        self.samples = [Reservoir(capacity, 2, seed + i) for i in range(n_bins + 1)]
        self.all = Reservoir(capacity, 2, seed + 1000)
        self.all_n = 0
        self.all_inside = 0

    def add(self, x: np.ndarray, offset: np.ndarray, z: np.ndarray) -> None:
        """Rows with finite offset and z; x may be NaN (its own bin, "unknown")."""
        x, offset, z = (np.asarray(v, dtype=np.float64) for v in (x, offset, z))
        ok = np.isfinite(offset) & np.isfinite(z)
        x, offset, z = x[ok], offset[ok], z[ok]
        inside = np.abs(z) <= 1.0
        self.all_n += len(z)
        self.all_inside += int(inside.sum())
        self.all.add(offset, z)
        n_bins = len(self.edges) - 1
        which = np.clip(np.searchsorted(self.edges, x, side="right") - 1, 0, n_bins - 1)
        which[~np.isfinite(x)] = n_bins
        for b in np.unique(which):
            mine = which == b
            self.n[b] += int(mine.sum())
            self.inside[b] += int(inside[mine].sum())
            self.samples[b].add(offset[mine], z[mine])

    def _label(self, b: int) -> str:
        if b == len(self.edges) - 1:
            return "unknown"
        lo, hi = self.edges[b], self.edges[b + 1]
        unit = f" {self.unit}" if self.unit else ""
        if not np.isfinite(lo):
            return f"< {hi:g}{unit}"
        if not np.isfinite(hi):
            return f">= {lo:g}{unit}"
        return f"{lo:g} - {hi:g}{unit}"

    @staticmethod
    def _stats(label: str, n: int, inside: int, sample: Reservoir) -> BinStats:
        values = sample.sample
        median = float(np.median(values[:, 0])) if len(values) else float("nan")
        median_z = float(np.median(values[:, 1])) if len(values) else float("nan")
        return BinStats(label, n, inside / n if n else float("nan"), median, median_z,
                        robust_sigma(values[:, 0]), sample.exact)

    def overall(self) -> BinStats:
        return self._stats("all", self.all_n, self.all_inside, self.all)

    def bins(self) -> list[BinStats]:
        """The bins that hold rows, in order of x (the unknown-x bin last)."""
        return [self._stats(self._label(b), int(self.n[b]), int(self.inside[b]), self.samples[b])
                for b in range(len(self.n)) if self.n[b]]


@dataclass
class HostStats:
    rows: int = 0
    seconds: float = 0.0
    """Sum of t_elapsed [s]: the time the host spent on its spectra."""
    first: float | None = None
    """Earliest write [s since the Unix epoch, UTC]."""
    last: float | None = None


@dataclass
class RateCounter:
    """Rows per interval of their write time (``created``) and per worker host."""

    MAX_BINS = 5_000
    step_s: int = 1
    """The interval [s]: 1, 10, 100, ... (grows as the span of the rows does)."""
    bins: dict[int, int] = field(default_factory=dict)
    hosts: dict[str, HostStats] = field(default_factory=dict)

    def add(self, seconds: np.ndarray, hosts: Sequence[str | None], t_elapsed: np.ndarray) -> None:
        """seconds: write times [s since the Unix epoch, UTC], t_elapsed [s], shape (n,)."""
        seconds = np.asarray(seconds, dtype=np.float64)
        if not len(seconds):
            return
        keys, counts = np.unique((seconds // self.step_s).astype(np.int64), return_counts=True)
        for key, count in zip(keys.tolist(), counts.tolist()):
            self.bins[key] = self.bins.get(key, 0) + count
        while len(self.bins) > self.MAX_BINS:
            self.step_s *= 10
            merged: dict[int, int] = {}
            for key, count in self.bins.items():
                merged[key // 10] = merged.get(key // 10, 0) + count
            self.bins = merged
        t = np.nan_to_num(np.asarray(t_elapsed, dtype=np.float64))
        names, which = np.unique(np.array([h or "(unknown)" for h in hosts], dtype=object), return_inverse=True)
        for i, host in enumerate(names.tolist()):
            mine = np.flatnonzero(which == i)
            stats = self.hosts.setdefault(host, HostStats())
            stats.rows += len(mine)
            stats.seconds += float(t[mine].sum())
            first, last = seconds[mine].min(), seconds[mine].max()
            stats.first = first if stats.first is None else min(stats.first, first)
            stats.last = last if stats.last is None else max(stats.last, last)
