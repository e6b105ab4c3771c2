import json

import numpy as np
import pytest

from famjax import data
from famjax.config import DataConfig


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


def test_process_slices_tile_the_global_batch(tokens):
  full = take(data.train_batches(tokens.train, 32, 8, seed=2), 3)
  parts = [take(data.train_batches(tokens.train, 32, 8, seed=2, process_index=p,
                                   process_count=2), 3) for p in range(2)]
  for step in range(3):
    np.testing.assert_array_equal(np.concatenate([parts[0][step], parts[1][step]]), full[step])


def test_train_and_validation_documents_are_disjoint(corpus_dir):
  docs = data.load_documents(str(corpus_dir))
  train, val = data.split_documents(docs, 0.1)
  assert {d.path for d in train}.isdisjoint({d.path for d in val})
  assert len(train) + len(val) == len(docs) and len(val) >= 1
  # the split follows the path alone: a document keeps its side whatever else the corpus holds
  _, val_subset = data.split_documents(docs[: len(docs) // 2] + val, 0.1)
  assert {d.path for d in val} <= {d.path for d in val_subset}


def test_stdlib_split_is_about_one_percent():
  docs = data.load_documents("stdlib")
  _, val = data.split_documents(docs, 0.01)
  assert len(docs) > 500 and 0.003 < len(val) / len(docs) < 0.03
  assert all("site-packages" not in d.path for d in docs)


def test_tokens_are_cached_once_and_reused(corpus_dir, private_cache):
  cfg = DataConfig(corpus=str(corpus_dir), val_fraction=0.1)
  first = data.load_tokens(cfg)
  entry = private_cache / "tokens" / f"{first.fingerprint[:16]}-byte-val0.1"
  entries = sorted((private_cache / "tokens").iterdir())
  mtime = (entry / "train.bin").stat().st_mtime_ns
  second = data.load_tokens(cfg)
  assert sorted((private_cache / "tokens").iterdir()) == entries
  assert (entry / "train.bin").stat().st_mtime_ns == mtime
  assert np.array_equal(first.train, second.train) and first.fingerprint == second.fingerprint
  eos = data.ByteTokenizer.eos_id
  assert int((np.asarray(first.train) == eos).sum()) == first.n_train_docs


def test_fingerprint_follows_content(tmp_path):
  (tmp_path / "a.txt").write_text("hello")
  before = data.fingerprint(data.load_documents(str(tmp_path)))
  (tmp_path / "a.txt").write_text("hello!")
  assert data.fingerprint(data.load_documents(str(tmp_path))) != before


def test_jsonl_and_plain_files(tmp_path):
  lines = [json.dumps({"text": f"record {i}"}) for i in range(3)]
  (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
  (tmp_path / "b.txt").write_text("plain")
  (tmp_path / "blob.bin").write_bytes(b"\x00\x01binary")
  docs = data.load_documents(f"{tmp_path / 'c.jsonl'},{tmp_path / 'b.txt'}")
  assert [d.text for d in docs] == ["record 0", "record 1", "record 2", "plain"]
  assert "binary" not in "".join(d.text for d in data.load_documents(str(tmp_path)))


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
  assert list((private_cache / "tokenizers").glob("*-bpe300.json"))
  text = "the shared backbone keeps its cache"
  assert tokens.tokenizer.decode(tokens.tokenizer.encode(text)) == text


@pytest.mark.parametrize("make, message", [
    (lambda p: str(p / "missing"), "does not exist"),
    (lambda p: (p / "empty").mkdir() or str(p / "empty"), "no non-empty text document"),
    (lambda p: (p / "bad.jsonl").write_text('{"txt": 1}\n') and str(p / "bad.jsonl"),
     "bad.jsonl:1: each JSONL record needs a string field 'text'"),
])
def test_bad_corpus_is_a_clear_error(tmp_path, make, message):
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    data.load_documents(make(tmp_path))


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
