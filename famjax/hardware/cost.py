"""What a planned train step costs on a TPU slice, before renting it: the step's matmul FLOPs
counted in its traced program (every scan and microbatch iteration, remat's recomputation
included), the TPU compiler's own cost analysis beside them, a roofline step time from the
chip's datasheet peak and bandwidth, the MFU that bounds, and the study's chip-hours.
Estimates from programs and datasheets, not measurements.

XLA's cost analysis counts a while loop's body once, whatever its trip count: for famjax's step
(microbatches, each segment's layers, loss chunks: all loops) its FLOPs and bytes are one
iteration's, shown as such. famjax counts FLOPs in the traced program instead, and for the
memory side of the roofline takes a floor on HBM traffic: the optimizer's pass over its state,
and every microbatch reading the weights it multiplies by (activations not counted).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jax.extend import core

from famjax.model import counts

_LOOP_LENGTH = {"scan": lambda params: params["length"]}
# AdamW's pass per parameter (float32): weight read and written, gradient written and read, mu and
# nu read and written
OPTIMIZER_TRAFFIC_BYTES = 32


def matmul_flops(jaxpr) -> float:
  """2 x M x N x K of every dot_general in a (closed) jaxpr, each scan body times its length."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      contracted = np.prod([lhs[d] for d in lhs_contract], dtype=np.float64)
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape, dtype=np.float64) * contracted
      continue
    times = _LOOP_LENGTH.get(eqn.primitive.name, lambda params: 1)(eqn.params)
    for sub in _jaxprs_in(eqn.params):
      total += times * matmul_flops(sub)
  return total


def _jaxprs_in(params):
  """The jaxprs an equation's parameters hold (a scan's body, a cond's branches, ...): what
  jax.extend.core.jaxprs_in_params gives in newer jax (0.10; 0.8 lacks it), for the older jax famjax
  accepts."""
  for value in params.values():
    for item in value if isinstance(value, tuple) else (value,):
      if isinstance(item, core.Jaxpr):
        yield item
      elif isinstance(item, core.ClosedJaxpr):
        yield item.jaxpr


@dataclasses.dataclass(frozen=True)
class StepCost:
  """One device's share of one train step at the chosen setting."""

  model_flops: float  # famjax's analytic training FLOPs (accounting), no recomputation
  program_flops: float  # matmul FLOPs of the traced step, recomputation included
  compiler_flops: float  # the compiler's cost analysis (loop bodies counted once)
  compiler_bytes: float  # its bytes accessed (likewise)
  min_bytes: float  # a floor on the step's HBM traffic (min_traffic)
  peak_flops: float  # per device, datasheet
  bandwidth: float  # HBM bytes/s per device, datasheet

  @property
  def compute_seconds(self) -> float:
    return self.program_flops / self.peak_flops

  @property
  def memory_seconds(self) -> float:
    return self.min_bytes / self.bandwidth

  @property
  def step_seconds(self) -> float:
    return max(self.compute_seconds, self.memory_seconds)

  @property
  def bound(self) -> str:
    return "memory" if self.memory_seconds > self.compute_seconds else "compute"

  @property
  def mfu_bound(self) -> float:
    """Model FLOPs over what the slice could do in the roofline step time."""
    return self.model_flops / (self.step_seconds * self.peak_flops)


def min_traffic(model, setting, params: int, model_axis: int, fsdp: int) -> float:
  """Bytes a device must move per step at least: the optimizer's pass over its shard of the
  state, and per microbatch the weights it multiplies by (gathered under FSDP) at the compute
  dtype, read in the forward pass, again in the backward pass, and once more when remat
  recomputes the forward."""
  itemsize = jnp.dtype(model.dtype).itemsize
  reads = 2 + (setting.remat != "none")
  return (OPTIMIZER_TRAFFIC_BYTES * params / (fsdp * model_axis)
          + reads * itemsize * params / model_axis * setting.microbatches)


def step_cost(plan, shape: tuple[int, int], target) -> StepCost | None:
  """The cost of a ShapePlan's chosen setting on a TPU target (None: CPU target, or no setting)."""
  slice_ = target.slice
  if slice_ is None or plan.setting is None:
    return None
  fp = plan.footprint
  n_devices = len(target.devices)
  per_chip = n_devices / slice_.chips  # v4: two TensorCores per chip
  batch, seq_len = shape
  accounting = counts.account(plan.model, seq_len)
  model = accounting.flops_per_token * batch * seq_len / n_devices
  floor = min_traffic(plan.model, plan.setting, accounting.params_total, target.model_axis,
                      plan.setting.fsdp)
  return StepCost(model_flops=model, program_flops=fp.program_flops / n_devices,
                  compiler_flops=fp.flops, compiler_bytes=fp.bytes_accessed, min_bytes=floor,
                  peak_flops=slice_.chip.peak_flops / per_chip,
                  bandwidth=slice_.chip.hbm_bandwidth / per_chip)


def chip_hours(plans, runs, shape: tuple[int, int], target) -> tuple[float, int]:
  """(chip-hours of the runs whose shape has a costed setting, how many runs that covers)."""
  by_run = {run_id: p for p in plans for run_id in p.run_ids}
  hours, covered = 0.0, 0
  for run in runs:
    plan = by_run.get(run.run_id)
    cost = None if plan is None else step_cost(plan, shape, target)
    if cost is not None:
      hours += run.steps * cost.step_seconds * target.slice.chips / 3600
      covered += 1
  return hours, covered


def cost_table(plans, runs, shape: tuple[int, int], target) -> str:
  """One line per planned shape with a setting: FLOPs per device and step (analytic, traced,
  the compiler's one-iteration count), the roofline times, what binds, the MFU bound; then the
  chip-hours of the runs covered."""
  chip = target.slice.chip
  header = (f"{'shape':<30} {'model TF':>9} {'program':>8} {'ratio':>6} {'XLA TF':>7} "
            f"{'XLA GB':>7} {'min GB':>7} {'compute s':>9} {'memory s':>8} {'bound':>7} "
            f"{'MFU<=':>6}")
  lines = [f"step cost per device on {target.name} (estimates from the traced program, the TPU "
           f"compiler's cost analysis and the {chip.name} datasheet: {chip.peak_flops / 1e12:.0f} "
           f"TFLOP/s, {chip.hbm_bandwidth / 1e9:.0f} GB/s per chip; not measurements). XLA TF / "
           "GB: the compiler's count, each loop body once; min GB: a floor on HBM traffic",
           header, "-" * len(header)]
  for plan in plans:
    cost = step_cost(plan, shape, target)
    if cost is None:
      continue
    name = f"d{plan.model.d_model}L{plan.model.n_layers} G{plan.model.n_exits}"
    lines.append(f"{name:<30} {cost.model_flops / 1e12:>9.1f} {cost.program_flops / 1e12:>8.1f} "
                 f"{cost.program_flops / cost.model_flops:>6.3f} "
                 f"{cost.compiler_flops / 1e12:>7.2f} {cost.compiler_bytes / 1e9:>7.2f} "
                 f"{cost.min_bytes / 1e9:>7.0f} {cost.compute_seconds:>9.2f} "
                 f"{cost.memory_seconds:>8.2f} {cost.bound:>7} "
                 f"{cost.mfu_bound:>6.1%}")
  hours, covered = chip_hours(plans, runs, shape, target)
  lines.append(f"{covered} of {len(runs)} runs costed: {hours:,.0f} {chip.name} chip-hours at "
               f"the roofline step time (a bound: real steps are slower)")
  return "\n".join(lines)
