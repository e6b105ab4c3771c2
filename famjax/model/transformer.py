"""FamilialTransformer: a pre-norm decoder-only backbone with one exit head after each exit layer.

The backbone is G segments: segment g holds layers l_{g-1}+1..l_g as one stack of blocks with a
leading "layers" axis, applied with lax.scan, so a program holds one block per segment however
deep the model is. Exit g reads the hidden state leaving segment g. Training computes each exit's
cross-entropy where the exit is, in token chunks whose logits are recomputed in the backward
pass, so no [G, B, T, V] (or even [B, T, V]) float32 array is ever live; `__call__` still returns
the stacked logits for scoring. Decoding passes a KV cache through the same segments
(famjax.decode): the cache of segment g is a stack [L_g, B, S, J, H] that scans with its blocks.

Shape suffixes: B batch, T sequence (new tokens), S cache length, M d_model, Q attention heads,
J key/value heads (Q / J query heads share each), H head dim, F MLP hidden, V vocabulary, G exits,
L layers of a segment, C tokens of a loss chunk, K loss chunks, R rows (B x T flattened). M and
Q, not the usual D and N: those are the scaling law's tokens and parameters. Every parameter
carries logical axis names (famjax.model.sharding.RULES).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from famjax.model.config import ModelConfig
from famjax.model.sharding import constrain

KERNEL_INIT = nnx.initializers.lecun_normal()
REMAT_POLICIES = {"block": None, "dots": jax.checkpoint_policies.checkpoint_dots}


class KV(NamedTuple):
  """Keys and values of the cached positions: [..., B, S, J, H] each."""
  k: jax.Array
  v: jax.Array


def _dtype(cfg: ModelConfig):
  return jnp.dtype(cfg.dtype)


def _norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
  return nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=_dtype(cfg),
                     param_dtype=jnp.float32,
                     scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
                     rngs=rngs)


def _linear(d_in, d_out, axes, cfg: ModelConfig, rngs: nnx.Rngs, in_axis=-1,
            bias: bool = False) -> nnx.LinearGeneral:
  """A projection; with `bias`, a zero-initialised bias over the output axes."""
  return nnx.LinearGeneral(d_in, d_out, axis=in_axis, use_bias=bias, dtype=_dtype(cfg),
                           param_dtype=jnp.float32,
                           kernel_init=nnx.with_partitioning(KERNEL_INIT, axes),
                           bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(),
                                                           axes[-len(d_out):]
                                                           if isinstance(d_out, tuple)
                                                           else axes[-1:]),
                           rngs=rngs)


def rotary(x_BTQH: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotates channel pairs (i, i + H/2) by position-dependent angles (RoFormer, GPT-NeoX layout).
  positions: [T] (every row alike) or [B, T]."""
  half = x_BTQH.shape[-1] // 2
  freq_h = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[..., None] * freq_h
  sin, cos = jnp.sin(angle)[..., None, :], jnp.cos(angle)[..., None, :]
  x1, x2 = jnp.split(x_BTQH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTQH.dtype)


def write_rows(cache_BSJH: jax.Array, new_BTJH: jax.Array, positions_BT: jax.Array) -> jax.Array:
  """Writes each row's new entries at its own (contiguous) positions."""
  put = lambda c, n, p: jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (p[0], 0, 0))
  return jax.vmap(put)(cache_BSJH, new_BTJH, positions_BT)


