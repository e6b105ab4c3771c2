"""Vmapped L-BFGS lanes: a queue of independent L-BFGS runs streamed through vmapped solver lanes.

Every run (a "start") minimises the fit objective for its own row weights, in its own solver
coordinates z (parameters x = origin + basis @ z). A step is one line-search trial in every lane
(see `_lbfgs_lanes`); a lane whose start has finished takes the next start from the queue, so no
lane waits for the slowest start of a batch. `solve` runs a queue to the end in one jitted
while_loop (pure: jit and vmap work on it); `run` drives the same steps from the host in chunks,
which is how a progress bar follows it.

Shape letters: S starts in the queue, L lanes, P parameters, R data rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jaxopt
import numpy as np

from famjax.scaling.problem_and_solver import Coordinates, Problem, Solver, StopRules
from famjax.scaling.solver import xla_scheduler
from famjax.scaling.solver.line_search import OneTrialLineSearch, ended

xla_scheduler.disable_concurrency_optimized_scheduler()  # before JAX first computes

QUEUE_BLOCK = 8192  # queues are padded to a multiple of this, to share one compilation
MIN_LANES = 8  # `run` gives a queue shorter than solver.lanes the next power of two of lanes
MIN_ROWS = 16  # row counts are padded to a power of two at least this
CHUNK_STEPS = 256  # loop steps per host call in `run`


class Queue(NamedTuple):
  """The starts: solver point, coordinates and row weights of each."""
  z_SP: jax.Array
  origin_SP: jax.Array
  basis_SPP: jax.Array
  weights_SR: jax.Array


class Outcome(NamedTuple):
  x_SP: jax.Array  # final parameters, the law's coordinates
  value_S: jax.Array  # objective (inf for a start that did not run)
  grad_SP: jax.Array  # gradient in the start's solver coordinates
  converged_S: jax.Array  # and its objective finite

  def params(self, names: tuple[str, ...]) -> dict:
    """{name: [S]} of the final parameters."""
    return {k: self.x_SP[:, i] for i, k in enumerate(names)}

  def where(self, mask_S, other: "Outcome", xp=jnp) -> "Outcome":
    """This outcome's starts where mask_S, other's elsewhere (xp: the array library)."""
    return _select(mask_S, self, other, xp)

  def take(self, index) -> "Outcome":
    return jax.tree.map(lambda a: a[index], self)

  def put(self, index, part: "Outcome", xp=np) -> "Outcome":
    """A copy with part's starts written at index (out-of-range indices dropped when traced)."""
    def written(a, b):
      if xp is not np:
        return a.at[index].set(b, mode="drop")
      a = np.array(a)
      a[index] = b
      return a
    return jax.tree.map(written, self, part)


def queue(x_SP, weights_SR, coordinates: Coordinates | None = None, xp=jnp) -> Queue:
  """Starts at parameters x_SP, in the given coordinates (one for all starts or one each; the
  law's own by default); xp: numpy on the host, jax.numpy in traced code."""
  x_SP = xp.asarray(x_SP, xp.float64)
  n, p = x_SP.shape
  origin_SP, basis_SPP = coordinates or Coordinates.identity(p)
  origin_SP = xp.broadcast_to(xp.asarray(origin_SP, xp.float64), (n, p))
  basis_SPP = xp.broadcast_to(xp.asarray(basis_SPP, xp.float64), (n, p, p))
  z_SP = xp.linalg.solve(basis_SPP, (x_SP - origin_SP)[..., None])[..., 0]
  weights_SR = xp.asarray(weights_SR, xp.float64)
  return Queue(z_SP, origin_SP, basis_SPP, xp.broadcast_to(weights_SR, (n, weights_SR.shape[-1])))


def _select(mask_L, new, old, xp=jnp):
  """Per lane: new where mask_L, else old (any pytree of [L, ...] arrays)."""
  return jax.tree.map(
      lambda a, b: xp.where(mask_L.reshape(mask_L.shape + (1,) * (a.ndim - 1)), a, b), new, old)


