import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from famjax.model.sharding import make_mesh
from famjax.model.transformer import ExitSubModel, FamilialTransformer, rotary
from famjax.train.step import create_model

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
  """Gradients of exit 0 reach layer 1 and exit 0's head, and stop there: nothing deeper, and no
  other exit's private block or own head."""
  family = families[kind]
  graphdef, params = nnx.split(family)
  grads = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p)(tokens())[0].sum()))(params)
  norm = lambda tree: max(float(jnp.abs(x).max()) for x in jax.tree.leaves(tree))
  assert norm(grads["segments"][0]) > 0 and norm(grads["embed"]) > 0  # layer 1
  assert norm(grads["exits"][0]["norm"]) > 0
  for segment in (1, 2):  # layers 2 and 3
    assert norm(grads["segments"][segment]) == 0.0
  for g in (1, 2):
    assert norm(grads["exits"][g]["norm"]) == 0.0, g
    if "block" in grads["exits"][g]:
      assert norm(grads["exits"][g]["block"]) == 0.0, g
    if kind[1] == "per_exit":
      assert norm(grads["exits"][g]["unembed"]) == 0.0, g


def reference_logits(params, cfg, tokens_BT, exit_index):
  """An independent numpy forward pass of exit `exit_index`, from the parameter arrays alone."""
  p = jax.tree.map(np.asarray, nnx.to_pure_dict(params))
  x = p["embed"]["embedding"][np.asarray(tokens_BT)]
  t = x.shape[1]
  half = cfg.head_size // 2
  angle = np.arange(t)[:, None] * cfg.rope_theta ** (-np.arange(half) / half)[None]
  cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]

  def rope(v):
    a, b = v[..., :half], v[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)

  def norm(v, scale):
    return v / np.sqrt(np.mean(v ** 2, -1, keepdims=True) + cfg.norm_eps) * scale

  def block(v, w):
    h = norm(v, w["attn_norm"]["scale"])
    q, k, val = (np.einsum("btd,dnh->btnh", h, w["attn"][n]["kernel"])
                 + w["attn"][n].get("bias", 0.0) for n in ("query", "key", "value"))
    group = cfg.n_heads // cfg.kv_heads  # query heads per key/value head
    k, val = np.repeat(k, group, axis=2), np.repeat(val, group, axis=2)
    scores = np.einsum("btnh,bsnh->bnts", rope(q), rope(k)) / np.sqrt(cfg.head_size)
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attended = np.einsum("bnts,bsnh->btnh", probs, val)
    v = v + np.einsum("btnh,nhd->btd", attended, w["attn"]["out"]["kernel"])
    h = norm(v, w["mlp_norm"]["scale"])
    gate = h @ w["mlp"]["gate"]["kernel"]
    hidden = gate / (1 + np.exp(-gate)) * (h @ w["mlp"]["up"]["kernel"])
    return v + hidden @ w["mlp"]["down"]["kernel"]

  for segment in (p["segments"][i] for i in range(exit_index + 1)):  # stacked [layers, ...]
    n_layers = jax.tree.leaves(segment)[0].shape[0]
    for layer in range(n_layers):
      x = block(x, jax.tree.map(lambda a: a[layer], segment["blocks"]))
  head = p["exits"][exit_index]
  if head.get("block"):
    x = block(x, head["block"])
  x = norm(x, head["norm"]["scale"])
  if cfg.unembed == "tied":
    return x @ p["embed"]["embedding"].T
  unembed = head["unembed"] if "unembed" in head else p["exits"][0]["unembed"]
  return x @ unembed["kernel"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_exit_equals_an_independent_reference_forward(families, kind):
  family = families[kind]
  x = tokens(seed=4)
  logits_GBTV = forward(family, x)
  for g in range(3):
    reference = reference_logits(nnx.state(family), family.cfg, x, g)
    np.testing.assert_allclose(logits_GBTV[g], reference, atol=2e-4, rtol=1e-4)


def test_the_dense_model_equals_the_reference():
  dense = build(tiny_model(unembed="tied", exit_layers=(3,)), seed=1)
  x = tokens(seed=3)
  np.testing.assert_allclose(forward(dense, x)[0], reference_logits(nnx.state(dense), dense.cfg,
                                                                   x, 0), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("attention", [dict(n_heads=4, n_kv_heads=2), dict(n_heads=4, n_kv_heads=1),
                                       dict(n_heads=2, head_dim=8, attention_bias=True)])
def test_grouped_query_attention_and_biases_equal_the_reference(attention):
  """GQA (2 query heads per key/value head), MQA, and q/k/v biases with a head width that is not
  d_model / n_heads, against the independent forward pass (biases randomised, not zero)."""
  family = build(tiny_model(unembed="shared", **attention))
  params = nnx.state(family, nnx.Param)
  bias_paths = [p for p, _ in nnx.to_flat_state(params) if p[-1] == "bias"]
  assert len(bias_paths) == (9 if attention.get("attention_bias") else 0)  # 3 layers x q, k, v
  keys = iter(jax.random.split(jax.random.key(1), len(bias_paths) or 1))
  for path in bias_paths:
    variable = family
    for name in path[:-1]:
      variable = variable[name] if isinstance(name, int) else getattr(variable, name)
    variable.bias.value = jax.random.normal(next(keys), variable.bias.value.shape)
  cfg = family.cfg
  layer = family.segments[0].blocks.attn
  assert layer.key.kernel.value.shape[-2:] == (cfg.kv_heads, cfg.head_size)
  x = tokens()
  logits_GBTV = forward(family, x)
  for g in range(cfg.n_exits):
    np.testing.assert_allclose(logits_GBTV[g], reference_logits(nnx.state(family), cfg, x, g),
                               rtol=2e-4, atol=2e-4)


def test_bfloat16_compute_keeps_float32_parameters_and_close_logits():
  cfg = tiny_model(dtype="bfloat16")
  model = build(cfg)
  assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}
  out = forward(model, tokens())
  reference = forward(build(tiny_model()), tokens())
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, reference, atol=0.1)
  assert float(jnp.abs(out - reference).max()) > 0  # it did compute in bfloat16


