"""The decoding strategies as functions of the model, exits numbered from 0 (exit g reads layer
cfg.exit_layers[g]): prefill, relay to a deeper exit, continue, confidence exits (CALM: a token
leaves at the first exit confident enough; skipped layers still get their KV entries from the
propagated state) and self-speculation (LayerSkip: a shallow exit drafts, the deepest verifies).

A decoding state holds, for each row, its tokens so far, the hidden state leaving the deepest
segment it has run at every position, and the KV cache of those segments (and of the exit's
private block, if it has one). Prompts of different lengths are padded on the right; every row
writes at its own positions, and a query attends to the cached positions up to its own, so padding
is never read before a real token overwrites it. Every loop runs inside JAX (lax.while_loop) and
is compiled once per (exit, shapes). Caches are constrained by the model's logical-axis rules, so
a family trained on a mesh decodes on it.

Shape suffixes as in transformer.py: B batch, S cache length (max_len), T new tokens, M d_model,
V vocabulary, L layers of a segment, Q attention heads, J key/value heads, H head dim, K drafted
tokens, O tokens generated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from famjax.decode.relay_state import RelayState, constrain_kv, zeros_kv
from famjax.decode.sampling import Sampling, sample
from famjax.model.transformer import KV, FamilialTransformer, run_segments, write_rows


def _run_segments(model, x_BTM, positions_BT, caches, first: int, last: int):
  """Segments first..last on x (positions [B, T]); returns x and their updated caches."""
  out = []
  for x_BTM, kv in run_segments(model.segments[first:last + 1], x_BTM, positions_BT, caches):
    out.append(constrain_kv(kv))
  return x_BTM, tuple(out)


def _head_logits(model, g, x_BTM, positions_BT, head_cache, at_B=None):
  """Exit g's logits at every position ([B, T, V]), or only at position at_B[b] of each row
  ([B, V]): the private block still runs over every position to fill its cache."""
  h_BTM, head_cache = model.exits[g].hidden(x_BTM, positions_BT, head_cache)
  if at_B is not None:
    h_BTM = _at(h_BTM, at_B)[:, None]
  logits = model.exits[g].logits(h_BTM, model.embed)
  return (logits if at_B is None else logits[:, 0]), constrain_kv(head_cache, stacked=False)


def _at(x_BT, index_B):
  """x[b, index[b]] for every row."""
  return jnp.take_along_axis(x_BT, index_B.reshape((-1,) + (1,) * (x_BT.ndim - 1)), axis=1)[:, 0]


def _put(x_BS, value_BT, positions_BT):
  put = lambda row, new, p: jax.lax.dynamic_update_slice_in_dim(row, new.astype(row.dtype), p[0],
                                                                 axis=0)
  return jax.vmap(put)(x_BS, value_BT, positions_BT)


def _forward(model, state: RelayState, tokens_BT, positions_BT, exit_: int, at_B=None):
  """Feeds tokens at positions through segments 0..exit and exit's head; returns logits
  [B, T, V] (or [B, V] at position at_B of each row) and the updated state (tokens, hidden and
  caches written; lengths unchanged)."""
  x_BTM = model.embed_tokens(tokens_BT)
  x_BTM, segments = _run_segments(model, x_BTM, positions_BT, state.segments, 0, exit_)
  logits_BTV, head = _head_logits(model, exit_, x_BTM, positions_BT, state.head, at_B)
  return logits_BTV, state._replace(tokens_BS=_put(state.tokens_BS, tokens_BT, positions_BT),
                                    hidden_BSM=_put(state.hidden_BSM, x_BTM, positions_BT),
                                    segments=segments, head=head)


def empty_state(model: FamilialTransformer, batch: int, max_len: int, exit_: int,
                first: int = 0) -> RelayState:
  """Zero caches of segments first..exit_ (and of exit_'s private block)."""
  cfg = model.cfg
  bounds = (0,) + cfg.exit_layers
  segments = tuple(zeros_kv(cfg, bounds[g + 1] - bounds[g], batch, max_len)
                   for g in range(first, exit_ + 1))
  head = (zeros_kv(cfg, None, batch, max_len) if model.exits[exit_].block is not None
          else None)
  return RelayState(jnp.zeros((batch, max_len), jnp.int32), jnp.zeros(batch, jnp.int32),
                    jnp.zeros((batch, max_len, cfg.d_model), jnp.dtype(cfg.dtype)),
                    segments, head)


def prefill_model(model: FamilialTransformer, prompts_BT, lengths_B, exit_: int, max_len: int):
  """Runs the prompts (padded on the right to T) through exit `exit_`; returns (state, logits of
  each row's next token [B, V])."""
  batch, t = prompts_BT.shape
  if t > max_len:
    raise ValueError(f"prompts of {t} tokens do not fit a cache of max_len={max_len}")
  state = empty_state(model, batch, max_len, exit_)
  positions_BT = jnp.broadcast_to(jnp.arange(t), (batch, t))
  lengths_B = jnp.asarray(lengths_B, jnp.int32)
  logits_BV, state = _forward(model, state, prompts_BT, positions_BT, exit_, at_B=lengths_B - 1)
  return state._replace(lengths_B=lengths_B), logits_BV


def deepened(state: RelayState, hidden_BSM, segments, head) -> RelayState:
  return state._replace(hidden_BSM=hidden_BSM, segments=state.segments + segments, head=head)


def relay_parts_model(model: FamilialTransformer, state: RelayState, to_exit: int,
                length: int | None = None):
  """What relay adds to a state: the new hidden states, the deeper segments' and head's caches,
  and the next-token logits. The shallow caches pass through untouched, so a jitted relay that
  returns only these never copies them."""
  g = len(state.segments) - 1  # 0-based inside this module
  if not g < to_exit < model.cfg.n_exits:
    raise ValueError(f"relay goes from exit {g} to a deeper one, {g + 1}..{model.cfg.n_exits - 1}"
                     f"; got to_exit={to_exit}")
  batch, max_len = state.tokens_BS.shape
  length = max_len if length is None else length
  deeper = empty_state(model, batch, max_len, to_exit, first=g + 1)
  positions_BT = jnp.broadcast_to(jnp.arange(length), (batch, length))
  x_BTM, segments = _run_segments(model, state.hidden_BSM[:, :length], positions_BT,
                                  deeper.segments, g + 1, to_exit)
  logits_BV, head = _head_logits(model, to_exit, x_BTM, positions_BT, deeper.head,
                                 at_B=state.lengths_B - 1)
  hidden_BSM = jax.lax.dynamic_update_slice_in_dim(state.hidden_BSM, x_BTM, 0, axis=1)
  return hidden_BSM, segments, head, logits_BV


def continue_model(model: FamilialTransformer, state: RelayState, logits_BV, key,
                      max_new_tokens: int, sampling: Sampling = Sampling()):
  """Generates up to max_new_tokens per row at the state's exit (a row stops at a stop token or
  a full cache); returns (state, generated [B, max_new_tokens] with -1 after a row stopped)."""
  batch, max_len = state.tokens_BS.shape
  exit_ = len(state.segments) - 1
  stop = jnp.asarray(sampling.stop_tokens or (-1,), jnp.int32)

  def body(carry):
    i, state, logits_BV, done_B, out_BO, key = carry
    key, sub = jax.random.split(key)
    token_B = sample(logits_BV, sub, sampling.temperature, sampling.top_k, sampling.top_p)
    out_BO = out_BO.at[:, i].set(jnp.where(done_B, -1, token_B))
    done_B = done_B | jnp.isin(token_B, stop) | (state.lengths_B + 1 >= max_len)
    positions_B1 = jnp.minimum(state.lengths_B, max_len - 1)[:, None]
    logits_B1V, new = _forward(model, state, token_B[:, None], positions_B1, exit_)
    lengths_B = jnp.where(out_BO[:, i] >= 0, state.lengths_B + 1, state.lengths_B)
    return i + 1, new._replace(lengths_B=lengths_B), logits_B1V[:, 0], done_B, out_BO, key

  def going(carry):
    i, _, _, done_B, _, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done_B)

  out_BO = jnp.full((batch, max_new_tokens), -1, jnp.int32)
  done_B = state.lengths_B >= max_len
  carry = (jnp.int32(0), state, logits_BV, done_B, out_BO, key)
  _, state, _, _, out_BO, _ = jax.lax.while_loop(going, body, carry)
  return state, out_BO


