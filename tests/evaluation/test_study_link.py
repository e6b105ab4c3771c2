"""Loss against accuracy over a study: every finished run's exits evaluated on a local task that
small models can score, the link fitted across them, held-out checks, the laws' accuracy, and a
rerun that evaluates nothing again (the `eval` extra)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from famjax.data.config import DataConfig
from famjax.scaling import laws
from famjax.study import records
from famjax.train.config import ExperimentConfig, TrainConfig

from conftest import tiny_model

study = pytest.importorskip("famjax.evaluation.study_link",
                            reason="lm-eval is the eval extra: pip install -e '.[eval]'")
from famjax.evaluation import runner, tasks  # noqa: E402
from famjax.train import loop  # noqa: E402

TASK = "famjax_continuation"
STEPS = {"C1e9_short": (1e9, 3), "C1e9_long": (1e9, 40), "C2e9": (2e9, 15)}


def test_continuation_documents_hide_the_truth_among_its_shuffles():
  texts = ["def scaling(law):\n    return law.exits * budget\n" * 3]
  docs = tasks.continuation_docs(texts, 20, context_chars=16, continuation_chars=8, n_choices=3)
  assert len(docs) == 20
  answers = {d["answer"] for d in docs}
  assert answers <= {0, 1, 2} and len(answers) > 1
  for doc in docs:
    truth = doc["choices"][doc["answer"]]
    assert texts[0].find(doc["context"] + truth) >= 0
    assert len(set(doc["choices"])) == 3
    assert all(sorted(c) == sorted(truth) for c in doc["choices"])
  with pytest.raises(ValueError, match="n_choices must be at least 2"):
    tasks.continuation_docs(texts, 5, n_choices=1)
  with pytest.raises(ValueError, match="longer than context_chars"):
    tasks.continuation_docs(["short"], 5)


def write_run(study_dir, corpus_dir, run_id, budget, steps):
  """A G = 3 run trained `steps` steps in STUDY/runs/RUN, with the records a sweep writes."""
  workdir = study_dir / "runs" / run_id
  cfg = ExperimentConfig(
      model=tiny_model(), data=DataConfig(corpus=str(corpus_dir), val_fraction=0.1),
      train=TrainConfig(batch_size=8, seq_len=32, steps=steps, warmup_steps=2,
                        learning_rate=1e-2, eval_every=steps, checkpoint_every=steps,
                        eval_batches=2, progress=False))
  summary = loop.train(cfg, workdir)
  rows = [{"run_id": run_id, "kind": "isoflop", "status": records.OK, "C": budget, "G": 3,
              "exit": g, "exit_layer": g, "P": g - 1, "Q": 3 - g,
              "N_exit": summary["params_per_exit"][g - 1],
              "N_exit_non_embedding": summary["non_embedding_params_per_exit"][g - 1],
              "N_family": summary["params_total"],
              "N_family_non_embedding": summary["params_non_embedding"],
              "D": summary["tokens"], "train_loss": summary["train_loss"][g - 1],
              "val_loss": summary["val_loss"][g - 1], "exit_weight": 1 / 3,
              "flops_per_token": summary["flops_per_token"], "seed": 0,
              "corpus_fingerprint": summary["corpus_fingerprint"], "config_hash": "h",
              "wall_seconds": 1.0} for g in (1, 2, 3)]
  records.write_records(workdir, rows)


@pytest.fixture(scope="module")
def evaluated_study(corpus_dir, tmp_path_factory):
  """Three tiny runs over two budgets, a report.json holding the paper's familial law, and the
  continuation task over the test corpus."""
  root = tmp_path_factory.mktemp("study")
  study_dir = root / "study"
  for run_id, (budget, steps) in STEPS.items():
    write_run(study_dir, corpus_dir, run_id, budget, steps)
  (study_dir / "report.json").write_text(json.dumps({
      "options": {"loss": "val", "param_count": "non_embedding"},
      "laws": {"familial": {"params": laws.PAPER_FAMILIAL}}}))
  texts = [p.read_text() for p in sorted(corpus_dir.glob("*.txt"))]
  tasks.write_continuation_task(root / "tasks", texts, TASK, n_docs=40, context_chars=20,
                                continuation_chars=6)
  options = {"include_path": str(root / "tasks"), "batch_size": 8}
  report = study.evaluate_study(study_dir, [TASK], options, floor=0.25)
  return study_dir, options, report


@pytest.mark.slow
def test_every_exit_of_every_finished_run_is_a_point_of_the_link(evaluated_study):
  study_dir, _, report = evaluated_study
  out = study_dir / "eval"
  import pandas as pd
  points = pd.read_csv(out / "points.csv")
  assert len(points) == 9 and set(points["run_id"]) == set(STEPS)
  for run_id in STEPS:  # each point is the run's own harness result for that exit
    run_results = json.loads((study_dir / "runs" / run_id / "eval" / "results.json").read_text())
    for row in points[points["run_id"] == run_id].itertuples():
      assert row.accuracy == run_results[f"exit{row.exit}"]["results"][TASK]["acc,none"]
  entry = report["tasks"][TASK]
  assert entry["n_points"] == 9 and entry["n_runs"] == 3 and entry["link"]["floor"] == 0.25
  boot = entry["bootstrap"]  # draws of one run alone (3 points) cannot be fitted, and are dropped
  assert boot["n"] == len(boot["samples"]) > 800 and boot["resampled"] == "runs"
  for name, (low, high) in entry["ci95"].items():
    assert low <= entry["link"][name] + 1e-9 and entry["link"][name] <= high + 1e-9, name
  assert entry["held_out"]["largest_budget"]["n"] == 3
  assert entry["held_out"]["leave_one_run_out"]["runs"] == 3
  via_law = entry["laws"]["familial"]["via_law"]
  assert via_law["n"] == 3 and 0 <= via_law["mae"] <= 1
  assert json.loads((out / "link.json").read_text())["tasks"][TASK]["link"] == entry["link"]
  assert "largest budget held out" in (out / "link.md").read_text()
  assert (out / "link.png").stat().st_size > 1000


@pytest.mark.slow
def test_the_link_turns_a_loss_into_an_accuracy_with_its_band(evaluated_study):
  _, _, report = evaluated_study
  entry = report["tasks"][TASK]
  fitted, low, high = study.predict(entry, np.array([1.0, 2.0, 5.0]))
  assert np.all(low <= fitted + 1e-9) and np.all(fitted <= high + 1e-9)
  assert np.all(np.diff(fitted) <= 0) and np.all((0.25 <= fitted) & (fitted <= 1))


@pytest.mark.slow
def test_a_rerun_reads_every_runs_results_back(evaluated_study, monkeypatch):
  study_dir, options, report = evaluated_study

  def refuse(*args, **kwargs):
    raise AssertionError("a finished run was evaluated again")

  monkeypatch.setattr(runner, "evaluate", refuse)
  again = study.evaluate_study(study_dir, [TASK], options, floor=0.25)
  assert again["tasks"][TASK]["link"] == report["tasks"][TASK]["link"]


@pytest.mark.slow
def test_the_study_command_prints_the_link(evaluated_study):
  study_dir, options, _ = evaluated_study
  out = subprocess.run(
      [sys.executable, "-m", "experiments.evaluate", f"--study={study_dir}", f"--tasks={TASK}",
       f"--include_path={options['include_path']}", "--link_floor=0.25"],
      cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"## {TASK}" in out.stdout and "each run left out" in out.stdout
  bad = subprocess.run(
      [sys.executable, "-m", "experiments.evaluate", f"--study={study_dir}",
       f"--workdir={study_dir}", f"--tasks={TASK}"],
      cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=600)
  assert bad.returncode != 0 and "exactly one of --workdir" in bad.stderr
