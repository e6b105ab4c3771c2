"""Downstream evaluation of a family's exits. `famjax.evaluation.harness` is an
lm-evaluation-harness model (the `eval` extra); `famjax.evaluation.scoring` the compiled scoring
it runs, which needs no harness."""