def _confidence(logits_BV, measure: str):
  probs_BV = jax.nn.softmax(logits_BV, axis=-1)
  if measure == "max_prob":
    return probs_BV.max(-1)
  top2_B2 = jax.lax.top_k(probs_BV, 2)[0]
  return top2_B2[:, 0] - top2_B2[:, 1]


def _leaves(logits_BV, exited_B, threshold: float, measure: str, deepest: bool):
  """Rows not yet exited whose confidence reaches the threshold (all of them at the deepest)."""
  return ~exited_B & ((_confidence(logits_BV, measure) >= threshold) | deepest)


def _confident_prompt(model: FamilialTransformer, state, threshold: float, measure: str):
  """Every exit's private block over the prompt, and the first token's exit: returns (head
  caches, logits [B, V] of that exit at the last prompt position, its exit [B])."""
  last, max_len = model.cfg.n_exits - 1, state.tokens_BS.shape[1]
  batch = state.tokens_BS.shape[0]
  heads = [empty_state(model, batch, max_len, g).head for g in range(last + 1)]
  positions_BS = jnp.broadcast_to(jnp.arange(max_len), state.tokens_BS.shape)
  logits_BV = jnp.zeros((batch, model.cfg.vocab_size), jnp.float32)
  chosen_B = jnp.zeros(batch, bool)
  first_exit_B = jnp.full(batch, last, jnp.int32)
  states = model.exit_states(model.embed_tokens(state.tokens_BS), positions_BS,
                             head_caches=list(heads))
  for g, h_BSM, head in states:
    heads[g] = head
    logits_g = model.exits[g].logits(_at(h_BSM, state.lengths_B - 1)[:, None], model.embed)[:, 0]
    leave_B = _leaves(logits_g, chosen_B, threshold, measure, g == last)
    logits_BV = jnp.where(leave_B[:, None], logits_g, logits_BV)
    first_exit_B = jnp.where(leave_B, g, first_exit_B)
    chosen_B = chosen_B | leave_B
  return heads, logits_BV, first_exit_B


