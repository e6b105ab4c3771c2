"""Fits a scaling law to run records, or compares laws on them:
famjax fit --data=FILE --law=familial --out=fit.json
famjax fit --data=FILE --compare=paper,gamma_d,submodel --out=compare.json

FILE is CSV, JSONL or parquet with columns N, D, loss (and G, exit as the law needs; C, a run's
budget, for leave-one-budget-out in a comparison).
Logic lives in famjax.scaling; this file only parses flags and prints.
"""

import json
import os
from pathlib import Path

from absl import flags

from famjax.commands import common
from famjax.common.files import atomic_write_text
from famjax.scaling import compare, fit_data, fitted_law, fitting, laws

PRESET = None  # `famjax fit` takes no --config

MIN_BOOTSTRAP = 100

_DATA = flags.DEFINE_string("data", None, "CSV, JSONL or parquet file of runs.", required=True)
_NAMED = {**laws.LAWS, **laws.CANDIDATES}
_LAW = flags.DEFINE_enum("law", "familial", sorted(_NAMED), "Law to fit (paper = familial).")
_COMPARE = flags.DEFINE_list("compare", None, "Laws to compare on the same rows instead of fitting "
                             f"one, ranked by held-out error; from {sorted(laws.CANDIDATES)}.")
flags.register_validator("compare", lambda names: names is None or (
    len(names) >= 2 and set(names) <= set(laws.CANDIDATES)),
    f"--compare takes two or more of {sorted(laws.CANDIDATES)}, comma-separated")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 4000, "Bootstrap resamples: 0 (none) or at least "
                                  f"{MIN_BOOTSTRAP} (fewer give no usable 95% interval).",
                                  lower_bound=0)
flags.register_validator("bootstrap", lambda n: n == 0 or n >= MIN_BOOTSTRAP,
                         f"--bootstrap must be 0 (no intervals) or at least {MIN_BOOTSTRAP}")
_GROUP_BY = flags.DEFINE_string("group_by", None, "Resample whole groups of rows sharing this "
                                "column (e.g. an IsoFLOP budget) instead of single rows.")
_DELTA = flags.DEFINE_float("huber_delta", fitting.DEFAULT_DELTA, "Huber delta on log residuals.",
                            lower_bound=0.0)
_SEED = flags.DEFINE_integer("seed", 0, "Bootstrap seed.")
_GRID_EVERY = flags.DEFINE_integer("grid_every", 1, "Keep every k-th of the law's fit starts (1: "
                                   "all; larger for a quick look).", lower_bound=1)
_OUT = flags.DEFINE_string("out", "fit.json", "Where the JSON result goes (written atomically).")


def _check_writable(path: Path) -> None:
  """Fails before the fit, not after it, when --out cannot be written."""
  parent = path.parent
  if not parent.is_dir():
    raise FileNotFoundError(f"--out={path}: directory {parent} does not exist")
  if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
    raise PermissionError(f"--out={path}: not writable")


def main(argv):
  del argv
  _check_writable(Path(_OUT.value))
  common.use_compilation_cache()
  frame = fit_data.read_table(_DATA.value)
  if _COMPARE.value:
    summary = _compare(frame)
    print(compare.comparison_table(summary))
  else:
    summary = _fit(frame)
    print(fitted_law.law_table(summary))
  atomic_write_text(_OUT.value, json.dumps(summary, indent=1))
  print(f"wrote {_OUT.value}")


def _compare(frame) -> dict:
  candidates = {name: laws.CANDIDATES[name] for name in _COMPARE.value}
  columns = compare.columns_of(frame, candidates, _DATA.value)
  return compare.compare(candidates, columns, n_bootstrap=_BOOTSTRAP.value, seed=_SEED.value,
                         starts_every=_GRID_EVERY.value, delta=_DELTA.value,
                         progress=True).summary()


def _fit(frame) -> dict:
  law = _NAMED[_LAW.value]
  data = fit_data.validate(frame, law, source=_DATA.value)
  grouping = None
  if _GROUP_BY.value:
    if _GROUP_BY.value not in frame.columns:
      raise ValueError(f"--group_by={_GROUP_BY.value!r} is not a column of {_DATA.value}")
    grouping = fitted_law.Grouping(_GROUP_BY.value, frame[_GROUP_BY.value].to_numpy())
  fitted = fitted_law.fit_law(law, data, n_bootstrap=_BOOTSTRAP.value, seed=_SEED.value,
                          grouping=grouping, delta=_DELTA.value,
                          starts=law.starts(_GRID_EVERY.value), progress=True)
  return fitted.summary()

