"""A run's workdir: its identity and config history (config.json), metrics log (metrics.jsonl and
TensorBoard) and summary (summary.json). The training loop (train.py) writes through these;
nothing here trains. The lock is files.WorkdirLock.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
from absl import logging

from famjax import data
from famjax.common.files import atomic_write_text
from famjax.train.config import ExperimentConfig, experiment_from_dict, without_added_defaults

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


def read_metrics(path: Path) -> list[dict]:
  """The records of a metrics.jsonl. A malformed last line (a kill mid-write) is dropped with a
  warning; a malformed line before it is an error naming the file and line."""
  if not path.exists():
    return []
  lines = path.read_text().splitlines()
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        raise ValueError("not an object with an integer 'step'")
    except ValueError as e:
      if number == len(lines):
        logging.warning("%s:%d: dropping a malformed last line (a write cut short?): %s", path,
                        number, e)
        break
      raise ValueError(f"{path}:{number}: malformed metrics line ({e}); fix or remove the "
                       "line to resume") from None
    records.append(record)
  return records


class MetricsLog:
  """Appends records to WORKDIR/metrics.jsonl and mirrors scalars to TensorBoard and, when given
  one (famjax.train.telemetry.open_wandb), a W&B run (process 0 only).

  Opening it for a run resumed at `resume_step` keeps the records up to that step (each once) and
  drops the rest, which a resumed run writes again.
  """

  def __init__(self, workdir: Path, resume_step: int, wandb_run=None):
    self.enabled = jax.process_index() == 0
    self.path = workdir / METRICS
    self._tb, self._wandb = None, wandb_run
    if not self.enabled:
      return
    kept, seen = [], set()
    for record in read_metrics(self.path):
      key = (record["step"], tuple(sorted(record)))
      if record["step"] <= resume_step and key not in seen:
        seen.add(key)
        kept.append(record)
    atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(str(workdir / "tensorboard"))
    self._file = self.path.open("a")

  def write(self, step: int, record: dict) -> None:
    if not self.enabled:
      return
    self._file.write(json.dumps({"step": step, **record}) + "\n")
    self._file.flush()
    scalars = {}
    for key, value in record.items():
      for i, v in enumerate(np.atleast_1d(value)):
        scalars[key if np.ndim(value) == 0 else f"{key}/exit{i}"] = float(v)
    for name, v in scalars.items():
      self._tb.add_scalar(name, v, step)
    if self._wandb is not None:
      self._wandb.log({"step": step, **scalars})

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      self._tb.close()
      if self._wandb is not None:
        self._wandb.finish()


def last_train_loss(workdir: Path) -> np.ndarray | None:
  """The last per-exit train loss logged in the workdir (for a resumed run that took no step)."""
  records = [r for r in read_metrics(workdir / METRICS) if "train_loss" in r]
  return np.asarray(records[-1]["train_loss"]) if records else None


def _jsonable(value):
  return json.loads(json.dumps(value, default=list))  # tuples become lists, as when read back


def _run_identity(cfg: ExperimentConfig) -> dict:
  """The fields a resumed run must share with the run that wrote the workdir."""
  tc = cfg.train
  data = {k: v for k, v in dataclasses.asdict(cfg.data).items()
          if k not in ("num_workers", "cache_dir")}  # where and how fast, not what
  # trainable fixes the optimizer state's layout; recorded only when set (older runs lack it)
  frozen = {} if tc.trainable == "all" else {"trainable": tc.trainable}
  return _jsonable({"model": without_added_defaults("model", dataclasses.asdict(cfg.model)),
                    "data": data, "seed": tc.seed, "batch_size": tc.batch_size,
                    "seq_len": tc.seq_len, **frozen})


def _recorded_config(workdir: Path) -> dict | None:
  path = workdir / CONFIG
  return json.loads(path.read_text()) if path.exists() else None


def check_identity(workdir: Path, cfg: ExperimentConfig) -> None:
  """Refuses a config whose model, data, seed or batch shape differ from the workdir's run."""
  previous = _recorded_config(workdir)
  if previous is None:
    return
  identity = _run_identity(cfg)
  if previous["identity"] != identity:
    changed = sorted(k for k in identity if previous["identity"].get(k) != identity[k])
    raise ValueError(f"workdir {workdir} holds a run with a different {changed}; use a new "
                     "--workdir or the original config")


def claim(workdir: Path, cfg: ExperimentConfig, start: int, tokenizer) -> None:
  """Writes config.json: the run's identity, its current config, and the history of the
  optimisation settings (`train` section), each entry with the step it took effect; and the
  run's tokenizer (tokenizer/), so that decoding never needs the corpus."""
  data.save_tokenizer(tokenizer, workdir)
  previous = _recorded_config(workdir) or {}
  history = previous.get("history", [])
  current = _jsonable(dataclasses.asdict(cfg.train))
  if history and history[-1]["train"] != current:
    changed = sorted(k for k in current if history[-1]["train"].get(k) != current[k])
    logging.warning("resuming %s at step %d with changed settings %s (recorded in config.json)",
                    workdir, start, ", ".join(f"train.{k}: {history[-1]['train'].get(k)!r} -> "
                                              f"{current[k]!r}" for k in changed))
  if not history or history[-1]["train"] != current:
    history = history + [{"from_step": start, "train": current}]
  atomic_write_text(workdir / CONFIG, json.dumps(
      {"identity": _run_identity(cfg), "config": _jsonable(dataclasses.asdict(cfg)),
       "history": history}, indent=1))


def write_summary(workdir: Path, summary: dict) -> None:
  if jax.process_index() == 0:
    atomic_write_text(workdir / SUMMARY, json.dumps(summary, indent=1))


def recorded_experiment(workdir: Path) -> ExperimentConfig:
  """The config of the run in `workdir`, as it was last claimed."""
  recorded = _recorded_config(workdir)
  if recorded is None:
    raise FileNotFoundError(f"{workdir} holds no trained run (no {CONFIG}, no checkpoint)")
  return experiment_from_dict(recorded["config"])

