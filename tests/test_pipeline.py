"""A miniature IsoFLOP study end to end (real training, fits, report and plots), and the report's
pieces on synthetic records."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from famjax import data, pipeline
from famjax.analysis import measured_leverage, report, study_analysis
from famjax.data.config import DataConfig
from famjax.model.config import ModelConfig
from famjax.scaling import fit_data, laws
from famjax.study import isoflop, publish, records, saved_config
from famjax.study.config import AnalysisConfig, StudyConfig
from famjax.train.config import ExperimentConfig, TrainConfig


def mini(corpus_dir, **study_overrides):
  values = dict(budgets=(2e7, 4e7, 8e7), granularities=(1, 2), widths=(8, 12), head_dim=4,
                min_layers=2, layer_multiple=2, sizes_per_budget=2, min_steps=5,
                tokens_per_param=20.0, leverage="4e7:2", leverage_granularities=(2, 3),
                grid_widths=(8,), grid_tokens=(320, 640), bootstrap=100, grid_every=50,
                # two laws compared: the report section and its JSON, at a third of five's cost
                compare_laws=("paper", "size_only"),
                # the one placement a 2-layer backbone has: the grid's G = 2 shape, compiled once
                placements="1,2", placement_width=8, placement_tokens=320,
                placement_seeds=(0, 1))
  values.update(study_overrides)
  base = ExperimentConfig(model=ModelConfig(vocab_size=264, max_seq_len=16),
                          data=DataConfig(corpus=str(corpus_dir), val_fraction=0.1),
                          train=TrainConfig(batch_size=4, seq_len=16, steps=1, warmup_steps=0,
                                            learning_rate=1e-2, eval_batches=2,
                                            checkpoint_every=50, progress=False))
  return StudyConfig(**values), base


@pytest.fixture(scope="module")
def mini_study(corpus_dir, tmp_path_factory):
  outdir = tmp_path_factory.mktemp("study")
  study_cfg, base = mini(corpus_dir)
  result = pipeline.run(study_cfg, base, outdir, progress=False)
  return outdir, result, study_cfg, base


@pytest.mark.slow
def test_a_miniature_study_writes_its_report_and_plots(mini_study):
  outdir, result, study_cfg, base = mini_study
  plan = isoflop.plan_study(study_cfg, base)
  assert result["missing"] == [] and result["sweep"].failed == {}
  rep = json.loads((outdir / "report.json").read_text())
  assert rep["runs"]["finished"] == rep["runs"]["planned"] == len(plan.runs)
  # report.json keeps the sections and option keys of the published reports
  published = json.loads((Path(__file__).resolve().parents[1] / "results" / "medium" /
                          "report.json").read_text())
  assert set(published) <= set(rep) and set(rep["options"]) == set(published["options"])
  assert rep["options"]["n_bootstrap"] == 100 and rep["options"]["loss"] == "val"
  assert rep["options"]["law_flops"] == rep["from_law"]["flops_rule"]
  assert set(rep["laws"]) == {"familial", "branch", "chinchilla"}
  familial = rep["laws"]["familial"]
  assert familial["bootstrap"]["n"] == 100 and familial["bootstrap"]["resampled"] == "runs"
  assert 0 < familial["gamma_test"]["n_refits"] <= 100
  assert {"p_percentile", "p_basic"} <= set(familial["gamma_test"])
  counts = rep["param_counts"]
  assert set(counts) == {"non_embedding", "total"}
  assert counts["non_embedding"]["gamma"]["estimate"] == familial["params"]["gamma"]
  assert counts["total"]["gamma"]["estimate"] != familial["params"]["gamma"]
  grid = rep["gamma_grid"]  # 2 cells x G in {1, 2}, one seed, and the exit-1 controls
  assert [(c["d_model"], c["D"], c["n_families"]) for c in grid["cells"]] == [(8, 320, 2),
                                                                               (8, 640, 2)]
  assert grid["shared"]["df"] == 1 and grid["branch"]["n_exits"] == 4
  assert all(c["size"]["estimate"] + c["sharing"]["estimate"]
             == pytest.approx(c["gamma"]["estimate"]) for c in grid["cells"])
  assert [(t["D"], t["G"], t["n_seeds"]) for t in grid["tax"]] == [(320, 2, 1), (640, 2, 1)]
  assert (rep["placements"]["n_families"], rep["placements"]["n_exits"]) == (2, 4)
  # every run's two validation batches, one per half
  assert rep["validation_noise"]["n_exits"] == sum(len(r.experiment.model.exit_layers)
                                                   for r in plan.runs)
  regime = {r["G"]: r for r in rep["regime"]}
  assert set(regime) == {1, 2} and regime[1]["flops_over_dense"] == [1.0, 1.0]
  assert 0 < regime[1]["outside_backbone_share"][0] < regime[2]["outside_backbone_share"][1] < 1
  # dense models for both sizes of the leverage point; the report takes the one nearest N*
  measured = rep["measured_leverage"]
  assert len(measured) == 2 and {e["G"] for e in measured} == {2}
  (optimum,) = rep["leverage_at_optimum"]
  n_opt = next(e["N_opt"] for e in rep["from_law"]["compute_optimal"]
               if e["C"] == 4e7 and e["G"] == 2)
  assert optimum["N_opt"] == n_opt and optimum["N_family"] == min(
      (e["N_family"] for e in measured), key=lambda n: abs(np.log(n / n_opt)))
  assert optimum["measured"] == [next(e["measured"] for e in measured
                                      if e["family"] == optimum["families"][0])]
  assert {e["G"] for e in rep["from_law"]["compute_optimal"]} == {1, 2}
  # the runs' FLOPs per token, not 6N; no ladder width has 3 layers for G = 3 exits
  assert rep["from_law"]["flops_per_token"] == "runs"
  assert {e["G"] for e in rep["from_law"]["leverage"]} == {2}
  assert "held_out_budget" in rep["extrapolation"]
  assert rep["extrapolation"]["held_out_budget"] == 8e7
  for name in ("isoflop", "loss_vs_G", "branch", "leverage", "bootstrap",
               "predicted_vs_observed", "gamma_grid", "gamma_vs_D", "residuals_vs_D",
               "placements"):
    assert (outdir / "plots" / f"{name}.png").stat().st_size > 5000, name
  text = (outdir / "report.md").read_text()
  assert "## familial law" in text and "plots/isoflop.png" in text
  assert "## Exits decoupled from G" in text and "Validation noise:" in text
  comparison = rep["law_comparison"]  # 3 budgets: ranked by leaving one out
  assert comparison["ranked_by"] == "budget" and set(comparison["laws"]) == {"paper", "size_only"}
  assert comparison["laws"]["paper"]["held_out"]["budget"]["n_folds"] == 3
  assert "## Which familial law? Held-out error" in text and f"**{comparison['best']}**" in text
  for law in ("familial", "branch", "chinchilla"):
    fit_data.validate(fit_data.read_table(outdir / "data" / f"{law}.csv"), laws.LAWS[law])
  # the study and each run keep the tokenizer, so nothing downstream needs the corpus
  assert data.load_tokenizer(outdir).name == "byte"
  assert data.load_tokenizer(next(outdir.glob("runs/*"))).name == "byte"


@pytest.mark.slow
def test_rerunning_a_finished_study_trains_nothing(mini_study):
  outdir, _, study_cfg, base = mini_study
  # no intervals and no comparison (analysis fields, allowed to change): the test is the sweep's
  quick = dataclasses.replace(study_cfg, bootstrap=0, compare_laws=())
  again = pipeline.run(quick, base, outdir, live_fit=False, progress=False)
  assert again["sweep"].trained == [] and len(again["sweep"].skipped) > 0
  assert again["report"] is not None


@pytest.mark.slow
def test_fit_only_reports_from_the_records_present(mini_study, tmp_path):
  import shutil
  outdir, _, study_cfg, base = mini_study
  partial = tmp_path / "partial"
  shutil.copytree(outdir, partial)
  gone = sorted(partial.glob("runs/*"))[0]
  shutil.rmtree(gone)
  # analysis fields, allowed to change; no intervals or comparison: the test is the missing run's
  six_n = dataclasses.replace(study_cfg, law_flops="6N", bootstrap=0, compare_laws=())
  result = pipeline.run(six_n, base, partial, fit_only=True, progress=False)
  assert result["missing"] == [gone.name]
  assert result["report"].runs.missing == [gone.name]
  assert "1 not yet run" in (partial / "report.md").read_text()
  from_law = result["report"].from_law  # EL at leverage_granularities, C = 6ND
  assert from_law.flops_per_token == "6N" and {e.G for e in from_law.leverage} == {2, 3}


@pytest.mark.slow
def test_a_published_study_refits_to_its_report_without_its_runs(mini_study, tmp_path):
  from famjax.scaling import fitting
  outdir, _, study_cfg, _ = mini_study
  dest = tmp_path / "results" / "mini"
  written = publish.publish(outdir, dest)
  names = {p.relative_to(dest).as_posix() for p in written}
  # config.json is the command line's (saved_config.remembered); pipeline.run alone writes none
  assert {"plan.json", "report.md", "report.json", "data/familial.csv", "data/records.csv",
          "plots/isoflop.png"} <= names
  assert not any(n.startswith("runs/") or n.endswith(".parquet") for n in names)
  published = json.loads((dest / "report.json").read_text())["laws"]["familial"]
  data = fit_data.validate(pd.read_csv(dest / "data" / "familial.csv"), laws.FAMILIAL)
  refit = fitting.fit(fitting.Problem.of(laws.FAMILIAL, data),
                  starts=laws.FAMILIAL.starts(study_cfg.grid_every))
  natural = laws.to_natural_params(refit.params)
  for name in ("gamma", "alpha", "beta"):
    assert natural[name] == pytest.approx(published["params"][name], rel=1e-6), name
  with pytest.raises(FileNotFoundError, match="has no report.json"):
    publish.publish(tmp_path / "empty", dest)


@pytest.mark.slow
def test_summary_prints_the_law_with_intervals(mini_study):
  outdir, result, _, _ = mini_study
  text = pipeline.summary(result, outdir)
  assert "familial law" in text and "95% CI" in text and str(outdir / "report.md") in text


def test_measured_leverage_at_the_optimum_takes_the_nearest_size_over_every_seed():
  entry = lambda n, seed, el, c=1e12: measured_leverage.MeasuredLeverage(
      f"C{c:g}_N{n:g}_s{seed}", c, 2, 1.0, [el, el], el, law=1.1, law_ci95=[1.0, 1.2],
      N_family=n, seed=seed)
  entries = [entry(3e4, 0, 1.02), entry(3e4, 1, 1.04), entry(6e4, 1, 1.08), entry(6e4, 0, 1.06),
             entry(1.2e5, 0, 1.5), entry(6e4, 0, 1.3, c=2e12)]  # 1.2e5: nearest, one seed only
  optimal = [report.ComputeOptimal(1e12, 2, N_opt=9e4, D_opt=1e6, ci95=None),
             report.ComputeOptimal(2e12, 2, N_opt=1e5, D_opt=1e6, ci95=None)]
  at_1e12, at_2e12 = measured_leverage.at_optimum(entries, optimal)
  assert at_1e12.N_family == 6e4 and at_1e12.families == ["C1e+12_N60000_s0", "C1e+12_N60000_s1"]
  assert at_1e12.measured == [1.06, 1.08] and at_1e12.mean == pytest.approx(1.07)
  half = 12.706 * 0.01 / np.sqrt(2) * np.sqrt(2)  # t(0.975, 1) x sd / sqrt(2), sd = 0.01 sqrt 2
  np.testing.assert_allclose(at_1e12.ci95, [1.07 - half, 1.07 + half], rtol=1e-4)
  assert at_1e12.law == 1.1 and at_1e12.law_ci95 == [1.0, 1.2]
  assert at_2e12.ci95 is None and at_2e12.mean == 1.3  # one seed: no interval


def synthetic_frame(curves_at_edge=False):
  """Records of a study whose familial losses follow the paper's law exactly."""
  paper = laws.to_log_params(laws.PAPER_FAMILIAL)
  rows = []
  for c in (1e18, 1e19, 1e20):
    for n in np.geomspace(1e7, 3e9, 5):
      for g in (1, 2, 4):
        d = c / (6 * n)
        loss = float(np.asarray(laws.loss(laws.FAMILIAL, paper, {
            "N": np.array([n]), "D": np.array([d]), "G": np.array([float(g)])}))[0])
        if curves_at_edge:
          loss = 3.0 + np.log10(n)  # the smallest size is always best
        for exit_ in range(1, g + 1):
          rows.append({"run_id": f"C{c:g}_G{g}_N{n:.0f}", "kind": isoflop.ISOFLOP, "status": "ok",
                       "error": "", "C": c, "G": g, "exit": exit_, "exit_layer": exit_,
                       "P": exit_ - 1, "Q": g - exit_, "N_exit": n * exit_ / g,
                       "N_exit_non_embedding": n * exit_ / g,
                       "N_family": n, "N_family_non_embedding": n, "D": d, "train_loss": loss,
                       "val_loss": loss, "exit_weight": 1 / g, "flops_per_token": 6 * n,
                       "seed": 0, "corpus_fingerprint": "x", "config_hash": "y",
                       "wall_seconds": 1.0, "matches": "", "matched_exit": 0, "matched_G": g})
  return pd.DataFrame(rows)


