"""Corpora, tokenizers, the cached token memmap and deterministic, resumable packed batches
(grain)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path
from typing import Sequence

import grain
import numpy as np

from famjax.config import DataConfig
from famjax.files import atomic_write_text, default_cache_dir

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIALS = (PAD, BOS, EOS)
BYTE_VOCAB_SIZE = 256 + len(SPECIALS)
_CACHE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Document:
  path: str  # stable name: relative to the corpus root, or "file.jsonl:LINE"
  text: str


# --- Corpora -------------------------------------------------------------------------------------


def stdlib_root() -> Path:
  return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_documents() -> list[Document]:
  root = stdlib_root()
  paths = sorted(p for p in root.rglob("*.py")
                 if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts))
  return [Document(str(p.relative_to(root)), p.read_text("utf-8", errors="replace"))
          for p in paths]


def _jsonl_documents(path: Path) -> list[Document]:
  docs = []
  with path.open("r", encoding="utf-8", errors="replace") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
      if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f"{path}:{line_no}: each JSONL record needs a string field 'text'")
      docs.append(Document(f"{path.name}:{line_no}", record["text"]))
  return docs


def _is_binary(raw: bytes) -> bool:
  return b"\x00" in raw[:8192]


def _path_documents(path: Path) -> list[Document]:
  if not path.exists():
    raise FileNotFoundError(f"data.corpus: {path} does not exist")
  if path.is_file():
    if path.suffix == ".jsonl":
      return _jsonl_documents(path)
    return [Document(path.name, path.read_text("utf-8", errors="replace"))]
  docs = []
  for file in sorted(p for p in path.rglob("*") if p.is_file()):
    if file.suffix == ".jsonl":
      docs.extend(_jsonl_documents(file))
      continue
    raw = file.read_bytes()
    if not _is_binary(raw):
      docs.append(Document(str(file.relative_to(path)), raw.decode("utf-8", errors="replace")))
  return docs


def load_documents(corpus: str) -> list[Document]:
  """The documents of "stdlib" or of comma-separated files, directories and .jsonl files."""
  if corpus == "stdlib":
    docs = _stdlib_documents()
  else:
    docs = [d for part in corpus.split(",") if part.strip()
            for d in _path_documents(Path(part.strip()).expanduser())]
  docs = [d for d in docs if d.text]
  if not docs:
    raise ValueError(f"data.corpus={corpus!r} holds no non-empty text document")
  return docs


def fingerprint(docs: Sequence[Document]) -> str:
  """sha256 of every document's path and bytes, in order: same corpus, same fingerprint."""
  h = hashlib.sha256()
  for doc in docs:
    h.update(doc.path.encode())
    h.update(b"\0")
    h.update(doc.text.encode("utf-8", errors="replace"))
    h.update(b"\0")
  return h.hexdigest()


def is_validation(path: str, val_fraction: float) -> bool:
  """A document's split depends on its path alone, so it never moves between train and val."""
  bucket = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big") / 2.0**64
  return bucket < val_fraction


def split_documents(docs: Sequence[Document], val_fraction: float):
  train = [d for d in docs if not is_validation(d.path, val_fraction)]
  val = [d for d in docs if is_validation(d.path, val_fraction)]
  if not train or not val:
    raise ValueError(
        f"the corpus has {len(docs)} document(s) and data.val_fraction={val_fraction} leaves "
        f"{len(train)} for training and {len(val)} for validation; both need at least one: "
        "add documents or change data.val_fraction")
  return train, val


# --- Tokenizers ----------------------------------------------------------------------------------


class ByteTokenizer:
  """UTF-8 bytes 0..255, then <pad>, <bos>, <eos>; nothing to train or download."""

  name = "byte"
  vocab_size = BYTE_VOCAB_SIZE
  eos_id = 256 + SPECIALS.index(EOS)

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class BPETokenizer:
  """Byte-level BPE trained locally with the `tokenizers` package, cached as JSON."""

  def __init__(self, tokenizer):
    self._tok = tokenizer
    self.vocab_size = tokenizer.get_vocab_size()
    self.eos_id = tokenizer.token_to_id(EOS)
    self.name = f"bpe{self.vocab_size}"

  @classmethod
  def train(cls, texts: Sequence[str], vocab_size: int) -> "BPETokenizer":
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return cls(tok)

  @classmethod
  def load(cls, path: Path) -> "BPETokenizer":
    from tokenizers import Tokenizer
    return cls(Tokenizer.from_file(str(path)))

  def save(self, path: Path) -> None:
    atomic_write_text(path, self._tok.to_str())

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text).ids, dtype=np.int32)

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids])


# --- Token cache ---------------------------------------------------------------------------------


@dataclasses.dataclass
class TokenData:
  """Train and validation token streams (memmaps; documents joined by <eos>) and their
  provenance."""

  train: np.ndarray
  val: np.ndarray
  vocab_size: int
  tokenizer: object
  fingerprint: str
  n_train_docs: int
  n_val_docs: int


