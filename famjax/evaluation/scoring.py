"""Scoring token sequences at one exit, batched: each request's continuation log-probability
and whether it is the greedy continuation. Requests are sorted by length and padded on the right
to a length bucket (a multiple of 64, at most the model's context) and to a fixed batch, so that
one program is compiled per bucket.

A request is (context tokens, continuation tokens). The scored sequence is context +
continuation without its last token; when it is longer than the model's context, the oldest
context tokens are dropped (the harness's convention), never the continuation's.
"""

from __future__ import annotations

import jax
import numpy as np

BUCKET = 64


def _window(context: list[int], continuation: list[int], max_len: int):
  """(inputs, targets, n continuation targets) of one request, truncated on the left."""
  if not continuation:
    raise ValueError("a loglikelihood request needs a non-empty continuation")
  if len(continuation) > max_len:
    raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the model's "
                     f"context of {max_len} tokens")
  whole = (list(context) + list(continuation))[-(max_len + 1):]
  return whole[:-1], whole[1:], len(continuation)


def bucket_length(n: int, max_len: int) -> int:
  return min(max_len, -(-n // BUCKET) * BUCKET)


def score(decoder, requests, exit_: int, batch_size: int,
          progress=None) -> list[tuple[float, bool]]:
  """(sum of the continuation's log-probabilities, greedy) per request, in the given order, at
  exit `exit_` (1..G) of `decoder` (a famjax.decode.decoder.Decoder). `progress(n)` is told of each
  batch done."""
  windows = [_window(c, t, decoder.max_len) for c, t in requests]
  order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
  out: list[tuple[float, bool] | None] = [None] * len(windows)
  for start in range(0, len(order), batch_size):
    chosen = order[start:start + batch_size]
    length = bucket_length(len(windows[chosen[0]][0]), decoder.max_len)
    inputs_BT = np.zeros((batch_size, length), np.int32)
    targets_BT = np.zeros((batch_size, length), np.int32)
    for row, i in enumerate(chosen):
      inputs, targets, _ = windows[i]
      inputs_BT[row, :len(inputs)], targets_BT[row, :len(targets)] = inputs, targets
    target_BT, greedy_BT = jax.device_get(decoder.scores(inputs_BT, targets_BT, exit_))
    for row, i in enumerate(chosen):
      n_inputs, n_cont = len(windows[i][0]), windows[i][2]
      span = slice(n_inputs - n_cont, n_inputs)
      out[i] = (float(np.sum(target_BT[row, span], dtype=np.float64)),
                bool(np.all(greedy_BT[row, span])))
    if progress is not None:
      progress(len(chosen))
  return out
