"""Device memory of every run of a plan, read from XLA: the real train step, lowered and compiled
with abstract inputs (nothing is allocated) for a simulated node of fake CPU devices, or by the
TPU compiler for a TPU slice that is not attached (famjax.hardware.tpu), and the cheapest setting
(FSDP degree, remat policy, microbatches) whose step fits: a stated memory per device, or the
HBM the TPU compiler allows (a step it refuses for HBM does not fit).

Cheapest first (docs/memory.md): remat "none", then "dots", then "block" (recomputation costs
FLOPs); for one policy, fewer microbatches (the same FLOPs in smaller matmuls, and one weight
gather per microbatch under FSDP); for those, the smaller FSDP degree.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import threading
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from famjax.common.files import atomic_write_text
from famjax.hardware import cost, tpu
from famjax.model import counts, sharding
from famjax.model.config import MeshConfig, ModelConfig
from famjax.train import optimizer, step
from famjax.train.config import TrainConfig

REMAT_ORDER = ("none", "dots", "block")
STATE_BYTES_PER_PARAM = 12  # float32 parameter, AdamW's float32 mu and nu
# the CPU backend's code generation does not change buffer assignment: compiling at level 0 gives
# the same memory analysis in about half the time (TPU programs compile with the defaults)
_CPU_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0}
STATE_MARGIN = 0.99  # the lower bound's share of the formula's state (XLA's is within 0.03%)


@dataclasses.dataclass(frozen=True)
class Setting:
  fsdp: int  # mesh.fsdp (mesh.data takes the node's other devices)
  remat: str  # model.remat
  microbatches: int  # train.microbatches

  def __str__(self) -> str:
    return f"fsdp {self.fsdp}, remat {self.remat}, micro {self.microbatches}"


@dataclasses.dataclass(frozen=True)
class Footprint:
  """Bytes per device of one compiled train step (XLA's memory analysis)."""

  params: int  # the parameters' shards on one device
  optimizer: int  # the optimizer state's shards
  temporaries: int  # activations, gradients, gathered weights, workspace
  peak: int  # arguments + outputs - donated + temporaries
  compile_seconds: float  # lowering and compiling (0 when read from the cache)
  refused: bool = False  # the TPU compiler refused it for HBM (temporaries: what it required)
  flops: float = 0.0  # the compiler's cost analysis, per device (loop bodies counted once)
  bytes_accessed: float = 0.0
  program_flops: float = 0.0  # matmul FLOPs of the traced step, all devices (study.cost)


@dataclasses.dataclass(frozen=True)
class Target:
  """The devices a run is compiled for and the memory it may use on each of them."""

  devices: tuple  # fake CPU devices of one node, or a TPU slice's compile-only devices
  model_axis: int  # mesh.model; data x fsdp take the rest
  capacity_bytes: float
  cache_dir: Path | None = None  # one JSON per measured (shape, batch, setting); None: no cache
  name: str = "cpu"  # study.memory_target ("cpu" or "tpu:GEN:TOPOLOGY"), or an attached platform

  @property
  def slice(self) -> tpu.Slice | None:
    return tpu.parse(self.name) if self.name.startswith("tpu:") else None


@dataclasses.dataclass(frozen=True)
class ShapePlan:
  """The chosen setting of one model shape (None: it fits no setting) and what was measured."""

  model: ModelConfig
  run_ids: tuple[str, ...]
  setting: Setting | None
  measured_at: Setting  # the setting, else the most frugal setting tried
  footprint: Footprint  # at measured_at
  analytic_state: float  # parameters + AdamW state per device at that FSDP degree, by formula
  compiles: int  # programs compiled (not read from the cache)
  seconds: float  # spent lowering and compiling this shape
  skipped: int = 0  # settings the lower bound ruled out without compiling

  @property
  def state_difference(self) -> float:
    """(XLA - analytic) / analytic for parameters plus optimizer state."""
    xla = self.footprint.params + self.footprint.optimizer
    return xla / self.analytic_state - 1.0


def simulated_devices(n: int) -> tuple:
  """n CPU devices; asks JAX for them if its CPU backend has not started yet."""
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:
    pass  # the backend is up: whatever XLA_FLAGS gave it
  devices = jax.devices("cpu")
  if len(devices) < n:
    raise ValueError(f"study.memory_devices={n} needs {n} CPU devices, JAX has {len(devices)}: "
                     f"set XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX starts")
  return tuple(devices[:n])


def analytic_state_bytes(model: ModelConfig, seq_len: int, shards: int) -> float:
  """Parameters and AdamW state per device if every parameter were split over `shards`."""
  return counts.account(model, seq_len).params_total * STATE_BYTES_PER_PARAM / shards


def lower_bound(model: ModelConfig, shape: tuple[int, int], setting: Setting,
                target: Target) -> float:
  """Bytes per device below which no compiler can place the step, for skipping settings before
  compiling them: the parameters and AdamW state (by formula, less a margin), and every layer's
  input kept for the backward pass at the compute dtype (what remat "block" keeps; the other
  policies keep more). Logits are chunked (model.chunked_cross_entropy), so none are counted."""
  batch, seq_len = shape
  rows = batch / (len(target.devices) // target.model_axis) / setting.microbatches
  state = analytic_state_bytes(model, seq_len, setting.fsdp * target.model_axis)
  inputs = model.n_layers * rows * seq_len * model.d_model * np.dtype(
      jax.numpy.dtype(model.dtype)).itemsize
  return STATE_MARGIN * state + inputs


def _shard_bytes(tree) -> int:
  """Bytes one device holds of `tree`, abstract arrays that carry their sharding."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def _compile(model: ModelConfig, shape: tuple[int, int], setting: Setting,
             target: Target) -> Footprint:
  batch, seq_len = shape
  mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=setting.fsdp, model=target.model_axis),
                            devices=list(target.devices))
  model = dataclasses.replace(model, remat=setting.remat)
  progs = step.programs(model, mesh, setting.microbatches)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    params = jax.eval_shape(progs.init_params, 0)
    opt_state = jax.eval_shape(progs.init_opt, params)
    tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), np.int32)
    hparams = {k: np.float32(v) for k, v in optimizer.hyperparameters(TrainConfig(), 0.0).items()}
    weights = np.full(model.n_exits, 1.0 / model.n_exits, np.float32)
    traced = progs.step.trace(params, opt_state, tokens, hparams, weights)
    lowered = traced.lower()
    state = {"params": _shard_bytes(params), "optimizer": _shard_bytes(opt_state),
             "program_flops": cost.matmul_flops(traced.jaxpr)}
    try:
      compiled = lowered.compile(compiler_options=_CPU_COMPILE_OPTIONS if
                                 target.devices[0].platform == "cpu" else None)
    except Exception as e:  # noqa: BLE001 (the TPU compiler's refusal is a JaxRuntimeError)
      refused = tpu.refusal(str(e))
      if refused is None:
        raise
      required = refused[0]
      return Footprint(**state, temporaries=required,
                       peak=state["params"] + state["optimizer"] + required,
                       compile_seconds=time.perf_counter() - start, refused=True)
  seconds = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  counted = compiled.cost_analysis()
  counted = (counted[0] if isinstance(counted, (list, tuple)) else counted) or {}
  return Footprint(
      **state,
      temporaries=int(analysis.temp_size_in_bytes),
      peak=int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
               - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes),
      compile_seconds=seconds, flops=float(counted.get("flops", 0.0)),
      bytes_accessed=float(counted.get("bytes accessed", 0.0)))


def measure(model: ModelConfig, shape: tuple[int, int], setting: Setting,
            target: Target) -> Footprint:
  """The footprint of one (model, (batch, seq_len), setting), from the cache when it is there."""
  key = [dataclasses.asdict(model), shape, dataclasses.asdict(setting), len(target.devices),
         target.model_axis, jax.__version__]
  if target.name != "cpu":  # the CPU plan's keys stay as they were
    key += [target.name] + ([tpu.libtpu_version()] if target.slice else [])
  key = json.dumps(key, default=list)
  path = (None if target.cache_dir is None else
          target.cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json")
  if path is not None and path.exists():
    return dataclasses.replace(Footprint(**json.loads(path.read_text())), compile_seconds=0.0)
  footprint = _compile(model, shape, setting, target)
  if path is not None:
    atomic_write_text(path, json.dumps(dataclasses.asdict(footprint)))
  return footprint


def _rank(setting: Setting) -> tuple[int, int, int]:
  """Cheaper settings rank lower (module docstring)."""
  return REMAT_ORDER.index(setting.remat), setting.microbatches, setting.fsdp


class _Search:
  """Measures settings of one shape on demand and remembers each footprint. Settings cheaper
  than `floor` (the choice for the same backbone with fewer exits) are known not to fit and are
  not compiled."""

  def __init__(self, model: ModelConfig, shape: tuple[int, int], target: Target,
               floor: Setting | None = None):
    self.model, self.shape, self.target, self.floor = model, shape, target, floor
    self.measured: dict[Setting, Footprint] = {}
    self.skipped: set[Setting] = set()  # ruled out by the lower bound, not compiled
    data_devices = len(target.devices) // target.model_axis
    self.fsdps = [f for f in _powers_of_two(data_devices) if model.d_model % f == 0]
    batch = shape[0]
    self.micros = [m for m in _powers_of_two(batch) if (batch // m) % data_devices == 0]

  def footprint(self, setting: Setting) -> Footprint:
    if setting not in self.measured:
      self.measured[setting] = measure(self.model, self.shape, setting, self.target)
    return self.measured[setting]

  def below_floor(self, setting: Setting) -> bool:
    return self.floor is not None and _rank(setting) < _rank(self.floor)

  def fits(self, setting: Setting) -> bool:
    if self.below_floor(setting) or self.bounded_out(setting):
      return False
    return self.footprint(setting).peak <= self.target.capacity_bytes

  def bounded_out(self, setting: Setting) -> bool:
    """Whether the lower bound alone rules the setting out (it is then never compiled)."""
    if lower_bound(self.model, self.shape, setting, self.target) > self.target.capacity_bytes:
      self.skipped.add(setting)
      return True
    return False

  def from_most_fsdp(self, remat: str) -> Setting | None:
    """The fewest microbatches at the largest FSDP degree, then the smallest degree that fits
    them: exact while memory never grows with the FSDP degree (XLA:CPU, tested)."""
    most = self.fsdps[-1]
    micro = self.fewest_microbatches(remat, most)
    return None if micro is None else Setting(self.smallest_fsdp(remat, micro, most), remat,
                                              micro)

  def over_every_fsdp(self, remat: str) -> Setting | None:
    """The cheapest of every FSDP degree's fewest microbatches (each degree searching only the
    counts that could still beat the best so far): for the TPU compiler, whose temporaries can
    grow with the FSDP degree (docs/memory.md)."""
    best = None
    for fsdp in self.fsdps:
      micro = self.fewest_microbatches(remat, fsdp, below=best.microbatches if best else None)
      if micro is not None:
        best = Setting(fsdp, remat, micro)
    return best

  def fewest_microbatches(self, remat: str, fsdp: int, below: int | None = None) -> int | None:
    """The fewest microbatches (fewer than `below`, if given) whose step fits at this FSDP
    degree. Counts whose temporaries cannot fit are not compiled: temporaries (activations over
    m, plus gradients and gathered weights) shrink at most in proportion to 1 / m."""
    candidates = [c for c in self.micros if below is None or c < below]
    m = next((c for c in candidates if not self.below_floor(Setting(fsdp, remat, c))), None)
    while m is not None:
      setting = Setting(fsdp, remat, m)
      if self.fits(setting):
        return m
      if setting in self.skipped:
        m = next((c for c in candidates if c > m), None)
        continue
      fp = self.footprint(setting)
      room = self.target.capacity_bytes - (fp.peak - fp.temporaries)
      m = next((c for c in candidates if c > m and fp.temporaries * m / c <= room), None)
    return None

  def smallest_fsdp(self, remat: str, micro: int, fits_at: int) -> int:
    """The smallest FSDP degree that fits, knowing `fits_at` does. A degree is compiled only if
    its parameters and optimizer state (by formula) fit beside the temporaries at `fits_at`:
    a smaller degree's temporaries are no smaller (its gradient shards are larger)."""
    temporaries = self.footprint(Setting(fits_at, remat, micro)).temporaries
    for fsdp in (f for f in self.fsdps if f < fits_at):
      state = analytic_state_bytes(self.model, self.shape[1], fsdp * self.target.model_axis)
      if state + temporaries <= self.target.capacity_bytes and self.fits(
          Setting(fsdp, remat, micro)):
        return fsdp
    return fits_at


def _powers_of_two(limit: int) -> list[int]:
  return [2**k for k in range(int(math.log2(limit)) + 1) if limit % 2**k == 0]


def choose(model: ModelConfig, shape: tuple[int, int], target: Target,
           run_ids: tuple[str, ...] = (), floor: Setting | None = None) -> ShapePlan:
  """The cheapest setting of one model shape (module docstring), measured by compiling; `floor`
  as in _Search, tried first."""
  started = time.perf_counter()
  search = _Search(model, shape, target, floor)
  most, chosen = search.fsdps[-1], None
  if floor is not None and search.fits(floor):
    chosen = floor
  for remat in REMAT_ORDER if chosen is None else ():
    chosen = search.over_every_fsdp(remat) if target.slice else search.from_most_fsdp(remat)
    if chosen is not None:
      break
  if not search.measured:  # every setting bounded out: compile the most frugal to show its need
    search.footprint(Setting(most, REMAT_ORDER[-1], search.micros[-1]))
  shown = chosen or min(search.measured, key=lambda s: search.measured[s].peak)
  return ShapePlan(
      model=model, run_ids=run_ids, setting=chosen, measured_at=shown,
      footprint=search.measured[shown],
      analytic_state=analytic_state_bytes(model, shape[1], shown.fsdp * target.model_axis),
      compiles=sum(fp.compile_seconds > 0 for fp in search.measured.values()),
      seconds=time.perf_counter() - started, skipped=len(search.skipped))


def _siblings(models: list[ModelConfig], shape: tuple[int, int], target: Target,
              run_ids: dict) -> list[ShapePlan]:
  """ShapePlans of shapes sharing one backbone, fewest exits first, each searched from the
  previous one's setting: a family with more exits needs at least the memory of one with fewer."""
  plans, floor = [], None
  for model in sorted(models, key=lambda m: m.n_exits):
    plans.append(choose(model, shape, target, tuple(run_ids[model]), floor))
    floor = plans[-1].setting
  return plans


def largest_per_budget(runs) -> list:
  """Each budget's largest family (most parameters; study.memory_runs "largest"): a first look
  at the plan's hardest shapes."""
  largest = {}
  for run in runs:
    key = (run.accounting.params_total, run.granularity)
    if run.budget not in largest or key > largest[run.budget][0]:
      largest[run.budget] = (key, run)
  return [run for _, run in largest.values()]


def plan_memory(runs, batch: int, seq_len: int, target: Target,
                progress: bool = True) -> list[ShapePlan]:
  """ShapePlan of every distinct model shape among `runs` (isoflop.RunSpec), in plan order.
  Backbones are searched in one process per CPU core, largest first: tracing a step is Python
  and holds its process's lock, so threads would take turns at it."""
  run_ids: dict[ModelConfig, list[str]] = {}
  for run in runs:
    run_ids.setdefault(dataclasses.replace(run.experiment.model, remat="none"), []).append(
        run.run_id)
  backbones: dict[ModelConfig, list[ModelConfig]] = {}
  for model in run_ids:
    backbones.setdefault(dataclasses.replace(model, exit_layers=(model.n_layers,)), []).append(
        model)
  largest_first = sorted(backbones.values(), key=lambda models: -max(
      counts.account(m, seq_len).params_total for m in models))  # no lone tail
  portable = dataclasses.replace(target, devices=())  # devices do not pickle
  jobs = [(models, (batch, seq_len), portable, {m: run_ids[m] for m in models})
          for models in largest_first]
  bar = tqdm(total=len(run_ids), desc=f"memory ({target.name})", unit="shape",
             disable=not progress)
  workers = min(os.cpu_count() or 1, len(jobs))
  done = []
  if workers == 1:
    for models, shape, _, ids in jobs:
      done.append(_siblings(models, shape, target, ids))
      _advance(bar, done[-1])
  else:
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
        initargs=(len(target.devices), target.name)) as pool:
      futures = [pool.submit(_siblings_in_worker, *job) for job in jobs]
      for future in concurrent.futures.as_completed(futures):
        _advance(bar, future.result())  # an error stops the pass here
      done = [f.result() for f in futures]
  bar.close()
  chosen = {p.model: p for plans in done for p in plans}
  return [chosen[model] for model in run_ids]