def _encode_stream(docs: Sequence[Document], tokenizer, dtype) -> np.ndarray:
  parts = []
  for doc in docs:
    parts.append(tokenizer.encode(doc.text))
    parts.append(np.asarray([tokenizer.eos_id], dtype=np.int32))
  return np.concatenate(parts).astype(dtype)


def _get_tokenizer(cfg: DataConfig, train_docs, cache: Path, corpus_fp: str):
  if cfg.tokenizer == "byte":
    return ByteTokenizer()
  path = cache / "tokenizers" / f"{corpus_fp[:16]}-bpe{cfg.bpe_vocab_size}.json"
  if path.exists():
    return BPETokenizer.load(path)
  tokenizer = BPETokenizer.train([d.text for d in train_docs], cfg.bpe_vocab_size)
  tokenizer.save(path)
  return tokenizer


def load_tokens(cfg: DataConfig) -> TokenData:
  """Tokenizes the corpus once into a memmap cache (built in a temp dir, renamed into place)."""
  docs = load_documents(cfg.corpus)
  corpus_fp = fingerprint(docs)
  train_docs, val_docs = split_documents(docs, cfg.val_fraction)
  cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
  tokenizer = _get_tokenizer(cfg, train_docs, cache, corpus_fp)
  dtype = np.uint16 if tokenizer.vocab_size <= 65_536 else np.uint32
  entry = cache / "tokens" / f"{corpus_fp[:16]}-{tokenizer.name}-val{cfg.val_fraction}"
  if not (entry / "meta.json").exists():
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}."))
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
      _encode_stream(split_docs, tokenizer, dtype).tofile(tmp / f"{split}.bin")
    meta = {"format": _CACHE_FORMAT, "fingerprint": corpus_fp, "tokenizer": tokenizer.name,
            "vocab_size": tokenizer.vocab_size, "dtype": np.dtype(dtype).name,
            "n_train_docs": len(train_docs), "n_val_docs": len(val_docs)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
      os.replace(tmp, entry)
    except OSError:  # another process finished the same entry first
      shutil.rmtree(tmp, ignore_errors=True)
  meta = json.loads((entry / "meta.json").read_text())
  streams = {split: np.memmap(entry / f"{split}.bin", dtype=meta["dtype"], mode="r")
             for split in ("train", "val")}
  return TokenData(train=streams["train"], val=streams["val"], vocab_size=meta["vocab_size"],
                   tokenizer=tokenizer, fingerprint=corpus_fp,
                   n_train_docs=meta["n_train_docs"], n_val_docs=meta["n_val_docs"])


# --- Batches -------------------------------------------------------------------------------------


class PackedWindows:
  """Random-access source of non-overlapping windows of seq_len + 1 tokens (inputs and targets)."""

  def __init__(self, tokens: np.ndarray, seq_len: int):
    self._tokens, self._seq_len = tokens, seq_len
    self._n = (len(tokens) - 1) // seq_len

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> np.ndarray:
    start = index * self._seq_len
    return np.asarray(self._tokens[start:start + self._seq_len + 1], dtype=np.int32)


def _check_windows(windows: PackedWindows, need: int, split: str, seq_len: int) -> None:
  if len(windows) < need:
    raise ValueError(f"the {split} split holds {len(windows)} window(s) of seq_len+1="
                     f"{seq_len + 1} tokens but {need} are needed: use a larger corpus or a "
                     f"smaller train.batch_size / train.seq_len / train.eval_batches")


def train_batches(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """Endless shuffled batches (reshuffled every epoch); this process's rows of each global batch.

  Yields int32 arrays of shape [batch_size // process_count, seq_len + 1]. The iterator has
  get_state() / set_state() for exact resumption.
  """
  if batch_size % process_count:
    raise ValueError(f"train.batch_size={batch_size} must be divisible by the "
                     f"{process_count} processes")
  windows = PackedWindows(tokens, seq_len)
  _check_windows(windows, batch_size, "train", seq_len)
  local = batch_size // process_count
  lo = process_index * local
  ds = (grain.MapDataset.source(windows).shuffle(seed=seed).repeat()
        .batch(batch_size, drop_remainder=True).map(lambda b: b[lo:lo + local]))
  # Reading a batch is a few memmap slices: prefetch threads would cost more than they save.
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, n_batches: int,
                 process_index: int = 0, process_count: int = 1) -> list[np.ndarray]:
  """The same fixed validation batches at every evaluation: the first windows, in order."""
  windows = PackedWindows(tokens, seq_len)
  _check_windows(windows, batch_size, "validation", seq_len)
  n_batches = min(n_batches, len(windows) // batch_size)
  local = batch_size // process_count
  lo = process_index * local
  return [np.stack([windows[b * batch_size + lo + i] for i in range(local)])
          for b in range(n_batches)]
