"""Tokenizers: bytes, a BPE trained locally on a bounded sample, or a pretrained Hugging Face
`tokenizer.json` or sentencepiece `.model`. Each one saves itself into a directory (a run's
workdir, a study) and loads back from it alone, without the corpus."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from famjax.common.files import atomic_write_text

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIALS = (PAD, BOS, EOS)
BYTE_VOCAB_SIZE = 256 + len(SPECIALS)
# Tried in order when data.eos_token is "": the end-of-text token of common tokenizers.
EOS_NAMES = (EOS, "</s>", "<|endoftext|>", "<|end_of_text|>", "<|eos|>", "<|im_end|>")
BOS_NAMES = (BOS, "<s>", "<|begin_of_text|>", "<|startoftext|>", "<|bos|>")
SAVED_NAME = "tokenizer"  # the directory inside a workdir or study


class ByteTokenizer:
  """UTF-8 bytes 0..255, then <pad>, <bos>, <eos>; nothing to train or download."""

  name = "byte"
  vocab_size = BYTE_VOCAB_SIZE
  eos_id = 256 + SPECIALS.index(EOS)
  bos_id = 256 + SPECIALS.index(BOS)
  file_name = "byte.json"

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

  def serialized(self) -> bytes:
    return json.dumps({"kind": "byte", "vocab_size": self.vocab_size}).encode()


class HFTokenizer:
  """A Hugging Face `tokenizers` tokenizer: pretrained (tokenizer.json) or the local BPE."""

  file_name = "tokenizer.json"

  def __init__(self, tokenizer, name: str, eos_token: str = "", eos_id: int | None = None):
    self._tok = tokenizer
    self.name = name
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    self.eos_id = eos_id if eos_id is not None else _special_id(
        tokenizer.token_to_id, eos_token, EOS_NAMES, name, "eos")
    self.bos_id = _special_id(tokenizer.token_to_id, "", BOS_NAMES, name, None)

  @classmethod
  def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> "HFTokenizer":
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return cls(tok, f"bpe{tok.get_vocab_size()}")

  @classmethod
  def from_bytes(cls, raw: bytes, name: str, eos_token: str = "", eos_id: int | None = None):
    from tokenizers import Tokenizer
    return cls(Tokenizer.from_str(raw.decode("utf-8")), name, eos_token, eos_id)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, dtype=np.int32)
            for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids])

  def token_text(self, token_id: int) -> str | None:
    return self._tok.id_to_token(int(token_id))

  def serialized(self) -> bytes:
    return self._tok.to_str().encode("utf-8")


class SentencePieceTokenizer:
  """A sentencepiece model (.model), used as trained elsewhere."""

  file_name = "tokenizer.model"

  def __init__(self, raw: bytes, name: str, eos_token: str = "", eos_id: int | None = None):
    import sentencepiece as spm
    self._raw = raw
    self._sp = spm.SentencePieceProcessor(model_proto=raw)
    self.name = name
    self.vocab_size = self._sp.get_piece_size()
    own = lambda i: i if i >= 0 else None
    if eos_id is not None:
      self.eos_id = eos_id
    elif eos_token:
      self.eos_id = _special_id(self._piece_id, eos_token, (), name, "eos")
    elif (eos := own(self._sp.eos_id())) is None:
      raise ValueError(f"data.tokenizer: {name} has no EOS piece; name one with data.eos_token")
    else:
      self.eos_id = eos
    self.bos_id = own(self._sp.bos_id())

  def _piece_id(self, piece: str):
    i = self._sp.piece_to_id(piece)
    return None if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i) else i

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=np.int32) for ids in self._sp.encode(list(texts))]

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])

  def token_text(self, token_id: int) -> str | None:
    return self._sp.id_to_piece(int(token_id))

  def serialized(self) -> bytes:
    return self._raw


def _special_id(token_to_id, configured: str, names: Sequence[str], tokenizer: str, which):
  """The id of `configured`, else of the first of `names` the vocabulary has. which="eos" makes a
  missing token an error (documents are joined with it)."""
  candidates = (configured,) if configured else names
  for token in candidates:
    if (i := token_to_id(token)) is not None:
      return int(i)
  if which is None:
    return None
  if configured:
    raise ValueError(f"data.eos_token={configured!r} is not in the vocabulary of {tokenizer}")
  raise ValueError(f"data.tokenizer: {tokenizer} has none of the EOS tokens {list(names)}; name "
                   "its end-of-document token with data.eos_token")


def digest(tokenizer) -> str:
  """sha256 of what the tokenizer is: its serialized form and its EOS."""
  return hashlib.sha256(tokenizer.serialized() + f"\0{tokenizer.eos_id}".encode()).hexdigest()


def from_file(path: str | Path, eos_token: str = ""):
  """A pretrained tokenizer: a Hugging Face tokenizer.json or a sentencepiece .model."""
  path = Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"data.tokenizer: {path} does not exist (a tokenizer.json or a "
                            "sentencepiece .model; nothing is downloaded)")
  raw = path.read_bytes()
  name = f"{path.name}-{hashlib.sha256(raw).hexdigest()[:8]}"
  try:
    if path.suffix == ".model":
      return SentencePieceTokenizer(raw, name, eos_token)
    return HFTokenizer.from_bytes(raw, name, eos_token)
  except ValueError as e:
    if str(e).startswith("data."):
      raise
    raise ValueError(f"data.tokenizer: {path} does not load as a "
                     f"{'sentencepiece model' if path.suffix == '.model' else 'tokenizer.json'} "
                     f"({' '.join(str(e).split())[:200]})") from None
  except Exception as e:  # noqa: BLE001 (the Rust and C++ libraries raise their own)
    raise ValueError(f"data.tokenizer: {path} does not load ({type(e).__name__}: "
                     f"{' '.join(str(e).split())[:200]})") from None


def save(tokenizer, directory: str | Path) -> Path:
  """Writes the tokenizer into directory/tokenizer/ (whole or not at all; kept if the same
  tokenizer is already there, replaced if another is)."""
  out = Path(directory) / SAVED_NAME
  meta = {"name": tokenizer.name, "file": tokenizer.file_name, "eos_id": tokenizer.eos_id,
          "vocab_size": tokenizer.vocab_size, "digest": digest(tokenizer)}
  saved = lambda: json.loads((out / "meta.json").read_text()).get("digest")
  if (out / "meta.json").exists() and saved() == meta["digest"]:
    return out
  tmp = out.with_name(f".{SAVED_NAME}.{os.getpid()}.tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  (tmp / tokenizer.file_name).write_bytes(tokenizer.serialized())
  atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1))
  shutil.rmtree(out, ignore_errors=True)
  try:
    tmp.rename(out)
  except OSError:  # another process saved one first
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def load(directory: str | Path):
  """The tokenizer saved in directory/tokenizer/ (a run's workdir or a study)."""
  saved = Path(directory) / SAVED_NAME
  if not (saved / "meta.json").exists():
    raise FileNotFoundError(f"{directory} has no saved tokenizer ({SAVED_NAME}/meta.json)")
  meta = json.loads((saved / "meta.json").read_text())
  return rebuild(meta["file"], (saved / meta["file"]).read_bytes(), meta["name"], meta["eos_id"])


def rebuild(file_name: str, raw: bytes, name: str, eos_id: int):
  """The tokenizer again from its serialized form (a saved copy, or what a worker receives)."""
  if file_name == ByteTokenizer.file_name:
    return ByteTokenizer()
  if file_name == SentencePieceTokenizer.file_name:
    return SentencePieceTokenizer(raw, name, eos_id=eos_id)
  return HFTokenizer.from_bytes(raw, name, eos_id=eos_id)