def _propagated(block, cache: KV, h_B1D, positions_B1, stacked: bool) -> KV:
  """`cache` with this position's entries computed from the propagated hidden state h_B1D
  (`stacked`: a segment's caches, one per layer)."""
  kv = block.keys_values(h_B1D, positions_B1)
  write = jax.vmap(write_rows, in_axes=(0, 0, None)) if stacked else write_rows
  return KV(write(cache.k, kv.k, positions_B1), write(cache.v, kv.v, positions_B1))


def _confident_token(model: FamilialTransformer, state, heads, token_B, threshold: float,
                     measure: str):
  """One token through the exits until each row's first confident one; deeper layers get KV
  entries from the hidden state propagated past them. Returns (segment caches, head caches,
  next logits [B, V], exit [B])."""
  last, max_len = model.cfg.n_exits - 1, state.tokens_BS.shape[1]
  positions_B1 = jnp.minimum(state.lengths_B, max_len - 1)[:, None]
  x_B1D = model.embed_tokens(token_B[:, None])
  exited_B = jnp.zeros(token_B.shape[0], bool)
  exit_B = jnp.full(token_B.shape[0], last, jnp.int32)
  h_B1D = x_B1D  # the hidden state of exited rows, propagated past deeper layers
  next_BV = jnp.zeros((token_B.shape[0], model.cfg.vocab_size), jnp.float32)
  segments, new_heads = [], []
  pick = lambda a, b: jnp.where(exited_B.reshape((1, -1) + (1,) * (a.ndim - 2)), a, b)
  for g in range(last + 1):
    segment, cache = model.segments[g], state.segments[g]
    full_B1D, full_kv = segment(x_B1D, positions_B1, cache)
    written = _propagated(segment, cache, h_B1D, positions_B1, stacked=True)
    segments.append(constrain_kv(KV(pick(written.k, full_kv.k), pick(written.v, full_kv.v))))
    x_B1D = jnp.where(exited_B[:, None, None], h_B1D, full_B1D)
    head = model.exits[g]
    h_head, head_kv = head.hidden(x_B1D, positions_B1, heads[g])
    if head.block is not None:
      prop_written = _propagated(head.block, heads[g], h_B1D, positions_B1, stacked=False)
      head_kv = KV(*(jnp.where(exited_B[:, None, None, None], a, b)
                     for a, b in zip(prop_written, head_kv)))
    new_heads.append(head_kv)
    logits_g = head.logits(h_head, model.embed)[:, 0]
    leave_B = _leaves(logits_g, exited_B, threshold, measure, g == last)
    next_BV = jnp.where(leave_B[:, None], logits_g, next_BV)
    exit_B = jnp.where(leave_B, g, exit_B)
    h_B1D = jnp.where(leave_B[:, None, None], x_B1D, h_B1D)
    exited_B = exited_B | leave_B
  return tuple(segments), new_heads, next_BV, exit_B


