"""Generates text from a trained family: famjax decode --workdir=TRAINED_RUN
--prompt="def " --exit=1 [--relay_to=3] [--confidence=0.9] [--speculative_exit=1].

Exits are numbered 1..G here, as in the training summary. Prints each tier's text and the time it
took. Logic lives in famjax.decode; this file only parses flags and prints.
"""

import time
from pathlib import Path

import jax
import numpy as np
from absl import flags, logging

from famjax import data
from famjax.commands import common
from famjax.decode import decoder, relay_state, sampling
from famjax.train import loop

PRESET = None  # `famjax decode` takes no --config

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run's workdir.", required=True)
_PROMPT = flags.DEFINE_string("prompt", "def ", "Prompt text.")
_EXIT = flags.DEFINE_integer("exit", 1, "Exit (1..G) that generates first.")
_RELAY_TO = flags.DEFINE_integer("relay_to", 0, "Deeper exit that continues from --exit's state "
                                 "(0: none).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per tier.", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy.", lower_bound=0.0)
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
_CONFIDENCE = flags.DEFINE_float("confidence", 0.0, "Also decode with confidence exits at this "
                                 "threshold (0: skip).")
_SPECULATIVE = flags.DEFINE_integer("speculative_exit", 0, "Also decode self-speculatively, "
                                    "drafting with this exit (0: skip).")
_DRAFT = flags.DEFINE_integer("draft_tokens", 4, "Tokens drafted per speculative step.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def load(workdir: Path):
  """The family and tokenizer of a trained workdir (its latest checkpoint, its saved tokenizer:
  the corpus is not read)."""
  cfg, model = loop.load_model(workdir)
  try:
    return cfg, model, data.load_tokenizer(workdir)
  except FileNotFoundError:
    if cfg.data.tokenizer != "byte":
      raise
    return cfg, model, data.ByteTokenizer()  # a byte-level run from before tokenizers were saved


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  common.use_compilation_cache()
  cfg, model, tokenizer = load(Path(_WORKDIR.value))
  n_exits = cfg.model.n_exits
  if not 1 <= _EXIT.value <= n_exits:
    raise ValueError(f"--exit must be in 1..{n_exits}; got {_EXIT.value}")
  if _RELAY_TO.value and not _EXIT.value < _RELAY_TO.value <= n_exits:
    raise ValueError(f"--relay_to must be deeper than --exit={_EXIT.value} and at most "
                     f"{n_exits}; got {_RELAY_TO.value}")
  dec = decoder.Decoder(model)
  prompt = [int(t) for t in tokenizer.encode(_PROMPT.value)]
  text = lambda row: tokenizer.decode([int(t) for t in row if t >= 0])
  chosen = sampling.Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value,
                           (int(tokenizer.eos_id),))

  def timed(label, fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    print(f"--- {label} ({time.perf_counter() - start:.2f} s, compilation included)")
    return out

  state, generated = timed(f"exit {_EXIT.value}", lambda: dec.generate(
      [prompt], _EXIT.value, _MAX_NEW.value, chosen, _SEED.value))
  print(_PROMPT.value + text(generated[0]))
  if _RELAY_TO.value:
    size = len(relay_state.to_bytes(state))
    relayed, logits = timed(f"relay to exit {_RELAY_TO.value} (state {size:,} bytes, "
                            f"{size / int(state.lengths_B[0]):,.0f} per token)",
                            lambda: dec.relay(state, _RELAY_TO.value))
    _, more = dec.continue_(relayed, logits, _MAX_NEW.value, chosen, _SEED.value)
    print(_PROMPT.value + text(generated[0]) + text(more[0]))
  if _CONFIDENCE.value:
    out, depth = timed(f"confidence exits at {_CONFIDENCE.value}", lambda: dec.confident(
        [prompt], _MAX_NEW.value, _CONFIDENCE.value))
    print(_PROMPT.value + text(out[0]))
    print(f"mean exit: {np.mean(np.asarray(depth)):.2f} of {n_exits}")
  if _SPECULATIVE.value:
    if not 1 <= _SPECULATIVE.value < n_exits:
      raise ValueError(f"--speculative_exit must be in 1..{n_exits - 1}")
    out, accepted, proposed = timed(
        f"speculative, drafts from exit {_SPECULATIVE.value}", lambda: dec.speculative(
            [prompt], _MAX_NEW.value, _SPECULATIVE.value, _DRAFT.value))
    print(_PROMPT.value + text(out[0]))
    print(f"acceptance: {int(accepted)} of {int(proposed)} drafted tokens")

