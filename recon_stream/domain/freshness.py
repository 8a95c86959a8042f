"""How old the evidence behind open exposures is: the freshness figure users watch.

`observation_ages` turns Shodan's per-port timestamps of the open critical exposures
into the ages of their median, 90th percentile and oldest observation (the
`recon_critical_observation_age_seconds` gauge). Quantiles are the nearest rank: an
age someone's exposure really has, never an interpolation between two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime

QUANTILES = (0.5, 0.9, 1.0)


def observation_ages(observed: Sequence[datetime], now: datetime) -> dict[str, float]:
    """{"0.5": seconds, "0.9": seconds, "1": seconds} over `observed` (any order); all 0
    when there is none (no open critical exposure is old). Future timestamps count as 0."""
    ages = sorted((max(0.0, (now - at).total_seconds()) for at in observed), reverse=True)
    figures: dict[str, float] = {}
    for quantile in QUANTILES:
        label = f"{quantile:g}"
        if not ages:
            figures[label] = 0.0
            continue
        # Nearest rank from the youngest: the q-quantile age is the ceil(q*n)-th youngest.
        rank = max(1, math.ceil(quantile * len(ages)))
        figures[label] = ages[len(ages) - rank]
    return figures