def test_edges_flag_minima_the_sizes_did_not_bracket():
  frame = synthetic_frame(curves_at_edge=True)
  edges = study_analysis._edges(records.law_rows(frame, "familial"))
  assert len(edges) == 9 and {e.minimum_at for e in edges} == {"smallest"}
  inner = study_analysis._edges(records.law_rows(synthetic_frame(), "familial"))
  assert all(e.minimum_at in ("interior", "smallest", "largest") for e in inner)


def test_extrapolation_recovers_an_exact_law():
  rows = records.law_rows(synthetic_frame(), "familial")
  out, table = study_analysis._extrapolation(rows, AnalysisConfig(grid_every=10))
  assert out.held_out_budget == 1e20 and out.n_held_out == 15
  assert out.max_abs_relative_error < 1e-3
  assert table["held_out"].sum() == 15


def _preset(name):
  from famjax.presets import isoflop as presets
  return presets.get_config(name).to_dict()


def test_a_study_remembers_its_config_and_takes_only_analysis_overrides(tmp_path):
  """The first run records the config; a later call without --config (no fields given) gets the
  recorded one, not the default preset's; an analysis field may change and is recorded; a field
  that would train other runs is refused, naming it."""
  small, tiny = _preset("small"), _preset("tiny")
  assert saved_config.remembered(tmp_path,
                                 small)["study"]["bootstrap"] == small["study"]["bootstrap"]
  again = saved_config.remembered(tmp_path, tiny, given=[])
  other = saved_config.remembered(tmp_path / "other", small)
  assert saved_config.configs(again) == saved_config.configs(other)
  more = {**small, "study": {**small["study"], "bootstrap": 3000}}
  kept = saved_config.remembered(tmp_path, more, given=["study.bootstrap"])
  assert kept["study"]["bootstrap"] == 3000
  recorded = json.loads((tmp_path / saved_config.CONFIG).read_text())
  assert recorded["history"] == [{"changed": {"study.bootstrap": [small["study"]["bootstrap"],
                                                                  3000]}}]
  assert saved_config.remembered(tmp_path, tiny, given=[])["study"]["bootstrap"] == 3000
  smaller = {**small, "study": {**kept["study"], "device_memory_gb": 40.0}}  # --dry_run's node
  assert saved_config.remembered(tmp_path, smaller, given=["study.device_memory_gb"])["study"][
      "device_memory_gb"] == 40.0
  with pytest.raises(ValueError, match=r"study\.widths.*without --config"):
    saved_config.remembered(tmp_path, tiny)  # a whole other preset: widths, budgets, ...
  wider = {**small, "study": {**small["study"], "widths": [64, 128]}}
  with pytest.raises(ValueError, match=r"study\.widths: \[.*\] -> \[64, 128\]"):
    saved_config.remembered(tmp_path, wider, given=["study.widths"])


