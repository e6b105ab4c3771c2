"""Runs a plan, or task i's share of it, one loop.train per run in STUDY/runs/RUN_ID/.

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
import time
import traceback
from pathlib import Path
from typing import Callable

import jax
from tqdm.auto import tqdm

from famjax import data
from famjax.common.files import WorkdirBusy, atomic_write_text
from famjax.study import isoflop, records
from famjax.train import loop
from famjax.train.config import config_hash

PLAN = "plan.json"


@dataclasses.dataclass
class SweepOutcome:
  trained: list[str] = dataclasses.field(default_factory=list)
  skipped: list[str] = dataclasses.field(default_factory=list)  # finished before this sweep
  failed: dict[str, str] = dataclasses.field(default_factory=dict)  # run id -> error
  busy: dict[str, str] = dataclasses.field(default_factory=dict)  # run id -> lock holder


def run_dir(study_dir: str | Path, run_id: str) -> Path:
  return Path(study_dir) / "runs" / run_id


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
        progress: bool = True) -> SweepOutcome:
  """Trains this task's share of the plan; on_finished(spec, records) after each run trained."""
  share = plan.share(task_index, num_tasks)
  outcome = SweepOutcome()
  if not share:
    return outcome
  data_cfg = share[0].experiment.data
  if any(r.experiment.data != data_cfg for r in share):
    raise ValueError("every run of a plan must read the same data config")
  tokens = data.load_tokens(data_cfg) if tokens is None else tokens
  bar = tqdm(share, desc=f"sweep {task_index + 1}/{num_tasks}", unit="run", disable=not progress,
             dynamic_ncols=True)
  for spec in bar:
    workdir = run_dir(study_dir, spec.run_id)
    if records.finished(workdir, config_hash(spec.experiment)):
      outcome.skipped.append(spec.run_id)
      continue
    bar.set_postfix_str(spec.run_id)
    began = time.perf_counter()
    try:
      summary = loop.train(spec.experiment, workdir, tokens=tokens)
    except WorkdirBusy as e:
      outcome.busy[spec.run_id] = e.holder
      tqdm.write(f"{spec.run_id}: skipped, in use by {e.holder}")
      continue
    except Exception as e:  # recorded, and the sweep goes on; KeyboardInterrupt stops it
      error = f"{type(e).__name__}: {e}"
      outcome.failed[spec.run_id] = error
      tqdm.write(f"{spec.run_id}: FAILED ({error.splitlines()[0][:300]}); see "
                 f"{workdir / 'error.txt'}")
      if jax.process_index() == 0:
        atomic_write_text(workdir / "error.txt", traceback.format_exc())
        records.write_records(workdir, records.run_records(
            spec, None, fingerprint=tokens.fingerprint, wall_seconds=time.perf_counter() - began,
            error=error))
      continue
    run_records = records.run_records(spec, summary, fingerprint=tokens.fingerprint,
                                      wall_seconds=summary["train_seconds"])
    if jax.process_index() == 0:
      records.write_records(workdir, run_records)
    outcome.trained.append(spec.run_id)
    losses = " ".join(f"{x:.3f}" for x in summary["val_loss"])
    tqdm.write(f"{spec.run_id}: val loss {losses} ({time.perf_counter() - began:.1f} s)")
    if on_finished is not None:
      on_finished(spec, run_records)
  bar.close()
  return outcome
