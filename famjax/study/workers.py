"""Runs side by side on one host: worker processes, each pinned to its own CPU cores, take a
sweep's units in bundles of one model shape, largest FLOPs first, and train them
(famjax.study.units): a shape's programs are compiled by one worker, not by each. A tiny run keeps
one core busy with dispatch and small kernels, so two runs on one core each train nearly twice as
fast as one run on both (benchmarks/study_throughput.py).

A worker exits when the sweep's process dies, however it dies (SIGKILL included): it watches its
parent's sentinel. A worker that dies leaves its unit's runs recorded as failed, and the sweep
goes on with the others; its checkpoints resume them on the next sweep.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import queue
import threading
from pathlib import Path
from typing import Iterator

import jax
import numpy as np
from absl import logging

from famjax import data
from famjax.data.config import DataConfig
from famjax.study.isoflop import RunSpec
from famjax.study.units import FAILED, Outcome, bundles, record_failure, run_dir, train_unit

# the process's JAX settings a worker takes over (the persistent compilation cache)
JAX_SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                "jax_persistent_cache_min_entry_size_bytes", "jax_enable_x64")


def usable_cores() -> list[int]:
  if hasattr(os, "sched_getaffinity"):
    return sorted(os.sched_getaffinity(0))
  return list(range(os.cpu_count() or 1))


def default_workers() -> int:
  """study.workers = 0: one worker per usable CPU core when JAX computes on the CPU; one on an
  accelerator (runs would share its one device) and in a multi-process job."""
  if jax.process_count() > 1 or jax.default_backend() != "cpu":
    return 1
  return len(usable_cores())


def default_cohort_size() -> int:
  """study.cohort_size = 0: cohorts of up to 8 on an accelerator, none on a CPU (where a vmapped
  step of R runs took 1.3x R steps alone: benchmarks/study_throughput.py)."""
  return 1 if jax.default_backend() == "cpu" else 8


def core_sets(n_workers: int) -> list[list[int]]:
  """The usable cores split into n_workers contiguous blocks (cores are shared round-robin when
  there are more workers than cores)."""
  cores = usable_cores()
  if n_workers > len(cores):
    return [[cores[w % len(cores)]] for w in range(n_workers)]
  return [block.tolist() for block in np.array_split(np.asarray(cores), n_workers)]


def train_in_workers(units: list[tuple[RunSpec, ...]], study_dir: str | Path, data_cfg: DataConfig,
                     n_workers: int, fingerprint: str) -> Iterator[Outcome]:
  """Each run's Outcome as its unit finishes, from n_workers processes taking bundles of units of
  one shape (famjax.study.units.bundles) in turn, largest first."""
  context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked JAX runtime
  jobs, results = context.Queue(), context.Queue()
  work = bundles(units, n_workers)
  units = [unit for bundle in work for unit in bundle]  # indexed in the order the jobs hold them
  index = 0
  for bundle in work:
    jobs.put([(index + i, unit) for i, unit in enumerate(bundle)])
    index += len(bundle)
  n_workers = min(n_workers, len(work))
  for _ in range(n_workers):
    jobs.put(None)
  settings = {name: getattr(jax.config, name) for name in JAX_SETTINGS}
  procs = [context.Process(target=_work, name=f"famjax-worker-{w}", daemon=True,
                           args=(w, cores, jobs, results, str(study_dir), data_cfg, settings))
           for w, cores in enumerate(core_sets(n_workers))]
  held: dict[int, int] = {}  # unit index -> the worker training it
  done: set[int] = set()
  try:
    for proc in procs:
      proc.start()
    while len(done) < len(units):
      try:
        kind, worker, index, payload = results.get(timeout=1.0)
      except queue.Empty:
        lost = [i for i, w in held.items() if i not in done and procs[w].exitcode is not None]
        if all(proc.exitcode is not None for proc in procs):
          lost = [i for i in range(len(units)) if i not in done]
        for index in lost:
          done.add(index)
          yield from _lost(units[index], procs[held[index]] if index in held else None,
                           study_dir, fingerprint)
        continue
      if kind == "start":
        held[index] = worker
      else:
        done.add(index)
        yield from payload
    for proc in procs:  # every unit is done: each worker has its stop and ends by itself
      proc.join(timeout=30)
  finally:
    for proc in procs:
      if proc.is_alive():
        proc.terminate()
      proc.join(timeout=30)
    for channel in (jobs, results):
      channel.close()
      channel.join_thread()


def _lost(unit, proc, study_dir, fingerprint) -> Iterator[Outcome]:
  """A unit whose worker died: its runs recorded as failed (their checkpoints stay)."""
  why = (f"worker process died (exit code {proc.exitcode})" if proc is not None
         else "no worker process left to train it")
  for spec in unit:
    record_failure(spec, run_dir(study_dir, spec.run_id), fingerprint, why, why + "\n", 0.0)
    yield Outcome(spec.run_id, FAILED, why)


def _work(worker: int, cores: list[int], jobs, results, study_dir: str, data_cfg: DataConfig,
          settings: dict) -> None:
  """A worker's life: pinned to its cores before JAX starts its CPU backend (importing JAX starts
  none), then one unit after another until the queue says stop."""
  if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, cores)
  _exit_with_parent()
  for name, value in settings.items():
    jax.config.update(name, value)
  logging.set_verbosity(logging.WARNING)
  tokens = data.load_tokens(data_cfg)
  while (bundle := jobs.get()) is not None:
    for index, unit in bundle:
      results.put(("start", worker, index, None))
      results.put(("done", worker, index, train_unit(unit, study_dir, tokens)))


def _exit_with_parent() -> None:
  """Ends this process as soon as its parent is gone, so that no worker outlives its sweep."""
  parent = multiprocessing.parent_process()

  def watch():
    multiprocessing.connection.wait([parent.sentinel])
    os._exit(1)

  threading.Thread(target=watch, daemon=True).start()
