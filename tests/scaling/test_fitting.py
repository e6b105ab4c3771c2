"""Laws, fits and leverage on small problems, the fitter as a JAX function, and the fit command
(the bootstrap's slow checks are in test_bootstrap.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from famjax.scaling import bootstrap, fit_data, fitted_law, fitting, laws, leverage
from famjax.scaling.problem_and_solver import Coordinates
from famjax.scaling.solver import fit_stages

from conftest import PAPER, reference_data_dir, synthetic_family


def test_laws_match_their_closed_forms():
  n, d = np.array([1e8, 1e9]), np.array([1e10, 3e10])
  g, e = np.array([2.0, 4.0]), np.array([1., 3.])
  nat = laws.PAPER_FAMILIAL
  dense = nat["E"] + nat["A"] / n ** nat["alpha"] + nat["B"] / d ** nat["beta"]
  with jax.enable_x64(True):
    data = fitting.as_data({"N": n, "D": d, "G": g, "exit": e})
    np.testing.assert_allclose(laws.loss(laws.CHINCHILLA, PAPER, data), dense, rtol=1e-12)
    np.testing.assert_allclose(laws.loss(laws.FAMILIAL, PAPER, data), dense * g ** nat["gamma"],
                               rtol=1e-12)
    branch = {**PAPER, "alpha_b": 1e-3, "beta_b": 0.0397}
    expected = dense * (1 + e - 1) ** 1e-3 * (1 + g - e) ** 0.0397
    np.testing.assert_allclose(laws.loss(laws.BRANCH, branch, data), expected, rtol=1e-12)


def test_the_laws_starts():
  """Hoffmann's starts (alpha, beta in 0..2 by 0.5; e in -1..1 by 0.5; a, b in 0..25 by 5), every
  combination once, times each law's own axes."""
  import itertools
  starts = laws.CHINCHILLA.starts()
  combos = set(zip(*(starts[k] for k in ("alpha", "beta", "e", "a", "b"))))
  expected = set(itertools.product(np.arange(0, 2.01, 0.5), np.arange(0, 2.01, 0.5),
                                   np.arange(-1, 1.01, 0.5), np.arange(0, 25.1, 5),
                                   np.arange(0, 25.1, 5)))
  assert len(starts["a"]) == 4500 and combos == expected
  familial = laws.FAMILIAL.starts()
  assert len(familial["gamma"]) == 13500 and set(familial["gamma"]) == {-0.05, 0.0, 0.05}
  assert set(laws.BRANCH.starts()) == set(laws.BRANCH.param_names)
  thinned = laws.CHINCHILLA.starts(450)
  assert len(thinned["a"]) == 10 and thinned["a"][1] == starts["a"][450]


def test_compute_optimal_matches_the_closed_form():
  nat = laws.PAPER_FAMILIAL
  alpha, beta = nat["alpha"], nat["beta"]
  g_coef = (alpha * nat["A"] / (beta * nat["B"])) ** (1 / (alpha + beta))
  with jax.enable_x64(True):
    for c in (1e19, 1e21):
      n_star, d_star = leverage.compute_optimal(PAPER, c, 4)
      assert float(n_star) == pytest.approx(g_coef * (c / 6) ** (beta / (alpha + beta)), rel=1e-4)
      assert float(6 * n_star * d_star) == pytest.approx(c, rel=1e-9)