def _advance(bar, plans: list[ShapePlan]) -> None:
  """One backbone's shapes done: the bar moves, and shows the time per compile."""
  compiles = sum(p.compiles for p in plans)
  seconds = sum(p.seconds for p in plans)
  bar.set_postfix_str(f"{compiles} compiled, {seconds / max(compiles, 1):.0f} s each"
                      if compiles else "from the cache")
  bar.update(len(plans))


_worker_devices: tuple = ()


def _start_worker(n_devices: int, target_name: str) -> None:
  global _worker_devices
  threading.Thread(target=_exit_with_parent, daemon=True).start()
  _worker_devices = (simulated_devices(n_devices) if target_name == "cpu"
                     else tpu.devices(tpu.parse(target_name)))


def _exit_with_parent() -> None:
  """A killed plan (`kill`, a scheduler's SIGTERM) takes its workers with it: they would otherwise
  finish their backbone's compiles, minutes each, beside the plan that resumes it."""
  multiprocessing.parent_process().join()
  os._exit(1)


def _siblings_in_worker(models, shape, target: Target, run_ids):
  """_siblings in a worker process, on its own devices (simulated CPU devices, or the TPU
  slice's compile-only devices)."""
  return _siblings(models, shape, dataclasses.replace(target, devices=_worker_devices), run_ids)


