"""Strong-Wolfe line searches for vmapped jaxopt.LBFGS, in which every trial is one evaluation.

jaxopt's zoom line search evaluates the objective inside lax.cond branches. Under vmap a cond
whose predicate differs between lanes runs both branches, so each trial of a vmapped zoom costs
three evaluations, and its first trial is traced twice. LaneLineSearch brackets and zooms as
Nocedal & Wright's Algorithms 3.5-3.6 do, but picks each trial step with jnp.where alone and runs
in one while_loop, so a vmapped lane pays one evaluation per trial. OneTrialLineSearch makes one
trial of the same search per call, so that vmapped lanes need not wait for each other's searches
(fit.solve_queue).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import jaxopt
from jaxopt.tree_util import tree_add_scalar_mul, tree_vdot_real

NUM_EVAL_DTYPE = jnp.int32  # jaxopt's counters of evaluations


class LineSearchStep(NamedTuple):
  """What jaxopt.LBFGS reads of a line search's run: the step taken and the search's state."""
  stepsize: jnp.ndarray
  state: Any


class LineSearchState(NamedTuple):
  iter_num: jnp.ndarray
  params: Any  # the best point so far: lowest objective among those meeting sufficient decrease
  value: jnp.ndarray
  grad: Any
  aux: Any
  done: jnp.ndarray
  failed: jnp.ndarray
  num_fun_eval: jnp.ndarray
  num_grad_eval: jnp.ndarray
  # the search: start point, direction, bracket ends (step, value, slope) and the next trial step
  start: Any
  direction: Any
  value_init: jnp.ndarray
  slope_init: jnp.ndarray
  low: tuple  # best step so far (meets sufficient decrease)
  high: tuple  # other end of the bracket; step inf until one is found
  trial_step: jnp.ndarray


def _cubic_minimum(low, high):
  """Minimiser of the cubic through both ends' values and slopes; nan where it has none."""
  (a, fa, ga), (b, fb, gb) = low, high
  d1 = ga + gb - 3 * (fa - fb) / (a - b)
  d2 = jnp.sign(b - a) * jnp.sqrt(d1 ** 2 - ga * gb)  # nan when the cubic has no minimum
  return b - (b - a) * (gb + d2 - d1) / (gb - ga + 2 * d2)


