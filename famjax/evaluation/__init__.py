"""Downstream evaluation of a family's exits: an lm-evaluation-harness model (harness.py, the
`eval` extra) and the compiled scoring it runs (scoring.py), every exit of a run on the harness's
tasks (runner.py), a local task small models can score (tasks.py), and loss against accuracy over
a study: the sigmoid link (accuracy_link.py) fitted across its runs (study_link.py)."""
