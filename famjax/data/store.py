"""The sharded token store: a corpus tokenized once, in parallel worker processes, into raw token
shards memory-mapped by the loader.

Each unit of the source (sources.Unit) becomes, in one worker, its train and validation token
streams (documents joined by EOS, each split cut into shards of at most SHARD_TOKENS tokens) and
a small record of what it holds; that record is written last, so a killed tokenization resumes
from its finished units and ends byte-identical to an uninterrupted one. index.json, written when
every unit is done, lists the shards in corpus order. The store's directory is keyed by the
source's key, the tokenizer's digest and the validation share, so a change to any of them builds
a new store. docs/data.md says why the shards are raw memmaps rather than array_record.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from famjax.common.files import atomic_write_text
from famjax.data import sources, tokenizers

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the worker processes are the parallelism
FORMAT = 2
SHARD_TOKENS = 1 << 25  # 64 MiB of uint16 tokens per shard at most
_FLUSH_TOKENS = 1 << 20  # a worker buffers about this many tokens before writing them
_ENCODE_BYTES = 1 << 22  # documents are encoded in batches of about this much text
SPLITS = ("train", "val")


def document_digest(text: str) -> bytes:
  """sha256 of a document's UTF-8 text: its split and its share of the fingerprint."""
  return hashlib.sha256(text.encode("utf-8", errors="replace")).digest()


def is_validation(digest: bytes, val_fraction: float) -> bool:
  """A document's split depends on its text alone (sha256): the same document lands on the same
  side in every source kind, and duplicates never straddle the split."""
  return int.from_bytes(digest[:8], "big") / 2.0**64 < val_fraction


# The corpus fingerprint: a polynomial hash of the documents' sha256 digests, in order, modulo
# the Mersenne prime 2^127 - 1. Unlike a hash of the stream, it composes across units, so the
# same documents split into other units (another source kind) give the same fingerprint.
_PRIME = (1 << 127) - 1
_BASE = 0x5DEECE66D1F3A9B7C2E4810F6A5D3C1B % _PRIME


class _Fingerprint:
  def __init__(self, value: int = 0, count: int = 0):
    self.value, self.count = value, count

  def add(self, digest: bytes) -> None:
    self.value = (self.value * _BASE + int.from_bytes(digest[:16], "big")) % _PRIME
    self.count += 1

  def extend(self, value: int, count: int) -> None:
    self.value = (self.value * pow(_BASE, count, _PRIME) + value) % _PRIME
    self.count += count


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype("<u2" if vocab_size <= 65_536 else "<u4")


def directory(root: Path, source: sources.Source, tokenizer, val_fraction: float) -> Path:
  key = hashlib.sha256(f"{FORMAT}\0{source.key}\0{tokenizers.digest(tokenizer)}\0"
                       f"{val_fraction!r}".encode()).hexdigest()
  return root / "store" / f"{tokenizer.name}-{key[:20]}"


@dataclasses.dataclass(frozen=True)
class _Task:
  """What a worker needs for one unit (picklable: the tokenizer travels serialized)."""

  unit: sources.Unit
  index: int
  text_field: str
  val_fraction: float
  tokenizer: tuple  # (file name, serialized bytes, name, eos id)
  out: str


class _ShardWriter:
  """Appends one split's tokens to shards of at most SHARD_TOKENS, each under a temporary name
  until the unit is done."""

  def __init__(self, out: Path, stem: str, dtype: np.dtype):
    self.out, self.stem, self.dtype = out, stem, dtype
    self.shards: list[tuple[str, int]] = []  # (file name, tokens)
    self._pending: list[np.ndarray] = []
    self._pending_n = 0
    self._file = None

  def add(self, ids: np.ndarray) -> None:
    self._pending.append(ids)
    self._pending_n += len(ids)
    if self._pending_n >= _FLUSH_TOKENS:
      self._flush()

  def _flush(self) -> None:
    tokens = np.concatenate(self._pending).astype(self.dtype) if self._pending else None
    self._pending, self._pending_n = [], 0
    while tokens is not None and len(tokens):
      if self._file is None or self.shards[-1][1] == SHARD_TOKENS:
        self._open_next()
      room = SHARD_TOKENS - self.shards[-1][1]
      self._file.write(tokens[:room].tobytes())
      name, n = self.shards[-1]
      self.shards[-1] = (name, n + min(room, len(tokens)))
      tokens = tokens[room:]

  def _open_next(self) -> None:
    if self._file is not None:
      self._file.close()
    name = f"{self.stem}-{len(self.shards):04d}.bin"
    self.shards.append((name, 0))
    self._file = open(self.out / _temporary(name), "wb")

  def close(self) -> list[tuple[str, int]]:
    self._flush()
    if self._file is not None:
      self._file.close()
    for name, _ in self.shards:
      os.replace(self.out / _temporary(name), self.out / name)
    return self.shards


def _temporary(name: str) -> str:
  return f".{name}.{os.getpid()}.tmp"


