"""Loss against accuracy over a study (`famjax evaluate --study=DIR`): every
finished run's exits evaluated on the tasks (each run's eval/ kept, so a rerun skips what is
done), a monotone link from validation loss to each task's accuracy fitted across them with
bootstrap intervals, checked on held-out runs (the largest budget's runs, and each run left out in
turn), and the study's fitted laws turned from predicted loss into predicted accuracy. Writes
STUDY/eval/points.csv, link.json, link.md and link.png.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from famjax.common.files import atomic_write_text
from famjax.evaluation import accuracy_link, runner
from famjax.scaling import fitting, laws
from famjax.study import records, sweep

REQUEST = "request.json"
LINK_LAWS = ("branch", "familial")  # laws whose predicted loss the report turns into accuracy


def _request(tasks, options: dict) -> dict:
  return {"tasks": sorted(tasks), "limit": options.get("limit"),
          "include_path": str(options.get("include_path") or "")}


def run_results(workdir: Path, tasks, options: dict) -> dict:
  """The run's harness results per exit: read back when its eval/ holds this very request (same
  tasks, limit and task directory), else evaluated now."""
  out_dir, request = workdir / runner.EVAL_DIR, _request(tasks, options)
  stored = out_dir / REQUEST
  if stored.exists() and json.loads(stored.read_text()) == request:
    raw = json.loads((out_dir / "results.json").read_text())
    return {name: entry["results"] for name, entry in raw.items()}
  found = runner.evaluate(workdir, list(tasks), None, (), options)
  atomic_write_text(stored, json.dumps(request))
  return found


def points(study_dir, tasks, options: dict, metric: str = "acc") -> pd.DataFrame:
  """One row per (finished run, exit, task): the run's record (C, G, exit, N, D, val_loss, ...)
  with the task's `metric` and its harness standard error."""
  frame = records.collect(study_dir)
  done = frame[frame["status"] == records.OK]
  if not len(done):
    raise ValueError(f"{study_dir} has no finished runs (runs/*/records.json with status ok)")
  rows = []
  for run_id, run_rows in tqdm(done.groupby("run_id", sort=True), desc="runs evaluated"):
    found = run_results(sweep.run_dir(study_dir, run_id), tasks, options)
    for record in run_rows.to_dict("records"):
      for task in tasks:
        measured = runner.metrics(found.get(f"exit{record['exit']}", {}).get(task, {}))
        if metric not in measured:
          raise ValueError(f"task {task} reports no {metric!r} metric (it has "
                           f"{sorted(measured)}): choose one with --link_metric")
        value, stderr = measured[metric]
        rows.append({**record, "task": task, "accuracy": value, "stderr": stderr or 0.0})
  return pd.DataFrame(rows)


def _arrays(frame: pd.DataFrame) -> dict[str, np.ndarray]:
  return {"loss": frame["val_loss"].to_numpy(np.float64),
          "accuracy": frame["accuracy"].to_numpy(np.float64),
          "run": frame["run_id"].to_numpy(str), "stderr": frame["stderr"].to_numpy(np.float64)}


def held_out_checks(frame: pd.DataFrame, boot: accuracy_link.Bootstrap, floor) -> dict:
  """The link on runs it was not fitted to: the largest budget's runs (an extrapolation, when the
  study has more than one budget) and every run left out in turn."""
  data = _arrays(frame)
  out = {"leave_one_run_out": accuracy_link.leave_one_run_out(data, boot.link, floor)}
  budgets = np.sort(frame["C"].unique())
  largest = frame["C"].to_numpy() == budgets[-1]
  if len(budgets) > 1 and (~largest).sum() >= 4:
    out["largest_budget"] = {"C": float(budgets[-1]),
                             **accuracy_link.held_out(data, largest, floor=floor)}
  return out


