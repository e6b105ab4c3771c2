"""Corpora in, packed batches out: sources (sources.py), tokenizers (tokenizers.py), the sharded
token store (store.py), a run's tokens (token_data.py) and grain batches (batches.py).
`data.load_tokens(cfg.data)` is the door; the names below are the package's public face."""

from famjax.data.batches import PackedWindows, eval_batches, train_batches
from famjax.data.token_data import (
                                    TokenData,
                                    bpe_sample,
                                    cache_root,
                                    load_tokens,
                                    open_store,
                                    tokenizer_for,
)
from famjax.data.tokenizers import BYTE_VOCAB_SIZE, ByteTokenizer, HFTokenizer
from famjax.data.tokenizers import load as load_tokenizer
from famjax.data.tokenizers import save as save_tokenizer

__all__ = ["PackedWindows", "eval_batches", "train_batches", "TokenData", "bpe_sample",
           "cache_root", "load_tokens", "open_store", "tokenizer_for", "BYTE_VOCAB_SIZE",
           "ByteTokenizer", "HFTokenizer", "load_tokenizer", "save_tokenizer"]
