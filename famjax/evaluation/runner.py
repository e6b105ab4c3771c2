"""Every exit of a run on the harness's tasks (`famjax evaluate`): the harness's
own results per exit (eval/results.json), a tasks x exits table with the harness's standard
errors (eval/table.md), and each task's metric against the exit's depth, with its forward FLOPs
per token on a second axis (eval/tasks_by_exit.png)."""

from __future__ import annotations

import json
from pathlib import Path

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from matplotlib.figure import Figure

from famjax.common.files import atomic_write_text
from famjax.evaluation.harness import FamjaxLM
from famjax.model import counts
from famjax.train import workdir_files

EVAL_DIR = "eval"


def metrics(task_results: dict) -> dict[str, tuple[float, float | None]]:
  """{metric: (value, stderr)} of one task's harness results ("acc,none", "acc_stderr,none")."""
  out = {}
  for key, value in task_results.items():
    name, comma, filt = key.partition(",")
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not comma or "_stderr" in name or not numeric:  # sample_len, aliases, stderrs
      continue
    stderr = task_results.get(f"{name}_stderr,{filt}")
    out[name if filt in ("", "none") else f"{name} ({filt})"] = (
        float(value), float(stderr) if isinstance(stderr, (int, float)) else None)
  return out


def exits_table(results: dict[str, dict]) -> str:
  """Markdown: one row per task and metric, one column per evaluated exit or strategy."""
  names = list(results)
  lines = ["| task | metric | " + " | ".join(names) + " |",
           "|---|---|" + "---|" * len(names)]
  tasks = sorted({t for r in results.values() for t in r})
  for task in tasks:
    reported = sorted({m for r in results.values() for m in metrics(r.get(task, {}))})
    for metric in reported:
      cells = []
      for name in names:
        value, stderr = metrics(results[name].get(task, {})).get(metric, (None, None))
        cells.append("" if value is None else f"{value:.4f}" + (
            f" ± {stderr:.4f}" if stderr is not None else ""))
      lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], cfg, path: Path) -> None:
  """Each task's first metric against the exit's layer, FLOPs per token on the top axis."""
  exits = [int(name[4:]) for name in results if name.startswith("exit")]
  if not exits:
    return
  layers = [cfg.model.exit_layers[g - 1] for g in exits]
  flops = counts.account(cfg.model, cfg.train.seq_len).forward_flops_per_token_per_exit
  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  for task in sorted({t for name in results for t in results[name]}):
    points = [(layer, metrics(results[f"exit{g}"].get(task, {}))) for g, layer in
              zip(exits, layers)]
    metric = next((next(iter(m)) for _, m in points if m), None)
    if metric is None:
      continue
    values = [(layer, m[metric]) for layer, m in points if metric in m]
    ax.errorbar([x for x, _ in values], [v for _, (v, _) in values],
                yerr=[s or 0.0 for _, (_, s) in values], marker="o", capsize=3,
                label=f"{task} ({metric})")
  ax.set_xlabel("exit layer")
  ax.set_ylabel("metric (harness stderr bars)")
  per_layer = {layer: flops[g - 1] for g, layer in zip(exits, layers)}
  top = ax.secondary_xaxis("top")
  top.set_xticks(layers, [f"{per_layer[x] / 1e6:.1f}M" for x in layers])
  top.set_xlabel("forward FLOPs per token")
  ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def evaluate(workdir, tasks: list[str], exits: list[int] | None = None,
             strategies: tuple[dict, ...] = (), options: dict | None = None) -> dict:
  """Runs the harness once per exit (all by default) and per strategy (model_args dicts such as
  {"strategy": "confidence", "threshold": 0.9}); writes and returns the results by name.
  `options`: include_path, limit, batch_size."""
  workdir, options = Path(workdir), dict(options or {})
  cfg = workdir_files.recorded_experiment(workdir)
  exits = exits or list(range(1, cfg.model.n_exits + 1))
  manager = TaskManager(include_path=options.get("include_path"))
  runs = {f"exit{g}": {"exit": g} for g in exits}
  runs.update({"+".join(f"{k}={v}" for k, v in s.items()): dict(s) for s in strategies})
  results, raw = {}, {}
  for name, model_args in runs.items():
    lm = FamjaxLM(workdir, batch_size=options.get("batch_size", 8), **model_args)
    out = simple_evaluate(model=lm, tasks=list(tasks), limit=options.get("limit"),
                          task_manager=manager, log_samples=False, bootstrap_iters=1000)
    raw[name] = {k: out[k] for k in ("results", "versions", "n-shot", "config") if k in out}
    results[name] = out["results"]
  out_dir = workdir / EVAL_DIR
  out_dir.mkdir(exist_ok=True)
  atomic_write_text(out_dir / "results.json", json.dumps(raw, indent=1, default=str))
  atomic_write_text(out_dir / "table.md", exits_table(results))
  plot(results, cfg, out_dir / "tasks_by_exit.png")
  return results
