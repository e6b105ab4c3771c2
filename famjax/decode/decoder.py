"""`Decoder`, what users call: each operation (prefill, relay, generate, confident, speculative,
scores) is one method running a jitted function of the split model (`_on_split_model`) around a
strategy of strategies.py. The Decoder numbers exits 1..G, as records, reports and the command
line do."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from famjax.decode.relay_state import RelayState
from famjax.decode.sampling import Sampling
from famjax.decode.strategies import (
  confident_model,
  continue_model,
  deepened,
  prefill_model,
  relay_parts_model,
  scores_model,
  speculative_model,
)
from famjax.model.transformer import FamilialTransformer

# --- Entry points: one compilation per (exit, shapes), on a split model ------------------------


class _Graph:
  """A GraphDef as a static jit argument, hashed once: hashing a family's GraphDef walks every
  node, about 1 ms per call, as much as a short prefill costs."""

  def __init__(self, graphdef):
    self.graphdef, self._hash = graphdef, hash(graphdef)

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return self is other or (isinstance(other, _Graph) and self.graphdef == other.graphdef)


def _on_split_model(fn, *static: str):
  """fn(model, ...) as a jitted function of (graph, params, ...): one compilation per graph and
  value of the static arguments (passed by keyword)."""
  return jax.jit(lambda graph, params, *args, **kwargs: fn(nnx.merge(graph.graphdef, params),
                                                           *args, **kwargs),
                 static_argnames=("graph",) + static)


_prefill = _on_split_model(prefill_model, "exit_", "max_len")
_relay_parts = _on_split_model(relay_parts_model, "to_exit", "length")
_continue = _on_split_model(continue_model, "max_new_tokens", "sampling")
_confident = _on_split_model(confident_model, "max_len", "max_new_tokens", "threshold",
                             "measure")
_speculative = _on_split_model(speculative_model, "max_len", "max_new_tokens", "draft_exit", "k")
_full_logits = _on_split_model(lambda model, tokens_BT: model(tokens_BT))
_scores = _on_split_model(scores_model, "exit_")


class Decoder:
  """A family ready to decode: jitted prefill, generation, relay, confidence and speculative
  decoding on the model's own mesh (its parameters keep their shardings). Exits are numbered
  1..G here, as in records, reports and the command line (the module's own functions count
  from 0)."""

  def __init__(self, model: FamilialTransformer, max_len: int | None = None,
               mesh: jax.sharding.Mesh | None = None):
    self.graphdef, self.params = nnx.split(model)
    self._graph = _Graph(self.graphdef)
    self.cfg = model.cfg
    self.max_len = max_len or model.cfg.max_seq_len
    if self.max_len > model.cfg.max_seq_len:
      raise ValueError(f"max_len={self.max_len} exceeds model.max_seq_len="
                       f"{model.cfg.max_seq_len}")
    self.mesh = mesh

  def _ctx(self):
    from contextlib import nullcontext
    return jax.set_mesh(self.mesh) if self.mesh is not None else nullcontext()

  def _index(self, exit_: int, name: str = "exit", deepest: int | None = None) -> int:
    """The 0-based index of exit `exit_` (1..deepest, by default 1..G)."""
    deepest = self.cfg.n_exits if deepest is None else deepest
    if not (isinstance(exit_, (int, np.integer)) and 1 <= exit_ <= deepest):
      raise ValueError(f"{name} must be in 1..{deepest}; got {exit_!r}")
    return int(exit_) - 1

  def pad(self, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded [B, T] prompts and their lengths; a prompt longer than the cache is an
    error."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.min(initial=1) < 1:
      raise ValueError("every prompt needs at least one token")
    if lengths.max() >= self.max_len:
      raise ValueError(f"a prompt of {lengths.max()} tokens leaves no room in a cache of "
                       f"max_len={self.max_len}")
    out = np.zeros((len(prompts), int(lengths.max())), np.int32)
    for row, p in enumerate(prompts):
      out[row, :len(p)] = p
    return out, lengths

  def prefill(self, prompts, exit_: int):
    """(state, next-token logits [B, V]) of the prompts at exit `exit_` (1..G)."""
    index = self._index(exit_)
    tokens, lengths = self.pad(prompts)
    with self._ctx():
      return _prefill(self._graph, self.params, tokens, lengths, exit_=index,
                      max_len=self.max_len)

  def relay(self, state: RelayState, to_exit: int):
    """A state decoded at a shallower exit, continued through the layers up to exit `to_exit`
    (1..G) without recomputing the shared ones: (deeper state, next-token logits [B, V])."""
    index = self._index(to_exit, "to_exit")
    if to_exit <= state.exit:
      raise ValueError(f"relay goes to a deeper exit than {state.exit}; got to_exit={to_exit}")
    # the used positions, rounded up to a multiple of 64: one compilation per bucket
    used = int(np.max(np.asarray(state.lengths_B)))
    length = min(self.max_len, -(-used // 64) * 64)
    with self._ctx():
      *parts, logits_BV = _relay_parts(self._graph, self.params, state, to_exit=index,
                                       length=length)
    return deepened(state, *parts), logits_BV

  def continue_(self, state, logits_BV, max_new_tokens: int, sampling: Sampling = Sampling(),
                seed: int = 0):
    with self._ctx():
      return _continue(self._graph, self.params, state, logits_BV, jax.random.key(seed),
                       max_new_tokens=max_new_tokens, sampling=sampling)

  def generate(self, prompts, exit_: int, max_new_tokens: int, sampling: Sampling = Sampling(),
               seed: int = 0):
    """(state, generated [B, max_new_tokens], -1 after a row stopped) at exit `exit_` (1..G)."""
    state, logits = self.prefill(prompts, exit_)
    return self.continue_(state, logits, max_new_tokens, sampling, seed)

  def confident(self, prompts, max_new_tokens: int, threshold: float, measure="max_prob"):
    """(generated [B, max_new_tokens], the exit 1..G that emitted each token): each token leaves
    at the first exit whose confidence (`measure`) reaches `threshold`."""
    tokens, lengths = self.pad(prompts)
    with self._ctx():
      out, depth = _confident(self._graph, self.params, tokens, lengths, max_len=self.max_len,
                              max_new_tokens=max_new_tokens, threshold=float(threshold),
                              measure=measure)
    return out, depth + 1

  def speculative(self, prompts, max_new_tokens: int, draft_exit: int = 1, k: int = 4):
    """(generated, accepted, proposed): exit `draft_exit` (1..G-1) drafts k tokens, the deepest
    exit checks them; greedy output equals the deepest exit's own."""
    index = self._index(draft_exit, "draft_exit", self.cfg.n_exits - 1)
    tokens, lengths = self.pad(prompts)
    with self._ctx():
      return _speculative(self._graph, self.params, tokens, lengths, max_len=self.max_len,
                          max_new_tokens=max_new_tokens, draft_exit=index, k=k)

  def scores(self, inputs_BT, targets_BT, exit_: int):
    """(log-probability of each target [B, T], whether it is the argmax [B, T]) at exit `exit_`
    (1..G), from full forward passes (no cache)."""
    index = self._index(exit_)
    with self._ctx():
      return _scores(self._graph, self.params, jnp.asarray(inputs_BT), jnp.asarray(targets_BT),
                     exit_=index)

  def logits(self, tokens_BT):
    """Every exit's logits of full forward passes, [G, B, T, V] (no cache)."""
    with self._ctx():
      return _full_logits(self._graph, self.params, jnp.asarray(tokens_BT))
