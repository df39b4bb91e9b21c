"""Statistics of per-token ratios: exact for small runs, a mergeable log-histogram sketch for large ones.

``RatioAccumulator`` keeps every value while the total stays under
``exact_limit`` (then quantiles are exact, numpy's linear interpolation) and
always keeps a fine log-spaced histogram: ``BINS_PER_DECADE`` bins per decade
over ``[LOW, HIGH]``. Once the raw values are dropped, quantiles come from the
histogram: the true quantile lies in the reported bin, and the reported value
(the bin's geometric centre) is within a factor ``10 ** (0.5 / BINS_PER_DECADE)``
of it (``SKETCH_RELATIVE_ERROR``, about 0.58 % at 200 bins per decade). Values
below ``LOW`` fall in the first bin, above ``HIGH`` in the last. Histograms of
two accumulators add, so shards and hosts merge exactly.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

LOW, HIGH, BINS_PER_DECADE = 1e-6, 1e3, 200
EDGES = np.logspace(np.log10(LOW), np.log10(HIGH), int(round(np.log10(HIGH / LOW))) * BINS_PER_DECADE + 1)
SKETCH_RELATIVE_ERROR = float(10 ** (0.5 / BINS_PER_DECADE) - 1)
QUANTILES = {"p10": 0.10, "median": 0.50, "p90": 0.90}


def histogram_bins(values: np.ndarray) -> np.ndarray:
    """The histogram bin of each value (below ``LOW``: the first, above ``HIGH``: the last)."""
    return np.clip(np.searchsorted(EDGES, values, side="right") - 1, 0, len(EDGES) - 2)


class RatioAccumulator:
    """Count, sum, histogram and (while small) the raw values of one stream of ratios."""

    def __init__(self, exact_limit: int = 5_000_000):
        self.exact_limit = exact_limit
        self.count = 0
        self.total = 0.0
        self.hist = np.zeros(len(EDGES) - 1, np.int64)
        self._raw: Optional[List[np.ndarray]] = []

    def add(self, values: np.ndarray, bins: Optional[np.ndarray] = None) -> None:
        """Add ``values``; ``bins``: their histogram bins (``histogram_bins(values)``) when already known."""
        values = np.asarray(values, np.float64).ravel()
        self.count += values.size
        self.total += float(values.sum())
        idx = histogram_bins(values) if bins is None else np.asarray(bins).ravel()
        self.hist += np.bincount(idx, minlength=len(self.hist))
        if self._raw is not None:
            self._raw.append(values.astype(np.float32))
            if self.count > self.exact_limit:
                self._raw = None

    def merge(self, other: "RatioAccumulator") -> "RatioAccumulator":
        self.count += other.count
        self.total += other.total
        self.hist += other.hist
        if self._raw is None or other._raw is None or self.count > self.exact_limit:
            self._raw = None
        else:
            self._raw.extend(other._raw)
        return self

    @property
    def exact(self) -> bool:
        return self._raw is not None

    def raw(self) -> np.ndarray:
        if self._raw is None:
            raise ValueError("raw values were dropped past exact_limit; raise it or use the histogram")
        return np.concatenate(self._raw) if self._raw else np.zeros(0, np.float32)

    def quantile(self, q: float) -> float:
        if self.count == 0:
            return float("nan")
        if self.exact:
            return float(np.quantile(self.raw().astype(np.float64), q))
        rank = q * (self.count - 1)
        b = int(np.searchsorted(np.cumsum(self.hist), rank, side="right"))
        return float(np.sqrt(EDGES[b] * EDGES[b + 1]))

    def summary(self) -> Dict[str, float]:
        out = {"count": self.count, "mean": self.total / self.count if self.count else float("nan")}
        if self.exact and self.count:  # the raw values joined and partitioned once for all quantiles
            values = np.quantile(self.raw().astype(np.float64), list(QUANTILES.values()))
            out.update({name: float(v) for name, v in zip(QUANTILES, values)})
        else:
            out.update({name: self.quantile(q) for name, q in QUANTILES.items()})
        out["exact"] = self.exact
        if not self.exact:
            out["relative_error_bound"] = SKETCH_RELATIVE_ERROR
        return out

    def coarse_histogram(self, bins_per_decade: int = 10) -> Dict[str, list]:
        """The histogram re-binned for plots and JSON: ``{"edges": [...], "counts": [...]}``."""
        step = BINS_PER_DECADE // bins_per_decade
        counts = self.hist.reshape(-1, step).sum(1)
        nz = np.flatnonzero(counts)
        if nz.size == 0:
            return {"edges": [], "counts": []}
        lo, hi = nz[0], nz[-1] + 1
        return {"edges": EDGES[::step][lo:hi + 1].tolist(), "counts": counts[lo:hi].tolist()}