def _lbfgs_lanes(fun, stop: StopRules):
  """(init, step) of vmapped jaxopt L-BFGS lanes minimising fun(z_P, data, lane_args).

  A step is one jaxopt.LBFGS.update in every lane, whose OneTrialLineSearch makes one trial
  (at most maxls per search): under vmap a full line search would make every lane wait for the
  lane that needs most trials (on Epoch's grid, a mean of 1.3 trials per search, but 3.7 for the
  slowest of the lanes). A lane keeps its L-BFGS state until its search ends. step returns
  (lane, converged_L, stopped_L), both false while a search goes on.
  """
  linesearch = OneTrialLineSearch(fun=fun, maxiter=stop.maxls)
  solver = jaxopt.LBFGS(fun=fun, linesearch=linesearch)  # update reads neither maxiter nor tol
  update = jax.vmap(solver.update, in_axes=(0, 0, None, 0))

  def init(z_LP, data, args_L):
    """A fresh lane: jaxopt's initial state, but with an infinite objective and a zero gradient
    in place of an evaluation; its first trial evaluates the start (LaneLineSearch takes a zero
    direction from an infinite objective as that), so the queue compiles one evaluation."""
    shapes = jax.eval_shape(jax.vmap(solver.init_state, in_axes=(0, None, 0)), z_LP, data,
                            args_L)
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    fresh = jnp.ones(z_LP.shape[0], z_LP.dtype)
    state = state._replace(value=fresh * jnp.inf, error=fresh * jnp.inf, gamma=fresh,
                           stepsize=fresh * solver.max_stepsize)
    # A search that has made no trial starts afresh at the lane's first step.
    search_shapes = jax.eval_shape(jax.vmap(linesearch.init_state, in_axes=(None, 0, 0, 0, 0)),
                                   1.0, z_LP, state.value, z_LP, z_LP)
    search = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), search_shapes)
    return dict(z=z_LP, solver=state, search=search)

  def step(lane, data, args_L):
    state = lane["solver"]
    fresh_L = ~jnp.isfinite(state.value)
    new_z_LP, new = update(lane["z"], state, data, args_L, search=lane["search"])
    search, new = new.aux, new._replace(aux=None)
    ended_L = ended(search)
    # The evaluation of a fresh start left a pair (s = 0, y = gradient) in the history: drop it.
    initial = lambda a: jnp.where(fresh_L.reshape((-1,) + (1,) * (a.ndim - 1)), 0, a)
    new = new._replace(s_history=initial(new.s_history), y_history=initial(new.y_history),
                       rho_history=initial(new.rho_history), iter_num=initial(new.iter_num),
                       gamma=jnp.where(fresh_L, 1.0, new.gamma))
    stalled_L = ended_L & ~fresh_L & ((state.value - new.value)
                                      <= stop.ftol * jnp.abs(state.value))
    converged_L = ended_L & ((new.error <= stop.tol) | (stalled_L & ~new.failed_linesearch))
    # A failed line search can step uphill or to a non-finite objective, which ends the lane:
    # it keeps the best point it reached.
    moved_L = ended_L & (new.value <= state.value)
    state = _select(moved_L, new, state)
    stopped_L = (stalled_L | (ended_L & ~moved_L) | ~jnp.isfinite(new.value)
                 | (state.iter_num >= stop.maxiter))
    return dict(z=_select(moved_L, new_z_LP, lane["z"]), solver=state, search=search), \
        converged_L, stopped_L

  return init, step


