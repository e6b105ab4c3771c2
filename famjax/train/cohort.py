"""Cohorts: runs of one model shape that differ only in values (seed, learning-rate schedule,
optimizer hyperparameters, exit weights, steps), trained as one program that jax.vmap maps over
the runs' parameters, optimizer states and batches. A tiny model's step is mostly dispatch, so R
runs cost little more than one (benchmarks/study_throughput.py). Each run keeps its own workdir,
lock, checkpoints, metrics and summary, as loop.train writes them, and resumes from them, in a
cohort or alone. A cohort's run equals the same run trained alone to float tolerance, not
bitwise: vmap batches the matmuls in another order (tests/train/test_cohort.py measures it).

A run whose steps end before the cohort's last takes its final evaluation, checkpoint and
summary at its own last step; from then on its learning rate is 0 and its results are final.
Cohorts run on one device of one process.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from pathlib import Path

import jax
import numpy as np

from famjax import data
from famjax.common.files import WorkdirLock
from famjax.model import sharding
from famjax.model.config import MeshConfig
from famjax.train import checkpoint, loop, workdir_files
from famjax.train.config import ExperimentConfig
from famjax.train.optimizer import hyperparameters, learning_rate_schedule
from famjax.train.step import exit_losses, exit_weights, programs

# TrainConfig fields that may differ between the runs of a cohort (their values are inputs of the
# vectorised step); the progress bar is off for every run of a cohort
PER_RUN = dict(seed=0, steps=1, tokens=0, learning_rate=1.0, min_lr_ratio=0.0, warmup_steps=0,
               schedule="cosine", decay_fraction=1.0, weight_decay=0.0, b1=0.0, b2=0.0,
               grad_clip=1.0, exit_weights=(), exit_warmup_steps=0, progress=False)


def cohort_key(cfg: ExperimentConfig) -> ExperimentConfig | None:
  """What the runs of one cohort share (the config with PER_RUN's fields blanked); None for a run
  that trains alone: a warm start, a profiled run or one logged to W&B."""
  tc = cfg.train
  if tc.init_from or tc.profile_steps or tc.wandb_project:
    return None
  return dataclasses.replace(cfg, train=dataclasses.replace(tc, **PER_RUN))


@functools.lru_cache(maxsize=16)
def _vectorised(progs):
  """The step and the evaluation of `progs` mapped over a leading runs axis."""
  return (jax.jit(jax.vmap(progs.update), donate_argnums=(0, 1)),
          jax.jit(jax.vmap(functools.partial(exit_losses, progs.graphdef), in_axes=(0, None))))


@dataclasses.dataclass
class _Run:
  """One run's own part of a cohort: where it writes, its data stream and its progress."""

  cfg: ExperimentConfig
  workdir: Path
  mngr: object
  batches: object
  state: dict
  start: int
  seconds: float
  last: int = 0  # the step this run stops at in this call
  log: workdir_files.MetricsLog | None = None
  window: list = dataclasses.field(default_factory=list)  # per-exit train losses
  batch_BT: np.ndarray | None = None  # the last batch drawn, fed again once the run is done
  result: dict | Exception | None = None
  tic: float = 0.0
  tic_step: int = 0


def train_cohort(cfgs: list[ExperimentConfig], workdirs: list[str | Path],
                 tokens: data.TokenData, stop_after: int | None = None) -> list[dict | Exception]:
  """Trains (or resumes) runs of one cohort_key, each in its own workdir. Returns per run its
  summary (as loop.train returns it) or the exception that stopped it alone (its workdir held by
  another process, another run's workdir, a non-finite loss), while the others go on. Runs that
  resume from different steps train as separate cohorts, one after another."""
  keys = {cohort_key(cfg) for cfg in cfgs}
  if len(keys) != 1 or None in keys:
    raise ValueError("a cohort's runs must share every config field but "
                     f"{sorted(PER_RUN)}, and none may warm-start, profile or log to W&B")
  loop.check_vocabulary(cfgs[0], tokens)
  mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
  results: list[dict | Exception | None] = [None] * len(cfgs)
  locks, runs = [], []
  try:
    for i, (cfg, workdir) in enumerate(zip(cfgs, workdirs)):
      try:
        locks.append(WorkdirLock(workdir).acquire())
        workdir_files.check_identity(Path(workdir), cfg)
        runs.append((i, _open(cfg, Path(workdir), mesh, tokens)))
      except Exception as e:  # noqa: BLE001 (this run's, returned; the others train)
        results[i] = e
    by_start = itertools.groupby(sorted(runs, key=lambda ir: ir[1].start),
                                 key=lambda ir: ir[1].start)
    for start, group in by_start:
      group = list(group)
      _train_group([run for _, run in group], start, mesh, tokens, stop_after)
      for i, run in group:
        results[i] = run.result
  finally:
    for lock in locks:
      lock.release()
  return results


def _open(cfg: ExperimentConfig, workdir: Path, mesh, tokens: data.TokenData) -> _Run:
  """A run's fresh state, replaced by its newest checkpoint's; its workdir claimed."""
  tc = cfg.train
  progs = programs(cfg.model, mesh, tc.microbatches, tc.trainable_last_layers)
  with jax.set_mesh(mesh):
    params = progs.init_params(tc.seed)
    state = {"params": params, "opt_state": progs.init_opt(params)}
  mngr = checkpoint.manager(workdir, tc.keep_checkpoints)
  batches = data.train_batches(tokens.train, tc.seq_len, tc.batch_size, tc.seed)
  start, seconds = 0, 0.0
  restored = checkpoint.restore_latest(mngr, state)
  if restored is not None:
    start, state, data_state = restored
    batches.set_state(data_state["batches"])
    seconds = data_state["elapsed_seconds"]
  if start > tc.total_steps:
    raise ValueError(f"train.steps={tc.total_steps} (or train.tokens) is below step {start} of "
                     f"the latest checkpoint in {workdir}: use a new workdir")
  workdir_files.claim(workdir, cfg, start, tokens.tokenizer)
  return _Run(cfg, workdir, mngr, batches, state, start, seconds)


def _stack(trees):
  return jax.tree.map(lambda *xs: jax.numpy.stack(xs), *trees)


def _train_group(runs: list[_Run], start: int, mesh, tokens: data.TokenData,
                 stop_after: int | None) -> None:
  """Steps every run of `runs` (all at step `start`) to its last step as one program."""
  tc = runs[0].cfg.train
  progs = programs(runs[0].cfg.model, mesh, tc.microbatches, tc.trainable_last_layers)
  step_fn, eval_fn = _vectorised(progs)
  val_batches = data.eval_batches(tokens.val, tc.seq_len, tc.batch_size, tc.eval_batches)
  for run in runs:
    total = run.cfg.train.total_steps
    run.last = total if stop_after is None else max(start, min(total, stop_after))
    run.log = workdir_files.MetricsLog(run.workdir, start)
  schedule = _schedules(runs)
  state = {key: _stack([run.state[key] for run in runs]) for key in ("params", "opt_state")}
  for run in runs:
    run.state = None  # the stacked copy is the live one
  tic = time.perf_counter()
  for run in runs:
    run.tic, run.tic_step = tic, start
  pending = None
  try:
    for step in range(start + 1, max(run.last for run in runs) + 1):
      metrics, active = _step(runs, step, state, step_fn, schedule)
      if pending is not None:
        _consume(runs, *pending)
      pending = (step, metrics, active)
      now = time.perf_counter()
      for run, on in zip(runs, active):
        run.seconds += (now - tic) / sum(active) if on else 0.0
      tic = now
      due = [on and (step == run.last or step % run.cfg.train.eval_every == 0
                     or step % run.cfg.train.checkpoint_every == 0)
             for run, on in zip(runs, active)]
      if any(due):
        _consume(runs, *pending)
        pending = None
        _checkpoint_and_finish(runs, due, step, state, eval_fn, val_batches, tokens.fingerprint)
    if pending is not None:
      _consume(runs, *pending)
    unfinished = [run.result is None for run in runs]  # runs resumed at their last step
    if any(unfinished):
      _checkpoint_and_finish(runs, unfinished, start, state, eval_fn, val_batches,
                             tokens.fingerprint, save=False)
  finally:
    for run in runs:
      run.mngr.wait_until_finished()
      run.log.close()


def _schedules(runs: list[_Run]) -> tuple[np.ndarray, dict]:
  """Each run's learning rate at each step, [R, the longest run's steps] (0 past its own), and
  its other optimizer hyperparameters, [R] each."""
  learning_rates_RS = np.zeros((len(runs), max(r.cfg.train.total_steps for r in runs)),
                               np.float32)
  for r, run in enumerate(runs):
    steps = run.cfg.train.total_steps
    learning_rates_RS[r, :steps] = learning_rate_schedule(run.cfg.train)(np.arange(steps))
  names = hyperparameters(runs[0].cfg.train, 0.0)
  hparams = {k: np.asarray([hyperparameters(run.cfg.train, 0.0)[k] for run in runs], np.float32)
             for k in names}
  return learning_rates_RS, hparams


def _step(runs: list[_Run], step: int, state: dict, step_fn, schedule) -> tuple[dict, list]:
  """One optimizer step of every run still training (the others are fed their last batch at a
  learning rate of 0); the step's metrics and which runs it trained."""
  learning_rates_RS, hparams = schedule
  active = [run.result is None and step <= run.last for run in runs]
  for run, on in zip(runs, active):
    if on:
      run.batch_BT = next(run.batches)
  tokens_RBT = np.stack([run.batch_BT for run in runs])
  n_exits = runs[0].cfg.model.n_exits
  weights_RG = np.stack([exit_weights(run.cfg.train, n_exits, step - 1) for run in runs])
  step_hparams = {**hparams, "learning_rate": learning_rates_RS[:, step - 1] * active}
  state["params"], state["opt_state"], metrics = step_fn(
      state["params"], state["opt_state"], tokens_RBT, step_hparams, weights_RG)
  return metrics, active


def _consume(runs: list[_Run], step: int, metrics, active: list[bool]) -> None:
  """Logs each active run's train losses; a run whose loss is not finite stops with the error."""
  metrics = jax.device_get(metrics)
  for r, (run, on) in enumerate(zip(runs, active)):
    if not on or run.result is not None:
      continue
    mine = jax.tree.map(lambda x, r=r: x[r], metrics)
    try:
      loop.check_finite(step, mine)
    except FloatingPointError as e:
      run.result = e
      continue
    run.window.append(np.asarray(mine["exit_loss"]))
    tc = run.cfg.train
    if step % tc.log_every == 0 or step == tc.total_steps:
      now = time.perf_counter()
      tokens_per_s = (step - run.tic_step) * tc.batch_size * tc.seq_len / max(now - run.tic, 1e-9)
      run.log.write(step, {"train_loss": np.mean(run.window[-tc.log_every:], axis=0).tolist(),
                           "loss": float(mine["loss"]), "grad_norm": float(mine["grad_norm"]),
                           "tokens_per_s": tokens_per_s})
      run.tic, run.tic_step = now, step


def _checkpoint_and_finish(runs, due, step, state, eval_fn, val_batches, fingerprint,
                           save=True) -> None:
  """For each due run: its validation loss when an evaluation or its end is due, its checkpoint,
  and at its last step its summary."""
  val_VRG = None
  for r, (run, on) in enumerate(zip(runs, due)):
    if not on or run.result is not None:
      continue
    tc = run.cfg.train
    ends = step == run.last
    if step % tc.eval_every == 0 or step == tc.total_steps or ends:
      if val_VRG is None:
        val_VRG = np.stack(jax.device_get([eval_fn(state["params"], b) for b in val_batches]))
      if save and (step % tc.eval_every == 0 or step == tc.total_steps):
        run.log.write(step, {"val_loss": val_VRG[:, r].mean(0).tolist()})
    if save and (step % tc.checkpoint_every == 0 or ends):
      mine = jax.tree.map(lambda x, r=r: x[r], state)
      checkpoint.save(run.mngr, step, mine, {"batches": run.batches.get_state(),
                                             "elapsed_seconds": run.seconds})
    if ends:
      run.result = _summary(run, step, val_VRG[:, r], fingerprint)


def _summary(run: _Run, step: int, val_loss_VG: np.ndarray, fingerprint: str) -> dict:
  window = run.window
  if not window:  # resumed a finished run: its last logged train loss
    last = workdir_files.last_train_loss(run.workdir)
    window = [] if last is None else [last]
  log_every = run.cfg.train.log_every
  train_loss = np.mean(window[-log_every:], axis=0).tolist() if window else None
  summary = loop.run_summary(run.cfg, step, train_loss, val_loss_VG, run.seconds, fingerprint)
  run.mngr.wait_until_finished()
  workdir_files.write_summary(run.workdir, summary)
  return summary
