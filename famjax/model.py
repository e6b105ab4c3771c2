"""FamilialTransformer: a pre-norm decoder-only backbone with one exit head after each exit layer.

Shape suffixes: B batch, T sequence, D d_model, N heads, H head dim, F MLP hidden, V vocabulary,
G exits. Every parameter carries logical axis names (see famjax.sharding.RULES).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from famjax.config import ModelConfig
from famjax.sharding import constrain

KERNEL_INIT = nnx.initializers.lecun_normal()


def _dtype(cfg: ModelConfig):
  return jnp.dtype(cfg.dtype)


def _norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
  return nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=_dtype(cfg),
                     param_dtype=jnp.float32,
                     scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
                     rngs=rngs)


def _linear(d_in, d_out, axes, cfg: ModelConfig, rngs: nnx.Rngs, in_axis=-1) -> nnx.LinearGeneral:
  return nnx.LinearGeneral(d_in, d_out, axis=in_axis, use_bias=False, dtype=_dtype(cfg),
                           param_dtype=jnp.float32,
                           kernel_init=nnx.with_partitioning(KERNEL_INIT, axes), rngs=rngs)


def rotary(x_BTNH: jax.Array, positions_T: jax.Array, theta: float) -> jax.Array:
  """Rotates channel pairs (i, i + H/2) by position-dependent angles (RoFormer, GPT-NeoX layout)."""
  half = x_BTNH.shape[-1] // 2
  freq_h = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_TH = positions_T.astype(jnp.float32)[:, None] * freq_h[None, :]
  sin_T1H = jnp.sin(angle_TH)[:, None, :]
  cos_T1H = jnp.cos(angle_TH)[:, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos_T1H - x2 * sin_T1H, x2 * cos_T1H + x1 * sin_T1H], axis=-1)
  return out.astype(x_BTNH.dtype)


class Attention(nnx.Module):
  """Causal multi-head self-attention with rotary embeddings, through jax.nn.dot_product_attention."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    shape_NH = (cfg.n_heads, cfg.head_dim)
    self.query = _linear(cfg.d_model, shape_NH, ("embed", "heads", "kv"), cfg, rngs)
    self.key = _linear(cfg.d_model, shape_NH, ("embed", "heads", "kv"), cfg, rngs)
    self.value = _linear(cfg.d_model, shape_NH, ("embed", "heads", "kv"), cfg, rngs)
    self.out = _linear(shape_NH, cfg.d_model, ("heads", "kv", "embed"), cfg, rngs,
                       in_axis=(-2, -1))
    self.rope_theta = cfg.rope_theta

  def __call__(self, x_BTD: jax.Array, positions_T: jax.Array) -> jax.Array:
    q_BTNH = rotary(self.query(x_BTD), positions_T, self.rope_theta)
    k_BTNH = rotary(self.key(x_BTD), positions_T, self.rope_theta)
    v_BTNH = self.value(x_BTD)
    attended_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BTNH, v_BTNH, is_causal=True)
    return self.out(attended_BTNH)


class SwiGLU(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.gate = _linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), cfg, rngs)
    self.up = _linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), cfg, rngs)
    self.down = _linear(cfg.d_ff, cfg.d_model, ("mlp", "embed"), cfg, rngs)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x_BTD)) * self.up(x_BTD))


class Block(nnx.Module):
  """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = _norm(cfg, rngs)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = _norm(cfg, rngs)
    self.mlp = SwiGLU(cfg, rngs)

  def __call__(self, x_BTD: jax.Array, positions_T: jax.Array) -> jax.Array:
    x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), positions_T)
    return x_BTD + self.mlp(self.mlp_norm(x_BTD))


class ExitHead(nnx.Module):
  """One exit: [private block] + RMSNorm + unembedding (its own, a shared one, or the embedding)."""

  def __init__(self, cfg: ModelConfig, private_block: bool, unembed: nnx.Module | None,
               rngs: nnx.Rngs):
    self.block = Block(cfg, rngs) if private_block else None
    self.norm = _norm(cfg, rngs)
    self.unembed = unembed

  def __call__(self, h_BTD: jax.Array, positions_T: jax.Array, embed: nnx.Embed) -> jax.Array:
    if self.block is not None:
      h_BTD = self.block(h_BTD, positions_T)
    h_BTD = self.norm(h_BTD)
    logits_BTV = embed.attend(h_BTD) if self.unembed is None else self.unembed(h_BTD)
    return constrain(logits_BTV.astype(jnp.float32), ("batch", "length", "vocab"))


def _embed(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Embed:
  init = nnx.initializers.normal(stddev=cfg.d_model ** -0.5)
  return nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=_dtype(cfg), param_dtype=jnp.float32,
                   embedding_init=nnx.with_partitioning(init, ("vocab", "embed")), rngs=rngs)


class FamilialTransformer(nnx.Module):
  """G exits on one shared backbone; G = 1 is the dense model through the same code."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = _embed(cfg, rngs)
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
    shared = (_linear(cfg.d_model, cfg.vocab_size, ("embed", "vocab"), cfg, rngs)
              if cfg.unembed == "shared" else None)
    heads = []
    for g in range(cfg.n_exits):
      is_last = g == cfg.n_exits - 1
      private_block = cfg.exit_head == "block" and not is_last
      if cfg.unembed == "per_exit":
        unembed = _linear(cfg.d_model, cfg.vocab_size, ("embed", "vocab"), cfg, rngs)
      else:
        unembed = shared
      heads.append(ExitHead(cfg, private_block, unembed, rngs))
    self.exits = nnx.List(heads)

  def __call__(self, tokens_BT: jax.Array, n_exits: int | None = None) -> jax.Array:
    """Logits of the first n_exits exits (all by default), stacked: logits_GBTV, float32."""
    n_exits = self.cfg.n_exits if n_exits is None else n_exits
    positions_T = jnp.arange(tokens_BT.shape[1])
    x_BTD = constrain(self.embed(tokens_BT), ("batch", "length", "embed"))
    logits = []
    for layer, block in enumerate(self.blocks[: self.cfg.exit_layers[n_exits - 1]], start=1):
      x_BTD = block(x_BTD, positions_T)
      if layer in self.cfg.exit_layers:
        g = self.cfg.exit_layers.index(layer)
        logits.append(self.exits[g](x_BTD, positions_T, self.embed))
    return jnp.stack(logits)


class ExitSubModel(nnx.Module):
  """Exit g's deployable sub-model: layers 1..l_g and exit g's head, sharing the family's weights."""

  def __init__(self, family: FamilialTransformer, g: int):
    if not 0 <= g < family.cfg.n_exits:
      raise ValueError(f"exit index g must be in 0..{family.cfg.n_exits - 1}; got {g}")
    self.embed = family.embed
    self.blocks = nnx.List(list(family.blocks[: family.cfg.exit_layers[g]]))
    self.head = family.exits[g]

  def __call__(self, tokens_BT: jax.Array) -> jax.Array:
    positions_T = jnp.arange(tokens_BT.shape[1])
    x_BTD = self.embed(tokens_BT)
    for block in self.blocks:
      x_BTD = block(x_BTD, positions_T)
    return self.head(x_BTD, positions_T, self.embed)
