"""A corpus's tokens for a run: the store built (or opened) for cfg.data with its tokenizer.
`load_tokens(cfg.data)` is the door."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from absl import logging

from famjax.common.files import default_cache_dir
from famjax.data import sources, store, tokenizers
from famjax.data.config import DataConfig


@dataclasses.dataclass
class TokenData:
  """Train and validation token streams (memory-mapped; documents joined by EOS) and their
  provenance."""

  train: store.TokenStream
  val: store.TokenStream
  vocab_size: int
  tokenizer: object
  fingerprint: str  # of every document's text, in corpus order (store._Fingerprint)
  n_train_docs: int
  n_val_docs: int
  store: Path


def cache_root(cfg: DataConfig) -> Path:
  return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()


def bpe_sample(source: sources.Source, val_fraction: float, max_bytes: int):
  """Training documents in corpus order up to max_bytes of text: the local BPE's sample."""
  seen = 0
  for unit in source.units:
    for text in sources.read(unit, source.text_field):
      if not text or store.is_validation(store.document_digest(text), val_fraction):
        continue
      yield text
      seen += len(text.encode("utf-8", errors="replace"))
      if seen >= max_bytes:
        return


def _local_bpe(cfg: DataConfig, source: sources.Source, root: Path):
  name = (f"{source.key[:16]}-bpe{cfg.bpe_vocab_size}-{cfg.bpe_sample_mb}mb-"
          f"val{cfg.val_fraction}")
  saved = root / "tokenizers" / name
  if (saved / tokenizers.SAVED_NAME / "meta.json").exists():
    return tokenizers.load(saved)
  logging.info("training a %d-token BPE on the first %d MB of training documents",
           cfg.bpe_vocab_size, cfg.bpe_sample_mb)
  tok = tokenizers.HFTokenizer.train_bpe(
      bpe_sample(source, cfg.val_fraction, cfg.bpe_sample_mb << 20), cfg.bpe_vocab_size)
  tokenizers.save(tok, saved)
  return tok


def tokenizer_for(cfg: DataConfig, source: sources.Source | None = None):
  """The tokenizer data.tokenizer names ("bpe" trains on, or reuses its cached, sample)."""
  if cfg.tokenizer == "byte":
    return tokenizers.ByteTokenizer()
  if cfg.tokenizer == "bpe":
    return _local_bpe(cfg, source or sources.from_corpus(cfg.corpus, cfg.text_field),
                      cache_root(cfg))
  return tokenizers.from_file(cfg.tokenizer, cfg.eos_token)


def load_tokens(cfg: DataConfig, progress: bool = True) -> TokenData:
  """The corpus's token store, built (or finished, after an interruption) on first use."""
  source = sources.from_corpus(cfg.corpus, cfg.text_field)
  tokenizer = tokenizer_for(cfg, source)
  out = store.directory(cache_root(cfg), source, tokenizer, cfg.val_fraction)
  store.build(source, tokenizer, cfg.val_fraction, out, cfg.num_workers, progress)
  return open_store(out, tokenizer)


def open_store(directory: Path, tokenizer) -> TokenData:
  index = json.loads((directory / "index.json").read_text())
  streams = {s: store.TokenStream(directory, index["shards"][s], index["dtype"])
             for s in store.SPLITS}
  return TokenData(streams["train"], streams["val"], index["vocab_size"], tokenizer,
                   index["fingerprint"], index["docs"]["train"], index["docs"]["val"], directory)
