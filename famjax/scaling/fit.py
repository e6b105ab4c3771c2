"""Huber-in-log-space fits of a law with jaxopt L-BFGS from a grid of starts, all in one jitted vmap.

objective(params) = sum_i w_i * Huber_delta(log loss_i - law.log_loss(params, data)_i)
(Hoffmann et al. 2022; Epoch AI 2024). Rows carry weights w_i, which is how bootstrap resamples
(counts per row) reuse the same compiled solver.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import jaxopt
from jax.flatten_util import ravel_pytree
import numpy as np
import optax

from famjax.scaling import newton
from famjax.scaling.linesearch import LaneLineSearch
from famjax.scaling.laws import Law

DEFAULT_DELTA = 1e-3
DEFAULT_MAXITER = 1000
DEFAULT_TOL = 1e-9  # on the gradient norm; objectives here are ~1e-3
# ... or a step that lowers the objective by less than this fraction: Huber kinks can keep the
# gradient norm from ever reaching tol (scipy's L-BFGS-B stops on the same kind of test).
DEFAULT_FTOL = 1e-10
DEFAULT_MAXLS = 20  # line-search trials per step, as scipy's L-BFGS-B (jaxopt's default is 30)
# Grid starts: under vmap each step costs the most trials any lane needs, and far-off starts
# spend them all before failing; the best starts are then polished by Newton steps.
GRID_MAXLS = 5
N_POLISHED = 8  # best grid starts rerun with famjax.scaling.newton
DEFAULT_LANES = 128  # vmapped solver lanes that a queue of starts streams through
QUEUE_BLOCK = 8192  # queues are padded to a multiple of this, to share one compilation


def objective(params, data, weights_R, *, law: Law, delta: float, fixed: Mapping | None = None):
  residual_R = jnp.log(data["loss"]) - law.log_loss({**(fixed or {}), **params}, data)
  return jnp.sum(weights_R * optax.losses.huber_loss(residual_R, delta=delta))


def dense_solve(matvec, b, **_):
  """Solves matvec(x) = b exactly. The Hessians here are tiny (one row per parameter) and too
  ill-conditioned for jaxopt's default conjugate gradients, which return wrong implicit gradients."""
  flat_b, unravel = ravel_pytree(b)
  flat_matvec = lambda x: ravel_pytree(matvec(unravel(x)))[0]
  matrix = jax.vmap(flat_matvec, out_axes=1)(jnp.eye(flat_b.size, dtype=flat_b.dtype))
  return unravel(jnp.linalg.solve(matrix, flat_b))


def _solver(law: Law, delta: float, fixed, maxiter: int, tol: float) -> jaxopt.LBFGS:
  fun = functools.partial(objective, law=law, delta=delta, fixed=fixed)
  return jaxopt.LBFGS(fun=fun, maxiter=maxiter, tol=tol, maxls=DEFAULT_MAXLS,
                      implicit_diff=True, implicit_diff_solve=dense_solve)


def solve(law: Law, init: Mapping, data: Mapping, weights_R=None, *, delta: float = DEFAULT_DELTA,
          fixed: Mapping | None = None, maxiter: int = DEFAULT_MAXITER, tol: float = DEFAULT_TOL):
  """One L-BFGS run from `init`; returns (params, state). Pure: jit, vmap and grad (implicit
  differentiation with respect to the data, e.g. the observed losses) all work on it."""
  weights_R = jnp.ones_like(data["loss"]) if weights_R is None else weights_R
  init = {k: jnp.asarray(v, jnp.float64) for k, v in init.items()}
  return _solver(law, delta, fixed, maxiter, tol).run(init, data, weights_R)


_progress_bar = None  # the tqdm bar of the solve_batch call in progress, if it asked for one


def _report_progress(n_started):
  if _progress_bar is not None:
    _progress_bar.update(int(n_started) - _progress_bar.n)


