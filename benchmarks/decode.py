"""Decoding a trained family, one process: (a) cached decoding against recomputing the whole
sequence each step; (b) relaying a 256-token context from exit 1 to the deepest exit against
prefilling it there from scratch, next to the share of a full prefill's FLOPs the relay's layers
have (famjax.accounting); (c) mean exit and validation loss of confidence exits at a few
thresholds; (d) self-speculative decoding (drafts from exit 1) against plain greedy decoding at
the deepest exit; (e) the KV cache's bytes per token with fewer key/value heads (grouped-query
attention) than query heads. Ends with one JSON line.

The family is the `tiny` preset (G = 3, exits after layers 2, 3, 4), trained for --steps on the
embedded corpus in --workdir (reused when present).
Usage: python benchmarks/decode.py [--steps 300] [--workdir runs/bench-decode]
"""

import argparse
import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from famjax import data
from famjax.decode import decoder, strategies
from famjax.model import counts, sharding
from famjax.model.config import MeshConfig
from famjax.model.transformer import FamilialTransformer
from famjax.presets import train as presets
from famjax.train import checkpoint, loop
from famjax.train.config import experiment_from_dict


def best_of(fn, repeats=3):
  """Seconds of the fastest of `repeats` calls (after one compiling call)."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def best_of_interleaved(*fns, repeats=50):
  """best_of for several functions timed in turn, so that all see the same machine load."""
  jax.block_until_ready([fn() for fn in fns])
  times = []
  for _ in range(repeats):
    row = []
    for fn in fns:
      start = time.perf_counter()
      jax.block_until_ready(fn())
      row.append(time.perf_counter() - start)
    times.append(row)
  return tuple(np.min(times, axis=0))


@functools.partial(jax.jit, static_argnames=("graphdef", "n_new"))
def recompute_decode(graphdef, params, tokens_BS, start, *, n_new):
  """Greedy decoding that runs the full sequence through the model for every new token."""
  model = nnx.merge(graphdef, params)

  def step(i, tokens_BS):
    logits_BSV = model(tokens_BS)[-1]
    nxt = jnp.argmax(logits_BSV[:, start + i - 1], -1).astype(jnp.int32)
    return tokens_BS.at[:, start + i].set(nxt)

  return jax.lax.fori_loop(0, n_new, step, tokens_BS)


def expected_speedup(acceptance: float, k: int, draft_cost: float) -> float:
  """Speculative decoding's expected speedup over plain decoding (Leviathan et al. 2023, eq. 1
  with independent acceptances): each round emits 1 + the accepted prefix of k drafts,
  (1 - a^(k+1)) / (1 - a) tokens on average, for k draft steps (each draft_cost of a plain step)
  and one verification pass costed as one plain step."""
  tokens = k + 1 if acceptance >= 1 else (1 - acceptance ** (k + 1)) / (1 - acceptance)
  return tokens / (k * draft_cost + 1)


def cache_bytes_per_token(model_cfg, max_len: int) -> dict[int, float]:
  """Bytes per cached token of the deepest exit's decoding state (every segment's K and V),
  read from the arrays a Decoder allocates, for each divisor of n_heads as n_kv_heads."""
  out = {}
  for heads in sorted({h for h in range(1, model_cfg.n_heads + 1) if model_cfg.n_heads % h == 0},
                      reverse=True):
    cfg = dataclasses.replace(model_cfg, n_kv_heads=heads)
    with nnx.use_eager_sharding(False):
      model = FamilialTransformer(cfg, rngs=nnx.Rngs(0))
    state = strategies.empty_state(model, 1, max_len, cfg.n_exits - 1)
    caches = list(state.segments) + ([state.head] if state.head is not None else [])
    out[heads] = sum(a.nbytes for kv in caches for a in kv) / max_len
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--workdir", default="runs/bench-decode")
  parser.add_argument("--context", type=int, default=256)
  args = parser.parse_args()
  base = experiment_from_dict(presets.get_config("tiny").to_dict())
  max_len = 2 * args.context
  cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, max_seq_len=max_len),
                            train=dataclasses.replace(base.train, steps=args.steps,
                                                      progress=False))
  summary = loop.train(cfg, args.workdir)
  mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
  trainer = loop.Trainer.create(cfg, mesh)
  step, state, _ = checkpoint.restore_latest(checkpoint.manager(args.workdir, 3), trainer.state)
  model = nnx.merge(trainer.progs.graphdef, state["params"])
  dec = decoder.Decoder(model, max_len=max_len)
  tokens = data.load_tokens(cfg.data)
  val = np.asarray(tokens.val[: max(4 * max_len, 4 * 128 + 1)], np.int32)  # (c) reads 513
  last = cfg.model.n_exits  # the deepest exit (exits count from 1)
  print(f"family: tiny preset, {step} steps, val loss per exit {summary['val_loss']}")

  # (a) cached decoding vs recomputation, 256 new tokens after an 8-token prompt
  prompt = [val[:8].tolist()]
  n_new = args.context
  cached_s = best_of(lambda: dec.generate(prompt, last, n_new)[1])
  buffer = jnp.zeros((1, 8 + n_new), jnp.int32).at[0, :8].set(val[:8])
  recompute_s = best_of(lambda: recompute_decode(dec.graphdef, dec.params, buffer, 8,
                                                 n_new=n_new), repeats=1)
  cache_speedup = recompute_s / cached_s
  print(f"(a) {n_new} tokens: cached {n_new / cached_s:,.0f} tok/s, recomputed "
        f"{n_new / recompute_s:,.0f} tok/s: {cache_speedup:.1f}x")

  # (b) relay a context from exit 1 to the deepest exit vs prefilling it there from scratch
  context = [val[: args.context - 1].tolist()]
  shallow, _ = dec.prefill(context, 1)
  relay_s, prefill_s = best_of_interleaved(lambda: dec.relay(shallow, last),
                                           lambda: dec.prefill(context, last))
  _, relay_logits = dec.relay(shallow, last)
  _, direct_logits = dec.prefill(context, last)
  # FLOPs over the context: the relay runs layers l_1+1..l_G (and exit G's private block), the
  # prefill every block up to exit G; both compute one row of logits
  t = args.context - 1
  blocks = [layers + private for layers, private in
            zip(cfg.model.exit_layers, counts.private_blocks(cfg.model))]
  block_flops = t * counts.block_forward_flops(cfg.model, t)
  logits_flops = 2 * cfg.model.vocab_size * cfg.model.d_model
  predicted = (((blocks[-1] - cfg.model.exit_layers[0]) * block_flops + logits_flops)
               / (blocks[-1] * block_flops + logits_flops))
  measured = relay_s / prefill_s
  max_diff = float(jnp.abs(relay_logits - direct_logits).max())
  print(f"(b) relay of {args.context - 1} tokens to exit {last}: {relay_s * 1e3:.1f} ms, "
        f"prefill from scratch {prefill_s * 1e3:.1f} ms: {measured:.2f} of it; FLOPs predict "
        f"{predicted:.2f} ({measured / predicted:.2f}x prediction); max |logit diff| "
        f"{max_diff:.2e}")

  # (c) confidence exits on validation text: the first exit whose max probability reaches the
  # threshold answers each token
  windows = jnp.asarray(val[: 4 * 128 + 1][:-1].reshape(4, 128))
  targets = jnp.asarray(val[1: 4 * 128 + 1].reshape(4, 128))
  logits_GBTV = dec.logits(windows)
  probs = jax.nn.softmax(logits_GBTV, -1)
  ce_GBT = -jnp.log(jnp.take_along_axis(probs, targets[None, ..., None], -1)[..., 0])
  confidence_GBT = probs.max(-1)
  levels = {}
  for threshold in (0.3, 0.5, 0.7, 0.9, 1.01):
    confident = confidence_GBT >= threshold
    confident = confident.at[-1].set(True)
    chosen_BT = jnp.argmax(confident, axis=0)
    loss = float(jnp.take_along_axis(ce_GBT, chosen_BT[None], 0).mean())
    levels[threshold] = {"mean_exit": float(chosen_BT.mean()) + 1, "val_loss": loss}
    print(f"(c) threshold {threshold:4.2f}: mean exit {levels[threshold]['mean_exit']:.2f}, "
          f"val loss {loss:.4f}")

  # (d) self-speculative decoding, drafts from exit 1, against plain greedy decoding at the
  # deepest exit; the expected speedup from the acceptance rate and the draft's measured cost
  k = 4
  plain_s, spec_s, draft_s = best_of_interleaved(
      lambda: dec.generate(prompt, last, 128)[1], lambda: dec.speculative(prompt, 128, 1, k)[0],
      lambda: dec.generate(prompt, 1, 128)[1], repeats=10)
  out, accepted, proposed = dec.speculative(prompt, 128, draft_exit=1, k=k)
  same = bool(jnp.all(out == dec.generate(prompt, last, 128)[1]))
  acceptance = int(accepted) / int(proposed)
  expected = expected_speedup(acceptance, k, draft_s / plain_s)
  print(f"(d) speculative (k={k}): acceptance {acceptance:.2f}, {128 / spec_s:,.0f} tok/s vs "
        f"plain {128 / plain_s:,.0f}: {plain_s / spec_s:.2f}x, expected {expected:.2f}x from the "
        f"acceptance and the draft exit's cost ({draft_s / plain_s:.2f} of a deep step): "
        f"{plain_s / spec_s / expected:.0%} of it; same output: {same}")
  # (e) the KV cache's bytes per token with grouped-query attention against multi-head
  cache_bytes = cache_bytes_per_token(cfg.model, max_len)
  for heads, size in cache_bytes.items():
    print(f"(e) KV cache with {heads} key/value heads of {cfg.model.n_heads}: {size:,.0f} bytes "
          f"per token ({size / cache_bytes[cfg.model.n_heads]:.2f} of multi-head)")
  print(json.dumps({"cache_speedup": cache_speedup, "cache_bytes_per_token": cache_bytes,
                    "relay_over_predicted": measured / predicted,
                    "relay_measured_share": measured, "relay_predicted_share": predicted,
                    "relay_max_abs_logit_diff": max_diff, "speculative_speedup": plain_s / spec_s,
                    "speculative_acceptance": acceptance, "speculative_equal": same,
                    "speculative_expected": expected, "draft_cost": draft_s / plain_s,
                    "confidence": {str(k): v for k, v in levels.items()}}))


if __name__ == "__main__":
  main()