def law_accuracy(study_dir: Path, frame: pd.DataFrame, link: accuracy_link.Link) -> dict:
  """Each fitted law of the study's report.json: its predicted loss at the study's own rows put
  through the link, against the measured accuracy (familial rows: the exit-weighted mean over a
  run's exits). The link's error on measured losses at the same rows is given beside it."""
  report_path = study_dir / "report.json"
  if not report_path.exists():
    return {}
  report = json.loads(report_path.read_text())
  options = report.get("options", {})
  out = {}
  for name in LINK_LAWS:
    if name not in report.get("laws", {}):
      continue
    rows = records.law_rows(frame.drop_duplicates(["run_id", "exit"]), name,
                            loss=options.get("loss", "val"),
                            param_count=options.get("param_count", "non_embedding"))
    measured = _measured_accuracy(frame, name).reindex(
        pd.MultiIndex.from_frame(rows[["run_id", "exit"]].astype({"exit": int})))
    logp = laws.to_log_params(report["laws"][name]["params"])
    with jax.enable_x64(True):
      predicted_loss = np.asarray(laws.loss(laws.LAWS[name], logp, fitting.as_data(
          {c: rows[c].to_numpy(np.float64) for c in ("N", "D", "G", "exit")})))
    accuracy = measured.to_numpy(np.float64)
    baseline = float(frame["accuracy"].mean())
    out[name] = {"via_law": accuracy_link.errors(link.accuracy(predicted_loss), accuracy, baseline),
                 "via_measured_loss": accuracy_link.errors(link.accuracy(rows["loss"]), accuracy,
                                                     baseline)}
  return out


def _measured_accuracy(frame: pd.DataFrame, law: str) -> pd.Series:
  """Accuracy per (run_id, exit) as the law's rows count it (familial: exit = G, the weighted
  mean over the run's exits)."""
  if law == "branch":
    return frame.set_index(["run_id", "exit"])["accuracy"]
  weighted = frame.assign(w=frame["accuracy"] * frame["exit_weight"]).groupby("run_id").agg(
      accuracy=("w", "sum"), G=("G", "first"))
  return weighted.set_index("G", append=True)["accuracy"].rename_axis(["run_id", "exit"])


def fit_task(study_dir: Path, frame: pd.DataFrame, floor=None, n_bootstrap: int = 1000) -> dict:
  """The link for one task's points, its intervals, held-out checks and the laws' accuracy."""
  data = _arrays(frame)
  boot = accuracy_link.bootstrap(data["loss"], data["accuracy"], data["run"], n=n_bootstrap,
                           floor=floor)
  return {"link": boot.link.as_dict(), "ci95": boot.intervals(), "n_points": int(len(frame)),
          "n_runs": int(frame["run_id"].nunique()), "floor_fixed": floor,
          "bootstrap": {"n": int(len(boot.samples)), "resampled": "runs",
                        "samples": boot.samples.round(6).tolist()},
          "held_out": held_out_checks(frame, boot, floor),
          "laws": law_accuracy(study_dir, frame, boot.link)}


def predict(task_record: dict, loss, level: float = 0.95) -> tuple[np.ndarray, np.ndarray,
                                                                   np.ndarray]:
  """(accuracy, low, high) at `loss` from a task's entry of link.json: the fitted link and the
  percentile band of its bootstrap refits (the link's uncertainty only; a law's predicted loss
  brings its own)."""
  boot = accuracy_link.Bootstrap(accuracy_link.Link(**task_record["link"]),
                           np.asarray(task_record["bootstrap"]["samples"], np.float64))
  low, high = boot.accuracy_band(np.atleast_1d(loss), level)
  return boot.link.accuracy(np.atleast_1d(loss)), low, high