def test_a_power_flops_rule_moves_the_optimum_as_its_closed_form_says():
  """k = c N^p per G: with p = 1 and c = 6 it is C = 6ND; with c = 12 for G = 4 (heads doubling
  the cost) N* is the 6N optimum at C/2 (D* halves with it), and EL uses the G = 1 rule for the
  dense models."""
  six = leverage.power_rule({1: (np.log(6.0), 1.0), 4: (np.log(6.0), 1.0)})
  costly = leverage.power_rule({1: (np.log(6.0), 1.0), 4: (np.log(12.0), 1.0)})
  with jax.enable_x64(True):
    for c in (1e19, 1e21):
      assert float(leverage.compute_optimal(PAPER, c, 4, flops_per_token=six)[0]) == pytest.approx(
          float(leverage.compute_optimal(PAPER, c, 4)[0]), rel=1e-6)
      n_star, d_star = leverage.compute_optimal(PAPER, c, 4, flops_per_token=costly)
      assert float(n_star) == pytest.approx(float(leverage.compute_optimal(PAPER, c / 2, 4)[0]),
                                            rel=1e-4)
      assert float(12 * n_star * d_star) == pytest.approx(c, rel=1e-9)
    el_six = leverage.efficiency_leverage(PAPER, 1e20, 4, flops_per_token=six)
    el_costly = leverage.efficiency_leverage(PAPER, 1e20, 4, flops_per_token=costly)
    assert float(el_six) == pytest.approx(float(leverage.efficiency_leverage(PAPER, 1e20, 4)))
  assert float(el_costly) < float(el_six)  # the family's tokens cost twice: less leverage


def test_efficiency_leverage_of_the_published_law():
  """EL > 1 and falling with compute over 1e19..1e21 for G = 3..6 (ladder N_g = g/G N*), equal
  to the closed form: N* from the Chinchilla optimum (G^gamma does not move it), dense model g
  of N_g = g N*/G on C/G FLOPs."""
  budgets = np.geomspace(1e19, 1e21, 5)
  table = np.asarray(leverage.leverage_table(PAPER, budgets, [3, 4, 5, 6]))
  assert np.all(table > 1.0)
  assert np.all(np.diff(table, axis=0) < 0)
  assert np.all(np.diff(table, axis=1) > 0)  # more exits, more leverage at a fixed budget
  nat = laws.PAPER_FAMILIAL
  alpha, beta = nat["alpha"], nat["beta"]
  dense = lambda n, d: nat["E"] + nat["A"] / n ** alpha + nat["B"] / d ** beta
  coef = (alpha * nat["A"] / (beta * nat["B"])) ** (1 / (alpha + beta))
  for i, c in enumerate(budgets):
    n_star = coef * (c / 6) ** (beta / (alpha + beta))
    for j, g in enumerate([3, 4, 5, 6]):
      n_g = np.arange(1, g + 1) / g * n_star
      closed = (np.mean(dense(n_g, c / g / (6 * n_g)))
                / (dense(n_star, c / (6 * n_star)) * g ** nat["gamma"]))
      assert table[i, j] == pytest.approx(closed, rel=1e-6)


@pytest.fixture(scope="module")
def familial_fit():
  data = synthetic_family(noise=0.0005, seed=3)
  return data, fitting.fit(fitting.Problem.of(laws.FAMILIAL, data),
                       fitting.Solver(fitting.StopRules(tol=1e-12, maxiter=3000)),
                       starts=laws.FAMILIAL.starts(450))


@pytest.mark.fp_path
def test_fit_recovers_the_generating_parameters(familial_fit):
  _, result = familial_fit
  got = laws.to_natural_params(result.params)
  for name, truth in laws.PAPER_FAMILIAL.items():
    assert got[name] == pytest.approx(truth, rel=0.03), name
  assert result.objective < 1e-4 and result.start_converged.any()
  assert result.start_objective.shape == result.start_converged.shape == (30,)


def test_fitted_parameters_are_differentiable_in_the_observed_losses(familial_fit):
  data, result = familial_fit
  with jax.enable_x64(True):
    arrays = fitting.as_data(data)

    def alpha_of(losses):
      params, _ = fitting.solve(laws.FAMILIAL, result.params, {**arrays, "loss": losses},
                            stop=fitting.StopRules(tol=1e-12, maxiter=3000))
      return params["alpha"]

    grad = jax.jit(jax.grad(alpha_of))(arrays["loss"])
    assert grad.shape == arrays["loss"].shape and bool(jnp.all(jnp.isfinite(grad)))
    bump = jnp.zeros_like(arrays["loss"]).at[0].set(1e-5 * arrays["loss"][0])
    alpha_jit = jax.jit(alpha_of)
    numeric = (alpha_jit(arrays["loss"] + bump) - alpha_jit(arrays["loss"] - bump)) / (2 * bump[0])
    assert float(grad[0]) == pytest.approx(float(numeric), rel=1e-3)


