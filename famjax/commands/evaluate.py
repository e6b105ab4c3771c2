"""Evaluates every exit of a trained family on lm-evaluation-harness tasks:
famjax evaluate --workdir=W --tasks=TASK[,TASK] [--exits=all|1,3]
[--include_path=DIR] [--limit=N] [--confidence=0.9] [--speculative_exit=1].

Writes W/eval/results.json (the harness's results per exit and strategy), W/eval/table.md (tasks
x exits, with the harness's standard errors) and W/eval/tasks_by_exit.png.

With --study=DIR instead of --workdir: every finished run of the study, each exit, then a link
from validation loss to each task's accuracy fitted across them, checked on held-out runs, and
the study's laws turned into predicted accuracy: DIR/eval/link.md, link.json, link.png and
points.csv (a rerun skips runs already evaluated on the same tasks). Needs the `eval` extra
(lm-eval). Nothing is downloaded here: a hub task needs its dataset in the datasets cache first
(run it once where the network reaches the hub, or set HF_DATASETS_CACHE to a copied cache);
local tasks (--include_path, task YAML with local data files) need nothing.
"""

from pathlib import Path

from absl import flags, logging

from famjax.commands import common

PRESET = None  # `famjax evaluate` takes no --config

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run's workdir.")
_STUDY = flags.DEFINE_string("study", None, "A study directory: every finished run, and the "
                             "loss-to-accuracy link across them.")
_TASKS = flags.DEFINE_list("tasks", None, "Harness task names.", required=True)
_EXITS = flags.DEFINE_string("exits", "all", "'all' or exits (1..G), comma-separated.")
_INCLUDE = flags.DEFINE_string("include_path", None, "A directory of local task YAML files.")
_LIMIT = flags.DEFINE_float("limit", None, "At most this many documents per task (or a share, "
                            "if below 1): a quick look.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Requests per compiled batch.", lower_bound=1)
_CONFIDENCE = flags.DEFINE_float("confidence", 0.0, "Also evaluate confidence exits at this "
                                 "threshold (generation tasks; 0: skip).")
_SPECULATIVE = flags.DEFINE_integer("speculative_exit", 0, "Also evaluate self-speculative "
                                    "decoding drafting with this exit (0: skip).")
_LINK_METRIC = flags.DEFINE_string("link_metric", "acc", "--study: the task metric the link "
                                   "predicts.")
_LINK_FLOOR = flags.DEFINE_float("link_floor", None, "--study: the metric's value at infinite "
                                 "loss (chance, e.g. 0.25 for four choices), in [0, 1); default: "
                                 "fitted.")
flags.register_multi_flags_validator(
    ["workdir", "study"], lambda v: (v["workdir"] is None) != (v["study"] is None),
    "give exactly one of --workdir (one run) and --study (every finished run of a study)")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  common.use_compilation_cache()
  try:
    from famjax.evaluation import runner
  except ModuleNotFoundError as e:
    raise ValueError(f"{e.name} is missing: install the eval extra (pip install -e "
                     "'.[eval]')") from None
  exits = None if _EXITS.value == "all" else [int(g) for g in _EXITS.value.split(",")]
  strategies = []
  if _CONFIDENCE.value:
    strategies.append({"strategy": "confidence", "threshold": _CONFIDENCE.value})
  if _SPECULATIVE.value:
    strategies.append({"strategy": "speculative", "draft_exit": _SPECULATIVE.value})
  limit = None if _LIMIT.value is None else (int(_LIMIT.value) if _LIMIT.value >= 1
                                             else _LIMIT.value)
  options = {"include_path": _INCLUDE.value, "limit": limit, "batch_size": _BATCH.value}
  if _STUDY.value:
    if exits or strategies:
      raise ValueError("--study evaluates every exit: --exits, --confidence and "
                       "--speculative_exit are for one --workdir")
    from famjax.evaluation import study_link
    study_link.evaluate_study(_STUDY.value, _TASKS.value, options, metric=_LINK_METRIC.value,
                         floor=_LINK_FLOOR.value)
    out = Path(_STUDY.value) / runner.EVAL_DIR
    print((out / "link.md").read_text())
    print(f"link: {out / 'link.json'}, points: {out / 'points.csv'}, plot: {out / 'link.png'}")
    return
  runner.evaluate(_WORKDIR.value, _TASKS.value, exits, tuple(strategies), options)
  out = Path(_WORKDIR.value) / runner.EVAL_DIR
  print((out / "table.md").read_text())
  print(f"results: {out / 'results.json'}, plot: {out / 'tasks_by_exit.png'}")