def _machine(problem: Problem, q: Queue, solver: Solver, n_starts):
  """(start, keep_going, step) of the queue loop over carry = (lane, out, next_start), which
  runs the first n_starts starts of the queue."""
  lanes = solver.lanes

  def fun(z_P, data, args):
    origin_P, basis_PP, weights_R = args
    return dataclasses.replace(problem, data=data).objective(origin_P + basis_PP @ z_P, weights_R)

  data = problem.data
  init, advance = _lbfgs_lanes(fun, solver.stop)
  n_total = q.weights_SR.shape[0]
  lane_args = lambda start_L: (q.origin_SP[start_L], q.basis_SPP[start_L], q.weights_SR[start_L])

  def load(lane, next_start):
    """Puts the next starts of the queue into the free lanes (start < 0), once an eighth of the
    lanes are free (or all are)."""
    free_L = lane["start"] < 0
    n_free = jnp.sum(free_L, dtype=jnp.int32)
    start_L = next_start + jnp.cumsum(free_L, dtype=jnp.int32) - 1
    load_L = (free_L & (start_L < n_starts)
              & ((n_free >= max(1, lanes // 8)) | (n_free == lanes)))
    start_L = jnp.where(load_L, start_L, -1)  # free lanes (-1) hold a dummy start
    fresh = dict(start=start_L, solver=init(q.z_SP[start_L], data, lane_args(start_L)))
    return _select(load_L, fresh, lane), next_start + jnp.sum(load_L, dtype=jnp.int32)

  def start():
    # Every lane starts free (its first step is idle), and the end of each step loads free
    # lanes: XLA then fuses the load's selects with the step's own.
    first = jnp.arange(lanes) % n_total
    lane = dict(start=jnp.full(lanes, -1, jnp.int32),
                solver=init(q.z_SP[first], data, lane_args(first)))
    out = dict(z=jnp.zeros_like(q.z_SP), value=jnp.full(n_total, jnp.inf),
               grad=jnp.zeros_like(q.z_SP), converged=jnp.zeros(n_total, bool))
    return lane, out, jnp.zeros((), jnp.int32)

  def step(carry):
    lane, out, next_start = carry
    moved, converged_L, stopped_L = advance(lane["solver"], data, lane_args(lane["start"]))
    done_L = (lane["start"] >= 0) & (converged_L | stopped_L)
    slot_L = jnp.where(done_L, lane["start"], n_total)  # out of range: dropped
    put = lambda dest, x: dest.at[slot_L].set(x, mode="drop")
    out = dict(z=put(out["z"], moved["z"]), value=put(out["value"], moved["solver"].value),
               grad=put(out["grad"], moved["solver"].grad),
               converged=put(out["converged"], converged_L))
    lane = dict(start=jnp.where(done_L, jnp.int32(-1), lane["start"]), solver=moved)
    lane, next_start = load(lane, next_start)
    return lane, out, next_start

  def keep_going(carry):
    lane, _, next_start = carry
    return jnp.any(lane["start"] >= 0) | (next_start < n_starts)

  return start, keep_going, step


def _outcome(q: Queue, out, xp=jnp) -> Outcome:
  x_SP = q.origin_SP + xp.einsum("spq,sq->sp", q.basis_SPP, out["z"])
  return Outcome(x_SP, out["value"], out["grad"], out["converged"] & xp.isfinite(out["value"]))


# XLA:CPU hands reductions to YNNPACK by default, which is slower on these small [lanes, rows]
# float64 arrays (docs/fitter.md); other backends ignore the option.
_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def _run_queue(problem: Problem, q: Queue, solver: Solver, n_starts) -> Outcome:
  start, keep_going, step = _machine(problem, q, solver, n_starts)
  _, out, _ = jax.lax.while_loop(keep_going, step, start())
  return _outcome(q, out)


def solve(problem: Problem, q: Queue, solver: Solver, active_S=None) -> Outcome:
  """Every start of the queue (those where active_S, if given) to the end, in one while_loop:
  a pure function for the caller's jit, vmap or grad (its results carry no gradient). A start
  that does not run keeps its point, with an infinite objective."""
  if active_S is None:
    return _run_queue(problem, q, solver, q.weights_SR.shape[0])
  order_S = jnp.argsort(~active_S, stable=True)  # the active starts first, in order
  out = _run_queue(problem, jax.tree.map(lambda a: a[order_S], q), solver,
                   jnp.sum(active_S, dtype=jnp.int32))
  out = out.take(jnp.argsort(order_S))
  return out.where(active_S, _idle(q))


def _idle(q: Queue, xp=jnp) -> Outcome:
  """The outcome of starts that did not run."""
  n = q.z_SP.shape[0]
  return _outcome(q, dict(z=q.z_SP, value=xp.full(n, xp.inf), grad=xp.zeros_like(q.z_SP),
                          converged=xp.zeros(n, bool)), xp)


@functools.partial(jax.jit, compiler_options=_COMPILER_OPTIONS)
def _start(problem, q, solver, n_starts):
  return _machine(problem, q, solver, n_starts)[0]()


@functools.partial(jax.jit, compiler_options=_COMPILER_OPTIONS, donate_argnames=("carry",))
def _advance(problem, q, solver, n_starts, carry):
  """Up to CHUNK_STEPS loop steps from `carry`; also whether the queue has work left."""
  _, keep_going, step = _machine(problem, q, solver, n_starts)
  carry, _ = jax.lax.while_loop(lambda c: keep_going(c[0]) & (c[1] < CHUNK_STEPS),
                                lambda c: (step(c[0]), c[1] + 1), (carry, jnp.int32(0)))
  return carry, keep_going(carry)


def _padded(problem: Problem, q: Queue, size: int) -> tuple[Problem, Queue]:
  """The queue padded to `size` starts (copies of the last) and the rows to a power of two
  (copies of row 0 with zero weight, which add nothing to the objective), so that similar queues
  and a study that grows run by run share compilations (~log2(rows) programs, not one per row)."""
  n, n_rows = q.weights_SR.shape
  rows = max(MIN_ROWS, 1 << (n_rows - 1).bit_length())
  data = {k: np.concatenate([v, np.repeat(v[:1], rows - n_rows)])
          for k, v in jax.device_get(dict(problem.data)).items()}
  q = jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[-1:], size - n, 0)]), q)
  q = q._replace(weights_SR=np.pad(q.weights_SR, ((0, 0), (0, rows - n_rows))))
  return dataclasses.replace(problem, data=data), Queue(*jax.device_put(tuple(q)))