def test_the_objective_is_the_huber_sum_of_log_residuals_computed_by_hand():
  data = {"N": np.array([1e8, 1e9, 1e10]), "D": np.array([1e10, 1e10, 1e11])}
  params = {"a": 6.0, "b": 8.0, "e": 0.5, "alpha": 0.3, "beta": 0.35}
  natural = laws.to_natural_params(params)
  predicted = natural["E"] + natural["A"] / data["N"] ** 0.3 + natural["B"] / data["D"] ** 0.35
  residual = np.array([5e-4, -2e-3, 3e-2])  # inside, beyond and far beyond delta = 1e-3
  data["loss"] = predicted * np.exp(residual)
  weights = np.array([1.0, 2.0, 0.5])
  huber = np.where(np.abs(residual) <= 1e-3, 0.5 * residual ** 2,
                   1e-3 * (np.abs(residual) - 0.5e-3))
  with jax.enable_x64(True):
    value = fitting.objective(params, fitting.as_data(data), jnp.asarray(weights),
                              law=laws.CHINCHILLA,
                          delta=fitting.DEFAULT_DELTA)
  assert float(value) == pytest.approx(float(np.sum(weights * huber)), rel=1e-8)


@pytest.mark.fp_path
def test_the_default_fit_shrugs_off_an_outlier():
  """Huber with delta 1e-3 on log residuals: one run 30% off moves the fit little; a squared
  loss (delta 1) is dragged by it."""
  data = synthetic_family(noise=0.0005, seed=5)
  data["loss"] = data["loss"].copy()
  data["loss"][17] *= 1.3
  fitted = lambda delta: laws.to_natural_params(fitting.fit(
      fitting.Problem.of(laws.FAMILIAL, data, delta=delta),
      starts=laws.FAMILIAL.starts(450)).params)
  robust, squared = fitted(fitting.DEFAULT_DELTA), fitted(1.0)
  truth = laws.PAPER_FAMILIAL
  assert robust["gamma"] == pytest.approx(truth["gamma"], rel=0.05)
  assert abs(squared["gamma"] / truth["gamma"] - 1) > 3 * abs(robust["gamma"] / truth["gamma"] - 1)


def whitened(problem: fitting.Problem, params) -> Coordinates:
  """Coordinates in which the problem's objective has the identity as Hessian at params."""
  with jax.enable_x64(True):
    at = fit_stages.whiten(problem, np.array([[params[k] for k in problem.names]]),
                       np.ones((1, problem.n_rows)), fitting.Solver(), fit_stages.HOST)
  return Coordinates(at.origin[0], at.basis[0])


def descend(problem: fitting.Problem, starts, weights_SR, solver, coordinates=None):
  """L-BFGS from every start ({name: [S]}) from the host."""
  with jax.enable_x64(True):
    return fit_stages.descend(problem, fitting.start_points(problem, starts), weights_SR, solver,
                          fit_stages.HOST, coordinates)


def resample_counts(n_rows: int, n: int, seed: int, groups=None) -> np.ndarray:
  with jax.enable_x64(True):
    return np.asarray(fitting.Resampling(n, seed, groups).counts(n_rows))


