"""Huber-in-log-space fits of a law with jaxopt L-BFGS from a grid of starts, all in one jitted vmap.

objective(params) = sum_i w_i * Huber_delta(log loss_i - law.log_loss(params, data)_i)
(Hoffmann et al. 2022; Epoch AI 2024). Rows carry weights w_i, which is how bootstrap resamples
(counts per row) reuse the same compiled solver.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import jaxopt
from jax.flatten_util import ravel_pytree
import numpy as np
import optax

from famjax.scaling.linesearch import LaneLineSearch, OneTrialLineSearch, ended
from famjax.scaling.laws import Law

DEFAULT_DELTA = 1e-3
DEFAULT_MAXITER = 1000
DEFAULT_TOL = 1e-9  # on the gradient norm; objectives here are ~1e-3
# ... or a step that lowers the objective by less than this fraction: Huber kinks can keep the
# gradient norm from ever reaching tol (scipy's L-BFGS-B stops on the same kind of test).
DEFAULT_FTOL = 1e-10
DEFAULT_MAXLS = 20  # line-search trials per step, as scipy's L-BFGS-B (jaxopt's default is 30)
N_POLISHED = 8  # best grid starts rerun in coordinates whitened at the best one
DEFAULT_LANES = 256  # vmapped solver lanes that a queue of starts streams through
QUEUE_BLOCK = 8192  # queues are padded to a multiple of this, to share one compilation
PROGRESS_STEPS = 50  # progress-bar updates per queue


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


class Coordinates(NamedTuple):
  """Solver coordinates z of parameters x (in a law's parameter order): x = origin + basis @ z."""
  origin: np.ndarray  # [P]
  basis: np.ndarray  # [P, P]

  @classmethod
  def identity(cls, n_params: int) -> "Coordinates":
    return cls(np.zeros(n_params), np.eye(n_params))

  def to_solver(self, x_SP: np.ndarray) -> np.ndarray:
    return np.linalg.solve(self.basis, (x_SP - self.origin).T).T

  def to_params(self, z_SP: np.ndarray) -> np.ndarray:
    return self.origin + z_SP @ self.basis.T


FD_STEP = 1e-5  # central differences of the gradient, for `whitened`


def whitened(law: Law, params: Mapping[str, float], data: Mapping, *, delta: float = DEFAULT_DELTA,
             fixed: Mapping | None = None, lanes: int = DEFAULT_LANES) -> Coordinates:
  """Coordinates centred on `params` in which the full-data objective's Hessian there is the
  identity (its eigenvalues taken in absolute value, floored at 1e-12 of the largest).

  Near an optimum L-BFGS then starts with the right curvature: refits of Epoch's data converge
  in a few steps, where in the law's own coordinates (Hessian eigenvalues 1e-4..1e3) they take
  hundreds. The Hessian is central differences (FD_STEP) of gradients that the compiled queue
  evaluates (maxiter 0), so it costs no compilation of its own (given the `lanes` of the fit it
  serves). Falls back to the identity where the Hessian is not finite.
  """
  names = tuple(params)
  x_P = np.array([params[k] for k in names], np.float64)
  n_params = len(names)
  offsets_KP = FD_STEP * np.concatenate([np.eye(n_params), -np.eye(n_params)])
  with jax.enable_x64(True):
    data = as_data(data)
    fixed = {k: jnp.float64(v) for k, v in (fixed or {}).items()}
    _, _, grad_KP, _ = _run_queue(
        law, names, x_P + offsets_KP, data, np.ones((len(offsets_KP), data["loss"].shape[0])),
        fixed, Coordinates.identity(n_params), maxiter=0, tol=DEFAULT_TOL, ftol=DEFAULT_FTOL,
        maxls=1, delta=delta, lanes=lanes)
  hessian_PP = (grad_KP[:n_params] - grad_KP[n_params:]) / (2 * FD_STEP)
  hessian_PP = (hessian_PP + hessian_PP.T) / 2
  identity = Coordinates(x_P, np.eye(n_params))
  if not np.all(np.isfinite(hessian_PP)):
    return identity
  eig_P, vectors_PP = np.linalg.eigh(hessian_PP)
  curvature_P = np.maximum(np.abs(eig_P), 1e-12 * np.abs(eig_P).max(initial=0.0))
  if not np.all(curvature_P > 0):
    return identity
  return Coordinates(x_P, vectors_PP / np.sqrt(curvature_P))


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


def _select(mask_L, new, old):
  """Per lane: new where mask_L, else old (any pytree of [L, ...] arrays)."""
  return jax.tree.map(
      lambda a, b: jnp.where(mask_L.reshape(mask_L.shape + (1,) * (a.ndim - 1)), a, b), new, old)


def _lbfgs_lanes(fun, maxiter, tol, ftol, maxls):
  """(init, step) of vmapped jaxopt L-BFGS lanes minimising fun(z_P, data, weights_R), for
  solve_queue.

  A step is one jaxopt.LBFGS.update in every lane, whose OneTrialLineSearch makes one trial
  (at most maxls per search): under vmap a full line search would make every lane wait for the
  lane that needs most trials (on Epoch's grid, a mean of 1.3 trials per search, but 3.7 for the
  slowest of the lanes). A lane keeps its L-BFGS state until its search ends. step returns
  (lane, converged_L, stopped_L), both false while a search goes on.
  """
  linesearch = OneTrialLineSearch(fun=fun, maxiter=maxls)
  solver = jaxopt.LBFGS(fun=fun, tol=DEFAULT_TOL, linesearch=linesearch)  # update reads no maxiter
  update = jax.vmap(solver.update, in_axes=(0, 0, None, 0))

  def init(z_LP, data, weights_LR):
    """A fresh lane: jaxopt's initial state, but with an infinite objective and a zero gradient
    in place of an evaluation; its first trial evaluates the start (LaneLineSearch takes a zero
    direction from an infinite objective as that), so the queue compiles one evaluation."""
    shapes = jax.eval_shape(jax.vmap(solver.init_state, in_axes=(0, None, 0)), z_LP, data,
                            weights_LR)
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    fresh = jnp.ones(z_LP.shape[0], z_LP.dtype)
    state = state._replace(value=fresh * jnp.inf, error=fresh * jnp.inf, gamma=fresh,
                           stepsize=fresh * solver.max_stepsize)
    # A search that has made no trial starts afresh at the lane's first step.
    search_shapes = jax.eval_shape(jax.vmap(linesearch.init_state, in_axes=(None, 0, 0, 0, 0)),
                                   1.0, z_LP, state.value, z_LP, z_LP)
    search = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), search_shapes)
    return dict(z=z_LP, solver=state, search=search)

  def step(lane, data, weights_LR):
    state = lane["solver"]
    fresh_L = ~jnp.isfinite(state.value)
    new_z_LP, new = update(lane["z"], state, data, weights_LR, search=lane["search"])
    search, new = new.aux, new._replace(aux=None)
    ended_L = ended(search)
    # The evaluation of a fresh start left a pair (s = 0, y = gradient) in the history: drop it.
    initial = lambda a: jnp.where(fresh_L.reshape((-1,) + (1,) * (a.ndim - 1)), 0, a)
    new = new._replace(s_history=initial(new.s_history), y_history=initial(new.y_history),
                       rho_history=initial(new.rho_history), iter_num=initial(new.iter_num),
                       gamma=jnp.where(fresh_L, 1.0, new.gamma))
    stalled_L = ended_L & ~fresh_L & ((state.value - new.value) <= ftol * jnp.abs(state.value))
    converged_L = ended_L & ((new.error <= tol) | (stalled_L & ~new.failed_linesearch))
    # A failed line search can step uphill or to a non-finite objective, which ends the lane:
    # it keeps the best point it reached.
    moved_L = ended_L & (new.value <= state.value)
    state = _select(moved_L, new, state)
    stopped_L = (stalled_L | (ended_L & ~moved_L) | ~jnp.isfinite(new.value)
                 | (state.iter_num >= maxiter))
    return dict(z=_select(moved_L, new_z_LP, lane["z"]), solver=state, search=search), \
        converged_L, stopped_L

  return init, step