def run(problem: Problem, q: Queue, solver: Solver, active_S=None, progress=None) -> Outcome:
  """`solve` driven from the host in chunks of CHUNK_STEPS loop steps, on the active starts
  only, padded to a multiple of QUEUE_BLOCK. `progress`, a tqdm bar, moves with the started
  starts. Returns numpy arrays."""
  q = Queue(*(np.asarray(a) for a in q))
  index = np.arange(len(q.z_SP)) if active_S is None else np.flatnonzero(active_S)
  out = _idle(q, np)
  n = len(index)
  if not n:
    return out
  size = -(-max(n, solver.lanes) // QUEUE_BLOCK) * QUEUE_BLOCK
  padded, part = _padded(problem, jax.tree.map(lambda a: a[index], q), size)
  # every lane steps each time, busy or not: a short queue (a polish, held-out folds, the few
  # refits left to restart) on 256 lanes pays 256 lanes' steps; its starts' paths are the same
  # on fewer lanes (each lane's arithmetic is its own), so their results are bitwise equal
  lanes = min(solver.lanes, max(MIN_LANES, 1 << (n - 1).bit_length()))
  solver = dataclasses.replace(solver, lanes=lanes,
                               stop=StopRules(*(jnp.asarray(v) for v in solver.stop)))
  carry, going = _start(padded, part, solver, jnp.int32(n)), True
  while bool(going):
    carry, going = _advance(padded, part, solver, jnp.int32(n), carry)
    if progress is not None:
      progress.update(min(n, int(carry[2])) - progress.n)
  if progress is not None:
    progress.update(n - progress.n)
  part = Queue(*(np.asarray(a)[:n] for a in jax.device_get(part)))
  found = _outcome(part, {k: np.asarray(v)[:n] for k, v in jax.device_get(carry[1]).items()}, np)
  return out.put(index, found)