def test_whitened_coordinates_make_the_hessian_the_identity(familial_fit):
  """The finite-difference Hessian from the compiled queue's gradients matches jax.hessian (on a
  smooth objective: a Huber delta beyond every residual)."""
  data, result = familial_fit
  names = tuple(result.params)
  coordinates = whitened(fitting.Problem.of(laws.FAMILIAL, data, delta=1.0), result.params)
  with jax.enable_x64(True):
    arrays = fitting.as_data(data)
    weights = jnp.ones_like(arrays["loss"])
    in_solver = lambda z: fitting.objective(
        dict(zip(names, coordinates.origin + coordinates.basis @ z)), arrays, weights,
        law=laws.FAMILIAL, delta=1.0)
    hessian = np.asarray(jax.hessian(in_solver)(jnp.zeros(len(names))))
  np.testing.assert_allclose(coordinates.origin, [result.params[k] for k in names])
  np.testing.assert_allclose(np.abs(hessian), np.eye(len(names)), atol=1e-3)
  x = np.random.default_rng(0).normal(size=(3, len(names)))
  np.testing.assert_allclose(coordinates.to_params(coordinates.to_solver(x)), x, atol=1e-12)


@pytest.mark.fp_path
def test_whitened_refits_match_refits_in_the_laws_coordinates(familial_fit):
  data, result = familial_fit
  counts = resample_counts(len(data["loss"]), 32, seed=1)
  starts = {k: np.full(32, v) for k, v in result.params.items()}
  problem = fitting.Problem.of(laws.FAMILIAL, data)
  solver = fitting.Solver(fitting.StopRules(tol=1e-12, maxiter=3000), lanes=16)
  plain, white = [descend(problem, starts, counts, solver, coordinates)
                  for coordinates in (None, whitened(problem, result.params))]
  assert white.converged_S.all()
  np.testing.assert_array_less(white.value_S, plain.value_S * (1 + 1e-9))
  for name in ("alpha", "beta", "gamma"):
    np.testing.assert_allclose(white.params(problem.names)[name],
                               plain.params(problem.names)[name], rtol=1e-4)


@pytest.mark.fp_path
def test_restart_carries_starts_that_stalled_on_to_the_minimum(familial_fit):
  """A loose stall rule (ftol 1e-2) ends every start early and calls it converged; restarting
  with fresh L-BFGS memory goes on to where a full run from the same start ends."""
  data, result = familial_fit
  starts = {k: v + np.linspace(-0.1, 0.1, 8) for k, v in result.params.items()}
  weights = np.ones((8, len(data["loss"])))
  problem = fitting.Problem.of(laws.FAMILIAL, data)
  stalled = descend(problem, starts, weights, fitting.Solver(fitting.StopRules(ftol=1e-2), 8))
  full = descend(problem, starts, weights, fitting.Solver(fitting.StopRules(tol=1e-12,
                                                                            maxiter=3000), 8))
  with jax.enable_x64(True):
    restarted = fit_stages.restart(problem, stalled, weights, fitting.Solver(lanes=8),
                                   fit_stages.HOST)
  ran_to_the_end = full.converged_S  # (a plain run from the farthest starts can end unconverged)
  assert ran_to_the_end.sum() >= 4
  assert stalled.converged_S[ran_to_the_end].all()
  assert np.all(stalled.value_S[ran_to_the_end] > full.value_S[ran_to_the_end] * 1.01)
  np.testing.assert_allclose(restarted.value_S[ran_to_the_end], full.value_S[ran_to_the_end],
                             rtol=1e-8)
  assert restarted.converged_S[ran_to_the_end].all()
  assert np.all(restarted.value_S[ran_to_the_end] <= full.value_S[ran_to_the_end] * (1 + 1e-8))


def test_the_queue_evaluates_its_starts_when_maxiter_is_zero():
  data = synthetic_family(noise=0.01)
  starts = {k: np.full(3, v) + np.array([0.0, 0.1, -0.1]) for k, v in PAPER.items()}
  weights = np.ones((3, len(data["loss"])))
  problem = fitting.Problem.of(laws.FAMILIAL, data)
  ends = descend(problem, starts, weights, fitting.Solver(fitting.StopRules(maxiter=0), 8))
  params, value = ends.params(problem.names), ends.value_S
  expected = []
  for s in range(3):  # the Huber sum by hand, in numpy
    nat = laws.to_natural_params({k: v[s] for k, v in starts.items()})
    dense = nat["E"] + nat["A"] / data["N"] ** nat["alpha"] + nat["B"] / data["D"] ** nat["beta"]
    pred = dense * data["G"] ** nat["gamma"]
    r = np.abs(np.log(data["loss"]) - np.log(pred))
    expected.append(np.sum(np.where(r <= 1e-3, 0.5 * r ** 2, 1e-3 * (r - 0.5e-3))))
  np.testing.assert_allclose(value, expected, rtol=1e-12)
  for k in starts:
    np.testing.assert_array_equal(params[k], starts[k])


