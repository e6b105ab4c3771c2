"""An IsoFLOP study from end to end: plan, this task's share of the sweep (with a live fit as
records arrive), then the report from every record present; --dry_run's table and estimate.

STUDY/ holds config.json (the study's own config, famjax.study.saved_config), plan.json,
runs/RUN_ID/ (each run's workdir and records.json), data/ (records and fit-ready rows as CSV and
parquet), report.json, report.md and plots/.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import NamedTuple

import jax

from famjax import data
from famjax.analysis import render
from famjax.analysis.live_fit import LiveFit
from famjax.analysis.study_analysis import analyze_study
from famjax.common.files import default_cache_dir
from famjax.hardware import chips, cost, memory, tpu
from famjax.study import isoflop, records, sweep
from famjax.study.config import StudyConfig
from famjax.train.config import ExperimentConfig


def flops_rule(study: StudyConfig, base: ExperimentConfig) -> dict | None:
  """The FLOPs rule of the law's EL and N*(C): the runs' own, fitted per G (study.law_flops
  "runs"), or None for 6N."""
  if study.law_flops != "runs":
    return None
  return isoflop.flops_rule(study, base.model, base.train.seq_len,
                            sorted({1, *study.granularities, *study.leverage_granularities}))


def dry_run(study: StudyConfig, base: ExperimentConfig, with_memory: bool = False) -> str:
  """The plan as a table, what was dropped and why, total FLOPs and accelerator-hours; trains
  nothing (reads the corpus only to count its tokens, unless study.planned_corpus_tokens).
  with_memory adds famjax.hardware.memory's plan: bytes per device and setting of every run."""
  target = memory_target(study, base) if with_memory else None  # before JAX's CPU backend starts
  corpus_tokens = study.planned_corpus_tokens or len(data.load_tokens(base.data).train)
  plan = isoflop.plan_study(study, base, corpus_tokens)
  peak = chips.chip(study.device).peak_flops
  if target is None:
    lines = [isoflop.plan_table(plan), ""]
  else:
    started = time.perf_counter()
    runs = plan.runs if study.memory_runs == "all" else memory.largest_per_budget(plan.runs)
    shape = (base.train.batch_size, base.train.seq_len)
    shapes = memory.plan_memory(runs, *shape, target)
    lines = [isoflop.plan_table(plan, memory.run_cells(shapes)), "",
             memory.memory_table(shapes, target)]
    if target.slice is not None:
      lines += ["", cost.cost_table(shapes, runs, shape, target)]
    lines += [f"memory pass: {time.perf_counter() - started:.0f} s", ""]
    lines += memory.refusals(shapes, target)
  lines += [f"dropped {run_id}: {why}" for run_id, why in plan.dropped]
  lines += [f"note: {note}" for note in plan.notes]
  lines.append(f"training corpus: {corpus_tokens:,} tokens; {plan.total_flops:.3g} FLOPs = "
               f"{plan.accelerator_hours(study.device, study.mfu):,.3g} {study.device} hours at "
               f"{study.mfu:.0%} MFU ({peak:.3g} FLOP/s peak)")
  return "\n".join(lines)


def memory_target(study: StudyConfig, base: ExperimentConfig) -> memory.Target:
  """The simulated node of study.memory_devices fake CPU devices (call before JAX starts), or
  the TPU slice of study.memory_target with the HBM its compiler allows."""
  cache = default_cache_dir() / "memory"
  if study.memory_target != "cpu":
    devices = tpu.devices(study.memory_slice)
    if len(devices) % base.mesh.model:
      raise ValueError(f"mesh.model={base.mesh.model} must divide the {len(devices)} devices of "
                       f"study.memory_target={study.memory_target}")
    return memory.Target(devices, base.mesh.model, tpu.available_hbm(devices[0]), cache,
                         study.memory_target)
  if study.memory_devices % base.mesh.model:
    raise ValueError(f"mesh.model={base.mesh.model} must divide study.memory_devices="
                     f"{study.memory_devices}")
  return memory.Target(memory.simulated_devices(study.memory_devices), base.mesh.model,
                       study.device_memory_gb * 1e9, cache)


class Task(NamedTuple):
  """This launcher's share of a study: task `index` (0-based) of `count` sharing the plan."""
  index: int = 0
  count: int = 1


