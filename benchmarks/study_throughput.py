"""A study's throughput: the same runs trained one at a time, side by side in workers, as cohorts,
and both; runs per hour and GFLOP/s of each beside the machine's matmul GFLOP/s measured in the
same process, and each mode's largest difference in validation loss from one at a time.

The runs: the laws preset's gamma-grid cells (widths 32 and 48 by default, 4 layers, batch 16 x 64
tokens; families of G = 1, 2, 4 and their dense exit controls) at the smallest token count, on
several seeds, with 32 validation batches instead of 1024. Each mode trains a fresh study in a
fresh process with its own empty persistent compilation cache, as `famjax study` runs (compile
time counted), so no mode profits from another's compiled programs.
Usage: python benchmarks/study_throughput.py [--widths 32] [--tokens 256000] [--seeds 0,1,2]
       [--modes sequential,workers,cohorts,both] [--workers 0] [--cohort_size 8]
       [--step_sizes 2,4,8] [--step_only]
First it times one step of the smallest shape alone and R runs of it vmapped (per run).
Ends with one JSON line.
"""

import argparse
import dataclasses
import json
import multiprocessing
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from famjax.model import sharding
from famjax.model.config import MeshConfig
from famjax.presets.isoflop import PRESETS
from famjax.study import isoflop, records, sweep, workers
from famjax.study.config import ExecutionConfig
from famjax.train import cohort, step
from famjax.train.config import ExperimentConfig
from famjax.train.optimizer import hyperparameters

MODES = {"sequential": (1, 1), "workers": (None, 1), "cohorts": (1, None), "both": (None, None)}


def matmul_gflops(n: int = 1024, repeats: int = 10) -> float:
  """XLA's float32 matmul on this backend, best of `repeats`."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  best = min(_timed(lambda: matmul(x).block_until_ready()) for _ in range(repeats))
  return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def step_times(plan, sizes=(2, 4, 8), repeats: int = 30) -> dict:
  """Seconds per step of the plan's first width-32-or-smallest G = 1 shape alone, and per run-step
  of R such runs vmapped as one cohort program, on this process's devices."""
  spec = min(plan.runs, key=lambda r: (r.experiment.model.d_model, r.experiment.model.n_exits))
  cfg, tc = spec.experiment, spec.experiment.train
  mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
  progs = step.programs(cfg.model, mesh)
  tokens_BT = np.random.default_rng(0).integers(0, 259, (tc.batch_size, tc.seq_len + 1),
                                                dtype=np.int32)
  hparams = {k: np.float32(v) for k, v in hyperparameters(tc, tc.learning_rate).items()}
  weights_G = np.ones(cfg.model.n_exits, np.float32)
  with jax.set_mesh(mesh):
    params = [progs.init_params(seed) for seed in range(max(sizes))]
    states = [progs.init_opt(p) for p in params]

  def seconds(fn, args):
    out = fn(*args)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(repeats):
      out = fn(*out[:2], *args[2:])
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats

  with jax.set_mesh(mesh):
    own = jax.tree.map(jnp.copy, (params[0], states[0]))  # the step donates its inputs
    alone = seconds(progs.step, (*own, tokens_BT, hparams, weights_G))
  stacked = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  vmapped, _ = cohort._vectorised(progs)
  out = {"shape": spec.run_id, "alone_s": alone}
  for r in sizes:
    batch = (stacked(params[:r]), stacked(states[:r]), np.stack([tokens_BT] * r),
             {k: np.full(r, v) for k, v in hparams.items()}, np.stack([weights_G] * r))
    out[f"cohort_{r}_s_per_run"] = seconds(vmapped, batch) / r
  return out


def study_plan(widths, tokens: int, seeds) -> isoflop.StudyPlan:
  preset = PRESETS["laws"]
  study = dataclasses.replace(preset["study"], grid_widths=tuple(widths), grid_tokens=(tokens,),
                              seeds=tuple(seeds), placements="", placement_width=0,
                              placement_tokens=0, placement_seeds=())
  base = ExperimentConfig(model=preset["model"], data=preset["data"],
                          train=dataclasses.replace(preset["train"], eval_batches=32))
  plan = isoflop.plan_study(study, base)
  if not plan.runs:
    raise SystemExit(f"no run of at least {study.min_steps} steps at --tokens={tokens}: "
                     f"{plan.dropped[:2]}")
  return plan


