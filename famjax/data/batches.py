"""Deterministic, resumable packed batches (grain) over a token stream: fixed windows of
seq_len + 1 tokens (inputs and targets) of the documents joined by EOS."""

from __future__ import annotations

import grain
import numpy as np


class PackedWindows:
  """Random-access source of non-overlapping windows of seq_len + 1 tokens."""

  def __init__(self, tokens, seq_len: int):
    self._tokens, self._seq_len = tokens, seq_len
    self._n = max(0, (len(tokens) - 1) // seq_len)

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> np.ndarray:
    start = int(index) * self._seq_len
    return np.asarray(self._tokens[start:start + self._seq_len + 1], dtype=np.int32)


def _check_windows(windows: PackedWindows, need: int, split: str, seq_len: int) -> None:
  if len(windows) < need:
    raise ValueError(f"the {split} split holds {len(windows)} window(s) of seq_len+1="
                     f"{seq_len + 1} tokens but {need} are needed: use a larger corpus or a "
                     f"smaller train.batch_size / train.seq_len / train.eval_batches")


def _local_rows(batch_size: int, process_index: int, process_count: int) -> slice:
  if batch_size % process_count:
    raise ValueError(f"train.batch_size={batch_size} must be divisible by the "
                     f"{process_count} processes")
  local = batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def train_batches(tokens, seq_len: int, batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> grain.DatasetIterator:
  """Endless shuffled batches (reshuffled every epoch): this process's rows of each global batch,
  int32 [batch_size // process_count, seq_len + 1]. The global batch is shuffled as window
  indices, and a process reads only its own rows' windows. The iterator has get_state() /
  set_state() for exact resumption."""
  rows = _local_rows(batch_size, process_index, process_count)
  windows = PackedWindows(tokens, seq_len)
  _check_windows(windows, batch_size, "train", seq_len)
  ds = (grain.MapDataset.range(len(windows)).shuffle(seed=seed).repeat()
        .batch(batch_size, drop_remainder=True)
        .map(lambda index_B: np.stack([windows[i] for i in index_B[rows]])))
  # Reading a batch is a few memmap slices: prefetch threads would cost more than they save.
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def eval_batches(tokens, seq_len: int, batch_size: int, n_batches: int, process_index: int = 0,
                 process_count: int = 1) -> list[np.ndarray]:
  """The same fixed validation batches at every evaluation: the first windows, in order."""
  rows = _local_rows(batch_size, process_index, process_count)
  windows = PackedWindows(tokens, seq_len)
  _check_windows(windows, batch_size, "validation", seq_len)
  n_batches = min(n_batches, len(windows) // batch_size)
  return [np.stack([windows[b * batch_size + i] for i in range(rows.start, rows.stop)])
          for b in range(n_batches)]
