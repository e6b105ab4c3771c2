"""Decoding: the fast path equals the slow path (cache == full forward, relay == from scratch,
confidence extremes == single exits, speculative == plain greedy)."""

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from famjax.decode import decoder, relay_state, sampling
from famjax.model.transformer import FamilialTransformer

from conftest import tiny_model

KINDS = list(itertools.product(("norm", "block"), ("tied", "shared", "per_exit")))
# make test checks both head kinds with the two extreme unembeddings; make check every pairing
EVERY_KIND = [kind if kind in (("norm", "tied"), ("block", "per_exit"))
              else pytest.param(kind, marks=pytest.mark.slow) for kind in KINDS]
PROMPTS = [[5, 7, 9, 11, 2, 40, 41], [3, 4], [100, 101, 102]]  # padded batch


def build(cfg, seed=0):
  with nnx.use_eager_sharding(False):
    return FamilialTransformer(cfg, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def decoders():
  return {kind: decoder.Decoder(build(tiny_model(exit_head=kind[0], unembed=kind[1],
                                                max_seq_len=32)))
          for kind in KINDS}


@pytest.mark.parametrize("kind", EVERY_KIND)
def test_cached_logits_equal_a_full_forward_at_every_exit(decoders, kind):
  dec = decoders[kind]
  for g in (1, 2, 3):  # exits count from 1; the logits' exit axis from 0
    state, next_logits = dec.prefill(PROMPTS, g)
    state, generated = dec.continue_(state, next_logits, 6)
    for b, prompt in enumerate(PROMPTS):
      sequence = prompt + [int(t) for t in generated[b]]
      full = dec.logits(jnp.asarray([sequence]))[g - 1, 0]
      np.testing.assert_allclose(next_logits[b], full[len(prompt) - 1], atol=2e-5)
      assert [int(t) for t in jnp.argmax(full[len(prompt) - 1:-1], -1)] == sequence[len(prompt):]
    # the cache holds exactly what a full forward pass computes: one more step's logits
    n = int(state.lengths_B.max())
    rows = [[int(t) for t in row[:length]]
            for row, length in zip(state.tokens_BS, state.lengths_B)]
    _, step_logits = dec.prefill(rows, g)
    full = dec.logits(state.tokens_BS[:, :n])[g - 1]
    np.testing.assert_allclose(step_logits, full[jnp.arange(3), state.lengths_B - 1], atol=2e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_relay_equals_running_the_deeper_exit_from_scratch(decoders, kind):
  """Tolerance 1e-5 absolute on logits of order 1: float32 sums in another order."""
  dec = decoders[kind]
  shallow, _ = dec.generate(PROMPTS, 1, 5)
  relayed, relay_logits = dec.relay(shallow, 3)
  for b in range(3):
    sequence = shallow.tokens_BS[b, :int(shallow.lengths_B[b])]
    direct = dec.logits(sequence[None])[2, 0, -1]
    np.testing.assert_allclose(relay_logits[b], direct, atol=1e-5)
  restored = relay_state.from_bytes(relay_state.to_bytes(shallow))
  again, again_logits = dec.relay(restored, 3)
  np.testing.assert_array_equal(again_logits, relay_logits)
  _, a = dec.continue_(relayed, relay_logits, 6)
  _, b = dec.continue_(again, again_logits, 6)
  np.testing.assert_array_equal(a, b)


def test_relay_state_size_per_token(decoders):
  dec = decoders[("block", "per_exit")]
  state, _ = dec.generate([[1, 2, 3, 4, 5, 6, 7, 8]], 1, 8)
  size = len(relay_state.to_bytes(state))
  cfg = dec.cfg
  per_token = (cfg.d_model + 2 * cfg.kv_heads * cfg.head_size * (cfg.exit_layers[0] + 1)) * 4 + 4
  assert size == pytest.approx(16 * per_token, rel=0.1)  # hidden + K, V of layer 1 and the block


def test_grouped_query_caches_hold_fewer_heads_and_every_decoding_path_agrees():
  """One key/value head for four query heads (with q/k/v biases): the cache holds 1 head, and
  cached, relayed, confidence and speculative decoding equal their slow paths as with MHA."""
  cfg = tiny_model(n_heads=4, n_kv_heads=1, attention_bias=True, exit_head="block",
                   unembed="shared", max_seq_len=32)
  dec = decoder.Decoder(build(cfg, seed=2))
  state, generated = dec.generate(PROMPTS, 1, 6)
  assert state.segments[0].k.shape[-2:] == (1, cfg.head_size) and state.head.v.shape[-2] == 1
  sequence = PROMPTS[0] + [int(t) for t in generated[0]]
  full = dec.logits(jnp.asarray([sequence]))[0, 0]
  assert [int(t) for t in jnp.argmax(full[len(PROMPTS[0]) - 1:-1], -1)] == sequence[7:]
  _, relay_logits = dec.relay(state, 3)
  rows = [[int(t) for t in row[:n]] for row, n in zip(state.tokens_BS, state.lengths_B)]
  for b, row in enumerate(rows):
    np.testing.assert_allclose(relay_logits[b], dec.logits(jnp.asarray([row]))[2, 0, -1],
                               atol=1e-5)
  deepest = dec.generate(PROMPTS, 3, 8)[1]
  np.testing.assert_array_equal(dec.confident(PROMPTS, 8, 1.01)[0], deepest)
  np.testing.assert_array_equal(dec.speculative(PROMPTS, 8, draft_exit=1, k=3)[0], deepest)


def test_confidence_extremes_are_single_exits(decoders):
  dec = decoders[("block", "tied")]
  deepest = dec.generate(PROMPTS, 3, 8)[1]
  first = dec.generate(PROMPTS, 1, 8)[1]
  above, depth_above = dec.confident(PROMPTS, 8, 1.01)
  zero, depth_zero = dec.confident(PROMPTS, 8, 0.0)
  np.testing.assert_array_equal(above, deepest)
  np.testing.assert_array_equal(zero, first)
  assert np.all(np.asarray(depth_above) == 3) and np.all(np.asarray(depth_zero) == 1)
  margin, _ = dec.confident(PROMPTS, 8, 1.01, measure="margin")
  np.testing.assert_array_equal(margin, deepest)


def test_a_token_that_exits_early_leaves_keys_for_the_layers_it_skipped():
  """With a threshold between exit 0's and the deepest exit's confidence, tokens mix exits, and
  the output still equals stepping exit by exit with propagated hidden states (checked against
  the deepest exit only where every earlier token took it)."""
  dec = decoder.Decoder(build(tiny_model(max_seq_len=32), seed=3))
  logits = dec.logits(jnp.asarray([PROMPTS[0]]))
  probs = jax.nn.softmax(logits[:, 0, -1], -1).max(-1)
  threshold = float(probs.mean())
  out, depth = dec.confident([PROMPTS[0]], 10, threshold)
  assert out.shape == (1, 10) and set(np.unique(depth)) <= {1, 2, 3}


@pytest.fixture(scope="module")
def agreeing_family():
  """Exit 0 nearly agrees with the deepest exit (the deeper layers are all but switched off), so
  drafts are mostly but not always accepted."""
  model = build(tiny_model(exit_layers=(1, 3), unembed="tied", max_seq_len=48), seed=2)
  graphdef, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  for name in ("attn", "mlp"):
    out = pure["segments"][1]["blocks"][name]["out" if name == "attn" else "down"]
    out["kernel"] = out["kernel"] * 0.2
  pure["exits"][1]["norm"]["scale"] = pure["exits"][0]["norm"]["scale"]
  nnx.replace_by_pure_dict(state, pure)
  return decoder.Decoder(nnx.merge(graphdef, state))


def test_speculative_greedy_output_equals_plain_greedy(agreeing_family):
  dec = agreeing_family
  plain = dec.generate(PROMPTS, 2, 20)[1]
  for k in (1, 3, 5):
    out, accepted, proposed = dec.speculative(PROMPTS, 20, draft_exit=1, k=k)
    np.testing.assert_array_equal(out, plain)
    assert 0 < int(accepted) < int(proposed), k


def test_bad_requests_are_clear_errors(decoders):
  dec = decoders[("norm", "tied")]
  for exit_ in (0, 4):  # exits count from 1
    with pytest.raises(ValueError, match="exit must be in 1..3"):
      dec.prefill(PROMPTS, exit_)
  state, _ = dec.prefill(PROMPTS, 2)
  with pytest.raises(ValueError, match="relay goes to a deeper exit than 2"):
    dec.relay(state, 2)
  with pytest.raises(ValueError, match="leaves no room in a cache of max_len=32"):
    dec.prefill([list(range(40))], 1)
  with pytest.raises(ValueError, match="draft_exit must be in 1..2"):
    dec.speculative(PROMPTS, 4, draft_exit=3)


def test_sampling_respects_top_k_and_top_p():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 400)
  draw = lambda **kw: np.array([int(sampling.sample(logits, k, 1.0, **kw)[0]) for k in keys])
  assert set(draw(top_k=2)) == {0, 1}
  assert set(draw(top_p=0.75)) == {0, 1}
  assert set(draw()) == {0, 1, 2, 3}
  assert int(sampling.sample(logits, keys[0])[0]) == 0  # temperature 0: greedy


def test_stop_tokens_end_a_row(decoders):
  dec = decoders[("norm", "tied")]
  _, free = dec.generate(PROMPTS, 3, 8)
  stop = int(free[0, 2])
  _, stopped = dec.generate(PROMPTS, 3, 8, sampling.Sampling(stop_tokens=(stop,)))
  row = [int(t) for t in stopped[0]]
  assert row[:3] == [int(t) for t in free[0, :3]] and all(t == -1 for t in row[3:])


@pytest.mark.slow
def test_decode_command_line(corpus_dir, tmp_path):
  root = Path(__file__).resolve().parents[2]
  env = dict(os.environ, PYTHONPATH=str(root))
  corpus = shutil.copytree(corpus_dir, tmp_path / "corpus")
  workdir = tmp_path / "run"
  train = [sys.executable, "-m", "experiments.train", f"--workdir={workdir}",
           f"--config.data.corpus={corpus}", "--config.data.val_fraction=0.1",
           "--config.model.d_model=32", "--config.model.n_heads=2", "--config.model.d_ff=64",
           "--config.train.steps=20", "--config.train.warmup_steps=1",
           "--config.train.seq_len=32", "--config.train.batch_size=4",
           "--config.train.progress=False"]
  assert subprocess.run(train, cwd=root, env=env, capture_output=True).returncode == 0
  shutil.rmtree(corpus)  # decoding reads the tokenizer the run saved, never the corpus
  run = lambda *a: subprocess.run([sys.executable, "-m", "experiments.decode",
                                   f"--workdir={workdir}", *a], cwd=root, env=env,
                                  capture_output=True, text=True, timeout=600)
  out = run("--prompt=the model ", "--exit=1", "--relay_to=3", "--max_new_tokens=16",
            "--confidence=0.9", "--speculative_exit=1")
  assert out.returncode == 0, out.stderr[-2000:]
  for word in ("exit 1", "relay to exit 3", "confidence", "speculative", "acceptance"):
    assert word in out.stdout, word
  for args, message in ((["--exit=4"], "--exit must be in 1..3"),
                        (["--exit=2", "--relay_to=1"], "--relay_to must be deeper"),
                        (["--prompt=" + "x" * 300], "leaves no room")):
    bad = run(*args)
    assert bad.returncode != 0 and message in bad.stderr and "Traceback" not in bad.stderr
  shutil.rmtree(workdir / "tokenizer")  # a byte-level run trained before tokenizers were saved
  old = run("--max_new_tokens=4")
  assert old.returncode == 0 and "exit 1" in old.stdout, old.stderr[-2000:]
  empty = subprocess.run([sys.executable, "-m", "experiments.decode",
                          f"--workdir={tmp_path / 'none'}"], cwd=root, env=env,
                         capture_output=True, text=True)
  assert empty.returncode != 0 and "no checkpoint" in empty.stderr