def tokenize_unit(task: _Task) -> dict:
  """Tokenizes one unit into its shards and writes its record; returns the record."""
  tok = tokenizers.rebuild(*task.tokenizer)
  out = Path(task.out)
  dtype = token_dtype(tok.vocab_size)
  writers = {s: _ShardWriter(out, f"u{task.index:06d}-{s}", dtype) for s in SPLITS}
  docs = dict.fromkeys(SPLITS, 0)
  content = _Fingerprint()
  eos = np.asarray([tok.eos_id], np.int64)
  batch, batch_bytes = [], 0

  def encode():
    for text, ids in zip(batch, tok.encode_batch(batch)):
      digest = document_digest(text)
      content.add(digest)
      split = "val" if is_validation(digest, task.val_fraction) else "train"
      docs[split] += 1
      writers[split].add(np.concatenate([ids, eos]))
    batch.clear()

  for text in sources.read(task.unit, task.text_field):
    if text:
      batch.append(text)
      batch_bytes += len(text)
    if batch_bytes >= _ENCODE_BYTES:
      encode()
      batch_bytes = 0
  encode()
  record = {"unit": task.unit.describe(), "docs": docs, "content": f"{content.value:032x}",
            "shards": {s: writers[s].close() for s in SPLITS}}
  atomic_write_text(out / f"u{task.index:06d}.json", json.dumps(record))
  return record


def _remove_stale_temporaries(out: Path) -> None:
  """Removes the temporary shards of processes that died mid-unit."""
  for tmp in out.glob(".*.tmp"):
    pid = int(tmp.name.rsplit(".", 2)[-2])
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      tmp.unlink(missing_ok=True)
    except PermissionError:
      pass


def default_workers() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def build(source: sources.Source, tokenizer, val_fraction: float, out: Path,
          num_workers: int = 0, progress: bool = True) -> Path:
  """Tokenizes the units not yet done into `out` with num_workers processes (0: all cores),
  then writes index.json. Returns `out`."""
  if (out / "index.json").exists():
    return out
  out.mkdir(parents=True, exist_ok=True)
  tokenizers.save(tokenizer, out)
  _remove_stale_temporaries(out)
  spec = (tokenizer.file_name, tokenizer.serialized(), tokenizer.name, tokenizer.eos_id)
  tasks = [_Task(u, i, source.text_field, val_fraction, spec, str(out))
           for i, u in enumerate(source.units) if not (out / f"u{i:06d}.json").exists()]
  workers = min(num_workers or default_workers(), len(tasks))
  bar = tqdm(total=len(source.units), initial=len(source.units) - len(tasks), unit="unit",
             desc=f"tokenize ({max(workers, 1)} worker{'s' * (workers > 1)})",
             disable=not progress or not tasks, dynamic_ncols=True)
  with bar:
    if workers <= 1:
      for task in tasks:
        tokenize_unit(task)
        bar.update()
    else:
      context = multiprocessing.get_context("spawn")  # the parent may run JAX's threads
      with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        for _ in pool.map(tokenize_unit, tasks):
          bar.update()
  _write_index(source, tokenizer, val_fraction, out)
  return out


def _write_index(source, tokenizer, val_fraction: float, out: Path) -> None:
  records = [json.loads((out / f"u{i:06d}.json").read_text()) for i in range(len(source.units))]
  docs = {s: sum(r["docs"][s] for r in records) for s in SPLITS}
  if not docs["train"] + docs["val"]:
    raise ValueError(f"data.corpus={source.corpus!r} holds no non-empty text document")
  if not docs["train"] or not docs["val"]:
    raise ValueError(
        f"the corpus has {docs['train'] + docs['val']} document(s) and data.val_fraction="
        f"{val_fraction} leaves {docs['train']} for training and {docs['val']} for validation; "
        "both need at least one: add documents or change data.val_fraction")
  content = _Fingerprint()
  for r in records:
    content.extend(int(r["content"], 16), sum(r["docs"].values()))
  fingerprint = f"{content.value:032x}"
  index = {"format": FORMAT, "corpus": source.corpus, "text_field": source.text_field,
           "fingerprint": fingerprint, "tokenizer": tokenizer.name,
           "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
           "dtype": token_dtype(tokenizer.vocab_size).str, "val_fraction": val_fraction,
           "docs": docs, "tokens": {s: sum(n for r in records for _, n in r["shards"][s])
                                    for s in SPLITS},
           "shards": {s: [sh for r in records for sh in r["shards"][s]] for s in SPLITS}}
  atomic_write_text(out / "index.json", json.dumps(index))


class TokenStream:
  """One split of a store as one random-access token sequence over its memory-mapped shards."""

  def __init__(self, directory: Path, shards: list[tuple[str, int]], dtype: str):
    self._paths = [directory / name for name, _ in shards]
    self._ends = np.cumsum([n for _, n in shards], dtype=np.int64)
    self._dtype = np.dtype(dtype)
    self._maps: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def _shard(self, i: int) -> np.ndarray:
    if i not in self._maps:
      self._maps[i] = np.memmap(self._paths[i], dtype=self._dtype, mode="r")
    return self._maps[i]

  def __getitem__(self, window: slice) -> np.ndarray:
    start, stop, step = window.indices(len(self))
    if step != 1:
      raise IndexError("a TokenStream is read in contiguous slices")
    pieces, i = [], int(np.searchsorted(self._ends, start, side="right"))
    while start < stop:
      begin = int(self._ends[i - 1]) if i else 0
      end = min(stop, int(self._ends[i]))
      pieces.append(self._shard(i)[start - begin:end - begin])
      start, i = end, i + 1
    if len(pieces) == 1:
      return np.asarray(pieces[0])
    return np.concatenate(pieces) if pieces else np.zeros(0, self._dtype)

  def __array__(self, dtype=None, copy=None):
    whole = self[:]
    return whole if dtype is None else whole.astype(dtype)