def _lbfgs_lanes(law, delta, fixed, names, maxiter, tol, ftol, maxls):
  """(init, step) of vmapped jaxopt L-BFGS lanes, for solve_queue.

  The lanes run LaneLineSearch (maxls trials per step) rather than jaxopt's zoom, which under vmap
  costs three evaluations per trial, and see their parameters as one vector (in `names` order), so
  that jaxopt's tree operations act on one array rather than one per parameter.
  """
  def fun(x_P, data, weights_R):
    return objective(dict(zip(names, x_P)), data, weights_R, law=law, delta=delta, fixed=fixed)

  solver = jaxopt.LBFGS(fun=fun, maxiter=maxiter, tol=DEFAULT_TOL,
                        linesearch=LaneLineSearch(fun=fun, maxiter=maxls))
  update = jax.vmap(solver.update, in_axes=(0, 0, None, 0))
  as_vector = lambda params: jnp.stack([params[k] for k in names], axis=-1)

  def init(params, data, weights_LR):
    """A fresh lane: jaxopt's initial state, but with an infinite objective and a zero gradient
    in place of an evaluation; its first step evaluates the start (LaneLineSearch takes a zero
    direction from an infinite objective as that), so the queue compiles one evaluation."""
    x_LP = as_vector(params)
    shapes = jax.eval_shape(jax.vmap(solver.init_state, in_axes=(0, None, 0)), x_LP, data,
                            weights_LR)
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    fresh = jnp.ones(x_LP.shape[0], x_LP.dtype)
    state = state._replace(value=fresh * jnp.inf, error=fresh * jnp.inf, gamma=fresh,
                           stepsize=fresh * solver.max_stepsize)
    return dict(params=params, value=state.value, solver=state)

  def step(lane, data, weights_LR):
    fresh_L = ~jnp.isfinite(lane["value"])
    new_x_LP, state = update(as_vector(lane["params"]), lane["solver"], data, weights_LR)
    # The evaluation of a fresh start left a pair (s = 0, y = gradient) in the history: drop it.
    initial = lambda a: jnp.where(fresh_L.reshape((-1,) + (1,) * (a.ndim - 1)), 0, a)
    state = state._replace(s_history=initial(state.s_history), y_history=initial(state.y_history),
                           rho_history=initial(state.rho_history),
                           iter_num=initial(state.iter_num),
                           gamma=jnp.where(fresh_L, 1.0, state.gamma))
    new_params = {k: new_x_LP[:, i] for i, k in enumerate(names)}
    stalled_L = ~fresh_L & ((lane["value"] - state.value) <= ftol * jnp.abs(lane["value"]))
    converged_L = (state.error <= tol) | (stalled_L & ~state.failed_linesearch)
    # A failed line search can step uphill or to a non-finite objective, which ends the lane:
    # it reports the best point it reached.
    uphill_L = ~(state.value <= lane["value"])
    lane = dict(params=newton.select(uphill_L, lane["params"], new_params), solver=state,
                value=jnp.where(uphill_L, lane["value"], state.value))
    return lane, converged_L, stalled_L | ~jnp.isfinite(state.value)

  return init, step


# XLA:CPU hands reductions to YNNPACK by default, which is slower on these small [lanes, rows]
# float64 arrays (README, "fit speed"); other backends ignore the option.
_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.partial(jax.jit, static_argnames=("law", "delta", "lanes", "maxiter", "method",
                                             "progress"), compiler_options=_COMPILER_OPTIONS)
