"""Quality assertions over a distribution of seeds, never one draw.

A training run's last bits differ between CPU kernel paths (AVX2, AVX-512, the portable default), and
training amplifies them: a check of one seed is a coin whose side depends on the machine. Quality
tests therefore run ≥ 10 seeds and assert a median and a pass fraction, with thresholds derived from
the spread measured on more than one kernel path (written beside each test).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def assert_distribution(
    what: str,
    values: Sequence[float],
    *,
    median_at_least: float | None = None,
    median_at_most: float | None = None,
    passes: Sequence[bool] | None = None,
    fraction_at_least: float = 1.0,
) -> None:
    """``values`` (one per seed) have their median on the right side of the bound(s), and at least
    ``fraction_at_least`` of the per-seed ``passes`` hold. The message lists every value."""
    shown = ", ".join(f"{v:.3f}" for v in values)
    median = statistics.median(values)
    if median_at_least is not None:
        assert median >= median_at_least, f"{what}: median {median:.3f} < {median_at_least} over [{shown}]"
    if median_at_most is not None:
        assert median <= median_at_most, f"{what}: median {median:.3f} > {median_at_most} over [{shown}]"
    if passes is not None:
        fraction = sum(passes) / len(passes)
        assert fraction >= fraction_at_least, (
            f"{what}: {sum(passes)}/{len(passes)} seeds pass < {fraction_at_least:.0%} over [{shown}]"
        )