def _train(plan, outdir, n_workers, cohort_size):
  """A sweep as `famjax study` runs it: with a persistent compilation cache (its own, empty), so
  that a program one worker compiled is read by the others."""
  jax.config.update("jax_compilation_cache_dir", str(Path(outdir) / "xla-cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  sweep.run(plan, outdir, progress=False,
            execution=ExecutionConfig(workers=n_workers, cohort_size=cohort_size))


def run_mode(plan, outdir: Path, n_workers: int, cohort_size: int) -> float:
  """Seconds to train the plan in a fresh process (JAX start and compiles included)."""
  proc = multiprocessing.get_context("spawn").Process(
      target=_train, args=(plan, outdir, n_workers, cohort_size))
  start = time.perf_counter()
  proc.start()
  proc.join()
  if proc.exitcode != 0:
    raise RuntimeError(f"the sweep in {outdir} exited with code {proc.exitcode}")
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--widths", default="32,48")
  parser.add_argument("--tokens", type=int, default=256_000)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--modes", default=",".join(MODES))
  parser.add_argument("--workers", type=int, default=0, help="0: one per usable CPU core")
  parser.add_argument("--cohort_size", type=int, default=8)
  parser.add_argument("--step_sizes", default="2,4,8", help="cohort sizes R of the step times")
  parser.add_argument("--step_only", action="store_true",
                      help="only the step times: one run alone against R runs vmapped")
  args = parser.parse_args()
  n_workers = args.workers or workers.default_workers()
  plan = study_plan([int(w) for w in args.widths.split(",")], args.tokens,
                    [int(s) for s in args.seeds.split(",")])
  gflops_matmul = matmul_gflops()
  steps = step_times(plan, [int(r) for r in args.step_sizes.split(",")])
  print(f"{steps['shape']}: {1e3 * steps['alone_s']:.1f} ms a step alone; vmapped, per run: "
        + ", ".join(f"R={k.split('_')[1]} {1e3 * v:.1f} ms" for k, v in steps.items()
                    if k.startswith("cohort_")))
  if args.step_only:
    print(json.dumps({"matmul_gflops": gflops_matmul, "steps": steps}))
    return
  flops = plan.total_flops
  print(f"{len(plan.runs)} runs, {flops:.3g} FLOPs; {n_workers} workers, cohorts of up to "
        f"{args.cohort_size}; matmul {gflops_matmul:.0f} GFLOP/s ({jax.default_backend()})")
  print(f"{'mode':<11} {'seconds':>8} {'runs/hour':>10} {'GFLOP/s':>8} {'% matmul':>8} "
        f"{'speed-up':>8} {'max |dval|':>10}")
  results, losses = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    for mode in args.modes.split(","):
      w, c = MODES[mode]
      seconds = run_mode(plan, Path(tmp) / mode, w or n_workers, c or args.cohort_size)
      frame = records.collect(Path(tmp) / mode).sort_values(["run_id", "exit"])
      losses[mode] = frame["val_loss"].to_numpy()
      first = next(iter(losses))
      diff = float(np.max(np.abs(losses[mode] - losses[first])))
      results[mode] = {"seconds": seconds, "runs_per_hour": len(plan.runs) / seconds * 3600,
                       "gflops": flops / seconds / 1e9,
                       "speedup": results[first]["seconds"] / seconds if results else 1.0,
                       "max_val_loss_diff": diff}
      r = results[mode]
      print(f"{mode:<11} {seconds:8.1f} {r['runs_per_hour']:10.0f} {r['gflops']:8.1f} "
            f"{100 * r['gflops'] / gflops_matmul:7.1f}% {r['speedup']:7.2f}x {diff:10.2e}")
  print(json.dumps({"runs": len(plan.runs), "flops": flops, "workers": n_workers, "steps": steps,
                    "cohort_size": args.cohort_size, "matmul_gflops": gflops_matmul,
                    "backend": jax.default_backend(), "modes": results}))


if __name__ == "__main__":
  main()
