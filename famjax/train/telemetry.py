"""What a run reports beyond its workdir's files: a jax.profiler trace of chosen steps (read by
TensorBoard's profile plugin or xprof) and an optional Weights & Biases run that receives the
same metrics as TensorBoard."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import jax
from absl import logging

from famjax.train.config import ExperimentConfig


class ProfileWindow:
  """Traces steps start..stop (1-based, both included) of train.profile_steps into `log_dir`
  (a run's tensorboard/: plugins/profile/RUN/HOST.xplane.pb); () traces nothing."""

  def __init__(self, steps: tuple[int, ...], log_dir: Path):
    self.start, self.stop = steps if steps else (0, -1)
    self.log_dir, self.tracing = log_dir, False

  def before(self, step: int) -> None:
    if step == self.start:
      jax.profiler.start_trace(str(self.log_dir))
      self.tracing = True

  def annotation(self, step: int):
    """Marks one step for the profile's step view (a no-op outside the window)."""
    return jax.profiler.StepTraceAnnotation("train", step_num=step)

  def after(self, step: int, metrics) -> None:
    if self.tracing and step == self.stop:
      jax.block_until_ready(metrics)  # the window holds the last step's device work
      self.close()

  def close(self) -> None:
    if self.tracing:
      jax.profiler.stop_trace()
      self.tracing = False


def open_wandb(cfg: ExperimentConfig, workdir: Path):
  """The W&B run of this workdir when train.wandb_project is set (else None): named after the
  workdir, grouped by train.wandb_group (a study's id), resumed under one id by a resumed run.
  Offline or online as WANDB_MODE says."""
  tc = cfg.train
  if not tc.wandb_project or jax.process_index() != 0:
    return None
  try:
    import wandb
  except ImportError:
    raise ImportError(f"train.wandb_project={tc.wandb_project!r} needs Weights & Biases: "
                      "pip install 'famjax[wandb]' (or leave the field empty)") from None
  workdir = workdir.resolve()
  run = wandb.init(project=tc.wandb_project, group=tc.wandb_group or None, name=workdir.name,
                   id=hashlib.sha256(str(workdir).encode()).hexdigest()[:16], resume="allow",
                   dir=str(workdir), config=dataclasses.asdict(cfg))
  run.define_metric("step")
  run.define_metric("*", step_metric="step")  # a resumed run may log a step again
  logging.info("W&B run %s (%s)", run.id, run.url or "offline")
  return run