def run(study: StudyConfig, base: ExperimentConfig, outdir: str | Path, *, task: Task = Task(),
        fit_only: bool = False, live_fit: bool = True, allow_other_corpora: bool = False,
        progress: bool = True) -> dict:
  """Trains this task's share (unless fit_only), then writes the report if every planned run
  has finished, or fit_only asks for one from the records so far. Returns {"report": dict or
  None, "files": {name: path}, "sweep": SweepOutcome or None, "missing": [run ids]}."""
  outdir = Path(outdir)
  if base.train.wandb_project and not base.train.wandb_group:  # the study's runs, one W&B group
    base = dataclasses.replace(base, train=dataclasses.replace(
        base.train, wandb_group=outdir.resolve().name))
  tokens = data.load_tokens(base.data)
  plan = isoflop.plan_study(study, base, len(tokens.train))
  if not plan.runs:
    raise ValueError("the plan holds no run: " + "; ".join(f"{i}: {w}" for i, w in plan.dropped))
  context = {"corpus_fingerprint": tokens.fingerprint, "study": dataclasses.asdict(study)}
  if not (fit_only and sweep.read_plan(outdir) is not None):  # a refit trusts the records
    sweep.write_plan(outdir, plan, context)
  if jax.process_index() == 0:
    data.save_tokenizer(tokens.tokenizer, outdir)
  outcome = None
  if not fit_only:
    live = LiveFit(outdir, study.analysis, tokens.fingerprint) if live_fit else None
    outcome = sweep.run(plan, outdir, task_index=task.index, num_tasks=task.count, tokens=tokens,
                        on_finished=_quietly(live) if live else None, progress=progress,
                        execution=study)
  frame = records.collect(outdir, tokens.fingerprint, allow_other_corpora)
  done = set(frame.loc[frame["status"] == records.OK, "run_id"]) if len(frame) else set()
  missing = sorted(r.run_id for r in plan.runs if r.run_id not in done)
  out = {"report": None, "files": {}, "sweep": outcome, "missing": missing}
  unfinished = {r.run_id for r in plan.runs} - done - set(outcome.failed if outcome else {})
  if (fit_only or not unfinished) and jax.process_index() == 0 and len(frame):
    analysis = analyze_study(frame, study.analysis, plan, context, progress=progress,
                             flops_rule=flops_rule(study, base))
    out["report"], out["files"] = analysis.report, render.write(outdir, analysis)
  return out


def _quietly(live):
  """The live fit must never stop a sweep: a failure is one printed line."""
  def call(spec, run_records):
    try:
      live(spec, run_records)
    except Exception as e:  # noqa: BLE001 (reported, and the sweep goes on)
      print(f"live fit skipped: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
  return call


def summary(result: dict, outdir: str | Path) -> str:
  """What `make run` prints: where the report is and the familial law with its intervals."""
  from famjax.scaling import fitted_law
  report_ = result["report"]
  if report_ is None:
    return (f"{len(result['missing'])} planned runs have not finished yet (other tasks, or "
            f"failures); rerun with --fit_only for a report from the records so far: {outdir}")
  lines = []
  familial = report_.laws.get("familial")
  if familial:
    lines.append(fitted_law.law_table(familial.summary()))
  elif not report_.has_isoflop_runs:
    lines.append("no IsoFLOP runs (study.budgets = ()): no law is fitted")
  else:
    lines.append(f"familial law not fitted: {report_.skipped_laws.get('familial')}")
  for e in report_.leverage_at_optimum or report_.measured_leverage:
    law = f", law {e.law:.3f}" if e.law is not None else ""
    if hasattr(e, "mean"):  # the family nearest N*(C), over seeds
      seeds = (f" [{e.ci95[0]:.3f}, {e.ci95[1]:.3f}] over {len(e.families)} seeds" if e.ci95
               else ", one seed")
      lines.append(f"measured EL at C={e.C:.3g}, G={e.G}, N={e.N_family:.3g} (fitted N* "
                   f"{e.N_opt:.3g}): {e.mean:.3f}{seeds}{law}")
    else:
      lines.append(f"measured EL at C={e.C:.3g}, G={e.G}: {e.measured:.3f}{law}")
  failed = report_.runs.failed
  if failed:
    lines.append(f"{len(failed)} runs failed: {', '.join(sorted(failed))} (see report.md)")
  lines.append(f"report: {Path(outdir) / 'report.md'} (and report.json, plots/)")
  return "\n".join(lines)
