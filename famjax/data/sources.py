"""Corpus sources: what `data.corpus` names, planned as units (a file, a group of text files or a
range of rows of a saved dataset) that a tokenizer worker reads on its own, streamed through
Hugging Face `datasets` so that no unit is ever held whole in memory.

Kinds, by file name: parquet, arrow, jsonl / json (also .gz, .zst), any other UTF-8 text file (one
document per file), and a directory written by `datasets.Dataset.save_to_disk`. Nothing is
downloaded: a name that is not a local path is refused.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # famjax never downloads
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TEXT_UNIT_BYTES = 16 << 20  # text files are grouped into units of about this many bytes
SAVED_UNIT_ROWS = 100_000  # rows of a saved dataset per unit
_BUILDERS = {"parquet": "parquet", "arrow": "arrow", "json": "json", "text": "text"}
_COMPRESSED = (".gz", ".zst")
_SNIFF_BYTES = 8192


@dataclasses.dataclass(frozen=True)
class Unit:
  """A piece of the corpus read by one worker: `paths` of one kind, or rows [start, stop) of the
  saved dataset at paths[0]."""

  kind: str  # "parquet", "arrow", "json", "text" or "saved"
  paths: tuple[str, ...]
  rows: tuple[int, int] | None = None

  def describe(self) -> str:
    where = self.paths[0] if len(self.paths) == 1 else f"{self.paths[0]} (+{len(self.paths) - 1})"
    return where if self.rows is None else f"{where} rows {self.rows[0]}..{self.rows[1]}"


@dataclasses.dataclass(frozen=True)
class Source:
  """A planned corpus: its units in order, and a key that changes when any of its files does."""

  corpus: str
  text_field: str
  units: tuple[Unit, ...]
  key: str


def stdlib_root() -> Path:
  return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
  root = stdlib_root()
  return sorted(p for p in root.rglob("*.py")
                if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts))


def _kind(path: Path) -> str:
  """The kind of one file, from its name (and, for text, its first bytes)."""
  name = path.name.lower()
  base = name[: -len(s)] if (s := next((c for c in _COMPRESSED if name.endswith(c)), "")) else name
  if base.endswith(".parquet") and not s:
    return "parquet"
  if base.endswith(".arrow") and not s:
    return "arrow"
  if base.endswith((".jsonl", ".json", ".ndjson")):
    return "json"
  if s:
    raise ValueError(f"data.corpus: {path}: a compressed file of unknown kind (compressed files "
                     "must be .jsonl.gz, .jsonl.zst, .json.gz or .json.zst)")
  with path.open("rb") as f:
    head = f.read(_SNIFF_BYTES)
  if b"\0" in head:  # text may hold invalid UTF-8 (read as U+FFFD), never NUL
    raise ValueError(f"data.corpus: {path}: a binary file of unknown kind (famjax reads parquet, "
                     "arrow, jsonl/json (.gz, .zst), UTF-8 text and save_to_disk directories)")
  return "text"


def _is_saved_dataset(path: Path) -> bool:
  return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _expand(part: str) -> list[Path]:
  """The files (or saved-dataset directories) one comma-separated part of data.corpus names."""
  path = Path(part).expanduser()
  if glob.has_magic(part):
    matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
    files = [p for p in matches if p.is_file() or _is_saved_dataset(p)]
    if not files:
      raise FileNotFoundError(f"data.corpus: the pattern {part!r} matches no file")
    return files
  if not path.exists():
    raise FileNotFoundError(
        f"data.corpus: {part!r} is not a local file, directory or pattern; famjax never "
        "downloads: fetch a hub dataset first (e.g. datasets.load_dataset(...).save_to_disk(DIR) "
        "or `huggingface-cli download --repo-type dataset NAME --local-dir DIR`) and pass DIR")
  if path.is_file() or _is_saved_dataset(path):
    return [path]
  return _walk(path)


def _walk(directory: Path) -> list[Path]:
  """Files under a directory in name order, hidden ones left out; a saved dataset inside it is
  one entry."""
  found = []
  for entry in sorted(directory.iterdir()):
    if entry.name.startswith("."):
      continue
    if entry.is_dir():
      found += [entry] if _is_saved_dataset(entry) else _walk(entry)
    elif entry.is_file():
      found.append(entry)
  return found


def _saved_rows(path: Path) -> int:
  import datasets
  return datasets.load_from_disk(str(path)).num_rows


def _units(files: list[Path]) -> list[Unit]:
  units, text, text_bytes = [], [], 0
  for file in files:
    if file.is_dir():
      n = _saved_rows(file)
      units += [Unit("saved", (str(file),), (a, min(n, a + SAVED_UNIT_ROWS)))
                for a in range(0, n, SAVED_UNIT_ROWS)]
      continue
    kind = _kind(file)
    if kind != "text":
      units.append(Unit(kind, (str(file),)))
      continue
    text.append(str(file))
    text_bytes += file.stat().st_size
    if text_bytes >= TEXT_UNIT_BYTES:
      units.append(Unit("text", tuple(text)))
      text, text_bytes = [], 0
  if text:
    units.append(Unit("text", tuple(text)))
  return units


def _stat_key(files: list[Path]) -> str:
  """Changes when a file is added, removed, resized or rewritten (its mtime)."""
  h = hashlib.sha256()
  for file in files:
    for f in sorted(file.rglob("*")) if file.is_dir() else [file]:
      if f.is_file():
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return h.hexdigest()


def from_corpus(corpus: str, text_field: str = "text") -> Source:
  """The units of "stdlib" or of comma-separated files, directories and glob patterns."""
  if corpus == "stdlib":
    files = stdlib_files()
  else:
    files = [f for part in corpus.split(",") if part.strip() for f in _expand(part.strip())]
  units = tuple(_units(files))
  if not units:
    raise ValueError(f"data.corpus={corpus!r} holds no file")
  key = hashlib.sha256(json.dumps([corpus, text_field, _stat_key(files)]).encode()).hexdigest()
  return Source(corpus, text_field, units, key)


def _records(unit: Unit):
  import datasets
  datasets.disable_progress_bars()
  if unit.kind == "saved":
    return datasets.load_from_disk(unit.paths[0]).select(range(*unit.rows))
  extra = (dict(sample_by="document", encoding_errors="replace") if unit.kind == "text"
           else {})
  return datasets.load_dataset(_BUILDERS[unit.kind], data_files=list(unit.paths), split="train",
                               streaming=True, **extra)


def read(unit: Unit, text_field: str) -> Iterator[str]:
  """The unit's documents in order; a missing or non-string field, or an unreadable file, is a
  one-line ValueError naming the file (and the record, counted from 1)."""
  field = "text" if unit.kind == "text" else text_field
  row = 0
  try:
    for row, record in enumerate(_records(unit), start=1):
      text = record.get(field)
      if not isinstance(text, str):
        where = _where(unit, row)
        raise ValueError(f"data.corpus: {where} has no string field {field!r} (data.text_field; "
                         f"its fields: {sorted(record)})")
      yield text
  except ValueError as e:
    if str(e).startswith("data.corpus:"):
      raise
    raise _unreadable(unit, row, e) from None
  except Exception as e:  # noqa: BLE001 (datasets, pyarrow, gzip, zstd all raise their own)
    raise _unreadable(unit, row, e) from None


def _where(unit: Unit, row: int) -> str:
  if unit.kind == "text":
    return unit.paths[row - 1]
  first = unit.rows[0] if unit.rows else 0
  return f"{unit.paths[0]} record {first + row}"


def _unreadable(unit: Unit, row: int, e: Exception) -> ValueError:
  message = " ".join(str(e).split())[:300]
  return ValueError(f"data.corpus: {unit.describe()}: cannot be read as {unit.kind} after record "
                    f"{row} ({type(e).__name__}: {message})")
