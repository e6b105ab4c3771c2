"""Faults and bad input lose nothing: each case as a user meets it (the CLI in a subprocess where
the case is about the CLI)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from famjax.common.files import WorkdirBusy, WorkdirLock, atomic_write_text
from famjax.train import checkpoint, loop

ROOT = Path(__file__).resolve().parents[1]


def cli(module, *args, cwd=ROOT, timeout=300):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                        text=True, env=env, timeout=timeout)


def metrics_steps(workdir, key="train_loss"):
  lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [json.loads(l)["step"] for l in lines if key in l]


def test_fewer_steps_than_the_latest_checkpoint_is_refused(tiny_experiment, tmp_path):
  cfg = tiny_experiment(steps=40, checkpoint_every=20)
  done = loop.train(cfg, tmp_path)
  summary = (tmp_path / "summary.json").read_text()
  shorter = tiny_experiment(steps=30, checkpoint_every=20)
  with pytest.raises(ValueError, match="train.steps=30 .* below step 40 of the latest checkpoint"):
    loop.train(shorter, tmp_path)
  assert (tmp_path / "summary.json").read_text() == summary
  assert done["step"] == 40 and done["tokens"] == 40 * 8 * 32


def test_a_paused_run_reports_the_step_its_state_has(tiny_experiment, tmp_path):
  cfg = tiny_experiment(steps=40, checkpoint_every=10)
  loop.train(cfg, tmp_path, stop_after=20)
  again = loop.train(cfg, tmp_path, stop_after=10)  # asks to stop before where it is
  assert again["step"] == 20 and again["tokens"] == 20 * 8 * 32
  assert json.loads((tmp_path / "summary.json").read_text())["step"] == 20


@pytest.mark.slow
def test_a_second_trainer_on_a_workdir_is_refused_naming_the_holder(corpus_dir, tmp_path):
  args = ["--config=tiny", f"--workdir={tmp_path}",
          f"--config.data.corpus={corpus_dir}", "--config.data.val_fraction=0.1",
          "--config.model.d_model=32", "--config.model.n_heads=2", "--config.model.d_ff=64",
          "--config.train.seq_len=32", "--config.train.batch_size=4",
          "--config.train.warmup_steps=1", "--config.train.progress=False"]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  first = subprocess.Popen([sys.executable, "-m", "experiments.train", *args,
                            "--config.train.steps=100000"], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    lock = tmp_path / WorkdirLock.name
    deadline = time.time() + 120
    while not (lock.exists() and lock.read_text()) and time.time() < deadline:
      time.sleep(0.2)
    second = cli("experiments.train", *args, "--config.train.steps=5")
    assert second.returncode != 0
    assert f"is in use by process {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr
  finally:
    first.kill()
    first.wait()
  WorkdirLock(tmp_path).acquire().release()  # the holder died: its lock went with it


def test_the_lock_excludes_a_second_holder_in_the_same_process(tmp_path):
  with WorkdirLock(tmp_path):
    with pytest.raises(WorkdirBusy, match=f"process {os.getpid()}"):
      WorkdirLock(tmp_path).acquire()
  WorkdirLock(tmp_path).acquire().release()  # released: free again


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tiny_experiment, tmp_path,
                                                                     caplog):
  cfg = tiny_experiment(steps=30, checkpoint_every=10)
  straight = loop.train(cfg, tmp_path / "straight")
  workdir = tmp_path / "damaged"
  loop.train(cfg, workdir)
  files = sorted((workdir / "checkpoints" / "30").rglob("*"), key=lambda p: -p.stat().st_size
                 if p.is_file() else 0)
  victim = files[0]
  victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
  with caplog.at_level("WARNING"):
    resumed = loop.train(cfg, workdir)  # retrains steps 21..30 from checkpoint 20
  assert "checkpoint at step 30 does not restore" in caplog.text
  assert len([r for r in caplog.records if "does not restore" in r.getMessage()]) == 1
  aside = list((workdir / checkpoint.DAMAGED_DIR).glob("30-*"))
  assert len(aside) == 1 and aside[0].is_dir()
  np.testing.assert_allclose(resumed["val_loss"], straight["val_loss"], rtol=1e-6)
  assert metrics_steps(workdir) == metrics_steps(tmp_path / "straight")


def test_a_checkpoint_of_another_parameter_layout_is_refused_and_kept(tiny_experiment, tmp_path):
  """A checkpoint whose parameter tree differs from the model's (as one written before the
  scanned-segment layout) is not a damaged one: the run stops with a message naming the
  difference, and the checkpoint stays where it is."""
  from famjax.model import sharding
  cfg = tiny_experiment(steps=10, checkpoint_every=10)
  state = loop.Trainer.create(cfg, sharding.make_mesh()).state
  params = dict(state["params"])
  params["layers"] = params.pop("segments")  # another layout: per-layer, not scanned segments
  mngr = checkpoint.manager(tmp_path, 3)
  checkpoint.save(mngr, 5, {**state, "params": params}, {"batches": {}, "elapsed_seconds": 0.0})
  mngr.wait_until_finished()
  with pytest.raises(ValueError, match=r"another parameter layout.*segments.*Nothing was moved"):
    loop.train(cfg, tmp_path)
  assert (tmp_path / "checkpoints" / "5").is_dir()
  assert not (tmp_path / checkpoint.DAMAGED_DIR).exists()
  assert not (tmp_path / "config.json").exists()


def test_a_torn_last_metrics_line_is_dropped_and_each_step_logged_once(tiny_experiment, tmp_path,
                                                                        caplog):
  cfg = tiny_experiment(steps=40, checkpoint_every=20)
  loop.train(cfg, tmp_path, stop_after=30)  # checkpoints at 20 and 30, logs to 30
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('{"step": 31, "train_lo')
  with caplog.at_level("WARNING"):
    loop.train(cfg, tmp_path)
  assert "dropping a malformed last line" in caplog.text
  assert metrics_steps(tmp_path) == list(range(10, 41, 10))


def test_a_malformed_middle_metrics_line_names_the_file_and_line(tiny_experiment, tmp_path):
  cfg = tiny_experiment(steps=40, checkpoint_every=20)
  loop.train(cfg, tmp_path, stop_after=20)
  path = tmp_path / "metrics.jsonl"
  lines = path.read_text().splitlines()
  path.write_text("\n".join(lines[:1] + ["not json"] + lines[1:]) + "\n")
  with pytest.raises(ValueError, match=f"{path}:2: malformed metrics line"):
    loop.train(cfg, tmp_path)


def test_resuming_from_step_zero_keeps_no_stale_records(tiny_experiment, tmp_path):
  """A kill during the first save leaves logs but no checkpoint: the rerun logs each step once."""
  cfg = tiny_experiment(steps=20, checkpoint_every=20)
  loop.train(cfg, tmp_path)
  import shutil
  shutil.rmtree(tmp_path / "checkpoints")
  (tmp_path / "summary.json").unlink()
  loop.train(cfg, tmp_path)
  assert metrics_steps(tmp_path) == [10, 20] and metrics_steps(tmp_path, "val_loss") == [20]


def test_a_run_that_fails_its_checks_does_not_claim_the_workdir(tiny_experiment, tmp_path):
  bad = tiny_experiment(batch_size=4096)  # more windows per batch than the corpus holds
  with pytest.raises(ValueError, match="train.batch_size"):
    loop.train(bad, tmp_path)
  assert not (tmp_path / "config.json").exists()
  good = tiny_experiment(steps=10, batch_size=8)
  assert loop.train(good, tmp_path)["step"] == 10


def test_changed_settings_on_resume_are_recorded(tiny_experiment, tmp_path, caplog):
  loop.train(tiny_experiment(steps=40, checkpoint_every=20), tmp_path, stop_after=20)
  with caplog.at_level("WARNING"):
    loop.train(tiny_experiment(steps=40, checkpoint_every=20, learning_rate=3e-3), tmp_path)
  assert "train.learning_rate: 0.01 -> 0.003" in caplog.text
  history = json.loads((tmp_path / "config.json").read_text())["history"]
  assert [h["from_step"] for h in history] == [0, 20]
  assert [h["train"]["learning_rate"] for h in history] == [1e-2, 3e-3]


def test_output_files_get_the_users_normal_permissions(tiny_experiment, tmp_path):
  loop.train(tiny_experiment(steps=10), tmp_path)
  mask = os.umask(0)
  os.umask(mask)
  for name in ("summary.json", "config.json", "metrics.jsonl"):
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_a_failed_atomic_write_leaves_no_temporary_file(tmp_path):
  class Unprintable:
    def __str__(self):
      raise RuntimeError("no")
  with pytest.raises(TypeError):
    atomic_write_text(tmp_path / "x.json", Unprintable())
  assert list(tmp_path.iterdir()) == []


def test_unknown_config_fields_are_one_line_errors_naming_the_closest_field(tmp_path):
  out = cli("experiments.train", "--config.model.dmodel=64", f"--workdir={tmp_path}")
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert "unknown config field model.dmodel" in out.stderr and "model.d_model" in out.stderr
  out = cli("experiments.isoflop", "--config.study.budget=1e10", "--dry_run")
  assert "unknown config field study.budget" in out.stderr and "study.budgets" in out.stderr


def test_presets_resolve_from_any_directory_and_help_explains_overrides(tmp_path):
  out = cli("experiments.train", "--helpshort", cwd=tmp_path)
  assert "--config.SECTION.FIELD=VALUE" in out.stdout
  assert "--config=small (famjax/presets/train.py)" in out.stdout
  out = cli("experiments.isoflop", "--dry_run", "--config=paper", cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "h100 hours at 40% MFU" in out.stdout


def test_make_clean_keeps_results():
  out = subprocess.run(["make", "-n", "clean"], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0 and "rm -rf" in out.stdout and "runs" not in out.stdout


def test_make_clean_cache_removes_the_cache_and_nothing_else(tmp_path):
  cache = tmp_path / "famjax-cache"
  out = subprocess.run(["make", "-n", "clean-cache"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "FAMJAX_CACHE": str(cache)})
  commands = [line for line in out.stdout.splitlines() if not line.startswith("make")]
  assert out.returncode == 0 and commands == [f"rm -rf {cache}"]  # (make's own lines under make)


def test_fit_speed_without_the_reference_data_says_where_to_get_it(tmp_path):
  out = subprocess.run([sys.executable, "benchmarks/fit_speed.py"], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "FAMJAX_REFERENCE_DATA": str(tmp_path)})
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert "epoch-research/analyzing-chinchilla" in out.stderr and "--data" in out.stderr


# --- fitting -------------------------------------------------------------------------------------


def fit_cli(tmp_path, frame, *args):
  path = tmp_path / "runs.csv"
  frame.to_csv(path, index=False)
  return cli("experiments.fit", f"--data={path}", f"--out={tmp_path / 'fit.json'}",
             "--grid_every=450", *args)


def family(n_rows=30, seed=0):
  rng = np.random.default_rng(seed)
  n = np.geomspace(1e7, 1e9, n_rows)
  d = rng.permutation(np.geomspace(1e9, 1e11, n_rows))
  g = np.resize([1, 2, 4], n_rows)
  loss = (1.7 + 400 / n ** 0.3 + 3000 / d ** 0.34) * g ** 0.03
  return pd.DataFrame({"N": n, "D": d, "G": g, "loss": loss})


def test_data_in_which_a_variable_does_not_vary_is_refused(tmp_path):
  frame = family().assign(N=1e8)
  out = fit_cli(tmp_path, frame, "--bootstrap=0")
  assert out.returncode != 0 and "N takes one value (1e+08)" in out.stderr
  assert "Traceback" not in out.stderr and not (tmp_path / "fit.json").exists()
  branch = family().assign(exit=1)
  out = fit_cli(tmp_path, branch, "--bootstrap=0", "--law=branch")
  assert out.returncode != 0 and "P = exit - 1 takes one value" in out.stderr


@pytest.mark.parametrize("frame_fn, args, message", [
    (lambda: family(), ["--bootstrap=1"], "--bootstrap must be 0 .no intervals. or at least 100"),
    (lambda: family().assign(G=np.resize([1, 2.5], 30)), ["--bootstrap=0"],
     "column 'G' must hold integers"),
    (lambda: family().iloc[:0], ["--bootstrap=0"], "holds no rows"),
])
def test_bad_fit_input_is_a_one_line_error(tmp_path, frame_fn, args, message):
  out = fit_cli(tmp_path, frame_fn(), *args)
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert __import__("re").search(message, out.stderr), out.stderr[-1000:]


def test_an_unwritable_out_fails_before_the_fit_and_leaves_nothing(tmp_path):
  frame = family()
  path = tmp_path / "runs.csv"
  frame.to_csv(path, index=False)
  out = cli("experiments.fit", f"--data={path}", f"--out={tmp_path / 'no' / 'fit.json'}",
            "--bootstrap=0", "--grid_every=450")
  assert out.returncode != 0 and "directory" in out.stderr and "does not exist" in out.stderr
  assert "fit:" not in out.stderr  # no fit was started
  assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.csv"]


def test_duplicate_rows_are_fitted_with_a_warning(tmp_path):
  frame = pd.concat([family(), family().iloc[:3]])
  out = fit_cli(tmp_path, frame, "--bootstrap=0")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "repeat earlier rows exactly" in out.stderr