class Attention(nnx.Module):
  """Causal self-attention with rotary embeddings, through jax.nn.dot_product_attention (which
  picks a fused kernel on accelerators). Grouped-query: the Q query heads share the J = n_kv_heads
  key/value heads in groups of Q / J (J = Q: multi-head, J = 1: multi-query)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    shape_QH, shape_JH = (cfg.n_heads, cfg.head_size), (cfg.kv_heads, cfg.head_size)
    bias = cfg.attention_bias
    self.query = _linear(cfg.d_model, shape_QH, ("embed", "heads", "kv"), cfg, rngs, bias=bias)
    self.key = _linear(cfg.d_model, shape_JH, ("embed", "kv_heads", "kv"), cfg, rngs, bias=bias)
    self.value = _linear(cfg.d_model, shape_JH, ("embed", "kv_heads", "kv"), cfg, rngs,
                         bias=bias)
    self.out = _linear(shape_QH, cfg.d_model, ("heads", "kv", "embed"), cfg, rngs,
                       in_axis=(-2, -1))
    self.rope_theta = cfg.rope_theta

  def keys_values(self, x_BTM, positions) -> KV:
    return KV(rotary(self.key(x_BTM), positions, self.rope_theta), self.value(x_BTM))

  def __call__(self, x_BTM: jax.Array, positions: jax.Array, cache: KV | None = None):
    """Without a cache: causal attention over the T positions (positions [T]). With one ([B, S,
    J, H] each): the new entries are written at positions [B, T] and every query attends to the
    cached positions up to its own. Returns (output, updated cache or None)."""
    q_BTQH = rotary(self.query(x_BTM), positions, self.rope_theta)
    new = self.keys_values(x_BTM, positions)
    if cache is None:
      attended = jax.nn.dot_product_attention(q_BTQH, new.k, new.v, is_causal=True)
      return self.out(attended), None
    cache = KV(write_rows(cache.k, new.k, positions), write_rows(cache.v, new.v, positions))
    key_positions_S = jnp.arange(cache.k.shape[1])
    mask_B1TS = key_positions_S[None, None, None, :] <= positions[:, None, :, None]
    attended = jax.nn.dot_product_attention(q_BTQH, cache.k.astype(q_BTQH.dtype),
                                            cache.v.astype(q_BTQH.dtype), mask=mask_B1TS)
    return self.out(attended), cache


class SwiGLU(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.gate = _linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), cfg, rngs)
    self.up = _linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), cfg, rngs)
    self.down = _linear(cfg.d_ff, cfg.d_model, ("mlp", "embed"), cfg, rngs)

  def __call__(self, x_BTM: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x_BTM)) * self.up(x_BTM))


class Block(nnx.Module):
  """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = _norm(cfg, rngs)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = _norm(cfg, rngs)
    self.mlp = SwiGLU(cfg, rngs)

  def __call__(self, x_BTM: jax.Array, positions: jax.Array, cache: KV | None = None):
    attended, cache = self.attn(self.attn_norm(x_BTM), positions, cache)
    x_BTM = constrain(x_BTM + attended, ("batch", "length", "act_embed"))
    return x_BTM + self.mlp(self.mlp_norm(x_BTM)), cache

  def keys_values(self, x_BTM, positions) -> KV:
    """The entries this block would cache for input x, without running it (confidence exits
    give skipped layers these, from the hidden state propagated past them)."""
    return self.attn.keys_values(self.attn_norm(x_BTM), positions)


def _remat(fn, cfg: ModelConfig):
  if cfg.remat == "none":
    return fn
  return jax.checkpoint(fn, policy=REMAT_POLICIES[cfg.remat])


