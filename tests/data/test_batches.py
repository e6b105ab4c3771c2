import json

import numpy as np
import pytest

from famjax import data
from famjax.data.config import DataConfig


@pytest.fixture(scope="module")
def tokens(corpus_dir):
  return data.load_tokens(DataConfig(corpus=str(corpus_dir), val_fraction=0.1))


def take(it, n):
  return [next(it) for _ in range(n)]


def test_same_seed_same_batches(tokens):
  a = take(data.train_batches(tokens.train, 32, 4, seed=3), 5)
  b = take(data.train_batches(tokens.train, 32, 4, seed=3), 5)
  c = take(data.train_batches(tokens.train, 32, 4, seed=4), 5)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))
  assert a[0].shape == (4, 33) and a[0].dtype == np.int32


def test_epochs_are_reshuffled_and_cover_every_window(tokens):
  n_windows = len(data.PackedWindows(tokens.train, 32))
  it = data.train_batches(tokens.train, 32, 1, seed=0)
  first = [tuple(b[0]) for b in take(it, n_windows)]
  second = [tuple(b[0]) for b in take(it, n_windows)]
  assert len(set(first)) == n_windows and set(first) == set(second) and first != second


def test_iterator_resume_continues_the_exact_sequence(tokens):
  it = data.train_batches(tokens.train, 32, 4, seed=1)
  take(it, 7)
  state = json.loads(json.dumps(it.get_state()))  # as it travels through a checkpoint
  expected = take(it, 5)
  resumed = data.train_batches(tokens.train, 32, 4, seed=1)
  resumed.set_state(state)
  assert all(np.array_equal(x, y) for x, y in zip(expected, take(resumed, 5)))


class Recorder:
  """A token stream that notes where each slice read starts."""

  def __init__(self, tokens):
    self.tokens, self.starts = tokens, set()

  def __len__(self):
    return len(self.tokens)

  def __getitem__(self, window):
    self.starts.add(window.start)
    return self.tokens[window]


def test_process_slices_tile_the_global_batch_and_each_reads_only_its_own(tokens):
  full = take(data.train_batches(tokens.train, 32, 8, seed=2), 3)
  readers = [Recorder(tokens.train) for _ in range(2)]
  parts = [take(data.train_batches(readers[p], 32, 8, seed=2, process_index=p, process_count=2),
                3) for p in range(2)]
  for step in range(3):
    np.testing.assert_array_equal(np.concatenate([parts[0][step], parts[1][step]]), full[step])
  assert len(readers[0].starts) == len(readers[1].starts) == 3 * 4
  assert readers[0].starts.isdisjoint(readers[1].starts)


def test_a_document_keeps_its_split_whatever_else_the_corpus_holds(corpus_dir, tmp_path):
  full = data.load_tokens(DataConfig(corpus=str(corpus_dir), val_fraction=0.1))
  assert full.n_val_docs >= 1 and full.n_train_docs >= 1
  eos = data.ByteTokenizer.eos_id
  assert int((np.asarray(full.val) == eos).sum()) == full.n_val_docs
  # the split follows a document's text alone: half the documents keep their sides
  half = tmp_path / "half"
  half.mkdir()
  for doc in sorted(corpus_dir.iterdir())[::2]:
    (half / doc.name).write_text(doc.read_text())
  part = data.load_tokens(DataConfig(corpus=str(half), val_fraction=0.1))
  # each generated document is one line; the byte decoder drops the EOS between them
  held_out = lambda t: set(data.ByteTokenizer().decode(np.asarray(t.val)).splitlines())
  assert held_out(part) <= held_out(full)
  assert part.n_train_docs + part.n_val_docs == len(list(half.iterdir()))


@pytest.mark.slow  # tokenizes the whole embedded corpus, the interpreter's standard library
def test_stdlib_split_is_about_one_percent():
  tokens = data.load_tokens(DataConfig())
  n = tokens.n_train_docs + tokens.n_val_docs
  assert n > 500 and 0.003 < tokens.n_val_docs / n < 0.03


def test_tokens_are_stored_once_and_reused(corpus_dir, private_cache):
  cfg = DataConfig(corpus=str(corpus_dir), val_fraction=0.1)
  first = data.load_tokens(cfg)
  stores = sorted((private_cache / "store").iterdir())
  index = first.store / "index.json"
  mtime = index.stat().st_mtime_ns
  second = data.load_tokens(cfg)
  assert sorted((private_cache / "store").iterdir()) == stores and second.store == first.store
  assert index.stat().st_mtime_ns == mtime
  assert np.array_equal(first.train, second.train) and first.fingerprint == second.fingerprint
  eos = data.ByteTokenizer.eos_id
  assert int((np.asarray(first.train) == eos).sum()) == first.n_train_docs


