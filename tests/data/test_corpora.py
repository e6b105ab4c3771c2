"""Real corpora: every source kind, pretrained tokenizers, bad input, the sharded store's
parallel and resumed builds."""

import gzip
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from famjax import data
from famjax.data import sources, store, tokenizers
from famjax.data.config import DataConfig
from famjax.train import loop

ROOT = Path(__file__).resolve().parents[2]
DOCS = [f"document {i}: the shared backbone — exits {'é' * (i % 3)} and {i * 'tokens '}"
        for i in range(40)]


def tokens_of(corpus, **kw):
  return data.load_tokens(DataConfig(corpus=str(corpus), val_fraction=0.2, num_workers=1, **kw),
                          progress=False)


def write_jsonl(path, records, opener=open):
  with opener(path, "wt") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  return path


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
  """The same documents as each source kind."""
  import datasets
  import pyarrow as pa
  import pyarrow.parquet as pq
  import zstandard
  root = tmp_path_factory.mktemp("kinds")
  texts = root / "texts"
  texts.mkdir()
  for i, doc in enumerate(DOCS):
    (texts / f"{i:03d}.txt").write_text(doc)
  records = [{"text": d, "id": i} for i, d in enumerate(DOCS)]
  write_jsonl(root / "docs.jsonl", records)
  write_jsonl(root / "docs.jsonl.gz", records, gzip.open)
  raw = (root / "docs.jsonl").read_bytes()
  (root / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
  (root / "shards").mkdir()
  for part, rows in enumerate((DOCS[:25], DOCS[25:])):
    pq.write_table(pa.table({"content": rows}), root / "shards" / f"part-{part}.parquet")
  saved = datasets.Dataset.from_list(records)
  saved.save_to_disk(str(root / "saved"))
  arrow = next((root / "saved").glob("*.arrow"))
  (root / "docs.arrow").write_bytes(arrow.read_bytes())
  return {"text files": (texts, {}), "jsonl": (root / "docs.jsonl", {}),
          "jsonl.gz": (root / "docs.jsonl.gz", {}), "jsonl.zst": (root / "docs.jsonl.zst", {}),
          "parquet glob": (f"{root}/shards/*.parquet", {"text_field": "content"}),
          "arrow": (root / "docs.arrow", {}), "save_to_disk": (root / "saved", {})}


def test_every_source_kind_gives_the_same_token_stream(kinds):
  streams = {k: tokens_of(corpus, **kw) for k, (corpus, kw) in kinds.items()}
  first = streams["text files"]
  assert first.n_train_docs + first.n_val_docs == len(DOCS) and first.n_val_docs >= 1
  for kind, got in streams.items():
    np.testing.assert_array_equal(got.train, first.train, err_msg=kind)
    np.testing.assert_array_equal(got.val, first.val, err_msg=kind)
    assert got.fingerprint == first.fingerprint, kind
  tok = first.tokenizer
  assert tok.decode(np.asarray(first.train)) + tok.decode(np.asarray(first.val)) != ""


def test_a_directory_of_mixed_kinds_reads_each_file_by_its_kind(kinds, tmp_path):
  import shutil
  mixed = tmp_path / "mixed"
  mixed.mkdir()
  shutil.copy(kinds["jsonl"][0], mixed / "a.jsonl")
  shutil.copytree(kinds["save_to_disk"][0], mixed / "b-saved")
  (mixed / "c.txt").write_text(DOCS[0])
  (mixed / ".hidden").write_bytes(b"\x00")
  got = tokens_of(mixed)
  assert got.n_train_docs + got.n_val_docs == 2 * len(DOCS) + 1
  assert [u.kind for u in sources.from_corpus(str(mixed)).units] == ["json", "saved", "text"]


def test_two_workers_build_the_store_one_builds(kinds, tmp_path):
  corpus, _ = kinds["text files"]
  one = tokens_of(corpus)
  two = data.load_tokens(DataConfig(corpus=str(corpus), val_fraction=0.2, num_workers=2,
                                    cache_dir=str(tmp_path)), progress=False)
  assert one.store != two.store
  assert _files(one.store) == _files(two.store)


def test_shards_split_a_stream_where_the_loader_does_not_notice(kinds, tmp_path, monkeypatch):
  corpus, _ = kinds["jsonl"]
  whole = tokens_of(corpus)
  monkeypatch.setattr(store, "SHARD_TOKENS", 97)
  monkeypatch.setattr(store, "_FLUSH_TOKENS", 13)
  cut = data.load_tokens(DataConfig(corpus=str(corpus), val_fraction=0.2, num_workers=1,
                                    cache_dir=str(tmp_path)), progress=False)
  index = json.loads((cut.store / "index.json").read_text())
  assert len(index["shards"]["train"]) > 5
  assert all(n <= 97 for _, n in index["shards"]["train"])
  np.testing.assert_array_equal(cut.train, whole.train)
  stream = np.asarray(whole.train)
  for start in (0, 90, 96, 97, 150, len(stream) - 40):
    np.testing.assert_array_equal(cut.train[start:start + 40], stream[start:start + 40])


def _files(directory: Path) -> dict:
  """Every file of a store but its saved tokenizer: name -> bytes."""
  return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


KILLER = """
import os, signal, sys
from famjax import data
from famjax.data.config import DataConfig
from famjax.data import sources, store
store._ENCODE_BYTES = store._FLUSH_TOKENS = 1  # write each document as it comes
read, seen = sources.read, []
def read_then_die(unit, field):
  seen.append(unit)
  for i, text in enumerate(read(unit, field)):
    if len(seen) == 4 and i == 2:  # inside the fourth unit, its shards half written
      os.kill(os.getpid(), signal.SIGKILL)
    yield text
sources.read = read_then_die
data.load_tokens(DataConfig(corpus=sys.argv[1], val_fraction=0.2, num_workers=1,
                            cache_dir=sys.argv[2]), progress=False)
"""


def test_a_killed_tokenization_resumes_to_the_same_store(kinds, tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for part in range(8):
    pq.write_table(pa.table({"text": DOCS[part * 5:part * 5 + 5]}), corpus / f"{part}.parquet")
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  killed = subprocess.run([sys.executable, "-c", KILLER, str(corpus), str(tmp_path / "cache")],
                          env=env, capture_output=True, text=True, timeout=300)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  (partial,) = (tmp_path / "cache" / "store").iterdir()
  done = sorted(p.name for p in partial.glob("u*.json"))
  assert done == [f"u{i:06d}.json" for i in range(3)] and not (partial / "index.json").exists()
  assert list(partial.glob(".*.tmp"))  # the fourth unit died half written
  finished = {p.name: p.stat().st_mtime_ns for p in partial.glob("u*")}
  resumed = data.load_tokens(DataConfig(corpus=str(corpus), val_fraction=0.2, num_workers=1,
                                        cache_dir=str(tmp_path / "cache")), progress=False)
  straight = data.load_tokens(DataConfig(corpus=str(corpus), val_fraction=0.2, num_workers=1,
                                         cache_dir=str(tmp_path / "straight")), progress=False)
  assert resumed.store == partial and _files(resumed.store) == _files(straight.store)
  assert all(partial.joinpath(n).stat().st_mtime_ns == t for n, t in finished.items())
  assert not list(partial.glob(".*.tmp"))


def _bpe_file(tmp_path, eos="</s>"):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(DOCS * 3, trainers.BpeTrainer(
      vocab_size=400, special_tokens=[eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  return path


def _sentencepiece_file(tmp_path):
  import sentencepiece as spm
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(DOCS * 3), model_writer=model,
                                 vocab_size=120, model_type="bpe", minloglevel=2,
                                 character_coverage=1.0)
  path = tmp_path / "sp.model"
  path.write_bytes(model.getvalue())
  return path


@pytest.mark.parametrize("make", [_bpe_file, _sentencepiece_file], ids=["tokenizer.json",
                                                                        "sentencepiece"])
def test_a_pretrained_tokenizer_round_trips_and_travels_with_the_run(kinds, tmp_path, make):
  path = make(tmp_path)
  corpus, _ = kinds["jsonl"]
  got = tokens_of(corpus, tokenizer=str(path))
  tok = got.tokenizer
  text = "document 7: the shared backbone"
  assert tok.decode(tok.encode(text)) == text
  assert int(np.asarray(got.train).max()) < got.vocab_size == tok.vocab_size
  assert int((np.asarray(got.train) == tok.eos_id).sum()) == got.n_train_docs
  saved = tmp_path / "workdir"
  data.save_tokenizer(tok, saved)
  path.unlink()  # the copy stands alone
  again = data.load_tokenizer(saved)
  assert again.eos_id == tok.eos_id and list(again.encode(text)) == list(tok.encode(text))


def test_a_tokenizer_without_eos_needs_one_named(kinds, tmp_path):
  path = _bpe_file(tmp_path, eos="<sep>")
  corpus, _ = kinds["jsonl"]
  with pytest.raises(ValueError, match="data.eos_token"):
    tokens_of(corpus, tokenizer=str(path))
  got = tokens_of(corpus, tokenizer=str(path), eos_token="<sep>")
  assert got.tokenizer.eos_id == got.tokenizer._tok.token_to_id("<sep>")
  with pytest.raises(ValueError, match=r"data.eos_token='<nope>' is not in the vocabulary"):
    tokens_of(corpus, tokenizer=str(path), eos_token="<nope>")


def test_a_model_vocabulary_below_the_tokenizers_is_refused(tiny_experiment, tmp_path):
  import dataclasses
  cfg = tiny_experiment()
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=200))
  with pytest.raises(ValueError, match=r"model.vocab_size=200 is smaller than the 259-token"):
    loop.train(cfg, tmp_path)
  assert not list(tmp_path.iterdir())  # nothing claimed


def _corrupt_gzip(p):
  (p / "bad.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 50)[:40])
  return p / "bad.jsonl.gz", "bad.jsonl.gz: cannot be read as json"


def _no_field(p):
  write_jsonl(p / "x.jsonl", [{"text": "a"}, {"body": "b"}])
  return p / "x.jsonl", r"x.jsonl record 2 has no string field 'text' \(data.text_field"


def _no_column(p):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"body": ["a", "b"]}), p / "x.parquet")
  return p / "x.parquet", "x.parquet record 1 has no string field 'text'"


