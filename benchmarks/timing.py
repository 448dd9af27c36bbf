"""Timing helpers shared by the benchmark scripts (imported as a sibling module)."""
from __future__ import annotations

import resource
import statistics
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


def interleaved(runners: dict, reps: int, warmup: int = 1) -> tuple[dict, dict]:
  """Best wall time of each runner over `reps` rounds; every round calls every runner once, so
  a slow phase of a shared machine hits all sides alike instead of whichever ran then. Also
  returns each runner's median count of minor page faults per call (getrusage)."""
  for fn in runners.values():
    for _ in range(warmup):
      fn()
  best = {k: float("inf") for k in runners}
  faults = {k: [] for k in runners}
  for _ in range(reps):
    for k, fn in runners.items():
      f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      t0 = time.perf_counter()
      fn()
      best[k] = min(best[k], time.perf_counter() - t0)
      faults[k].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
  return best, {k: int(statistics.median(v)) for k, v in faults.items()}


# glibc malloc settings that keep freed memory for reuse: every allocation comes from the one
# main heap (no per-thread arenas, no mmap) and nothing is trimmed back to the OS. By default
# each buffer above 32 MiB is a fresh mmap, so an XLA executable (or a torch step) page-faults
# its large temporaries in again on every call: ~160k minor faults per LoRA step of
# bench_llama. The setting applies to the whole process, so both sides of a comparison get it.
MALLOC_REUSE = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                "glibc.malloc.trim_threshold=68719476736")


def allocator_env(mode: str, argv=None) -> str:
  """Re-execute this script once so glibc reads the allocator tunables for `mode` ("reuse":
  `MALLOC_REUSE`; "default": glibc's own) at start-up, which is the only time it reads them.
  Only a command-line run (`argv` None) is re-executed; a caller passing its own argv keeps
  its process as it is. Returns the GLIBC_TUNABLES value the process runs with."""
  import os
  import sys
  want = MALLOC_REUSE if mode == "reuse" else ""
  if argv is None and os.environ.get("EMO_BENCH_ALLOCATOR") != mode:
    env = dict(os.environ, EMO_BENCH_ALLOCATOR=mode)
    if want:
      env["GLIBC_TUNABLES"] = want
    else:
      env.pop("GLIBC_TUNABLES", None)
    os.execve(sys.executable, [sys.executable] + sys.argv, env)
  return os.environ.get("GLIBC_TUNABLES", "")
