"""Paired per-image statistics for benchmark claims: the mean difference and its 95 % t-interval."""
from __future__ import annotations

import math
from collections.abc import Sequence


def paired(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean of a_i - b_i over images with its two-sided ``level`` Student-t interval (n - 1 degrees of freedom).

    >>> r = paired([2.0, 3.0, 4.0], [1.0, 1.0, 1.0])
    >>> round(r["mean"], 3), round(r["lo"], 3), round(r["hi"], 3), r["n"]
    (2.0, -0.484, 4.484, 3)
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired differences need two equally long, non-empty lists, got {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    if n == 1:
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "sd": math.nan, "n": 1}
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    from scipy.stats import t as student_t

    half = float(student_t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "sd": sd, "n": n}