class Segment(nnx.Module):
  """Consecutive backbone blocks stacked on a leading "layers" axis and applied with lax.scan."""

  def __init__(self, cfg: ModelConfig, n_layers: int, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def stack(rngs):
      return Block(cfg, rngs)

    self.blocks = stack(rngs)
    self.n_layers = n_layers
    self.cfg = cfg

  def __call__(self, x_BTM: jax.Array, positions: jax.Array, cache: KV | None = None):
    """x through every block; with a cache ([L, B, S, J, H] each), the updated cache too."""
    graphdef, state = nnx.split(self.blocks)

    def body(x, layer):
      params, kv = layer
      x, kv = nnx.merge(graphdef, params)(x, positions, kv)
      return x, kv

    x_BTM, cache = jax.lax.scan(_remat(body, self.cfg), x_BTM, (state, cache))
    return x_BTM, cache

  def keys_values(self, x_BTM: jax.Array, positions: jax.Array) -> KV:
    """Every block's cache entries computed from the same input x (see Block.keys_values)."""
    graphdef, state = nnx.split(self.blocks)
    return jax.lax.map(lambda params: nnx.merge(graphdef, params).keys_values(x_BTM, positions),
                       state)


def run_segments(segments, x_BTM: jax.Array, positions, caches=None):
  """The backbone's walk: x through each segment in turn (with its KV cache, if caches holds one
  per segment). Yields (x leaving the segment, its updated cache, None without caches); exit
  heads branch off these states."""
  for i, segment in enumerate(segments):
    x_BTM, kv = segment(x_BTM, positions, None if caches is None else caches[i])
    yield x_BTM, kv


class ExitHead(nnx.Module):
  """One exit: [private block] + RMSNorm + unembedding (its own, a shared one, or the embedding)."""

  def __init__(self, cfg: ModelConfig, private_block: bool, unembed: nnx.Module | None,
               rngs: nnx.Rngs):
    self.block = Block(cfg, rngs) if private_block else None
    self.norm = _norm(cfg, rngs)
    self.unembed = unembed

  def hidden(self, h_BTM, positions, cache: KV | None = None):
    """The normalised state the unembedding reads, and the private block's updated cache."""
    if self.block is not None:
      h_BTM, cache = self.block(h_BTM, positions, cache)
    return self.norm(h_BTM), cache

  def unembedding(self, embed: nnx.Embed) -> jax.Array:
    """The [D, V] matrix from hidden state to logits."""
    if self.unembed is None:
      return embed.embedding.value.T
    return self.unembed.kernel.value

  def logits(self, h_BTM: jax.Array, embed: nnx.Embed) -> jax.Array:
    w_MV = self.unembedding(embed).astype(h_BTM.dtype)
    return constrain((h_BTM @ w_MV).astype(jnp.float32), ("batch", "length", "vocab"))


def chunked_cross_entropy(h_BTM: jax.Array, w_MV: jax.Array, targets_BT: jax.Array,
                          chunk: int) -> jax.Array:
  """Mean next-token cross-entropy of logits h @ w, computed `chunk` tokens at a time; each
  chunk's float32 logits are recomputed in the backward pass instead of kept."""
  h_RM = h_BTM.reshape(-1, h_BTM.shape[-1])
  targets_R = targets_BT.reshape(-1)
  n = h_RM.shape[0]
  chunk = min(chunk, n)
  n_chunks = -(-n // chunk)
  pad = n_chunks * chunk - n
  h_KCM = jnp.pad(h_RM, ((0, pad), (0, 0))).reshape(n_chunks, chunk, -1)
  targets_KC = jnp.pad(targets_R, (0, pad)).reshape(n_chunks, chunk)
  valid_KC = (jnp.arange(n_chunks * chunk) < n).reshape(n_chunks, chunk)

  @jax.checkpoint
  def chunk_loss(total, xs):
    h_CM, t_C, valid_C = xs
    logits_CV = (h_CM @ w_MV.astype(h_CM.dtype)).astype(jnp.float32)
    ce_C = jax.nn.logsumexp(logits_CV, axis=-1) - jnp.take_along_axis(
        logits_CV, t_C[:, None], axis=-1)[:, 0]
    return total + jnp.sum(jnp.where(valid_C, ce_C, 0.0)), None

  total, _ = jax.lax.scan(chunk_loss, jnp.zeros((), jnp.float32), (h_KCM, targets_KC, valid_KC))
  return total / n


def _embed(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Embed:
  init = nnx.initializers.normal(stddev=cfg.d_model ** -0.5)
  return nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=_dtype(cfg), param_dtype=jnp.float32,
                   embedding_init=nnx.with_partitioning(init, ("vocab", "embed")), rngs=rngs)


class FamilialTransformer(nnx.Module):
  """G exits on one shared backbone; G = 1 is the dense model through the same code."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = _embed(cfg, rngs)
    bounds = (0,) + cfg.exit_layers
    self.segments = nnx.List([Segment(cfg, bounds[g + 1] - bounds[g], rngs)
                              for g in range(cfg.n_exits)])
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

  def embed_tokens(self, tokens_BT: jax.Array) -> jax.Array:
    return constrain(self.embed(tokens_BT), ("batch", "length", "act_embed"))

  def exit_states(self, x_BTM: jax.Array, positions, n_exits: int | None = None,
                  head_caches=None, remat: bool = False):
    """The walk over segments and exits: x through segments 0..n_exits-1 in turn, each exit's
    head branching off where its segment ends. Yields (g, h_BTM, head cache) per exit: the
    normalised state exit g's unembedding reads, and its private block's updated cache (with
    head_caches, one per exit). `remat` recomputes each head in the backward pass."""
    n_exits = self.cfg.n_exits if n_exits is None else n_exits
    states = run_segments(self.segments[:n_exits], x_BTM, positions)
    for g, ((x_BTM, _), head) in enumerate(zip(states, self.exits[:n_exits])):
      cache = None if head_caches is None else head_caches[g]
      hidden = lambda x, c, head=head: head.hidden(x, positions, c)
      h_BTM, cache = (_remat(hidden, self.cfg) if remat else hidden)(x_BTM, cache)
      yield g, h_BTM, cache

  def __call__(self, tokens_BT: jax.Array, n_exits: int | None = None) -> jax.Array:
    """Logits of the first n_exits exits (all by default), stacked: logits_GBTV, float32."""
    positions_T = jnp.arange(tokens_BT.shape[1])
    return jnp.stack([self.exits[g].logits(h_BTM, self.embed) for g, h_BTM, _ in
                      self.exit_states(self.embed_tokens(tokens_BT), positions_T, n_exits)])

  def exit_losses(self, inputs_BT: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy of every exit, ce_G (float32), each computed where its exit
    is, in chunks of cfg.loss_chunk tokens (see `chunked_cross_entropy`)."""
    positions_T = jnp.arange(inputs_BT.shape[1])
    states = self.exit_states(self.embed_tokens(inputs_BT), positions_T, remat=True)
    return jnp.stack([chunked_cross_entropy(h_BTM, self.exits[g].unembedding(self.embed),
                                            targets_BT, self.cfg.loss_chunk)
                      for g, h_BTM, _ in states])


class ExitSubModel(nnx.Module):
  """Exit g's deployable sub-model: layers 1..l_g and exit g's head, sharing the family's
  weights."""

  def __init__(self, family: FamilialTransformer, g: int):
    if not 0 <= g < family.cfg.n_exits:
      raise ValueError(f"exit index g must be in 0..{family.cfg.n_exits - 1}; got {g}")
    self.embed = family.embed
    self.segments = nnx.List(list(family.segments[: g + 1]))
    self.head = family.exits[g]

  def __call__(self, tokens_BT: jax.Array) -> jax.Array:
    positions_T = jnp.arange(tokens_BT.shape[1])
    *_, (x_BTM, _) = run_segments(self.segments, self.embed(tokens_BT), positions_T)
    h_BTM, _ = self.head.hidden(x_BTM, positions_T)
    return self.head.logits(h_BTM, self.embed)