@pytest.mark.slow
def test_the_command_line_refuses_another_config_for_an_existing_study(tmp_path):
  import os
  import subprocess
  import sys
  from pathlib import Path
  root = Path(__file__).resolve().parents[1]
  saved_config.remembered(tmp_path, _preset("tiny"))
  out = subprocess.run([sys.executable, "-m", "experiments.isoflop",
                        "--config=small", f"--outdir={tmp_path}",
                        "--fit_only"], cwd=root, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(root)))
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert "holds a study made with another config" in out.stderr and "study.widths" in out.stderr


def _readme_command(start: str, words: dict[str, str]) -> list[str]:
  """The README's shell command whose line begins with `start` (joined over its continuation
  lines, split as the shell would), with `words` replaced: what a user would run."""
  import shlex
  from pathlib import Path
  lines = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
  i = next(i for i, line in enumerate(lines) if line.startswith(start))
  command = ""
  while True:
    command += lines[i].rstrip("\\") + " "
    if not lines[i].endswith("\\"):
      break
    i += 1
  for old, new in words.items():
    command = command.replace(old, new)
  return shlex.split(command)


# The paper preset shrunk to run here: tiny budgets, widths and batches (the README's commands
# otherwise as written).
PAPER_ON_A_CPU = [
    "--config.study.budgets=(2e7,4e7)", "--config.study.granularities=(1,2)",
    "--config.study.widths=(8,12)", "--config.study.head_dim=4", "--config.study.min_layers=2",
    "--config.study.layer_multiple=2", "--config.study.sizes_per_budget=2",
    "--config.study.min_steps=5", "--config.study.leverage=4e7:2",
    "--config.study.leverage_granularities=(2,)", "--config.study.bootstrap=0",
    "--config.model.max_seq_len=16", "--config.model.dtype=float32",
    "--config.train.batch_size=4", "--config.train.seq_len=16", "--config.train.eval_batches=2",
    "--config.train.learning_rate=1e-2", "--config.train.progress=False"]