def solve_queue(law: Law, inits_S: Mapping, data: Mapping, weights_SR, n_starts, fixed, tol, ftol,
                maxls, *, delta: float, lanes: int, maxiter: int, method: str = "lbfgs",
                progress: bool = False):
  """The first n_starts of S independent runs (start s from inits_S[.][s], row weights
  weights_SR[s]), streamed through `lanes` vmapped solver lanes; method "lbfgs" (jaxopt) or
  "newton" (famjax.scaling.newton, for starts near an optimum).

  Under vmap every lane waits for the slowest lane's line search, and a batch of starts would run
  until its slowest start is done. So a lane whose start has finished takes the next start from
  the queue (once an eighth of the lanes are free), and a free lane's weights are zero, which ends
  its line search at once. tol, ftol and maxls are traced: one compilation serves
  every call with the same shapes. Returns (params {name: [S]}, objective [S], converged [S]).
  """
  if method == "lbfgs":
    init, advance = _lbfgs_lanes(law, delta, fixed, tuple(inits_S), maxiter, tol, ftol, maxls)
  elif method == "newton":
    init, advance = newton.lanes(
        functools.partial(objective, law=law, delta=delta, fixed=fixed), tol, ftol)
  else:
    raise ValueError(f"method must be 'lbfgs' or 'newton'; got {method!r}")
  n_total = weights_SR.shape[0]
  inits_S = {k: jnp.asarray(v, jnp.float64) for k, v in inits_S.items()}

  def load(lane, next_start):
    """Puts the next starts of the queue into the free lanes (start < 0)."""
    free_L = lane["start"] < 0
    start_L = next_start + jnp.cumsum(free_L) - 1
    load_L = free_L & (start_L < n_starts)
    start_L = jnp.where(load_L, start_L, -1)
    params = {k: v[start_L] for k, v in inits_S.items()}  # free lanes (-1) hold a dummy start
    weights_LR = weights_SR[start_L] * load_L[:, None]
    fresh = dict(start=start_L, weights=weights_LR, iters=jnp.zeros(lanes, jnp.int32),
                 solver=init(params, data, weights_LR))
    next_start = next_start + jnp.sum(load_L)
    if progress:
      jax.debug.callback(_report_progress, next_start)
    return newton.select(load_L, fresh, lane), next_start

  # Every lane starts free, with a zero solver state, and the first step loads it: the lane
  # method's init is then compiled once, inside the loop.
  n_rows = weights_SR.shape[1]
  solver_shapes = jax.eval_shape(init, {k: jnp.zeros(lanes) for k in inits_S}, data,
                                 jnp.zeros((lanes, n_rows)))
  lane = dict(start=jnp.full(lanes, -1), weights=jnp.zeros((lanes, n_rows)),
              iters=jnp.zeros(lanes, jnp.int32),
              solver=jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), solver_shapes))
  next_start = jnp.asarray(0)
  out = dict(params={k: jnp.zeros(n_total) for k in inits_S}, value=jnp.full(n_total, jnp.inf),
             converged=jnp.zeros(n_total, bool))

  def step(carry):
    lane, out, next_start = carry
    n_free = jnp.sum(lane["start"] < 0)
    wanted = ((n_free >= max(1, lanes // 8)) | (n_free == lanes)) & (next_start < n_starts)
    lane, next_start = jax.lax.cond(wanted, load, lambda *a: a, lane, next_start)
    solver, converged_L, stopped_L = advance(lane["solver"], data, lane["weights"])
    iters_L = lane["iters"] + 1
    done_L = (lane["start"] >= 0) & (converged_L | stopped_L | (iters_L >= maxiter))
    slot_L = jnp.where(done_L, lane["start"], n_total)  # out of range: dropped
    put = lambda dest, x: dest.at[slot_L].set(x, mode="drop")
    out = dict(params={k: put(out["params"][k], solver["params"][k]) for k in out["params"]},
               value=put(out["value"], solver["value"]),
               converged=put(out["converged"], converged_L))
    lane = dict(start=jnp.where(done_L, -1, lane["start"]),
                weights=lane["weights"] * ~done_L[:, None], iters=iters_L, solver=solver)
    return lane, out, next_start

  def keep_going(carry):
    lane, _, next_start = carry
    return jnp.any(lane["start"] >= 0) | (next_start < n_starts)

  _, out, _ = jax.lax.while_loop(keep_going, step, (lane, out, next_start))
  return out["params"], out["value"], out["converged"]


def _run_queue(law, inits_S, data, weights_SR, n_starts, fixed, *, delta, maxiter, tol, ftol,
               maxls, lanes, method, progress):
  """solve_queue on the queue padded to a multiple of QUEUE_BLOCK starts, so that every call with
  the same method (polish and bootstrap; or grids) shares one compilation."""
  n = weights_SR.shape[0]
  size = -(-max(n, lanes) // QUEUE_BLOCK) * QUEUE_BLOCK
  pad = lambda x: np.concatenate([x, np.repeat(x[-1:], size - n, 0)])
  return solve_queue(law, {k: pad(np.asarray(v, np.float64)) for k, v in inits_S.items()}, data,
                     pad(np.asarray(weights_SR, np.float64)), jnp.int32(n_starts), fixed or {},
                     jnp.float64(tol), jnp.float64(ftol), jnp.int32(maxls), delta=delta,
                     lanes=lanes, maxiter=maxiter, method=method, progress=progress)


def solve_batch(law: Law, inits_S: Mapping, data: Mapping, weights_SR, fixed=None, *,
                delta: float = DEFAULT_DELTA, maxiter: int = DEFAULT_MAXITER,
                tol: float = DEFAULT_TOL, ftol: float = DEFAULT_FTOL, maxls: int = DEFAULT_MAXLS,
                lanes: int = DEFAULT_LANES, method: str = "lbfgs", progress: bool = False,
                desc: str = "fit"):
  """Every start of the queue through solve_queue (see _run_queue), with a tqdm bar when asked.
  Returns numpy (params, objective, converged)."""
  global _progress_bar
  from tqdm.auto import tqdm
  n = np.shape(weights_SR)[0]
  try:
    with tqdm(total=n, desc=desc, unit="start", disable=not progress) as _progress_bar:
      out = _run_queue(law, inits_S, data, weights_SR, n, fixed, delta=delta, maxiter=maxiter,
                       tol=tol, ftol=ftol, maxls=maxls, lanes=lanes, method=method,
                       progress=progress)
      out = jax.tree.map(lambda x: np.array(x[:n]), out)
      _progress_bar.update(n - _progress_bar.n)
  finally:  # a failed call must not leave its closed bar to the next one
    _progress_bar = None
  return out


@dataclasses.dataclass(frozen=True)
class FitResult:
  law: str
  params: dict[str, float]  # best converged start, log parameters (a, b, e, exponents)
  objective: float
  n_rows: int
  starts: dict[str, np.ndarray]  # every start's final parameters, [S] each
  start_objective: np.ndarray  # [S]
  start_converged: np.ndarray  # [S] bool: gradient <= tol, or a last step lowering the objective
  #                               by < ftol of it (and no failed line search)
  fixed: dict[str, float] = dataclasses.field(default_factory=dict)


def as_data(data: Mapping) -> dict[str, jnp.ndarray]:
  return {k: jnp.asarray(np.asarray(v, dtype=np.float64)) for k, v in data.items()}


def fit(law: Law, data: Mapping, *, delta: float = DEFAULT_DELTA, grid: Mapping | None = None,
        fixed: Mapping | None = None, maxiter: int = DEFAULT_MAXITER, tol: float = DEFAULT_TOL,
        ftol: float = DEFAULT_FTOL, lanes: int = DEFAULT_LANES,
        progress: bool = False) -> FitResult:
  """Fits `law` from every grid start (the law's own grid by default) and keeps the best.

  Every start runs jaxopt L-BFGS with GRID_MAXLS line-search trials per step; the N_POLISHED
  lowest objectives are then rerun from where they stopped with Newton steps (newton.py). A start
  has converged when its gradient norm is <= tol, or a step (without a failed line search) lowered
  its objective by less than ftol of it. The best start is the lowest objective among converged
  starts (among all finite ones if none converged).
  `fixed` holds parameters kept constant (e.g. a dense law under the branch law).
  """
  with jax.enable_x64(True):
    data = as_data(data)
    fixed = {k: jnp.float64(v) for k, v in (fixed or {}).items()}
    grid = {k: np.asarray(v, np.float64) for k, v in (grid or law.grid()).items()
            if k not in fixed}
    n_starts = len(next(iter(grid.values())))
    weights_SR = np.ones((n_starts, data["loss"].shape[0]))
    options = dict(delta=delta, maxiter=maxiter, tol=tol, ftol=ftol, lanes=lanes)
    params_S, value_S, converged_S = solve_batch(law, grid, data, weights_SR, fixed,
                                                 maxls=GRID_MAXLS, progress=progress, **options)
    polished = np.argsort(np.where(np.isfinite(value_S), value_S, np.inf))[:N_POLISHED]
    params_P, value_P, converged_P = solve_batch(
        law, {k: v[polished] for k, v in params_S.items()}, data, weights_SR[polished], fixed,
        method="newton", progress=progress, desc="polish", **options)
    for k in params_S:
      params_S[k][polished] = params_P[k]
    value_S[polished], converged_S[polished] = value_P, converged_P
    converged_S = converged_S & np.isfinite(value_S)
    candidates = np.where(converged_S if converged_S.any() else np.isfinite(value_S),
                          value_S, np.inf)
    best = int(np.argmin(candidates))
    return FitResult(law=law.name, params={k: float(v[best]) for k, v in params_S.items()},
                     objective=float(value_S[best]), n_rows=int(data["loss"].shape[0]),
                     starts=params_S, start_objective=value_S, start_converged=converged_S,
                     fixed={k: float(v) for k, v in fixed.items()})
