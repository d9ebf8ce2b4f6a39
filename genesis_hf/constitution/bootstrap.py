"""Bootstrap confidence intervals over prompts: is a rate, or its change between two runs, beyond noise?

A rate over 30 or 10 prompts moves a lot with the choice of prompts. Drawing the prompts again with replacement
(`RESAMPLES` times, a fixed seed, so the same scores always give the same interval) and recomputing the statistic
shows that spread; the middle `LEVEL` of the recomputed values is the percentile interval. A change between two runs
on the same prompts is resampled in pairs (one draw picks a prompt for both runs), so that what the prompts share
cancels and the interval is about the runs, not about the prompts.
"""

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

RESAMPLES = 1000
LEVEL = 0.95
SEED = 0

Statistic = Callable[[list[Any]], float | None]


def bootstrap_interval(
    items: Sequence[Any],
    statistic: Statistic,
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = SEED,
) -> tuple[float, float] | None:
    """The `level` percentile interval of `statistic` over `resamples` resamples of `items` (with replacement).

    Resamples where `statistic` is `None` (a share of refusals when a resample holds none) are left out; `None` when
    `items` is empty or every resample is.
    """
    items = list(items)
    if not items:
        return None
    rng = random.Random(seed)
    count = len(items)
    values = []
    for _ in range(resamples):
        value = statistic([items[rng.randrange(count)] for _ in range(count)])
        if value is not None:
            values.append(value)
    if not values:
        return None
    values.sort()
    tail = (1 - level) / 2
    low = values[math.floor(tail * len(values))]
    high = values[max(math.ceil((1 - tail) * len(values)) - 1, 0)]
    return round(low, 4), round(high, 4)


def paired_difference(
    pairs: Sequence[tuple[Any, Any]], statistic: Statistic, **options
) -> tuple[float | None, tuple[float, float] | None]:
    """`statistic(after) - statistic(before)` over `(before, after)` pairs (one per prompt) and its paired interval."""

    def difference(sample: list[tuple[Any, Any]]) -> float | None:
        before = statistic([first for first, _ in sample])
        after = statistic([second for _, second in sample])
        return None if before is None or after is None else after - before

    value = difference(list(pairs)) if pairs else None
    return (None if value is None else round(value, 4)), bootstrap_interval(pairs, difference, **options)


def excludes_zero(interval: tuple[float, float] | None) -> bool:
    """Whether an interval of a difference lies wholly on one side of 0 (the change is beyond the resampling noise)."""
    return interval is not None and (interval[0] > 0 or interval[1] < 0)
