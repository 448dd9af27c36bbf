"""Timing helper shared by the benchmark scripts (imported as a sibling module)."""
from __future__ import annotations

import time


def best_time(fn, reps: int, warmup: int = 1) -> float:
  """Minimum wall time of `fn()` over `reps` calls, after `warmup` untimed calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)