@pytest.mark.slow
def test_the_readme_slurm_example_runs_on_a_named_corpus_and_tokenizer(tmp_path):
  """README's cluster example as written (tokenize once, then a task of the array), on a parquet
  corpus and a tokenizer.json made here and the paper preset shrunk by PAPER_ON_A_CPU."""
  import os
  import subprocess
  import sys
  from pathlib import Path

  import pyarrow as pa
  import pyarrow.parquet as pq
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers

  from conftest import write_corpus
  root = Path(__file__).resolve().parents[1]
  texts = [p.read_text() for p in sorted(write_corpus(tmp_path / "text", n_docs=80).iterdir())]
  (tmp_path / "corpus").mkdir()
  for part in range(2):
    pq.write_table(pa.table({"text": texts[part::2]}), tmp_path / "corpus" / f"{part}.parquet")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["</s>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(tmp_path / "tokenizer.json"))
  corpus = (f"--config.data.corpus={tmp_path}/corpus/*.parquet "
            f"--config.data.tokenizer={tmp_path}/tokenizer.json --config.model.vocab_size=304 "
            "--config.data.val_fraction=0.1")
  words = {".venv/bin/famjax": str(Path(sys.executable).parent / "famjax"), "$CORPUS": corpus,
           "FAMJAX_CACHE=/shared/cache/famjax ": "", "srun ": "",
           "/shared/studies/paper": str(tmp_path / "study"), "$SLURM_ARRAY_TASK_ID": "0",
           "$SLURM_ARRAY_TASK_COUNT": "2"}
  env = dict(os.environ, PYTHONPATH=str(root), FAMJAX_CACHE=str(tmp_path / "cache"))
  run = lambda argv: subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True,
                                    timeout=600)
  tokenized = run(_readme_command("FAMJAX_CACHE=/shared/cache/famjax", words) + PAPER_ON_A_CPU)
  assert tokenized.returncode == 0, tokenized.stderr[-2000:]
  assert "tokenizer tokenizer.json" in tokenized.stdout
  task = run(_readme_command("srun ", words) + PAPER_ON_A_CPU)
  assert task.returncode == 0, task.stderr[-2000:]
  plan = json.loads((tmp_path / "study" / "plan.json").read_text())
  trained = list((tmp_path / "study" / "runs").glob("*/summary.json"))
  assert plan["runs"] and 0 < len(trained) < len(plan["runs"])  # task 1 of 2: its share
  assert data.load_tokenizer(tmp_path / "study").eos_id == tok.token_to_id("</s>")
