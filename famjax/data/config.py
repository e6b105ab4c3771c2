"""DataConfig: where the text comes from, how it is tokenized and where the token cache lives."""

from __future__ import annotations

import dataclasses

from famjax.common.fields import require

TOKENIZERS = ("byte", "bpe")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the text comes from, how it is tokenized and where the token cache lives."""

  # "stdlib", or comma-separated local files, directories and glob patterns: parquet, arrow,
  # jsonl / json (.gz, .zst), UTF-8 text (a document per file), save_to_disk directories
  corpus: str = "stdlib"
  text_field: str = "text"  # the column (field) holding each record's text
  # "byte", "bpe" (trained locally on bpe_sample_mb of training text), or a path to a pretrained
  # Hugging Face tokenizer.json or sentencepiece .model
  tokenizer: str = "byte"
  bpe_vocab_size: int = 4096  # vocabulary of the local BPE tokenizer, specials included
  bpe_sample_mb: int = 100  # the local BPE trains on the first this many MB of training text
  eos_token: str = ""  # end-of-document token of a pretrained tokenizer; "": its own EOS
  val_fraction: float = 0.01  # share of documents (by a hash of their text) held out
  num_workers: int = 0  # tokenizer processes; 0: all cores
  cache_dir: str = ""  # token store and local tokenizers; "" = ~/.cache/famjax

  def __post_init__(self):
    require(isinstance(self.corpus, str) and self.corpus.strip() != "", "data.corpus",
             '"stdlib" or a comma-separated list of local paths or patterns', self.corpus)
    require(isinstance(self.text_field, str) and self.text_field != "", "data.text_field",
             "a column name", self.text_field)
    require(isinstance(self.tokenizer, str)
             and (self.tokenizer in TOKENIZERS or self.tokenizer.endswith((".json", ".model"))),
             "data.tokenizer", f"one of {TOKENIZERS} or a path to a tokenizer.json or a "
             "sentencepiece .model", self.tokenizer)
    require(isinstance(self.bpe_vocab_size, int) and 260 <= self.bpe_vocab_size <= 65_535,
             "data.bpe_vocab_size", "an integer in 260..65535", self.bpe_vocab_size)
    require(isinstance(self.bpe_sample_mb, int) and self.bpe_sample_mb >= 1,
             "data.bpe_sample_mb", "a positive integer", self.bpe_sample_mb)
    require(0.0 < self.val_fraction < 0.5, "data.val_fraction", "in (0, 0.5)",
             self.val_fraction)
    require(isinstance(self.num_workers, int) and self.num_workers >= 0, "data.num_workers",
             "0 (all cores) or a positive integer", self.num_workers)
