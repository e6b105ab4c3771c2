"""Fits a scaling law to run records: python -m experiments.fit --data=FILE --law=familial --out=fit.json

FILE is CSV, JSONL or parquet with columns N, D, loss (and G, exit as the law needs).
Logic lives in famjax.scaling; this file only parses flags and prints.
"""

import json
import time

from absl import app, flags

from famjax.scaling import bootstrap, fit, io, laws
from famjax.files import atomic_write_text

_DATA = flags.DEFINE_string("data", None, "CSV, JSONL or parquet file of runs.", required=True)
_LAW = flags.DEFINE_enum("law", "familial", sorted(laws.LAWS), "Law to fit.")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 4000, "Bootstrap resamples (0: none).",
                                  lower_bound=0)
_GROUP_BY = flags.DEFINE_string("group_by", None, "Resample whole groups of rows sharing this "
                                "column (e.g. an IsoFLOP budget) instead of single rows.")
_DELTA = flags.DEFINE_float("huber_delta", fit.DEFAULT_DELTA, "Huber delta on log residuals.",
                            lower_bound=0.0)
_SEED = flags.DEFINE_integer("seed", 0, "Bootstrap seed.")
_GRID_EVERY = flags.DEFINE_integer("grid_every", 1, "Keep every k-th grid start (1: the whole "
                                   "grid; larger for a quick look).", lower_bound=1)
_OUT = flags.DEFINE_string("out", "fit.json", "Where the JSON result goes (written atomically).")

ORDER = ("E", "A", "B", "alpha", "beta", "gamma", "alpha_b", "beta_b", "a_opt", "b_opt")


def main(argv):
  del argv
  law = laws.LAWS[_LAW.value]
  frame = io.read_table(_DATA.value)
  data = io.validate(frame, law)
  groups = None
  if _GROUP_BY.value:
    if _GROUP_BY.value not in frame.columns:
      raise ValueError(f"--group_by={_GROUP_BY.value!r} is not a column of {_DATA.value}")
    groups = frame[_GROUP_BY.value].to_numpy()
  start = time.perf_counter()
  grid = {k: v[::_GRID_EVERY.value] for k, v in law.grid().items()}
  result = fit.fit(law, data, delta=_DELTA.value, grid=grid, progress=True)
  natural = laws.to_natural_params(result.params)
  derived = bootstrap.derived(natural) if {"alpha", "beta"} <= set(natural) else {}
  record = {"law": law.name, "params": natural, "derived": derived, "objective": result.objective,
            "n_rows": result.n_rows,
            "starts": {"n": int(result.start_objective.size),
                       "converged": int(result.start_converged.sum())}}
  boot = None
  if _BOOTSTRAP.value:
    boot = bootstrap.bootstrap(law, data, result, n=_BOOTSTRAP.value, seed=_SEED.value,
                               groups=groups, delta=_DELTA.value, progress=True)
    record["bootstrap"] = {"n": boot.n, "se": boot.se,
                           "ci95": {k: list(v) for k, v in boot.ci95.items()},
                           "converged": boot.converged,
                           "resampled": _GROUP_BY.value or "rows"}
  if law is laws.FAMILIAL:
    record["gamma_test"] = bootstrap.gamma_tests(data, result, boot, delta=_DELTA.value,
                                                 grid=grid)
  record["seconds"] = time.perf_counter() - start

  print(f"{law.name} law, {result.n_rows} rows, objective {result.objective:.10g}")
  print(f"{'param':>8} {'estimate':>12} {'SE':>10} {'95% CI':>26}")
  estimates = {**natural, **derived}
  for name in [k for k in ORDER if k in estimates]:
    value = estimates[name]
    if boot:
      lo, hi = boot.ci95[name]
      print(f"{name:>8} {value:>12.5g} {boot.se[name]:>10.4g} {f'[{lo:.5g}, {hi:.5g}]':>26}")
    else:
      print(f"{name:>8} {value:>12.5g}")
  if "gamma_test" in record:
    t = record["gamma_test"]
    print(f"gamma > 0?  likelihood-ratio p = {t['lrt_p']:.3g}"
          + (f", bootstrap p = {t['bootstrap_p']:.3g}" if "bootstrap_p" in t else ""))
  atomic_write_text(_OUT.value, json.dumps(record, indent=1))
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