def confident_model(model: FamilialTransformer, prompts_BT, lengths_B, max_len: int,
                       max_new_tokens: int, threshold: float, measure: str = "max_prob"):
  """Greedy decoding where each token leaves at the first exit whose confidence (max probability
  or top-2 margin) reaches `threshold` (CALM). Layers past that exit still get this position's
  KV entries, computed from the hidden state propagated past them, so later tokens can attend to
  it. Returns (generated [B, max_new_tokens], 0-based exit of each [B, max_new_tokens]).
  threshold > 1 gives the deepest exit's output; threshold 0 gives exit 0's."""
  if measure not in ("max_prob", "margin"):
    raise ValueError(f"measure must be 'max_prob' or 'margin'; got {measure!r}")
  last = model.cfg.n_exits - 1
  batch = prompts_BT.shape[0]
  state, _ = prefill_model(model, prompts_BT, lengths_B, last, max_len)
  heads, logits_BV, first_exit_B = _confident_prompt(model, state, threshold, measure)

  def step(carry):
    i, state, heads, logits_BV, out_BO, depth_BO = carry
    token_B = jnp.argmax(logits_BV, -1).astype(jnp.int32)
    segments, heads, next_BV, exit_B = _confident_token(model, state, heads, token_B,
                                                        threshold, measure)
    state = state._replace(lengths_B=state.lengths_B + 1, segments=segments)
    return (i + 1, state, heads, next_BV, out_BO.at[:, i].set(token_B),
            depth_BO.at[:, i].set(exit_B))

  # the exit chosen in step i decides token i + 1: depths are shifted to the tokens they produced
  out_BO = jnp.zeros((batch, max_new_tokens), jnp.int32)
  depth_BO = jnp.full((batch, max_new_tokens), last, jnp.int32)
  carry = (jnp.int32(0), state, heads, logits_BV, out_BO, depth_BO)
  _, _, _, _, out_BO, depth_BO = jax.lax.while_loop(lambda c: c[0] < max_new_tokens, step, carry)
  return out_BO, jnp.roll(depth_BO, 1, axis=1).at[:, 0].set(first_exit_B)


