"""XLA compiler options for each kind of jitted program, chosen per backend.

Only XLA:CPU gets options (every other backend gets None, i.e. XLA's defaults). On CPU, XLA
hands dots to YNNPACK by default (one library call per dot) and compiles everything else with
its own loop emitters. What suits a program depends on its shape:

- training steps (large matmuls surrounded by softmax / norm / activation elementwise work):
  also let YNNPACK run the elementwise and reduce fusions (`train_compiler_options`); this
  made the `benchmarks/bench_llama.py` LoRA step faster on CPU, with equal results (the test
  suite runs with these options).
- decoding ([B, D] x [D, N] matrix-vector products, memory-bound): XLA's own Eigen dots stream
  the weights faster than YNNPACK (`decode_compiler_options`, measured with the bench_llama
  decode).

A caller that writes its own `jax.jit` around a step or a decode passes these as
`compiler_options=`; the library's `jit_train_step` and `generate` already do.
"""
from __future__ import annotations

import jax

_YNN = "xla_cpu_experimental_ynn_fusion_type"
_CPU_TRAIN = {_YNN: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE,"
                    "LIBRARY_FUSION_TYPE_REDUCE"}
_CPU_DECODE = {_YNN: ""}  # no YNNPACK fusions: dots go to XLA's Eigen path


def _for_backend(options: dict, backend: str | None) -> dict | None:
  backend = backend or jax.default_backend()
  return dict(options) if backend == "cpu" else None


def train_compiler_options(backend: str | None = None) -> dict | None:
  """Compiler options for a jitted training (forward + backward) step; None off CPU."""
  return _for_backend(_CPU_TRAIN, backend)


def decode_compiler_options(backend: str | None = None) -> dict | None:
  """Compiler options for a jit that contains decoding; None off CPU."""
  return _for_backend(_CPU_DECODE, backend)