def test_fingerprint_and_store_follow_content(tmp_path):
  for i in range(12):
    (tmp_path / f"{i}.txt").write_text(f"hello {i}")
  cfg = DataConfig(corpus=str(tmp_path), val_fraction=0.3)
  before = data.load_tokens(cfg)
  (tmp_path / "0.txt").write_text("hello again, longer")
  after = data.load_tokens(cfg)
  assert after.fingerprint != before.fingerprint and after.store != before.store


def test_byte_tokenizer_round_trips():
  tok = data.ByteTokenizer()
  text = "def f(x):\n    return 'héllo'"
  assert tok.decode(tok.encode(text)) == text and tok.vocab_size == 259


def test_bpe_tokenizer_trains_locally_and_is_cached(corpus_dir, private_cache):
  cfg = DataConfig(corpus=str(corpus_dir), val_fraction=0.1, tokenizer="bpe", bpe_vocab_size=300)
  tokens = data.load_tokens(cfg)
  assert tokens.vocab_size <= 300 and int(np.asarray(tokens.train).max()) < tokens.vocab_size
  assert len(tokens.train) < len(data.load_tokens(DataConfig(corpus=str(corpus_dir),
                                                             val_fraction=0.1)).train)
  assert list((private_cache / "tokenizers").glob("*-bpe300-100mb-*"))
  text = "the shared backbone keeps its cache"
  assert tokens.tokenizer.decode(tokens.tokenizer.encode(text)) == text


def test_the_local_bpe_sample_is_bounded_and_holds_training_documents_only(corpus_dir):
  source = data.sources.from_corpus(str(corpus_dir))
  sample = list(data.bpe_sample(source, 0.1, max_bytes=5000))
  sizes = [len(t.encode()) for t in sample]
  assert sum(sizes[:-1]) < 5000 <= sum(sizes)
  everything = list(data.bpe_sample(source, 0.1, max_bytes=1 << 30))
  held_out = data.load_tokens(DataConfig(corpus=str(corpus_dir), val_fraction=0.1)).n_val_docs
  assert everything[:len(sample)] == sample and len(everything) == len(source.units[0].paths) \
      - held_out


def test_too_few_documents_for_a_split(tmp_path):
  (tmp_path / "only.txt").write_text("one document")
  with pytest.raises(ValueError, match="val_fraction"):
    data.load_tokens(DataConfig(corpus=str(tmp_path)))


def test_corpus_smaller_than_a_batch(tokens):
  with pytest.raises(ValueError, match="train.batch_size"):
    data.train_batches(tokens.train, 32, 10**6, seed=0)


def test_windows_are_contiguous_slices_of_the_stream_with_one_token_of_overlap(tokens):
  stream = np.asarray(tokens.train)
  windows = data.PackedWindows(tokens.train, 32)
  assert len(windows) == (len(stream) - 1) // 32
  for i in (0, 1, 7, len(windows) - 1):
    np.testing.assert_array_equal(windows[i], stream[32 * i: 32 * i + 33])
  assert windows[3][-1] == windows[4][0]  # a window's last token is the next one's first input


def test_train_batches_hold_whole_windows_of_the_stream(tokens):
  windows = data.PackedWindows(tokens.train, 32)
  all_windows = {tuple(windows[i]) for i in range(len(windows))}
  for batch in take(data.train_batches(tokens.train, 32, 4, seed=5), 3):
    assert all(tuple(row) in all_windows for row in batch)


def test_eval_batches_are_the_first_windows_in_order_and_tile_across_processes(tokens):
  windows = data.PackedWindows(tokens.val, 16)
  batches = data.eval_batches(tokens.val, 16, 4, 2)
  assert len(batches) == 2
  for b, batch in enumerate(batches):
    np.testing.assert_array_equal(batch, np.stack([windows[4 * b + i] for i in range(4)]))
  parts = [data.eval_batches(tokens.val, 16, 4, 2, process_index=p, process_count=2)
           for p in range(2)]
  for b in range(2):
    np.testing.assert_array_equal(np.concatenate([parts[0][b], parts[1][b]]), batches[b])
