"""Compute-optimal allocation N*(C), D*(C) per G, and Efficiency Leverage, from a fitted law.

Budgets: C = k(N, G) * D with k = flops_per_token(N, G), the training FLOPs per token of a
model of N parameters with G exits (default 6N, whatever G). Pure JAX (float64).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from famjax.scaling.laws import FAMILIAL, Law

FlopsPerToken = Callable[[jnp.ndarray, int], jnp.ndarray]


def six_n(n, n_exits=1):
  """C = 6ND (Kaplan et al., Hoffmann et al.): exit heads cost nothing extra."""
  return 6.0 * n


def power_rule(coefficients: Mapping[int, tuple[float, float]]) -> FlopsPerToken:
  """k(N, G) = c_G * N^p_G from {G: (log c_G, p_G)}, e.g. fitted to a study's accounting
  (famjax.study.isoflop.flops_rule)."""
  def flops_per_token(n, n_exits=1):
    log_c, power = coefficients[int(n_exits)]
    return jnp.exp(log_c + power * jnp.log(n))
  return flops_per_token


def _loss(law: Law, params: Mapping, n, d, g):
  data = {"N": n, "D": d, "G": jnp.broadcast_to(jnp.asarray(g, jnp.float64), jnp.shape(n)),
          "exit": jnp.broadcast_to(jnp.asarray(g, jnp.float64), jnp.shape(n))}
  return jnp.exp(law.log_loss(params, data))


def compute_optimal(params: Mapping, budget, n_exits=1, *, law: Law = FAMILIAL,
                    flops_per_token: FlopsPerToken = six_n, log10_n_range=(0.0, 16.0)):
  """(N*, D*) minimising the law along C = flops_per_token(N) * D: a coarse then a fine log grid
  over N in 10**log10_n_range. Relative precision on N* is about 1e-5. Where the minimum is at
  an end of the range (the law has no minimum inside it), N* and D* are nan.
  """
  def loss_at(log_n):
    n = jnp.exp(log_n)
    return _loss(law, params, n, budget / flops_per_token(n, n_exits), n_exits)

  lo, hi = (jnp.log(10.0) * x for x in log10_n_range)
  coarse = jnp.linspace(lo, hi, 2401)
  index = jnp.argmin(loss_at(coarse))
  best = coarse[index]
  step = coarse[1] - coarse[0]
  fine = jnp.linspace(best - step, best + step, 2001)
  inside = (index > 0) & (index < coarse.size - 1)
  n_star = jnp.where(inside, jnp.exp(fine[jnp.argmin(loss_at(fine))]), jnp.nan)
  return n_star, budget / flops_per_token(n_star, n_exits)


def efficiency_leverage(params: Mapping, budget, n_exits: int, *, law: Law = FAMILIAL,
                        ladder: Sequence[float] | None = None,
                        budget_split: Sequence[float] | None = None,
                        flops_per_token: FlopsPerToken = six_n, log10_n_range=(0.0, 16.0)):
  """EL(C, G) = mean_g L_dense(N_g, D_g) / L_family(N*, D*, G).

  The family is trained compute-optimally at budget C (N*, D*); its mean exit loss is the law at G
  (equal exit weights, as the paper). Exit g's sub-model has N_g = ladder[g] * N* parameters
  (default ladder g/G: exits evenly spaced in depth). The G independent dense models have the same
  sizes N_g and share the budget: model g gets budget_split[g] * C (default C/G each), so
  D_g = budget_split[g] * C / flops_per_token(N_g, 1); their loss is the law at G = 1.
  """
  g = jnp.arange(1, n_exits + 1, dtype=jnp.float64)
  ladder = g / n_exits if ladder is None else jnp.asarray(ladder, jnp.float64)
  split = (jnp.full(n_exits, 1.0 / n_exits) if budget_split is None
           else jnp.asarray(budget_split, jnp.float64))
  n_star, d_star = compute_optimal(params, budget, n_exits, law=law,
                                   flops_per_token=flops_per_token, log10_n_range=log10_n_range)
  family = _loss(law, params, n_star, d_star, n_exits)
  n_g = ladder * n_star
  dense = _loss(law, params, n_g, split * budget / flops_per_token(n_g, 1), 1.0)
  return jnp.mean(dense) / family


def leverage_table(params: Mapping, budgets, granularities, **kwargs):
  """EL for every (budget, G): array [len(budgets), len(granularities)]."""
  with jax.enable_x64(True):
    budgets = jnp.asarray(budgets, jnp.float64)
    return jnp.stack([jax.vmap(lambda c: efficiency_leverage(params, c, g, **kwargs))(budgets)
                      for g in granularities], axis=1)