def speculative_model(model: FamilialTransformer, prompts_BT, lengths_B, max_len: int,
                         max_new_tokens: int, draft_exit: int, k: int):
  """Greedy self-speculative decoding: exit `draft_exit` drafts k tokens, the deepest exit checks
  them in one pass over k + 1 positions and keeps the prefix it agrees with, plus its own next
  token. The output is the deepest exit's greedy output. Returns (generated [B, max_new_tokens],
  drafted tokens accepted, drafted tokens proposed)."""
  last = model.cfg.n_exits - 1
  if not 0 <= draft_exit < last:
    raise ValueError(f"draft_exit must be in 0..{last - 1} (shallower than the deepest exit)")
  batch = prompts_BT.shape[0]
  state, logits_BV = prefill_model(model, prompts_BT, lengths_B, last, max_len)
  draft = empty_state(model, batch, max_len, draft_exit)
  # the draft exit's private block needs the prompt's entries
  _, draft = _forward(model, draft._replace(segments=state.segments[: draft_exit + 1]),
                      prompts_BT, jnp.broadcast_to(jnp.arange(prompts_BT.shape[1]),
                                                   prompts_BT.shape), draft_exit)
  rows = jnp.arange(batch)

  def iteration(carry):
    n_out_B, state, draft_head, logits_BV, out_BO, accepted, proposed = carry
    token_B = jnp.argmax(logits_BV, -1).astype(jnp.int32)  # known right: the deep exit's
    start_B = state.lengths_B

    def draft_step(c, j):
      shallow, head, token_B = c
      positions_B1 = jnp.minimum(start_B + j, max_len - 1)[:, None]
      view = state._replace(segments=shallow, head=head)
      logits_B1V, view = _forward(model, view, token_B[:, None], positions_B1, draft_exit)
      nxt = jnp.argmax(logits_B1V[:, 0], -1).astype(jnp.int32)
      return (view.segments, view.head, nxt), nxt

    (_, draft_head, _), drafts_KB = jax.lax.scan(
        draft_step, (state.segments[: draft_exit + 1], draft_head, token_B), jnp.arange(k))
    drafts_BK = drafts_KB.T
    checked_BT = jnp.concatenate([token_B[:, None], drafts_BK], axis=1)  # k + 1 tokens
    positions_BT = jnp.minimum(start_B[:, None] + jnp.arange(k + 1), max_len - 1)
    logits_BTV, state = _forward(model, state, checked_BT, positions_BT, last)
    deep_BT = jnp.argmax(logits_BTV, -1).astype(jnp.int32)
    agree_BK = jnp.cumprod(drafts_BK == deep_BT[:, :k], axis=1)
    n_accept_B = agree_BK.sum(-1).astype(jnp.int32)
    # emit the known token and the accepted drafts
    emit_BT = jnp.where(jnp.arange(k + 1)[None] <= n_accept_B[:, None], checked_BT, -1)
    slots_BT = n_out_B[:, None] + jnp.arange(k + 1)
    valid_BT = (emit_BT >= 0) & (slots_BT < max_new_tokens)
    out_BO = out_BO.at[rows[:, None], jnp.where(valid_BT, slots_BT, max_new_tokens)].set(
        emit_BT, mode="drop")
    next_BV = _at(logits_BTV, n_accept_B)
    active_B = n_out_B < max_new_tokens
    state = state._replace(lengths_B=jnp.where(active_B, start_B + 1 + n_accept_B, start_B))
    return (n_out_B + 1 + n_accept_B, state, draft_head, next_BV, out_BO,
            accepted + jnp.sum(jnp.where(active_B, n_accept_B, 0)),
            proposed + k * jnp.sum(active_B))

  out_BO = jnp.full((batch, max_new_tokens), -1, jnp.int32)
  carry = (jnp.zeros(batch, jnp.int32), state, draft.head, logits_BV, out_BO, jnp.int32(0),
           jnp.int32(0))
  carry = jax.lax.while_loop(lambda c: jnp.any(c[0] < max_new_tokens), iteration, carry)
  return carry[4], carry[5], carry[6]


def scores_model(model: FamilialTransformer, inputs_BT, targets_BT, exit_: int):
  """Each target's log-probability at exit `exit_` and whether it is that exit's argmax."""
  logits_BTV = model(inputs_BT, n_exits=exit_ + 1)[exit_]
  log_probs_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  target_BT = jnp.take_along_axis(log_probs_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return target_BT, jnp.argmax(logits_BTV, axis=-1) == targets_BT


