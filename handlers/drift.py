"""Drift of a model's inputs from its training data (docs/signature.md, "reference").

Each input kind reduces a batch of model rows to a few statistics per row (kinds.py's
`statistics`): an image, its mean intensity and its ink fraction after framing; a features
row, each feature; a variable-length tensor, its length. Export bins the training split's
statistics at their quintiles and stores the edges and the share of training rows in each bin
(`reference_of`); a worker keeps a running, decayed histogram of what it is sent over the same
edges (`Sketch`) and scores the two with the population stability index:

    PSI = sum over bins of (a - e) * ln(a / e)

where a and e are the served and training shares of a bin, each floored at FLOOR so that an
empty bin counts as rare, not as infinitely surprising. 0.1 is read as a small shift, 0.25 as
a large one (the usual rule of thumb, and Kiln's alert threshold).

Pure numpy: export and the handler call the same functions on the same graph rows, so that a
request whose rows look like the training rows scores near 0 by construction.
"""

import numpy as np

# Quintiles: each bin holds a fifth of the training rows (fewer bins where values tie). Ten
# bins doubled the scores' sampling noise: binary's 114 test rows, against its 398 training
# rows, scored up to 0.29 on some feature (over THRESHOLD) with ten, 0.12 with five.
BINS = 5
# The sketch forgets with weight (1 - 1/WINDOW_ROWS) per row: its histogram is that of about
# the last WINDOW_ROWS rows, so a score follows a change within a few hundred requests.
WINDOW_ROWS = 500
# No score before a worker has seen this many rows: 100 rows of the training distribution itself
# score about (BINS - 1) / 100 = 0.04 by sampling noise alone, well under THRESHOLD.
MIN_ROWS = 100
FLOOR = 1e-4
THRESHOLD = 0.25  # deploy/prometheus/alerts.yml's KilnInputDrift fires over it


def reference_of(values, bins=BINS):
    """The reference of one statistic from its training values (float64 [N]): mean, spread,
    quantile edges and the share of rows in each of the len(edges) + 1 bins."""
    values = np.asarray(values, dtype=np.float64)
    edges = np.unique(np.quantile(values, np.arange(1, bins) / bins))
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return {"mean": float(values.mean()), "std": float(values.std()),
            "edges": edges.tolist(), "ratios": (counts / len(values)).tolist()}


def check_reference(reference, where="reference"):
    """Raises ValueError naming what is wrong with a signature's reference statistics."""
    if not isinstance(reference, dict):
        raise ValueError(f"{where} must be an object, got {reference!r}")
    for name, stats in (reference.get("inputs") or {}).items():
        for stat, ref in stats.items():
            edges, ratios = ref.get("edges"), ref.get("ratios")
            if (not isinstance(edges, list) or not isinstance(ratios, list)
                    or len(ratios) != len(edges) + 1 or edges != sorted(edges)):
                raise ValueError(f"{where}.inputs.{name}.{stat} needs sorted edges and one more "
                                 f"ratio than edges, got {ref!r}")
    labels = reference.get("labels")
    if labels is not None and not isinstance(labels, dict):
        raise ValueError(f"{where}.labels must be an object of label: share, got {labels!r}")


def psi(actual, expected):
    """The population stability index of each row of shares against `expected` ([S, B])."""
    a = np.maximum(actual, FLOOR)
    e = np.maximum(expected, FLOOR)
    return ((a - e) * np.log(a / e)).sum(axis=-1)


class Sketch:
    """One input's running histogram of each statistic, over its reference's bins."""

    def __init__(self, reference):
        self.names = list(reference)
        widest = max(len(ref["edges"]) for ref in reference.values())
        # Padded with +inf: a statistic with fewer edges never reaches the padded bins.
        self.edges = np.full((len(self.names), widest), np.inf)
        self.expected = np.zeros((len(self.names), widest + 1))
        for i, ref in enumerate(reference.values()):
            self.edges[i, :len(ref["edges"])] = ref["edges"]
            self.expected[i, :len(ref["ratios"])] = ref["ratios"]
        self.offsets = np.arange(len(self.names)) * (widest + 1)
        self.counts = np.zeros_like(self.expected)
        self.flat = self.counts.reshape(-1)  # a view: adding to it adds to counts
        self.weight = 0.0  # the decayed count of rows, the histogram's total
        self.rows = 0
        self.keep = 1.0 - 1.0 / WINDOW_ROWS

    def add(self, values):
        """Adds rows of statistics ([N, S], in `names` order)."""
        n = len(values)
        if not n:
            return
        # A statistic's bin: how many of its edges the value reaches (searchsorted's "right").
        bins = (values[:, :, np.newaxis] >= self.edges).sum(axis=2, dtype=np.intp)
        decay = self.keep ** n
        self.counts *= decay
        # bincount, not np.add.at: 6 us less a batch.
        self.flat += np.bincount((bins + self.offsets).ravel(), minlength=self.flat.size)
        self.weight = self.weight * decay + n
        self.rows += n

    def scores(self):
        """PSI per statistic against the reference, or None before MIN_ROWS rows."""
        if self.rows < MIN_ROWS:
            return None
        return psi(self.counts / self.weight, self.expected)