# jaxopt.LBFGS takes a line-search object only if it is a jaxopt IterativeLineSearch, a class that
# jaxopt (0.8.5, its last release) exports only from its private module. LaneLineSearch derives
# from the public BacktrackingLineSearch, one of them, and overrides every method LBFGS calls
# (init_state, update, run): nothing of the backtracking search runs.
@dataclasses.dataclass(eq=False)
class LaneLineSearch(jaxopt.BacktrackingLineSearch):
  """Strong Wolfe conditions (c1, c2) by bracketing and safeguarded cubic zooming.

  While no bracket is known the step grows by `increase_factor` up to `max_stepsize`; a step at
  `max_stepsize` that lowers the objective enough is taken even if the slope is still steep. A run
  that ends without meeting the conditions is `failed` and returns its best point, which is the
  start when no trial lowered the objective enough.
  """
  fun: Callable  # fun(params, *args, **kwargs) -> scalar
  maxiter: int = 20
  c1: float = 1e-4
  c2: float = 0.9
  increase_factor: float = 2.0
  max_stepsize: float = 1.0
  interval_threshold: float = 1e-10  # relative width at which a bracket counts as closed
  tol: float = 0.0
  jit: bool = True
  unroll: bool = False
  verbose: bool = False

  def init_state(self, init_stepsize, params, value=None, grad=None, descent_direction=None,
                 fun_args=(), fun_kwargs=None) -> LineSearchState:
    fun_kwargs = fun_kwargs or {}
    n_evals = 0
    if value is None or grad is None:
      value, grad = jax.value_and_grad(self.fun)(params, *fun_args, **fun_kwargs)
      n_evals = 1
    value = jnp.asarray(value, jnp.result_type(*jax.tree.leaves(params)))
    if descent_direction is None:
      descent_direction = jax.tree.map(jnp.negative, grad)
    slope = tree_vdot_real(grad, descent_direction)
    # Nothing to search along a zero gradient or an ascent direction, except from an infinite
    # objective, where the first trial (the start itself, as the direction is then zero)
    # evaluates the start: fit.py's queue uses this to evaluate a fresh start.
    not_descent = ~(slope < 0) & jnp.isfinite(value)
    dtype = value.dtype
    zero = jnp.zeros((), dtype)
    return LineSearchState(
        iter_num=jnp.asarray(0, NUM_EVAL_DTYPE), params=params, value=value, grad=grad,
        aux=None, done=jnp.asarray(False), failed=not_descent,
        num_fun_eval=jnp.asarray(n_evals, NUM_EVAL_DTYPE),
        num_grad_eval=jnp.asarray(n_evals, NUM_EVAL_DTYPE),
        start=params, direction=descent_direction, value_init=value, slope_init=slope,
        low=(zero, value, slope), high=(jnp.asarray(jnp.inf, dtype), zero, zero),
        trial_step=jnp.minimum(jnp.asarray(init_stepsize, dtype), self.max_stepsize))

  def update(self, stepsize, state: LineSearchState, params=None, value=None, grad=None,
             descent_direction=None, fun_args=(), fun_kwargs=None) -> LineSearchStep:
    """One trial at state.trial_step; the new bracket and the next trial step."""
    step = state.trial_step
    point = tree_add_scalar_mul(state.start, step, state.direction)
    value, grad = jax.value_and_grad(self.fun)(point, *fun_args, **(fun_kwargs or {}))
    slope = tree_vdot_real(grad, state.direction)
    (low_step, low_value, _), high = state.low, state.high
    bracketed = jnp.isfinite(high[0])

    decrease = (value <= state.value_init + self.c1 * step * state.slope_init) & jnp.isfinite(slope)
    lower = decrease & (value < low_value)  # a new best point, else a new bracket end
    flat = jnp.abs(slope) <= self.c2 * jnp.abs(state.slope_init)
    beyond = jnp.where(bracketed, slope * (high[0] - low_step) >= 0, slope >= 0)
    trial = (step, value, slope)
    new_high = jax.tree.map(lambda t, lo, hi: jnp.where(~lower, t, jnp.where(beyond, lo, hi)),
                            trial, state.low, high)
    new_low = jax.tree.map(lambda t, lo: jnp.where(lower, t, lo), trial, state.low)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(lower, a, b), new, old)

    now_bracketed = jnp.isfinite(new_high[0])
    at_cap = ~now_bracketed & (step >= self.max_stepsize)
    width = jnp.abs(new_high[0] - new_low[0])
    closed = now_bracketed & (width <= self.interval_threshold * jnp.maximum(new_low[0], 1.0))
    done = state.done | (lower & (flat | at_cap)) | (closed & (new_low[0] > 0))
    failed = ~done & (state.failed | (state.iter_num + 1 >= self.maxiter) | closed)

    ends = jnp.sort(jnp.stack([new_low[0], new_high[0]]))
    cubic = _cubic_minimum(new_low, new_high)
    margin = 0.1 * (ends[1] - ends[0])
    zoom = jnp.where(jnp.isfinite(cubic), jnp.clip(cubic, ends[0] + margin, ends[1] - margin),
                     0.5 * (ends[0] + ends[1]))
    grow = jnp.minimum(step * self.increase_factor, self.max_stepsize)
    new_state = state._replace(
        iter_num=state.iter_num + 1, params=keep(point, state.params),
        value=keep(value, state.value), grad=keep(grad, state.grad), done=done, failed=failed,
        num_fun_eval=state.num_fun_eval + 1, num_grad_eval=state.num_grad_eval + 1,
        low=new_low, high=new_high, trial_step=jnp.where(now_bracketed, zoom, grow))
    return LineSearchStep(stepsize=new_low[0], state=new_state)

  def run(self, init_stepsize, params, value=None, grad=None, descent_direction=None,
          fun_args=(), fun_kwargs=None) -> LineSearchStep:
    """init_state, then update until done or failed, in one while_loop (jaxopt's own loop
    traces the first update twice)."""
    state = self.init_state(init_stepsize, params, value, grad, descent_direction, fun_args,
                            fun_kwargs)
    searching = lambda step: ~(step.state.done | step.state.failed)
    advance = lambda step: self.update(step.stepsize, step.state, fun_args=fun_args,
                                       fun_kwargs=fun_kwargs)
    return jax.lax.while_loop(searching, advance,
                              LineSearchStep(stepsize=state.low[0], state=state))


@dataclasses.dataclass(eq=False)
class OneTrialLineSearch(LaneLineSearch):
  """LaneLineSearch one trial per run, for lanes that must not wait on each other.

  jaxopt.LBFGS.update runs its line search to the end, so under vmap each update costs the trials
  of the lane that needs most. With this search each update makes one trial: the search so far
  comes in as fun_kwargs["search"] and leaves as the returned state's `aux`. The caller keeps the
  L-BFGS state of a lane whose search has not ended (`ended`), and passes the search back in: the
  next update recomputes the same direction and makes the next trial. A search that has ended,
  or has made no trial yet, starts afresh from the update's direction.
  """

  def run(self, init_stepsize, params, value=None, grad=None, descent_direction=None,
          fun_args=(), fun_kwargs=None) -> LineSearchStep:
    fun_kwargs = dict(fun_kwargs or {})
    search = fun_kwargs.pop("search")
    fresh = self.init_state(init_stepsize, params, value, grad, descent_direction, fun_args,
                            fun_kwargs)
    restart = (search.iter_num == 0) | ended(search)
    state = jax.tree.map(lambda new, old: jnp.where(restart, new, old), fresh, search)
    step = self.update(state.low[0], state, fun_args=fun_args, fun_kwargs=fun_kwargs)
    return step._replace(state=step.state._replace(aux=step.state))


def ended(search: LineSearchState) -> jnp.ndarray:
  return search.done | search.failed