# XLA:CPU hands reductions to YNNPACK by default, which is slower on these small [lanes, rows]
# float64 arrays (README, "fit speed"); other backends ignore the option.
_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.partial(jax.jit, static_argnames=("law", "names", "delta", "lanes"),
                   compiler_options=_COMPILER_OPTIONS)
def solve_queue(law: Law, z_SP, origin_P, basis_PP, data: Mapping, weights_SR, n_starts, fixed,
                maxiter, tol, ftol, maxls, *, names: tuple[str, ...], delta: float, lanes: int):
  """The first n_starts of S independent L-BFGS runs (start s from z_SP[s], row weights
  weights_SR[s]) in solver coordinates z (parameters `names` = origin_P + basis_PP @ z), streamed
  through `lanes` vmapped solver lanes.

  A step is one line-search trial in every lane (see _lbfgs_lanes), and a batch of starts would
  run until its slowest start is done, so a lane whose start has finished takes the next start
  from the queue (once an eighth of the lanes are free; a free lane's work is discarded). The
  coordinates, maxiter, tol, ftol and maxls are traced: one compilation serves every call with
  the same shapes (maxiter 0 evaluates the starts).
  Returns (z [S, P], objective [S], gradient in z [S, P], converged [S]).
  """
  def fun(z_P, data, weights_R):
    x_P = origin_P + basis_PP @ z_P
    return objective(dict(zip(names, x_P)), data, weights_R, law=law, delta=delta, fixed=fixed)

  init, advance = _lbfgs_lanes(fun, maxiter, tol, ftol, maxls)
  n_total = weights_SR.shape[0]

  def load(lane, next_start):
    """Puts the next starts of the queue into the free lanes (start < 0), once an eighth of the
    lanes are free (or all are)."""
    free_L = lane["start"] < 0
    n_free = jnp.sum(free_L)
    start_L = next_start + jnp.cumsum(free_L) - 1
    load_L = (free_L & (start_L < n_starts)
              & ((n_free >= max(1, lanes // 8)) | (n_free == lanes)))
    start_L = jnp.where(load_L, start_L, -1)  # free lanes (-1) hold a dummy start
    fresh = dict(start=start_L, solver=init(z_SP[start_L], data, weights_SR[start_L]))
    started = next_start + jnp.sum(load_L)
    # A host callback costs ~1 ms, so the bar moves in steps of 1/PROGRESS_STEPS of the queue
    # (and the callback is a no-op unless a bar is open).
    step = lambda n: n * PROGRESS_STEPS // n_starts
    jax.lax.cond(step(started) > step(next_start),
                 lambda: jax.debug.callback(_report_progress, started), lambda: None)
    return _select(load_L, fresh, lane), started

  # Every lane starts free (its first step is idle), and the end of each step loads free lanes:
  # XLA then fuses the load's selects with the step's own.
  lane = dict(start=jnp.full(lanes, -1), solver=init(z_SP[:lanes], data, weights_SR[:lanes]))
  next_start = jnp.asarray(0)
  out = dict(z=jnp.zeros_like(z_SP), value=jnp.full(n_total, jnp.inf),
             grad=jnp.zeros_like(z_SP), converged=jnp.zeros(n_total, bool))

  def step(carry):
    lane, out, next_start = carry
    solver, converged_L, stopped_L = advance(lane["solver"], data, weights_SR[lane["start"]])
    done_L = (lane["start"] >= 0) & (converged_L | stopped_L)
    slot_L = jnp.where(done_L, lane["start"], n_total)  # out of range: dropped
    put = lambda dest, x: dest.at[slot_L].set(x, mode="drop")
    out = dict(z=put(out["z"], solver["z"]), value=put(out["value"], solver["solver"].value),
               grad=put(out["grad"], solver["solver"].grad),
               converged=put(out["converged"], converged_L))
    lane = dict(start=jnp.where(done_L, -1, lane["start"]), solver=solver)
    lane, next_start = load(lane, next_start)
    return lane, out, next_start

  def keep_going(carry):
    lane, _, next_start = carry
    return jnp.any(lane["start"] >= 0) | (next_start < n_starts)

  _, out, _ = jax.lax.while_loop(keep_going, step, (lane, out, next_start))
  return out["z"], out["value"], out["grad"], out["converged"]


MIN_ROWS = 16  # row counts are padded to a power of two at least this


def _pad_rows(data: Mapping, weights_SR: np.ndarray):
  """Pads the rows to a power of two (copies of row 0 with zero weight, which add nothing to the
  objective), so a study that grows run by run compiles ~log2(rows) programs, not one per row."""
  n_rows = weights_SR.shape[1]
  size = max(MIN_ROWS, 1 << (n_rows - 1).bit_length())
  if size == n_rows:
    return data, weights_SR
  padded = {k: jnp.concatenate([v, jnp.repeat(v[:1], size - n_rows)]) for k, v in data.items()}
  return padded, np.pad(weights_SR, ((0, 0), (0, size - n_rows)))


def _run_queue(law, names, x_SP, data, weights_SR, fixed, coordinates, *, maxiter, tol, ftol,
               maxls, delta, lanes, progress=False, desc="fit"):
  """solve_queue on the queue padded to a multiple of QUEUE_BLOCK starts (so that queues of
  similar length share one compilation), with a tqdm bar when asked. Returns numpy
  (params [S, P], objective [S], gradient in solver coordinates [S, P], converged [S])."""
  global _progress_bar
  from tqdm.auto import tqdm
  n = len(x_SP)
  size = -(-max(n, lanes) // QUEUE_BLOCK) * QUEUE_BLOCK
  pad = lambda x: np.concatenate([x, np.repeat(x[-1:], size - n, 0)])
  data, weights_SR = _pad_rows(data, np.asarray(weights_SR, np.float64))
  try:
    with tqdm(total=n, desc=desc, unit="start", disable=not progress) as _progress_bar:
      out = solve_queue(law, pad(coordinates.to_solver(x_SP)), coordinates.origin,
                        coordinates.basis, data, pad(weights_SR),
                        jnp.int32(n), fixed or {}, jnp.int32(maxiter), jnp.float64(tol),
                        jnp.float64(ftol), jnp.int32(maxls), names=names, delta=delta,
                        lanes=lanes)
      z_SP, value_S, grad_SP, converged_S = (np.array(x)[:n] for x in out)
      _progress_bar.update(n - _progress_bar.n)
  finally:  # a failed call must not leave its closed bar to the next one
    _progress_bar = None
  return coordinates.to_params(z_SP), value_S, grad_SP, converged_S


def solve_batch(law: Law, inits_S: Mapping, data: Mapping, weights_SR, fixed=None, *,
                coordinates: Coordinates | None = None, delta: float = DEFAULT_DELTA,
                maxiter: int = DEFAULT_MAXITER, tol: float = DEFAULT_TOL,
                ftol: float = DEFAULT_FTOL, maxls: int = DEFAULT_MAXLS,
                lanes: int = DEFAULT_LANES, progress: bool = False, desc: str = "fit"):
  """Every start of the queue ({name: [S]}, row weights [S, R]) through solve_queue, in the
  given solver coordinates (the parameters' own by default; `whitened` ones for starts near an
  optimum). Returns numpy (params {name: [S]}, objective [S], converged [S])."""
  names = tuple(inits_S)
  x_SP = np.stack([np.asarray(inits_S[k], np.float64) for k in names], -1)
  x_SP, value_S, _, converged_S = _run_queue(
      law, names, x_SP, data, weights_SR, fixed, coordinates or Coordinates.identity(len(names)),
      maxiter=maxiter, tol=tol, ftol=ftol, maxls=maxls, delta=delta, lanes=lanes,
      progress=progress, desc=desc)
  return {k: x_SP[:, i] for i, k in enumerate(names)}, value_S, converged_S


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

  Every start runs jaxopt L-BFGS; the N_POLISHED lowest objectives are then rerun from where
  they stopped, in coordinates whitened at the lowest (see `whitened`). A start
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
                                                 progress=progress, **options)
    polished = np.argsort(np.where(np.isfinite(value_S), value_S, np.inf))[:N_POLISHED]
    around = {k: v[polished[0]] for k, v in params_S.items()}
    params_P, value_P, converged_P = solve_batch(
        law, {k: v[polished] for k, v in params_S.items()}, data, weights_SR[polished], fixed,
        coordinates=whitened(law, around, data, delta=delta, fixed=fixed, lanes=lanes),
        progress=progress, desc="polish", **options)
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