def test_group_resampling_draws_whole_groups_with_replacement():
  groups = np.repeat([0, 1, 2, 3], 5)
  counts = resample_counts(20, 2000, seed=0, groups=groups)
  assert counts.shape == (2000, 20) and np.all(counts.sum(axis=1) == 20)
  for row in counts[:50]:
    assert all(len(set(row[groups == k])) == 1 for k in range(4))
  per_group = counts[:, ::5]  # how often each group was drawn: multinomial(4, 1/4 each)
  np.testing.assert_allclose(per_group.mean(axis=0), 1.0, atol=0.06)
  np.testing.assert_allclose(per_group.var(axis=0), 4 * 0.25 * 0.75, atol=0.08)
  assert (per_group == 0).any() and (per_group >= 2).any()
  rows = resample_counts(10, 4000, seed=1)
  np.testing.assert_allclose(rows.var(axis=0), 10 * 0.1 * 0.9, rtol=0.1)


@pytest.mark.parametrize("frame, law, message", [
    (pd.DataFrame({"N": [1.0] * 8, "loss": [2.0] * 8}), laws.CHINCHILLA, r"lacks \['D'\]"),
    (pd.DataFrame({"N": [1e8, -1, 1e8, 1e8, 1e8, 1e8], "D": [1e9] * 6, "loss": [2.0] * 6}),
     laws.CHINCHILLA, r"'N' must be finite and > 0; rows \[1\]"),
    (pd.DataFrame({"N": [1e8] * 6, "D": [1e9] * 6, "loss": [2.0, np.nan, 2, 2, 2, 2]}),
     laws.CHINCHILLA, r"'loss' must be finite and > 0; rows \[1\]"),
    (pd.DataFrame({"N": [1e8] * 4, "D": [1e9] * 4, "loss": [2.0] * 4}), laws.CHINCHILLA,
     "too few"),
    (pd.DataFrame({"N": np.geomspace(1e7, 1e9, 9), "D": np.geomspace(1e9, 1e11, 9), "G": [4] * 9,
                   "loss": [2.0] * 9}), laws.FAMILIAL, "G takes one value"),
])
def test_bad_fit_data_is_a_clear_error(frame, law, message):
  with pytest.raises(ValueError, match=message):
    fit_data.validate(frame, law)


@pytest.fixture(scope="module")
def epoch_data():
  """Epoch AI's Chinchilla rows; the shared reference data is absent outside a project checkout."""
  path = reference_data_dir() / "chinchilla-epoch" / "svg_extracted_data.csv"
  if not path.exists():
    pytest.skip(f"reference data not found at {path} (set FAMJAX_REFERENCE_DATA)")
  return fit_data.epoch_chinchilla(path)


def test_epoch_rows(epoch_data):
  data = epoch_data
  assert len(data["loss"]) == 240 and data["loss"].max() < 3.447