def evaluate_study(study_dir, tasks, options: dict | None = None, *, metric: str = "acc",
                   floor: float | None = None) -> dict:
  """Every finished run's exits on `tasks`, a link per task; writes and returns link.json's
  content. `options` as runner.evaluate's (include_path, limit, batch_size)."""
  study_dir, options = Path(study_dir), dict(options or {})
  frame = points(study_dir, tasks, options, metric)
  out_dir = study_dir / runner.EVAL_DIR
  out_dir.mkdir(exist_ok=True)
  tmp = out_dir / ".points.csv.tmp"
  frame.to_csv(tmp, index=False)
  tmp.replace(out_dir / "points.csv")
  report = {"metric": metric, "request": _request(tasks, options),
            "tasks": {task: fit_task(study_dir, frame[frame["task"] == task], floor)
                      for task in tasks}}
  atomic_write_text(out_dir / "link.json", json.dumps(report, indent=1))
  atomic_write_text(out_dir / "link.md", render(report))
  plot(frame, report, out_dir / "link.png")
  return report


def _interval(values) -> str:
  return f"[{values[0]:.3f}, {values[1]:.3f}]"


def render(report: dict) -> str:
  """link.md: per task the link with its intervals, the held-out errors and the laws'."""
  lines = ["# Validation loss against task accuracy", "",
           f"accuracy = floor + (ceiling - floor) * sigmoid(-slope * (val_loss - midpoint)), "
           f"metric `{report['metric']}`, least squares over every (run, exit); 95% intervals "
           "from a bootstrap over runs. Errors are in accuracy units; `baseline` predicts every "
           "point by the fitted points' mean accuracy.", ""]
  for task, entry in report["tasks"].items():
    lines += [f"## {task}", "", f"{entry['n_points']} exits of {entry['n_runs']} runs.", "",
              "| parameter | estimate | 95% interval |", "|---|---|---|"]
    lines += [f"| {name} | {entry['link'][name]:.4f} | {_interval(entry['ci95'][name])} |"
              for name in accuracy_link.PARAMS]
    lines += ["", "| check | points | MAE | RMSE | baseline MAE | 95% coverage |",
              "|---|---|---|---|---|---|"]
    for check, stats in entry["held_out"].items():
      label = (f"largest budget held out (C = {stats['C']:.3g})" if check == "largest_budget"
               else "each run left out")
      coverage = f"{stats['coverage95']:.2f}" if "coverage95" in stats else ""
      lines.append(f"| {label} | {stats['n']} | {stats['mae']:.4f} | {stats['rmse']:.4f} | "
                   f"{stats['baseline_mae']:.4f} | {coverage} |")
    for law, stats in entry["laws"].items():
      for source, errs in stats.items():
        lines.append(f"| {law} law, {source.replace('_', ' ')} (in-sample) | {errs['n']} | "
                     f"{errs['mae']:.4f} | {errs['rmse']:.4f} | {errs['baseline_mae']:.4f} | |")
    lines.append("")
  return "\n".join(lines)


def plot(frame: pd.DataFrame, report: dict, path: Path) -> None:
  """Accuracy against validation loss per task: the exits (largest budget hollow), the fitted
  link and its 95% band."""
  tasks = list(report["tasks"])
  fig = Figure(figsize=(5 * len(tasks), 4))
  for i, task in enumerate(tasks):
    ax = fig.add_subplot(1, len(tasks), i + 1)
    rows = frame[frame["task"] == task]
    largest = rows["C"] == rows["C"].max()
    for mask, style in ((~largest, dict(marker="o")),
                        (largest, dict(marker="o", mfc="none", label="largest budget"))):
      ax.errorbar(rows["val_loss"][mask], rows["accuracy"][mask], yerr=rows["stderr"][mask],
                  ls="none", capsize=2, color="C0", **style)
    grid = np.linspace(rows["val_loss"].min(), rows["val_loss"].max(), 100)
    fitted, low, high = predict(report["tasks"][task], grid)
    ax.plot(grid, fitted, color="C1", label="link")
    ax.fill_between(grid, low, high, color="C1", alpha=0.25, label="95% band")
    ax.set_xlabel("exit's validation loss")
    ax.set_ylabel(f"{task} {report['metric']}")
    ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
