"""An IsoFLOP study from end to end: plan, this task's share of the sweep (with a live fit as
records arrive), then the report from every record present.

STUDY/ holds config.json (the study's own config, see `remembered`), plan.json, runs/RUN_ID/
(each run's workdir and records.json), data/ (records and fit-ready rows as CSV and parquet),
report.json, report.md and plots/.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple

import jax

from famjax import accounting, data, isoflop, memory, render, report, results, sweep
from famjax.config import ExperimentConfig, StudyConfig, experiment_from_dict
from famjax.files import atomic_write_text, default_cache_dir


def configs(values: Mapping) -> tuple[StudyConfig, ExperimentConfig]:
  """(study, base run config) from nested mappings (an isoflop preset's to_dict())."""
  values = dict(values)
  study = values.pop("study", {})
  known = {f.name for f in dataclasses.fields(StudyConfig)}
  unknown = sorted(set(study) - known)
  if unknown:
    raise ValueError(f"unknown config field(s) {[f'study.{u}' for u in unknown]}; "
                     f"allowed: {sorted(known)}")
  return StudyConfig(**study), experiment_from_dict(values)


CONFIG = "config.json"
# study fields that change only the analysis (fits, report, --dry_run's estimate), never which
# runs are trained: an existing study accepts new values for these
ANALYSIS_FIELDS = frozenset(f"study.{name}" for name in (
    "param_count", "leverage_granularities", "law_flops", "fit_loss", "bootstrap", "grid_every",
    "device", "mfu", "planned_corpus_tokens", "memory_devices", "device_memory_gb"))


def _flat(values: Mapping, prefix: str = "") -> dict:
  """{"study.bootstrap": 1000, ...}: JSON values (tuples as lists) by dotted field name."""
  out = {}
  for key, value in values.items():
    if isinstance(value, Mapping):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = json.loads(json.dumps(value, default=list))
  return out


def _nested(flat: Mapping) -> dict:
  out: dict = {}
  for name, value in flat.items():
    *parents, leaf = name.split(".")
    node = out
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return out


def remembered(outdir: str | Path, values: Mapping, given: Iterable[str] | None = None) -> dict:
  """The config values the study in `outdir` runs with (nested, as a preset's to_dict()).

  A new study takes `values` and records them in STUDY/config.json. An existing study keeps its
  own: `given` names the fields the caller set (dotted, e.g. "study.bootstrap"; None: all of
  `values`, as a whole --config preset does), and those that differ from the recorded values
  are an error naming them, unless they change only the analysis (ANALYSIS_FIELDS): those are
  applied and added to the file's history.
  """
  path = Path(outdir) / CONFIG
  asked = _flat(values)
  if not path.exists():
    if jax.process_index() == 0:
      path.parent.mkdir(parents=True, exist_ok=True)
      atomic_write_text(path, json.dumps({"config": _nested(asked), "history": []}, indent=1))
    return _nested(asked)
  recorded = json.loads(path.read_text())
  current = _flat(recorded["config"])
  names = asked if given is None else [n for n in asked if any(
      n == g or n.startswith(g + ".") for g in given)]
  # a field the record lacks (added to famjax since the study began) takes the asked value
  current.update({n: v for n, v in asked.items() if n not in current})
  changed = {n: asked[n] for n in names if current[n] != asked[n]}
  fixed = sorted(n for n in changed if n not in ANALYSIS_FIELDS)
  if fixed:
    shown = ", ".join(f"{n}: {current[n]!r} -> {changed[n]!r}" for n in fixed[:6])
    raise ValueError(f"{outdir} holds a study made with another config ({shown}); rerun "
                     f"without --config to use the study's own ({path}), change only analysis "
                     f"fields ({', '.join(sorted(ANALYSIS_FIELDS))}), or use a new --outdir")
  if changed:
    history = recorded.get("history", []) + [
        {"changed": {n: [current[n], changed[n]] for n in sorted(changed)}}]
    current.update(changed)
    if jax.process_index() == 0:
      atomic_write_text(path, json.dumps({"config": _nested(current), "history": history},
                                         indent=1))
  return _nested(current)


def options(study: StudyConfig, base: ExperimentConfig) -> report.Options:
  flops = None
  if study.law_flops == "runs":
    flops = isoflop.flops_rule(study, base.model, base.train.seq_len,
                               sorted({1, *study.granularities, *study.leverage_granularities}))
  return report.Options(loss=study.fit_loss, param_count=study.param_count,
                        n_bootstrap=study.bootstrap, grid_every=study.grid_every,
                        leverage_granularities=tuple(study.leverage_granularities),
                        law_flops=flops)


def dry_run(study: StudyConfig, base: ExperimentConfig, with_memory: bool = False) -> str:
  """The plan as a table, what was dropped and why, total FLOPs and accelerator-hours; trains
  nothing (reads the corpus only to count its tokens, unless study.planned_corpus_tokens).
  with_memory adds famjax.memory's plan: bytes per device and setting of every run."""
  target = memory_target(study, base) if with_memory else None  # before JAX's CPU backend starts
  corpus_tokens = study.planned_corpus_tokens or len(data.load_tokens(base.data).train)
  plan = isoflop.plan(study, base, corpus_tokens)
  peak = accounting.PEAK_FLOPS[study.device]
  if target is None:
    lines = [isoflop.table(plan), ""]
  else:
    started = time.perf_counter()
    shapes = memory.plan_memory(plan.runs, base.train.batch_size, base.train.seq_len, target)
    lines = [isoflop.table(plan, memory.run_cells(shapes)), "", memory.table(shapes, target),
             f"memory pass: {time.perf_counter() - started:.0f} s", ""]
    lines += memory.refusals(shapes, target)
  lines += [f"dropped {run_id}: {why}" for run_id, why in plan.dropped]
  lines += [f"note: {note}" for note in plan.notes]
  lines.append(f"training corpus: {corpus_tokens:,} tokens; {plan.total_flops:.3g} FLOPs = "
               f"{plan.accelerator_hours(study.device, study.mfu):,.3g} {study.device} hours at "
               f"{study.mfu:.0%} MFU ({peak:.3g} FLOP/s peak)")
  return "\n".join(lines)


def memory_target(study: StudyConfig, base: ExperimentConfig) -> memory.Target:
  """The simulated node of study.memory_devices fake CPU devices; call before JAX starts."""
  if study.memory_devices % base.mesh.model:
    raise ValueError(f"mesh.model={base.mesh.model} must divide study.memory_devices="
                     f"{study.memory_devices}")
  return memory.Target(memory.simulated_devices(study.memory_devices), base.mesh.model,
                       study.device_memory_gb * 1e9, default_cache_dir() / "memory")


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
  plan = isoflop.plan(study, base, len(tokens.train))
  if not plan.runs:
    raise ValueError("the plan holds no run: " + "; ".join(f"{i}: {w}" for i, w in plan.dropped))
  context = {"corpus_fingerprint": tokens.fingerprint, "study": dataclasses.asdict(study)}
  if not (fit_only and sweep.read_plan(outdir) is not None):  # a refit trusts the records
    sweep.write_plan(outdir, plan, context)
  if jax.process_index() == 0:
    data.save_tokenizer(tokens.tokenizer, outdir)
  opts = options(study, base)
  outcome = None
  if not fit_only:
    live = report.LiveFit(outdir, opts, tokens.fingerprint) if live_fit else None
    outcome = sweep.run(plan, outdir, task_index=task.index, num_tasks=task.count, tokens=tokens,
                        on_finished=_quietly(live) if live else None, progress=progress)
  frame = results.collect(outdir, tokens.fingerprint, allow_other_corpora)
  done = set(frame.loc[frame["status"] == results.OK, "run_id"]) if len(frame) else set()
  missing = sorted(r.run_id for r in plan.runs if r.run_id not in done)
  out = {"report": None, "files": {}, "sweep": outcome, "missing": missing}
  unfinished = {r.run_id for r in plan.runs} - done - set(outcome.failed if outcome else {})
  if (fit_only or not unfinished) and jax.process_index() == 0 and len(frame):
    analysis = report.analyze(frame, opts, plan, context, progress=progress)
    out["report"], out["files"] = analysis.report, render.write(outdir, analysis)
  return out


def _quietly(live):
  """The live fit must never stop a sweep: a failure is one printed line."""
  def call(spec, records):
    try:
      live(spec, records)
    except Exception as e:  # noqa: BLE001 (reported, and the sweep goes on)
      print(f"live fit skipped: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
  return call


def summary(result: dict, outdir: str | Path) -> str:
  """What `make run` prints: where the report is and the familial law with its intervals."""
  from famjax.scaling import record
  report_ = result["report"]
  if report_ is None:
    return (f"{len(result['missing'])} planned runs have not finished yet (other tasks, or "
            f"failures); rerun with --fit_only for a report from the records so far: {outdir}")
  lines = []
  familial = report_.laws.get("familial")
  if familial:
    lines.append(record.table(familial))
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


# what a published study holds: its config, plan, report, fit-ready tables and plots (small text
# and PNG files), never its runs' checkpoints
PUBLISHED = ("config.json", "plan.json", "report.md", "report.json", "data/*.csv", "plots/*.png")


def publish(study_dir: str | Path, dest: str | Path) -> list[Path]:
  """Copies a finished study's records and report (PUBLISHED) into dest, e.g. results/medium,
  so that anyone can refit it (`experiments.fit --data=DEST/data/familial.csv`) or read it
  without training; report.md's plot links stay valid."""
  study_dir, dest = Path(study_dir), Path(dest)
  if not (study_dir / "report.json").exists():
    raise FileNotFoundError(f"{study_dir} has no report.json: finish the study (or --fit_only) "
                            "before publishing it")
  written = []
  for pattern in PUBLISHED:
    for path in sorted(study_dir.glob(pattern)):
      target = dest / path.relative_to(study_dir)
      target.parent.mkdir(parents=True, exist_ok=True)
      tmp = target.with_name(f".{target.name}.tmp")
      tmp.write_bytes(path.read_bytes())
      tmp.replace(target)
      written.append(target)
  return written
