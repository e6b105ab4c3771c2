"""LaneLineSearch: strong Wolfe steps, one evaluation per trial, and jaxopt.LBFGS driving it;
OneTrialLineSearch: the same L-BFGS path, one trial per update."""

import jax
import jax.numpy as jnp
import jaxopt
import numpy as np
import pytest

from famjax.scaling.solver.line_search import LaneLineSearch, OneTrialLineSearch, ended


def rosenbrock(x):
  return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def search(x, direction, init_stepsize=1.0, fun=rosenbrock, **options):
  value, grad = jax.value_and_grad(fun)(x)
  return LaneLineSearch(fun=fun, **options).run(init_stepsize, x, value, grad, direction)


@pytest.fixture(scope="module")
def starts():
  """float64 once the tests enable x64."""
  return np.array([[-1.2, 1.0, 0.5], [0.0, 0.0, 0.0], [2.0, -1.0, 3.0], [1.5, 1.5, 1.5]])


@pytest.mark.fp_path
def test_steps_meet_the_strong_wolfe_conditions_under_vmap(starts):
  c1, c2 = 1e-4, 0.9
  with jax.enable_x64(True):
    directions = -jax.vmap(jax.grad(rosenbrock))(starts)
    # a short first trial (grow), a long one (zoom back) and the default
    for init_stepsize in (1e-6, 10.0, 1.0):
      out = jax.jit(jax.vmap(lambda x, d: search(x, d, init_stepsize, max_stepsize=100.0)))(
          starts, directions)
      state = out.state
      assert bool(jnp.all(state.done & ~state.failed)), init_stepsize
      slope0 = jnp.sum(-directions * directions, -1)
      values0 = jax.vmap(rosenbrock)(starts)
      moved = jax.vmap(rosenbrock)(starts + out.stepsize[:, None] * directions)
      assert bool(jnp.all(moved <= values0 + c1 * out.stepsize * slope0))
      assert bool(jnp.allclose(moved, state.value))
      slope = jnp.sum(state.grad * directions, -1)
      assert bool(jnp.all(jnp.abs(slope) <= c2 * jnp.abs(slope0)))
      # one evaluation (value and gradient) per trial
      assert bool(jnp.all(state.num_fun_eval == state.iter_num))


def test_an_ascent_direction_fails_without_an_evaluation(starts):
  with jax.enable_x64(True):
    out = search(starts[0], jax.grad(rosenbrock)(starts[0]))
    assert bool(out.state.failed) and int(out.state.num_fun_eval) == 0
    assert float(out.stepsize) == 0.0 and np.array_equal(out.state.params, starts[0])


def test_an_infinite_objective_evaluates_the_start(starts):
  """fit's queue starts a fresh lane with objective inf and a zero gradient."""
  with jax.enable_x64(True):
    x = starts[2]
    out = LaneLineSearch(fun=rosenbrock).run(1.0, x, jnp.inf, jnp.zeros(3), jnp.zeros(3))
    assert bool(out.state.done) and int(out.state.num_fun_eval) == 1
    assert float(out.state.value) == pytest.approx(float(rosenbrock(x)))


def test_a_trial_budget_that_runs_out_returns_the_best_point_found(starts):
  with jax.enable_x64(True):
    x = starts[0]
    direction = -jax.grad(rosenbrock)(x)
    out = search(x, direction, init_stepsize=1e-9, maxiter=2, max_stepsize=1e3)
    assert bool(out.state.failed) and int(out.state.num_fun_eval) == 2
    assert float(out.state.value) < float(rosenbrock(x))  # grew the step twice, both lower


@pytest.mark.fp_path
def test_jaxopt_lbfgs_with_it_minimises_rosenbrock_in_every_lane(starts):
  with jax.enable_x64(True):
    solver = jaxopt.LBFGS(fun=rosenbrock, maxiter=500, tol=1e-10,
                          linesearch=LaneLineSearch(fun=rosenbrock, maxiter=20))
    params, state = jax.jit(jax.vmap(solver.run))(starts)
    assert bool(jnp.all(state.error <= 1e-10))
    assert bool(jnp.allclose(params, 1.0, atol=1e-8))


@pytest.mark.fp_path
def test_one_trial_updates_retrace_the_full_searches_path(starts):
  """jaxopt.LBFGS.update with OneTrialLineSearch, the state kept until each search ends (as
  fit's lanes do), visits the same iterates as with LaneLineSearch, in as many trials."""
  n_steps = 12
  with jax.enable_x64(True):
    x0 = starts[0]
    full = jaxopt.LBFGS(fun=rosenbrock, linesearch=LaneLineSearch(fun=rosenbrock))
    x, state = x0, full.init_state(x0)
    path = []
    for _ in range(n_steps):
      x, state = jax.jit(full.update)(x, state)
      path.append(np.asarray(x))
    one_trial = OneTrialLineSearch(fun=rosenbrock)
    solver = jaxopt.LBFGS(fun=rosenbrock, linesearch=one_trial)
    update = jax.jit(solver.update)
    x, one_state = x0, solver.init_state(x0)
    search = one_trial.init_state(1.0, x0, one_state.value, one_state.grad)  # no trial yet
    n_trials, reached = 0, []
    while len(reached) < n_steps:
      new_x, new_state = update(x, one_state, search=search)
      search, n_trials = new_state.aux, n_trials + 1
      if bool(ended(search)):
        x, one_state = new_x, new_state._replace(aux=None)
        reached.append(np.asarray(x))
    np.testing.assert_array_equal(np.stack(reached), np.stack(path))
    assert n_trials == int(state.num_linesearch_iter) > n_steps
