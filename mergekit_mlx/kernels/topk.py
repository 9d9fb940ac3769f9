"""What every exact magnitude selection shares: its result and the sampled bracket.

The rule (every backend follows it): |x| is compared as float32 bit patterns (NaN above inf); the
k largest are kept, ties at the threshold lowest flat index first. A selection is (t, cut): keep
bits > t, and bits == t at a flat index <= cut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

SIGMAS = 6.0  # bracket half-width in binomial standard deviations of the sampled rank
SLACK = 4.0  # and this many sample positions more


@dataclass
class Selection:
    """The exact top-k of one flat tensor: keep bits > t, and bits == t at flat index <= cut."""

    t: mx.array  # uint32 scalar: bit pattern of the k-th largest |x|
    cut: mx.array  # uint32 scalar: last flat index whose tie at t is kept


def bracket(n: int, k: int, s: int) -> tuple[int, int, int]:
    """Positions (lo, hi) in an ascending sample of s of the n values that hold the k-th largest
    between them, and open-side flags (1: no lower bound, 2: no upper bound): the k-th lies there
    unless the sampled rank is off by more than SIGMAS binomial standard deviations (then the
    caller's exact fallback runs). The CPU and the GPU selections take their brackets here."""
    q = k / n
    centre = (n - k) * s / n
    half = SIGMAS * math.sqrt(s * q * (1.0 - q)) + SLACK
    lo, hi, flags = math.floor(centre - half), math.ceil(centre + half), 0
    if lo <= 0:
        lo, flags = 0, flags | 1
    if hi >= s - 1:
        hi, flags = s - 1, flags | 2
    return lo, hi, flags


def tie_chunk(counts: np.ndarray, need: int) -> tuple[int, int]:
    """The chunk that holds the need-th tie (need >= 1), from the ties each chunk holds in index
    order, and how many ties lie before that chunk."""
    cum = np.cumsum(np.asarray(counts, dtype=np.int64))
    j = int(np.count_nonzero(cum < need))
    return j, int(cum[j - 1]) if j > 0 else 0
