import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from famjax.model import ExitSubModel, FamilialTransformer
from famjax.sharding import make_mesh
from famjax.train import create_model

from conftest import tiny_model

KINDS = list(itertools.product(("norm", "block"), ("tied", "shared", "per_exit")))


@pytest.fixture(scope="module")
def families():
  return {kind: build(tiny_model(exit_head=kind[0], unembed=kind[1])) for kind in KINDS}


def forward(model, x, n_exits=None):
  """Eager calls: for these tiny shapes, op-by-op dispatch beats compiling each variant."""
  return model(x, n_exits)


def build(cfg, seed=0):
  with nnx.use_eager_sharding(False):
    return FamilialTransformer(cfg, rngs=nnx.Rngs(seed))


def tokens(batch=2, length=16, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, 259)


@pytest.mark.parametrize("kind", KINDS)
def test_every_exit_has_logits_of_the_right_shape(families, kind):
  logits_GBTV = forward(families[kind], tokens())
  assert logits_GBTV.shape == (3, 2, 16, 259)
  assert logits_GBTV.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits_GBTV)))


@pytest.mark.parametrize("kind", KINDS)
def test_exits_are_causal(families, kind):
  t = 7
  a = tokens(seed=1)
  b = a.at[:, t + 1:].set((a[:, t + 1:] + 11) % 259)
  out_a, out_b = forward(families[kind], a), forward(families[kind], b)
  np.testing.assert_allclose(out_a[:, :, :t + 1], out_b[:, :, :t + 1], atol=1e-5)
  assert float(jnp.abs(out_a[:, :, t + 1:] - out_b[:, :, t + 1:]).max()) > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_exit_equals_its_truncated_submodel(families, kind):
  family = families[kind]
  x = tokens(seed=2)
  logits_GBTV = forward(family, x)
  for g in range(3):
    sub = ExitSubModel(family, g)
    np.testing.assert_allclose(sub(x), logits_GBTV[g], atol=1e-5)
    np.testing.assert_allclose(forward(family, x, g + 1)[g], logits_GBTV[g], atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_each_exit_sees_its_own_parameters(families, kind):
  """Deeper layers must not change a shallower exit: gradients of exit 0 stop at layer 1."""
  family = families[kind]
  graphdef, params = nnx.split(family)
  grads = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p)(tokens())[0].sum()))(params)
  for layer in (1, 2):
    for leaf in jax.tree.leaves(grads["blocks"][layer]):
      assert float(jnp.abs(leaf).max()) == 0.0


def test_dense_model_is_the_family_backbone():
  """G = 1 runs the same code: with the family's backbone weights it equals the family's last exit."""
  family = build(tiny_model(unembed="shared"))
  dense = build(tiny_model(unembed="shared", exit_layers=(3,)), seed=1)
  dense.embed = family.embed
  dense.blocks = family.blocks
  dense.exits = nnx.List([family.exits[-1]])
  x = tokens(seed=3)
  out = forward(dense, x)
  assert out.shape == (1, 2, 16, 259)
  np.testing.assert_allclose(out[0], forward(family, x)[-1], atol=1e-5)


def test_bfloat16_compute_keeps_float32_parameters():
  model = build(tiny_model(dtype="bfloat16"))
  assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}
  out = forward(model, tokens())
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))


def test_created_inside_jit_on_a_mesh():
  model = create_model(tiny_model(), 0, make_mesh())
  assert forward(model, tokens()).shape == (3, 2, 16, 259)
