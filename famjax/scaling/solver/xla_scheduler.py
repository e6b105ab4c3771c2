"""The XLA:CPU scheduler setting the fitter needs, applied when the fitter is imported.

XLA:CPU's concurrency-optimized scheduler can deadlock a program that runs several loops at once
(a traced bootstrap stalled within 1-5 executions with it, none in 220 without; jax 0.10.2,
docs/fitter.md). XLA reads XLA_FLAGS when JAX first computes, so this applies unless a
computation ran before the fitter was imported; an explicit setting in XLA_FLAGS wins.
"""

import os

FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def disable_concurrency_optimized_scheduler() -> None:
  """Adds FLAG=false to XLA_FLAGS unless XLA_FLAGS already sets FLAG."""
  if FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FLAG}=false".strip()
