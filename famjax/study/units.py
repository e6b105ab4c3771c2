"""A sweep's units of work: a run alone, or a cohort of runs of one shape trained as one program
(famjax.train.cohort); training a unit into its runs' workdirs and writing their records, in the
sweep's own process or in a worker's (famjax.study.workers)."""

from __future__ import annotations

import collections
import dataclasses
import math
import time
import traceback
from pathlib import Path

import jax

from famjax import data
from famjax.common.files import WorkdirBusy, atomic_write_text
from famjax.model import sharding
from famjax.study import records
from famjax.study.isoflop import RunSpec
from famjax.train import cohort, loop

TRAINED, FAILED, BUSY = "trained", "failed", "busy"


@dataclasses.dataclass(frozen=True)
class Outcome:
  """What became of one run of a unit."""

  run_id: str
  status: str  # TRAINED, FAILED or BUSY
  detail: str = ""  # TRAINED: the line printed for it; FAILED: the error; BUSY: the lock holder
  records: list[dict] | None = None  # TRAINED: the run's records


def run_dir(study_dir: str | Path, run_id: str) -> Path:
  return Path(study_dir) / "runs" / run_id


def form_units(specs: list[RunSpec], cohort_size: int) -> list[tuple[RunSpec, ...]]:
  """The runs grouped into cohorts of at most cohort_size runs sharing a cohort_key (longest
  runs together, so that a cohort's runs end at similar steps), each other run a unit of its
  own; largest FLOPs first, so that workers taking units in turn stay balanced."""
  groups = collections.defaultdict(list)
  for spec in specs:
    key = cohort.cohort_key(spec.experiment) if cohort_size > 1 and _one_device(spec) else None
    groups[spec.run_id if key is None else key].append(spec)
  units = []
  for members in groups.values():
    members.sort(key=lambda s: (-s.steps, s.run_id))
    units += [tuple(members[i:i + cohort_size]) for i in range(0, len(members), cohort_size)]
  return sorted(units, key=lambda u: (-_flops(u), u[0].run_id))


def bundles(units: list[tuple[RunSpec, ...]], n_workers: int) -> list[list[tuple[RunSpec, ...]]]:
  """The units grouped by model shape for workers (one worker trains a bundle's units one after
  another, compiling their programs once), a bundle above 1/n_workers of the FLOPs split into
  that many parts; largest first."""
  groups = collections.defaultdict(list)
  for unit in units:
    key = cohort.cohort_key(unit[0].experiment)
    groups[unit[0].run_id if key is None else key].append(unit)
  most = sum(_flops(u) for u in units) / max(1, n_workers)
  out = []
  for members in groups.values():
    parts = max(1, min(len(members), math.ceil(sum(map(_flops, members)) / most)))
    out += [members[i::parts] for i in range(parts)]
  return sorted(out, key=lambda b: (-sum(map(_flops, b)), b[0][0].run_id))


def _flops(unit: tuple[RunSpec, ...]) -> float:
  return sum(spec.flops for spec in unit)


def _one_device(spec: RunSpec) -> bool:
  """Cohorts train on one device of one process: runs whose mesh is larger train alone."""
  mesh = sharding.mesh_shape(spec.experiment.mesh, jax.device_count())
  return jax.process_count() == 1 and math.prod(mesh) == 1


def train_unit(unit: tuple[RunSpec, ...], study_dir: str | Path,
               tokens: data.TokenData) -> list[Outcome]:
  """Trains (or resumes) a unit's runs and writes each one's records: a run that fails is
  recorded as failed (its error in error.txt) and the others go on."""
  began = time.perf_counter()
  workdirs = [run_dir(study_dir, spec.run_id) for spec in unit]
  if len(unit) == 1:
    try:
      results = [loop.train(unit[0].experiment, workdirs[0], tokens=tokens)]
    except Exception as e:  # recorded, and the sweep goes on; KeyboardInterrupt stops it
      results = [e]
  else:
    results = cohort.train_cohort([spec.experiment for spec in unit], workdirs, tokens)
  seconds = time.perf_counter() - began
  together = f", {len(unit)} runs as one cohort" if len(unit) > 1 else ""
  outcomes = []
  for spec, workdir, result in zip(unit, workdirs, results):
    if isinstance(result, WorkdirBusy):
      outcomes.append(Outcome(spec.run_id, BUSY, result.holder))
    elif isinstance(result, Exception):
      error = f"{type(result).__name__}: {result}"
      record_failure(spec, workdir, tokens.fingerprint, error,
                     "".join(traceback.format_exception(result)), seconds)
      outcomes.append(Outcome(spec.run_id, FAILED, error))
    else:
      run_records = records.run_records(spec, result, fingerprint=tokens.fingerprint,
                                        wall_seconds=result["train_seconds"])
      if jax.process_index() == 0:
        records.write_records(workdir, run_records)
      losses = " ".join(f"{x:.3f}" for x in result["val_loss"])
      line = f"{spec.run_id}: val loss {losses} ({seconds:.1f} s{together})"
      outcomes.append(Outcome(spec.run_id, TRAINED, line, run_records))
  return outcomes


def record_failure(spec: RunSpec, workdir: Path, fingerprint: str, error: str, details: str,
                   seconds: float) -> None:
  """A failed run's records (losses null, the error) and its error.txt: the next sweep retries
  it."""
  if jax.process_index() == 0:
    atomic_write_text(workdir / "error.txt", details)
    records.write_records(workdir, records.run_records(
        spec, None, fingerprint=fingerprint, wall_seconds=seconds, error=error))
