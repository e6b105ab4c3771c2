"""A run's profile trace and its W&B mirror: written when asked, training unchanged."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import wandb

from famjax.data.config import DataConfig
from famjax.train import loop
from famjax.train.config import ExperimentConfig, TrainConfig, config_hash

from conftest import tiny_model


def _last(workdir: Path, key: str) -> dict:
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r for r in records if key in r][-1]


@pytest.fixture(scope="module")
def traced(tmp_path_factory, corpus_dir):
  plain = ExperimentConfig(
      model=tiny_model(), data=DataConfig(corpus=str(corpus_dir), val_fraction=0.1),
      train=TrainConfig(batch_size=8, seq_len=32, steps=30, learning_rate=1e-2, warmup_steps=5,
                        log_every=10, eval_every=15, eval_batches=2, checkpoint_every=30,
                        progress=False))
  tracked = dataclasses.replace(plain, train=dataclasses.replace(
      plain.train, profile_steps=(11, 13), wandb_project="famjax-tests", wandb_group="study-x"))
  root = tmp_path_factory.mktemp("tracking")
  finished = []  # what W&B's own run object held when famjax finished it

  def finish(run, *args, **kwargs):
    finished.append({"summary": dict(run.summary), "project": run.project, "group": run.group,
                     "name": run.name, "dir": run.dir})
    return original(run, *args, **kwargs)

  mp = pytest.MonkeyPatch()
  mp.setenv("WANDB_MODE", "offline")
  mp.setenv("WANDB_SILENT", "true")
  original = wandb.sdk.wandb_run.Run.finish
  mp.setattr(wandb.sdk.wandb_run.Run, "finish", finish)
  try:
    return dict(plain=loop.train(plain, root / "plain"),
                tracked=loop.train(tracked, root / "run-a"), wandb=finished, root=root,
                hashes=(config_hash(plain), config_hash(tracked)))
  finally:
    mp.undo()


def test_tracking_changes_no_number_and_no_run_identity(traced):
  np.testing.assert_array_equal(traced["tracked"]["val_loss"], traced["plain"]["val_loss"])
  np.testing.assert_array_equal(traced["tracked"]["train_loss"], traced["plain"]["train_loss"])
  assert traced["hashes"][0] == traced["hashes"][1]


def test_profile_steps_write_a_trace_for_tensorboard(traced):
  traces = list((traced["root"] / "run-a" / "tensorboard" / "plugins" / "profile").glob(
      "*/*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 1000
  assert not (traced["root"] / "plain" / "tensorboard" / "plugins").exists()


def test_wandb_offline_run_holds_the_metrics_of_tensorboard(traced):
  workdir = traced["root"] / "run-a"
  runs = list((workdir / "wandb").glob("offline-run-*"))
  assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))  # the offline record, to sync
  [run] = traced["wandb"]
  assert (run["project"], run["group"], run["name"]) == ("famjax-tests", "study-x", "run-a")
  summary = run["summary"]
  train_loss, val_loss = _last(workdir, "train_loss"), _last(workdir, "val_loss")
  for i in range(3):
    assert summary[f"train_loss/exit{i}"] == pytest.approx(train_loss["train_loss"][i])
    assert summary[f"val_loss/exit{i}"] == pytest.approx(val_loss["val_loss"][i])
  assert summary["step"] == 30 and "grad_norm" in summary and "tokens_per_s" in summary
  assert not (traced["root"] / "plain" / "wandb").exists()


@pytest.mark.parametrize("steps", [(0, 3), (5, 4), (1, 31), (3,)])
def test_profile_steps_out_of_range_name_the_field(steps):
  with pytest.raises(ValueError, match=r"train.profile_steps.*1 <= start <= stop <= 30"):
    TrainConfig(steps=30, profile_steps=steps)
