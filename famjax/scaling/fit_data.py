"""Reading and validating fit data (CSV, JSONL, parquet), and Epoch AI's Chinchilla table.

Validation takes a pandas DataFrame or any mapping of columns; only reading a file needs pandas
(imported then), so that the fitter imports without it."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from famjax.scaling.laws import Law


def read_table(path: str | Path):
  """A table of runs (a pandas DataFrame) from CSV, JSONL or parquet; errors name the file."""
  import pandas as pd
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist")
  readers = {".csv": pd.read_csv, ".jsonl": lambda p: pd.read_json(p, lines=True),
             ".parquet": pd.read_parquet}
  if path.suffix not in readers:
    raise ValueError(f"{path} must end in one of {sorted(readers)}")
  try:
    frame = readers[path.suffix](path)
  except (ValueError, OSError) as e:  # pandas' EmptyDataError and parser errors are ValueErrors
    raise ValueError(f"{path} is not a readable {path.suffix[1:]} table: {e}") from None
  if frame.empty:
    raise ValueError(f"{path} holds no rows")
  return frame


def _numbers(values) -> np.ndarray:
  """float64 values; entries that are not numbers become nan (as pandas' to_numeric coerces)."""
  try:
    return np.asarray(values, np.float64)
  except (TypeError, ValueError):
    def number(v):
      try:
        return float(v)
      except (TypeError, ValueError):
        return np.nan
    return np.array([number(v) for v in values], np.float64)


def validate(frame, law: Law, *, source: str = "the data") -> dict[str, np.ndarray]:
  """The law's columns as float64 arrays; every problem is an error naming its rows or columns.

  Refused: missing or non-positive values, too few rows, a variable the law needs that does not
  vary (N and D; G for the familial law; the exit's upstream and downstream counts P = exit - 1
  and Q = G - exit for the branch law), and a non-integer G or exit. Exact duplicate rows are
  allowed, with a warning: each counts as a separate run and narrows the intervals.
  """
  needed = ("loss",) + law.columns
  found = list(frame.columns if hasattr(frame, "columns") else frame)
  missing = [c for c in needed if c not in found]
  if missing:
    raise ValueError(f"the {law.name} law needs columns {list(needed)}; {source} lacks {missing} "
                     f"(found {found})")
  columns = {}
  for name in needed:
    values = _numbers(frame[name])
    bad = np.flatnonzero(~np.isfinite(values) | (values <= 0))
    if bad.size:
      raise ValueError(f"column {name!r} must be finite and > 0; rows {bad[:10].tolist()}"
                       f"{' ...' if bad.size > 10 else ''} are not")
    if name in ("G", "exit"):
      bad = np.flatnonzero(values != np.round(values))
      if bad.size:
        raise ValueError(f"column {name!r} must hold integers; rows {bad[:10].tolist()} do not")
    columns[name] = values
  n_rows = len(columns["loss"])
  if n_rows < len(law.param_names) + 1:
    raise ValueError(f"the {law.name} law has {len(law.param_names)} parameters; {n_rows} "
                     f"rows are too few to fit it (need at least {len(law.param_names) + 1})")
  if law.max_G is not None:
    bad = np.flatnonzero(columns["G"] > law.max_G)
    if bad.size:
      raise ValueError(f"the {law.name} law sums over at most {law.max_G} exits: column 'G' must "
                       f"be in 1..{law.max_G}; rows {bad[:10].tolist()} are not")
  if "exit" in law.columns:
    bad = np.flatnonzero(columns["exit"] > columns["G"])
    if bad.size:
      raise ValueError(f"column 'exit' must be in 1..G; rows {bad[:10].tolist()} are not")
  varying = {"N": columns["N"], "D": columns["D"]}
  if "G" in law.columns:
    varying["G"] = columns["G"]
  if "exit" in law.columns:
    varying["P = exit - 1"] = columns["exit"] - 1
    varying["Q = G - exit"] = columns["G"] - columns["exit"]
  for name, values in varying.items():
    if np.unique(values).size < 2:
      raise ValueError(f"the {law.name} law cannot be identified: {name} takes one value "
                       f"({values[0]:g}) in every row of {source}; it needs at least two")
  _, first = np.unique(np.stack([columns[c] for c in needed], axis=1), axis=0, return_index=True)
  duplicated = np.setdiff1d(np.arange(n_rows), first)
  if duplicated.size:
    warnings.warn(f"{source}: rows {duplicated[:10].tolist()} repeat earlier rows "
                  "exactly; each counts as a separate run (and narrows the intervals)",
                  stacklevel=2)
  return columns


def epoch_chinchilla(path: str | Path) -> dict[str, np.ndarray]:
  """Epoch AI's reconstruction of Chinchilla Approach 3 (their svg_extracted_data.csv): the 240
  rows they fit (5 highest losses dropped), with D = C / (6N)."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist (Epoch AI's svg_extracted_data.csv)")
  import pandas as pd
  frame = pd.read_csv(path).sort_values("loss", kind="stable").iloc[:-5]
  n = frame["Model Size"].to_numpy(np.float64)
  return {"N": n, "D": frame["Training FLOP"].to_numpy(np.float64) / (6.0 * n),
          "loss": frame["loss"].to_numpy(np.float64)}