def test_created_inside_jit_on_a_mesh_equals_the_eager_model():
  model = create_model(tiny_model(), 0, make_mesh())
  eager = build(tiny_model(), seed=0)
  np.testing.assert_allclose(forward(model, tokens()), forward(eager, tokens()), atol=1e-5)


def test_rotary_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 6, 2, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 6, 2, 8)), jnp.float32)
  scores = lambda positions: jnp.einsum("btnh,bsnh->bnts", rotary(q, positions, 1e4),
                                        rotary(k, positions, 1e4))
  base = scores(jnp.arange(6))
  np.testing.assert_allclose(scores(jnp.arange(6) + 11), base, atol=1e-4)
  np.testing.assert_allclose(jnp.linalg.norm(rotary(q, jnp.arange(6) + 3, 1e4), axis=-1),
                             jnp.linalg.norm(q, axis=-1), rtol=1e-5)  # a rotation
  moved = rotary(q, jnp.arange(6) + 3, 1e4)
  assert float(jnp.abs(moved - rotary(q, jnp.arange(6), 1e4)).max()) > 0.1
  # same token pair, another distance: another score
  same = jnp.broadcast_to(q[:, :1], q.shape)
  far = jnp.einsum("bnh,bnh->bn", rotary(same, jnp.arange(6), 1e4)[:, 5],
                   rotary(same, jnp.arange(6), 1e4)[:, 0])
  near = jnp.einsum("bnh,bnh->bn", rotary(same, jnp.arange(6), 1e4)[:, 1],
                    rotary(same, jnp.arange(6), 1e4)[:, 0])
  assert float(jnp.abs(far - near).max()) > 1e-2


def test_model_outputs_depend_on_token_order():
  """Without position information a token's logits would ignore where earlier tokens sit."""
  model = build(tiny_model())
  a = jnp.asarray([[5, 9, 12, 7]])
  b = jnp.asarray([[9, 5, 12, 7]])  # the same set of earlier tokens, another order
  assert float(jnp.abs(forward(model, a)[:, :, -1] - forward(model, b)[:, :, -1]).max()) > 1e-3


# make test: each head kind once, and each remat policy once; make check: every pairing
@pytest.mark.parametrize("kind, remat", [
    (("norm", "per_exit"), "none"), (("block", "tied"), "dots"),
    pytest.param(("norm", "per_exit"), "block", marks=pytest.mark.slow),
    pytest.param(("norm", "per_exit"), "dots", marks=pytest.mark.slow),
    pytest.param(("block", "tied"), "none", marks=pytest.mark.slow),
    (("block", "tied"), "block")])
def test_in_loop_chunked_losses_equal_the_losses_of_the_stacked_logits(kind, remat):
  """Losses and gradients of exit_losses (per exit, in 7-token chunks, 2 x 15 = 30 tokens: a
  padded last chunk) equal cross-entropy of __call__'s stacked logits."""
  import optax
  cfg = tiny_model(exit_head=kind[0], unembed=kind[1], loss_chunk=7, remat=remat)
  graphdef, params = nnx.split(build(cfg))
  x = tokens(length=16, seed=5)

  def stacked(p):
    logits = nnx.merge(graphdef, p)(x[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, x[None, :, 1:]).mean((1, 2))

  def in_loop(p):
    return nnx.merge(graphdef, p).exit_losses(x[:, :-1], x[:, 1:])

  weights = jnp.array([0.2, 0.3, 0.5])
  np.testing.assert_allclose(jax.jit(in_loop)(params), jax.jit(stacked)(params), rtol=1e-5)
  grads = [jax.jit(jax.grad(lambda p, f=f: weights @ f(p)))(params) for f in (in_loop, stacked)]
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
