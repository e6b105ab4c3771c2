"""Run records: one per (run, exit), collected, turned into each law's rows, exported."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from famjax.analysis.live_fit import LiveFit
from famjax.model import counts
from famjax.model.config import ModelConfig
from famjax.scaling import fit_data, laws
from famjax.study import isoflop, records
from famjax.study.config import AnalysisConfig, StudyConfig
from famjax.train.config import ExperimentConfig, TrainConfig

FINGERPRINT = "a" * 64


@pytest.fixture(scope="module")
def plan():
  study = StudyConfig(budgets=(3e10, 1e11), granularities=(1, 2, 4), head_dim=4,
                      widths=(4, 8, 12, 16, 20), sizes_per_budget=3, tokens_per_param=100.0,
                      leverage="1e11:2", min_steps=10)
  base = ExperimentConfig(model=ModelConfig(vocab_size=264, max_seq_len=64),
                          train=TrainConfig(batch_size=16, seq_len=64, steps=1, warmup_steps=0))
  return isoflop.plan_study(study, base)


def fake_summary(spec, rng):
  n = spec.experiment.model.n_exits
  val = sorted(rng.uniform(2.0, 3.0, n), reverse=True)
  return {"train_loss": [v - 0.1 for v in val], "val_loss": val, "tokens": spec.tokens}


@pytest.fixture(scope="module")
def study_dir(plan, tmp_path_factory):
  root = tmp_path_factory.mktemp("study")
  rng = np.random.default_rng(0)
  for spec in plan.runs:
    run_records = records.run_records(spec, fake_summary(spec, rng), fingerprint=FINGERPRINT,
                                      wall_seconds=1.0)
    records.write_records(root / "runs" / spec.run_id, run_records)
  return root


def test_one_record_per_run_and_exit_with_the_documented_fields(plan, study_dir):
  frame = records.collect(study_dir, FINGERPRINT)
  assert len(frame) == sum(r.experiment.model.n_exits for r in plan.runs)
  assert (frame.groupby(["run_id", "exit"]).size() == 1).all()
  for spec in plan.runs:
    rows = frame[frame["run_id"] == spec.run_id].sort_values("exit")
    acc = counts.account(spec.experiment.model, 64)
    n_exits = spec.experiment.model.n_exits
    assert rows["exit"].tolist() == list(range(1, n_exits + 1))
    assert rows["P"].tolist() == [g - 1 for g in range(1, n_exits + 1)]
    assert rows["Q"].tolist() == [n_exits - g for g in range(1, n_exits + 1)]
    assert rows["exit_layer"].tolist() == list(spec.experiment.model.exit_layers)
    assert rows["N_exit"].tolist() == list(acc.params_per_exit)
    assert rows["N_exit_non_embedding"].tolist() == list(acc.non_embedding_per_exit)
    assert set(rows["N_family"]) == {acc.params_total}
    assert set(rows["D"]) == {spec.tokens} and set(rows["C"]) == {spec.budget}


def test_familial_rows_take_the_weighted_mean_exit_loss():
  spec = isoflop.RunSpec(
      run_id="r", kind=isoflop.ISOFLOP, budget=1e10, granularity=2, seed=0,
      experiment=ExperimentConfig(model=ModelConfig(n_layers=2, exit_layers=(1, 2)),
                                  train=TrainConfig(exit_weights=(0.2, 0.6))),
      flops_per_token=1.0, tokens=1000)
  summary = {"val_loss": [3.0, 2.0], "train_loss": [2.9, 1.9], "tokens": 1000}
  frame = pd.DataFrame(records.run_records(spec, summary, fingerprint=FINGERPRINT,
                                           wall_seconds=1.0))
  rows = records.law_rows(frame, "familial")
  assert rows["loss"].tolist() == [pytest.approx(0.25 * 3.0 + 0.75 * 2.0)]
  assert records.law_rows(frame, "familial", loss="train")["loss"].tolist() == [
      pytest.approx(0.25 * 2.9 + 0.75 * 1.9)]
  acc = counts.account(spec.experiment.model, spec.experiment.train.seq_len)
  assert rows["N"].tolist() == [acc.params_non_embedding]
  assert records.law_rows(frame, "familial", param_count="total")["N"].tolist() == [
      acc.params_total]


def test_each_law_gets_its_rows(plan, study_dir):
  frame = records.collect(study_dir, FINGERPRINT)
  isoflop_runs = [r for r in plan.runs if r.kind == isoflop.ISOFLOP]
  familial = records.law_rows(frame, "familial")
  assert sorted(familial["run_id"]) == sorted(r.run_id for r in isoflop_runs)
  chinchilla = records.law_rows(frame, "chinchilla")
  assert set(chinchilla["G"]) == {1} and len(chinchilla) == sum(
      r.granularity == 1 for r in isoflop_runs)
  branch = records.law_rows(frame, "branch")
  assert len(branch) == sum(r.granularity for r in isoflop_runs)
  exits = frame[frame["kind"] == isoflop.ISOFLOP].sort_values(["run_id", "exit"])
  np.testing.assert_array_equal(branch.sort_values(["run_id", "exit"])["N"],
                                exits["N_exit_non_embedding"])
  for name, law in (("familial", laws.FAMILIAL), ("branch", laws.BRANCH),
                    ("chinchilla", laws.CHINCHILLA)):
    fit_data.validate(records.law_rows(frame, name), law)  # fit-ready


def test_records_round_trip_through_csv_and_parquet(study_dir, tmp_path):
  frame = records.collect(study_dir, FINGERPRINT)
  written = records.write_tables(frame, tmp_path)
  assert set(written) >= {f"{name}.{ext}" for name in ("records", *laws.LAWS)
                          for ext in ("csv", "parquet")}
  for name in laws.LAWS:
    expected = records.law_rows(frame, name)
    for ext in ("csv", "parquet"):
      back = fit_data.read_table(written[f"{name}.{ext}"])
      pd.testing.assert_frame_equal(back, expected, check_dtype=False)
  back = pd.read_parquet(written["records.parquet"])
  pd.testing.assert_frame_equal(back, frame, check_dtype=False)


def test_a_corrupt_record_is_reported_with_its_file(plan, study_dir, tmp_path):
  import shutil
  copy = tmp_path / "study"
  shutil.copytree(study_dir, copy)
  broken = copy / "runs" / plan.runs[0].run_id / records.RECORDS
  broken.write_text(broken.read_text()[:50])
  with pytest.raises(ValueError, match=f"malformed run record {broken}"):
    records.collect(copy)
  rows = json.loads((study_dir / "runs" / plan.runs[1].run_id / records.RECORDS).read_text())
  del rows[0]["val_loss"]
  broken.write_text(json.dumps(rows))
  with pytest.raises(ValueError, match=r"malformed run record .* lacks \['val_loss'\]"):
    records.collect(copy)


def test_records_of_another_corpus_are_refused_unless_asked(study_dir):
  with pytest.raises(ValueError, match="trained on another corpus"):
    records.collect(study_dir, "b" * 64)
  assert len(records.collect(study_dir, "b" * 64, allow_other_corpora=True))


def test_a_failed_run_has_records_without_losses(plan):
  failed = records.run_records(plan.runs[0], None, fingerprint=FINGERPRINT, wall_seconds=2.0,
                               error="RuntimeError: boom")
  assert {r["status"] for r in failed} == {"failed"}
  assert all(r["val_loss"] is None and r["error"] == "RuntimeError: boom" for r in failed)
  frame = pd.DataFrame(failed)
  assert records.law_rows(frame, "familial").empty


def test_finished_needs_ok_records_with_the_same_config(plan, study_dir):
  from famjax.train.config import config_hash
  spec = plan.runs[0]
  workdir = study_dir / "runs" / spec.run_id
  assert records.finished(workdir, config_hash(spec.experiment))
  other = dataclasses.replace(spec.experiment, train=dataclasses.replace(
      spec.experiment.train, learning_rate=1.0))
  assert not records.finished(workdir, config_hash(other))


def test_the_live_fit_adds_the_records_the_sweep_passes(plan, tmp_path):
  """After its first read of the study directory, the live fit counts the records it is handed:
  runs whose records never reached the disk are fitted too."""
  rng = np.random.default_rng(1)
  runs = [spec for spec in plan.runs if spec.kind == isoflop.ISOFLOP]
  on_disk, handed = runs[:-3], runs[-3:]
  for spec in on_disk:
    records.write_records(tmp_path / "runs" / spec.run_id, records.run_records(
        spec, fake_summary(spec, rng), fingerprint=FINGERPRINT, wall_seconds=1.0))
  live = LiveFit(tmp_path, AnalysisConfig(), FINGERPRINT, starts_every=500)
  assert f"over {len(on_disk)} runs" in live(on_disk[-1], None)
  for k, spec in enumerate(handed, start=1):
    run_records = records.run_records(spec, fake_summary(spec, rng), fingerprint=FINGERPRINT,
                                      wall_seconds=1.0)
    assert f"over {len(on_disk) + k} runs" in live(spec, run_records)
