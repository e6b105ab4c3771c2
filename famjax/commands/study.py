"""The IsoFLOP study: famjax study --config=tiny
--outdir=DIR [--dry_run [--memory]] [--fit_only] [--task_index=i --num_tasks=n]
[--publish=results/NAME].

Plans budgets x granularities x sizes, trains this task's share of the runs (rerunning resumes and
skips finished runs), refits as records arrive and writes DIR/report.md, report.json and plots/.
DIR/config.json remembers the study's config: later runs, other tasks and --fit_only use it
without --config, and refuse a --config that would train other runs.
Logic lives in famjax.pipeline and famjax.study; this file only parses flags and prints.
"""

import contextlib

from absl import flags
from ml_collections import config_flags

from famjax import pipeline
from famjax.analysis import timing
from famjax.commands import common
from famjax.study import publish, saved_config

# the --config preset file and preset that `famjax study` uses when --config is not given
PRESET = ('isoflop.py', 'tiny')

_CONFIG = config_flags.DEFINE_config_file("config", None,
                                          common.config_help("isoflop.py", "tiny", "small"))
_OUTDIR = flags.DEFINE_string("outdir", "runs/isoflop", "Study directory (shared by every task).")
_DRY_RUN = flags.DEFINE_boolean("dry_run", False, "Print the plan, its FLOPs and "
                                "accelerator-hours; train nothing.")
_MEMORY = flags.DEFINE_boolean("memory", False, "With --dry_run: compile every model shape's train "
                              "step for study.memory_devices simulated devices (or, with "
                              "study.memory_target=tpu:GEN:TOPOLOGY, by the TPU compiler for that "
                              "slice) and print the cheapest setting (FSDP, remat, microbatches) "
                              "that fits, the bytes per device and, for TPU, the step's cost.")
_FIT_ONLY = flags.DEFINE_boolean("fit_only", False, "Train nothing: refit and rewrite the report "
                                 "from the records present (other tasks may still be training).")
_TASK_INDEX = flags.DEFINE_integer("task_index", 0, "This task's share of the plan (0-based), e.g. "
                                   "$SLURM_ARRAY_TASK_ID.", lower_bound=0)
_NUM_TASKS = flags.DEFINE_integer("num_tasks", 1, "Tasks sharing the plan, e.g. "
                                  "$SLURM_ARRAY_TASK_COUNT.", lower_bound=1)
_PROFILE = flags.DEFINE_boolean("profile", False, "Print where the analysis spent its time: "
                                "seconds per part, compiling and running, persistent-cache hits.")
_LIVE_FIT = flags.DEFINE_boolean("live_fit", True, "Refit the familial law after every run.")
_PUBLISH = flags.DEFINE_string("publish", None, "After the report, copy the study's config, plan, "
                               "report, fit-ready tables and plots (no checkpoints) into this "
                               "directory, e.g. results/medium.")
_ALLOW_OTHER_CORPORA = flags.DEFINE_boolean("allow_other_corpora", False, "Fit records made on "
                                            "another corpus than the study's.")
flags.adopt_module_key_flags(common)  # --coordinator_address, --num_processes, ...


def main(argv):
  del argv
  common.quiet_logs()
  values = _CONFIG.value.to_dict()
  if _DRY_RUN.value:
    print(pipeline.dry_run(*saved_config.configs(values), with_memory=_MEMORY.value))
    return
  # an existing study runs with its own config (STUDY/config.json), whatever the default preset
  study_cfg, base = saved_config.configs(saved_config.remembered(_OUTDIR.value, values,
                                                   common.given_config_fields()))
  common.use_compilation_cache()
  common.initialize_distributed()
  with timing.Sections() if _PROFILE.value else contextlib.nullcontext() as sections:
    result = pipeline.run(study_cfg, base, _OUTDIR.value,
                          task=pipeline.Task(_TASK_INDEX.value, _NUM_TASKS.value),
                          fit_only=_FIT_ONLY.value, live_fit=_LIVE_FIT.value,
                          allow_other_corpora=_ALLOW_OTHER_CORPORA.value)
  print(pipeline.summary(result, _OUTDIR.value))
  if sections is not None:
    print(sections.table())
  if _PUBLISH.value and result["report"] is not None:
    written = publish.publish(_OUTDIR.value, _PUBLISH.value)
    print(f"published {len(written)} files to {_PUBLISH.value}")