def _binary(p):
  (p / "docs").mkdir()
  (p / "docs" / "a.txt").write_text("fine")
  (p / "docs" / "blob.bin").write_bytes(b"\x00\x01binary")
  return p / "docs", "blob.bin: a binary file of unknown kind"


def _unknown_compressed(p):
  (p / "x.csv.gz").write_bytes(gzip.compress(b"a,b\n"))
  return p / "x.csv.gz", "x.csv.gz: a compressed file of unknown kind"


def _empty(p):
  (p / "empty").mkdir()
  (p / "empty" / "a.txt").write_text("")
  return p / "empty", "holds no non-empty text document"


def _hub_name(p):
  return "allenai/c4", "'allenai/c4' is not a local file.*never downloads"


def _no_match(p):
  return f"{p}/*.parquet", r"matches no file"


def _bad_tokenizer(p):
  (p / "t.json").write_text("{not a tokenizer")
  return None, "data.tokenizer: .*t.json does not load"


@pytest.mark.parametrize("case", [_corrupt_gzip, _no_field, _no_column, _binary,
                                  _unknown_compressed, _empty, _hub_name, _no_match,
                                  _bad_tokenizer])
def test_bad_input_is_a_one_line_error_naming_the_file(tmp_path, case, kinds):
  corpus, message = case(tmp_path)
  extra = {}
  if corpus is None:
    corpus, extra = kinds["jsonl"][0], {"tokenizer": str(tmp_path / "t.json")}
  with pytest.raises((ValueError, FileNotFoundError)) as error:
    tokens_of(corpus, cache_dir=str(tmp_path / "cache"), **extra)
  assert "\n" not in str(error.value)
  assert __import__("re").search(message, str(error.value)), str(error.value)


def test_unknown_tokenizer_names_are_refused_with_the_allowed_ones():
  with pytest.raises(ValueError, match=r"data.tokenizer must be one of \('byte', 'bpe'\) or a "):
    DataConfig(tokenizer="gpt2")
  with pytest.raises(ValueError, match="data.num_workers"):
    DataConfig(num_workers=-1)


def test_saved_tokenizers_rebuild_from_their_directory(tmp_path):
  tok = tokenizers.ByteTokenizer()
  data.save_tokenizer(tok, tmp_path)
  assert isinstance(data.load_tokenizer(tmp_path), tokenizers.ByteTokenizer)
  with pytest.raises(FileNotFoundError, match="no saved tokenizer"):
    data.load_tokenizer(tmp_path / "elsewhere")
  assert sources.from_corpus(str(tmp_path / "tokenizer")).units  # a directory of files is a corpus
