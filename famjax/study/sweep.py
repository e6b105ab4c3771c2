"""Runs a plan, or task i's share of it, each run in STUDY/runs/RUN_ID/: alone or in cohorts
(famjax.study.units), in this process or in workers side by side (famjax.study.workers).

Idempotent and resumable: a run whose records say it finished is skipped, an interrupted one
resumes from its checkpoints, and a run that fails is recorded as failed (its error in its
records and error.txt) while the sweep goes on; the next sweep tries it again. Beyond one machine
famjax schedules nothing itself: `num_tasks` launchers (a SLURM array, a Kubernetes Indexed Job)
each run their `task_index` share, all writing to one shared study directory; a run held by
another process (its workdir lock) is left to it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import jax
from tqdm.auto import tqdm

from famjax import data
from famjax.common.files import atomic_write_text
from famjax.study import isoflop, records, units
from famjax.study.config import ExecutionConfig
from famjax.study.units import run_dir
from famjax.study.workers import default_cohort_size, default_workers, train_in_workers
from famjax.train.config import config_hash

PLAN = "plan.json"
ONE_AT_A_TIME = ExecutionConfig(workers=1, cohort_size=1)


@dataclasses.dataclass
class SweepOutcome:
  trained: list[str] = dataclasses.field(default_factory=list)
  skipped: list[str] = dataclasses.field(default_factory=list)  # finished before this sweep
  failed: dict[str, str] = dataclasses.field(default_factory=dict)  # run id -> error
  busy: dict[str, str] = dataclasses.field(default_factory=dict)  # run id -> lock holder


def write_plan(study_dir: str | Path, plan: isoflop.StudyPlan, extra: dict | None = None) -> None:
  """STUDY/plan.json: every planned run (the plan table's fields), what was dropped and why.
  A study directory holding a plan with other runs is refused: use a new directory."""
  record = {**plan.describe(), **(extra or {})}
  previous = read_plan(study_dir)
  if previous is not None:
    old = {r["run_id"]: r["config_hash"] for r in previous["runs"]}
    new = {r["run_id"]: r["config_hash"] for r in record["runs"]}
    if old != new:
      changed = sorted(set(old.items()) ^ set(new.items()))[:3]
      raise ValueError(f"{study_dir} holds a study with another plan (runs differ, e.g. "
                       f"{[c[0] for c in changed]}); use a new study directory")
  if jax.process_index() == 0:
    atomic_write_text(Path(study_dir) / PLAN, json.dumps(record, indent=1))


def read_plan(study_dir: str | Path) -> dict | None:
  path = Path(study_dir) / PLAN
  return json.loads(path.read_text()) if path.exists() else None


def run(plan: isoflop.StudyPlan, study_dir: str | Path, *, task_index: int = 0, num_tasks: int = 1,
        tokens: data.TokenData | None = None,
        on_finished: Callable[[isoflop.RunSpec, list[dict]], None] | None = None,
        progress: bool = True, execution: ExecutionConfig = ONE_AT_A_TIME) -> SweepOutcome:
  """Trains this task's share of the plan; on_finished(spec, records) after each run trained.
  execution.workers > 1 trains that many units at once in worker processes
  (famjax.study.workers); execution.cohort_size > 1 trains up to that many runs of one shape as
  one program (famjax.train.cohort); 0 picks either by backend."""
  workers = execution.workers or default_workers()
  cohort_size = execution.cohort_size or default_cohort_size()
  share = plan.share(task_index, num_tasks)
  outcome = SweepOutcome()
  if not share:
    return outcome
  data_cfg = share[0].experiment.data
  if any(r.experiment.data != data_cfg for r in share):
    raise ValueError("every run of a plan must read the same data config")
  tokens = data.load_tokens(data_cfg) if tokens is None else tokens
  pending = []
  for spec in share:
    if records.finished(run_dir(study_dir, spec.run_id), config_hash(spec.experiment)):
      outcome.skipped.append(spec.run_id)
    else:
      pending.append(spec)
  work = units.form_units(pending, cohort_size)
  bar = tqdm(total=len(pending), desc=f"sweep {task_index + 1}/{num_tasks}", unit="run",
             disable=not progress, dynamic_ncols=True)
  if min(workers, len(work)) > 1:
    bar.set_postfix_str(f"{min(workers, len(work))} workers")
    stream = train_in_workers(work, study_dir, data_cfg, workers, tokens.fingerprint)
  else:
    stream = _here(work, study_dir, tokens, bar)
  for result in stream:
    bar.update(1)
    if result.status == units.BUSY:
      outcome.busy[result.run_id] = result.detail
      tqdm.write(f"{result.run_id}: skipped, in use by {result.detail}")
    elif result.status == units.FAILED:
      outcome.failed[result.run_id] = result.detail
      tqdm.write(f"{result.run_id}: FAILED ({result.detail.splitlines()[0][:300]}); see "
                 f"{run_dir(study_dir, result.run_id) / 'error.txt'}")
    else:
      outcome.trained.append(result.run_id)
      tqdm.write(result.detail)
      if on_finished is not None:
        on_finished(plan.run(result.run_id), result.records)
  bar.close()
  return outcome


def _here(work, study_dir, tokens, bar):
  """The units trained in this process, one after another."""
  for unit in work:
    bar.set_postfix_str(",".join(spec.run_id for spec in unit)[:80])
    yield from units.train_unit(unit, study_dir, tokens)