def test_fit_command_line(tmp_path):
  import json
  import subprocess
  import sys
  from pathlib import Path
  data = synthetic_family(noise=0.01, seed=2)
  pd.DataFrame(data).to_csv(tmp_path / "runs.csv", index=False)
  root = Path(__file__).resolve().parents[2]
  out = subprocess.run([sys.executable, "-m", "experiments.fit", f"--data={tmp_path / 'runs.csv'}",
                        "--law=familial", "--bootstrap=100", "--grid_every=450",
                        f"--out={tmp_path / 'fit.json'}"], cwd=root, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  record = json.loads((tmp_path / "fit.json").read_text())
  assert record["law"] == "familial" and record["n_rows"] == 120
  assert set(record["params"]) == {"E", "A", "B", "alpha", "beta", "gamma"}
  assert record["bootstrap"]["n"] == 100 and len(record["bootstrap"]["ci95"]["gamma"]) == 2
  assert "Is gamma > 0 (one-sided" in out.stdout and "95% CI" in out.stdout
  assert "nan" not in out.stdout
  params = record["params"]
  assert record["derived"]["a_opt"] == pytest.approx(
      params["beta"] / (params["alpha"] + params["beta"]))


def test_fit_command_line_rejects_bad_data(tmp_path):
  import subprocess
  import sys
  from pathlib import Path
  pd.DataFrame({"N": [1e8] * 9, "D": [1e9] * 9, "loss": [2.0] * 9}).to_csv(tmp_path / "x.csv")
  root = Path(__file__).resolve().parents[2]
  out = subprocess.run([sys.executable, "-m", "experiments.fit", f"--data={tmp_path / 'x.csv'}",
                        "--law=familial"], cwd=root, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and "lacks ['G']" in out.stderr


@pytest.mark.slow
def test_epoch_chinchilla_from_every_start_and_bootstrap(epoch_data):
  """Epoch AI's best fit from 4500 starts and bootstrap standard errors (arXiv 2404.10102).
  A 4000-refit SE is itself a Monte-Carlo estimate: over seeds 0-5 famjax gave A 119.7-123.0,
  E 0.0249-0.0258, alpha 0.0149-0.0153, beta 0.0198-0.0208, all within 5% of Epoch's, but B
  (a heavy-tailed exp(b)) 1267-1458, a seed-to-seed spread of about 5%: B is held to 15%, three
  times that, the others to 10%."""
  data = epoch_data
  result = fitting.fit(fitting.Problem.of(laws.CHINCHILLA, data))
  assert result.objective <= 0.0010182741
  got = laws.to_natural_params(result.params)
  for name, value in {"A": 477.8, "B": 2143, "E": 1.8172, "alpha": 0.3473, "beta": 0.3672}.items():
    assert got[name] == pytest.approx(value, rel=0.005), name
  boot = bootstrap.bootstrap(result, fitting.Resampling(4000, 0))
  for name, se in {"A": 124.5, "B": 1293, "E": 0.0257, "alpha": 0.0154, "beta": 0.0206}.items():
    assert boot.se[name] == pytest.approx(se, rel=0.15 if name == "B" else 0.10), name


STARTS = laws.FAMILIAL.starts(450)


def test_estimate_gradients_match_finite_differences():
  """d gamma / d loss_i by implicit differentiation, against central differences, on the rows
  that move the estimate most (rows beyond the Huber delta do not move it at all)."""
  with jax.enable_x64(True):
    data = fitting.as_data(synthetic_family(noise=0.0005, seed=3))
    problem = lambda losses: fitting.Problem.of(laws.FAMILIAL, dict(data, loss=losses))
    gamma = lambda losses, w: fitting.estimate(problem(losses), weights=w,
                                               starts=STARTS).params["gamma"]
    ones = jnp.ones(120)
    # one compiled program for both gradients, one for the estimate itself
    grad, by_weight = map(np.asarray, jax.jit(jax.grad(gamma, argnums=(0, 1)))(data["loss"], ones))
    assert np.count_nonzero(grad) > 100
    jitted = jax.jit(gamma)
    for i in np.argsort(-np.abs(grad))[:3]:
      h = 1e-6 * float(data["loss"][i])
      numeric = (jitted(data["loss"].at[i].add(h), ones)
                 - jitted(data["loss"].at[i].add(-h), ones)) / (2 * h)
      assert grad[i] == pytest.approx(float(numeric), rel=1e-3)
    assert np.count_nonzero(by_weight) > 100


def test_estimate_vmaps_over_studies_and_compiles_once_per_shape():
  with jax.enable_x64(True):
    # four studies: a batch of several, each of which must match its own unbatched fit
    studies = [fitting.as_data(synthetic_family(noise=0.002, seed=s)) for s in range(4)]
    single = jax.jit(lambda d: fitting.estimate(fitting.Problem.of(laws.FAMILIAL, d),
                                                starts=STARTS))
    separate = [single(d) for d in studies]
    assert single._cache_size() == 1
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *studies)
    batched = jax.jit(jax.vmap(
        lambda d: fitting.estimate(fitting.Problem.of(laws.FAMILIAL, d), starts=STARTS)))(stacked)
  for name in PAPER:
    np.testing.assert_allclose(batched.params[name], [e.params[name] for e in separate],
                               rtol=1e-8, err_msg=name)
  assert bool(np.all(batched.converged))


# not in the second-code-path rerun: a standard error within 20% does not follow which minimum a
# start falls into (test_bootstrap.py's traced test compares the refits one by one there)
@pytest.mark.slow
def test_estimate_bootstrap_gives_intervals_like_the_host_bootstrap():
  data = synthetic_family(noise=0.01, seed=1)
  with jax.enable_x64(True):
    def estimate_and_bootstrap(problem, key):
      est = fitting.estimate(problem, starts=STARTS)
      return est, bootstrap.bootstrap(est, fitting.Resampling(400, key), fitting.Solver(lanes=64))

    est, boot = jax.jit(estimate_and_bootstrap)(fitting.Problem.of(laws.FAMILIAL, data),
                                                jax.random.key(0))
  host = bootstrap.bootstrap(fitting.fit(fitting.Problem.of(laws.FAMILIAL, data), starts=STARTS),
                             fitting.Resampling(400))
  assert float(boot.converged_B.mean()) > 0.99
  assert float(boot.se["gamma"]) == pytest.approx(host.se["gamma"], rel=0.2)
  lo, hi = (float(x) for x in boot.ci95["gamma"])
  assert lo < float(est.params["gamma"]) < hi


def test_estimate_refuses_a_silent_float32_fit():
  data = {k: np.asarray(v, np.float32) for k, v in synthetic_family().items()}
  with pytest.raises(TypeError, match="jax.enable_x64"):
    fitting.estimate(fitting.Problem.of(laws.FAMILIAL, data), starts=STARTS)


@pytest.mark.fp_path
def test_failed_refits_are_left_out_and_counted():
  data = synthetic_family(noise=0.01, seed=1)
  result = fitting.fit(fitting.Problem.of(laws.FAMILIAL, data), starts=STARTS)
  boot = bootstrap.bootstrap(result, fitting.Resampling(100),
                             fitting.Solver(fitting.StopRules(maxiter=1)))
  assert boot.failed > 0 and boot.converged_share == pytest.approx(1 - boot.failed / 100)
  assert np.isnan(boot.samples["gamma"]).sum() == boot.failed
  ok = boot.samples["gamma"][np.isfinite(boot.samples["gamma"])]
  if ok.size >= 2:
    assert boot.se["gamma"] == pytest.approx(np.std(ok, ddof=1))


@pytest.mark.fp_path
def test_a_parameter_at_a_boundary_is_flagged_and_its_interval_unidentified():
  """Data without a loss floor (E = 0): the fit runs E to zero; the record says so."""
  rng = np.random.default_rng(0)
  n, d = np.geomspace(1e7, 1e9, 24), rng.permutation(np.geomspace(1e9, 1e11, 24))
  loss = 400 / n ** 0.3 + 3000 / d ** 0.34
  fitted = fitted_law.fit_law(laws.CHINCHILLA, {"N": n, "D": d, "loss": loss}, n_bootstrap=100,
                          starts=laws.CHINCHILLA.starts(10))
  summary = fitted.summary()
  assert "E" in summary["boundary"]
  assert summary["bootstrap"]["ci95"]["E"] is None
  assert summary["bootstrap"]["se"]["E"] is None
  assert summary["bootstrap"]["ci95"]["alpha"] is not None
  assert "unidentified (boundary)" in fitted_law.law_table(summary)

