"""Timing for the course's speed comparisons: medians of alternating runs on a shared machine."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(
    fns: dict[str, Callable[[], object]], repeats: int = 15, warmup: int = 2
) -> dict[str, float]:
    """Median wall time in seconds of each function, measured side by side: the functions alternate inside
    every repeat (and the order flips each time), so a slow moment of a shared machine hits all of them."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
