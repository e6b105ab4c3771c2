"""famjax: familial models (one backbone, several exits) trained, measured and fitted in JAX."""

import os

# XLA:CPU's concurrency-optimized scheduler can deadlock a program that runs several loops at once
# (a traced bootstrap stalled within 1-5 executions with it, none in 220 without; jax 0.10.2,
# docs/fitter.md). XLA reads XLA_FLAGS when JAX first computes, so this applies unless a
# computation ran before famjax was imported; an explicit setting in XLA_FLAGS wins.
_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
if _SCHEDULER_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_SCHEDULER_FLAG}=false".strip()
