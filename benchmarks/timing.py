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


# glibc malloc settings that keep freed memory for reuse: every allocation comes from the one
# main heap (no per-thread arenas, no mmap) and nothing is trimmed back to the OS. By default
# each buffer above 32 MiB is a fresh mmap, so an XLA executable (or a torch step) page-faults
# its large temporaries in again on every call: ~160k minor faults per LoRA step of
# bench_llama. The setting applies to the whole process, so both sides of a comparison get it.
MALLOC_REUSE = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                "glibc.malloc.trim_threshold=68719476736")


def allocator_env(mode: str) -> str:
  """Re-execute this script once so glibc reads the allocator tunables for `mode` ("reuse":
  `MALLOC_REUSE`; "default": glibc's own) at start-up, which is the only time it reads them.
  Returns the GLIBC_TUNABLES value the process runs with."""
  import os
  import sys
  want = MALLOC_REUSE if mode == "reuse" else ""
  if os.environ.get("EMO_BENCH_ALLOCATOR") != mode:
    env = dict(os.environ, EMO_BENCH_ALLOCATOR=mode)
    if want:
      env["GLIBC_TUNABLES"] = want
    else:
      env.pop("GLIBC_TUNABLES", None)
    os.execve(sys.executable, [sys.executable] + sys.argv, env)
  return os.environ.get("GLIBC_TUNABLES", "")