def _gb(n: float) -> str:
  return f"{n / 1e9:.1f}"


def run_cells(plans: list[ShapePlan]) -> tuple[str, dict[str, str]]:
  """(header, {run id: cell}) of the plan table's memory columns: peak GB per device, setting."""
  cells = {}
  for p in plans:
    cell = (f"{_gb(p.footprint.peak):>7} {p.setting}" if p.setting else
            f"{'-':>7} refused")
    cells.update(dict.fromkeys(p.run_ids, cell))
  return f"{'GB/dev':>7} setting", cells


def _shape_name(model: ModelConfig) -> str:
  return f"d{model.d_model}L{model.n_layers} exits {','.join(map(str, model.exit_layers))}"


def _compiled_for(target: Target) -> str:
  if target.slice is None:
    return (f"compiled for {len(target.devices)} simulated CPU devices (mesh.model="
            f"{target.model_axis}); fits: peak <= {_gb(target.capacity_bytes)} GB")
  return (f"compiled by the TPU compiler (libtpu {tpu.libtpu_version()}) for {target.name}, "
          f"{len(target.devices)} devices (mesh.model={target.model_axis}); fits: what the "
          f"compiler accepts, at most {_gb(target.capacity_bytes)} GB a device (its own figure)")


def memory_table(plans: list[ShapePlan], target: Target) -> str:
  """One line per model shape: the setting, XLA's bytes per device (parameters, optimizer
  state, temporaries, peak), the formula's state and its difference, and the compile cost."""
  header = (f"{'shape':<30} {'runs':>4} {'setting':<30} {'params':>7} {'optim':>7} {'temps':>7} "
            f"{'peak':>7} {'formula':>7} {'diff':>6} {'compiles':>8} {'s':>6}")
  lines = [f"memory per device (GB = 1e9 bytes) of each shape's train step, "
           f"{_compiled_for(target)}", header, "-" * len(header)]
  for p in plans:
    fp = p.footprint
    lines.append(f"{_shape_name(p.model):<30} {len(p.run_ids):>4} "
                 f"{str(p.setting) if p.setting else 'refused':<30} {_gb(fp.params):>7} "
                 f"{_gb(fp.optimizer):>7} {_gb(fp.temporaries):>7} {_gb(fp.peak):>7} "
                 f"{_gb(p.analytic_state):>7} {p.state_difference:>+6.1%} {p.compiles:>8} "
                 f"{p.seconds:>6.1f}")
  worst = max(abs(p.state_difference) for p in plans)
  lines.append(f"{len(plans)} shapes, {sum(p.compiles for p in plans)} programs compiled in "
               f"{sum(p.seconds for p in plans):.0f} s; parameters + optimizer state: XLA and "
               f"the formula (12 bytes a parameter) differ by at most {worst:.2%}")
  return "\n".join(lines)


def refusals(plans: list[ShapePlan], target: Target) -> list[str]:
  """One line per run that fits no setting, with the most frugal setting's need."""
  lines = []
  for p in (p for p in plans if p.setting is None):
    fp = p.footprint
    more = ("a larger slice (study.memory_target)" if target.slice else
            "more devices (study.memory_devices, mesh.model) or more memory "
            "(study.device_memory_gb)")
    verdict = "the TPU compiler refused" if fp.refused else "peaks at"
    why = (f"{_shape_name(p.model)} fits no setting within {_gb(target.capacity_bytes)} GB per "
           f"device: the most frugal tried ({p.measured_at}) {verdict} {_gb(fp.peak)} GB, of "
           f"which state {_gb(fp.params + fp.optimizer)} GB and temporaries "
           f"{_gb(fp.temporaries)} GB; give it {more}, or a smaller train.batch_size")
    lines += [f"refused {run_id}: {why}" for run_id in p.run_ids]
  return lines
