"""Interleaved micro-timing: the candidate and its anchor are timed in alternating rounds."""

from __future__ import annotations

import statistics
import timeit
from collections.abc import Callable


def per_call_ns(fn: Callable[[], object], number: int) -> float:
    """Nanoseconds a call of ``fn``, the best of a few short repeats."""
    return min(timeit.repeat(fn, number=number, repeat=3)) / number * 1e9


def interleaved(
    candidate: Callable[[], object],
    anchor: Callable[[], object],
    number: int = 20_000,
    rounds: int = 7,
) -> tuple[float, float]:
    """Median per-call nanoseconds of ``candidate`` and ``anchor``, timed alternately."""
    cands, anchors = [], []
    for _ in range(rounds):
        cands.append(per_call_ns(candidate, number))
        anchors.append(per_call_ns(anchor, number))
    return statistics.median(cands), statistics.median(anchors)
