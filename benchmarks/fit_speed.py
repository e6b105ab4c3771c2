"""famjax's fit from every start + bootstrap vs a scipy L-BFGS-B loop over the same starts, on
Epoch's
Chinchilla data, in one process. Prints wall times (famjax including compilation), both optima and
the speed ratio; then a warm refit in the same process, the cost of adding one row to the fitted
study, and the whole `experiments.fit` process (a fresh interpreter, compilation included).
Ends with one JSON line.

Usage: python benchmarks/fit_speed.py [--every 1] [--bootstrap 4000]
(--every k keeps every k-th start, for a quick look; the target is stated for k = 1.)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import huber

from famjax.scaling import bootstrap, fit_data, fitting, laws

PARAMS = ("a", "b", "e", "alpha", "beta")


def scipy_starts(data, starts, delta):
  """What a researcher would write (after Epoch AI's replication): L-BFGS-B from every start,
  with a lean numpy objective (np.logaddexp; scipy.special.logsumexp over a list is ~7x slower
  per call here, which would flatter famjax) and scipy's finite-difference gradients."""
  log_n, log_d, log_l = np.log(data["N"]), np.log(data["D"]), np.log(data["loss"])

  def objective(x):
    a, b, e, alpha, beta = x
    pred = np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e)
    return np.sum(huber(delta, pred - log_l))

  best = None
  for s in range(len(starts["a"])):
    result = minimize(objective, [starts[k][s] for k in PARAMS], method="L-BFGS-B")
    if best is None or result.fun < best.fun:
      best = result
  return best


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--every", type=int, default=1)
  parser.add_argument("--bootstrap", type=int, default=4000)
  parser.add_argument("--delta", type=float, default=1e-3)
  parser.add_argument("--data", default=os.environ.get("FAMJAX_REFERENCE_DATA", str(
      Path(__file__).resolve().parents[2] / "shared" / "reference-data"))
      + "/chinchilla-epoch/svg_extracted_data.csv", help="Epoch AI's svg_extracted_data.csv")
  args = parser.parse_args()
  if not Path(args.data).exists():
    sys.exit(f"fit_speed needs Epoch AI's public Chinchilla table, not found at {args.data}. "
             "It is data/svg_extracted_data.csv of the repository "
             "epoch-research/analyzing-chinchilla: pass --data=PATH to it, or set "
             "FAMJAX_REFERENCE_DATA to a folder holding chinchilla-epoch/svg_extracted_data.csv")
  data = fit_data.epoch_chinchilla(args.data)
  starts = laws.CHINCHILLA.starts(args.every)
  n_starts = len(starts["a"])

  start = time.perf_counter()
  problem = fitting.Problem.of(laws.CHINCHILLA, data, delta=args.delta)
  result = fitting.fit(problem, starts=starts, progress=True)
  fit_s = time.perf_counter() - start
  boot = bootstrap.bootstrap(result, fitting.Resampling(args.bootstrap), progress=True)
  famjax_s = time.perf_counter() - start

  start = time.perf_counter()
  warm = fitting.fit(problem, starts=starts)
  bootstrap.bootstrap(warm, fitting.Resampling(args.bootstrap))
  warm_s = time.perf_counter() - start
  grown = {k: np.append(v, v[0] * (1.01 if k == "loss" else 1.0)) for k, v in data.items()}
  start = time.perf_counter()
  fitting.fit(fitting.Problem.of(laws.CHINCHILLA, grown, delta=args.delta), starts=starts)
  one_more_row_s = time.perf_counter() - start

  with tempfile.TemporaryDirectory() as tmp:
    csv = Path(tmp) / "epoch.csv"
    csv.write_text("N,D,loss\n" + "".join(f"{float(n)!r},{float(d)!r},{float(l)!r}\n" for n, d, l in
                                           zip(data["N"], data["D"], data["loss"])))
    cli_s = []  # a first process (empty compilation cache), then a second one
    for _ in range(2):
      start = time.perf_counter()
      subprocess.run([sys.executable, "-m", "experiments.fit", f"--data={csv}",
                      "--law=chinchilla", f"--bootstrap={args.bootstrap}",
                      f"--grid_every={args.every}", f"--out={Path(tmp) / 'fit.json'}",
                      f"--compilation_cache={Path(tmp) / 'xla'}"], check=True,
                     capture_output=True, cwd=Path(__file__).resolve().parents[1])
      cli_s.append(time.perf_counter() - start)

  start = time.perf_counter()
  reference = scipy_starts(data, starts, args.delta)
  scipy_s = time.perf_counter() - start

  speedup = scipy_s / famjax_s
  print(f"{n_starts} starts on {len(data['loss'])} rows")
  print(f"famjax: fit {fit_s:.1f} s + {args.bootstrap} bootstrap refits "
        f"{famjax_s - fit_s:.1f} s = {famjax_s:.1f} s (compilation included); "
        f"objective {result.objective:.10f}, {result.start_converged.mean():.1%} of starts "
        "converged")
  print(f"scipy L-BFGS-B from every start: {scipy_s:.1f} s; objective {reference.fun:.10f}")
  print(f"speedup (scipy fit / famjax fit + bootstrap): {speedup:.2f}x")
  print(f"warm (same process): fit + bootstrap {warm_s:.2f} s; refit after adding one row "
        f"{one_more_row_s:.2f} s")
  print(f"whole experiments.fit process: {cli_s[0]:.1f} s (speedup {scipy_s / cli_s[0]:.2f}x); "
        f"a second one, compilation cache warm: {cli_s[1]:.1f} s ({scipy_s / cli_s[1]:.2f}x)")
  print("famjax estimates:",
        {k: round(v, 5) for k, v in laws.to_natural_params(result.params).items()})
  print(json.dumps({"n_starts": n_starts, "n_bootstrap": args.bootstrap, "famjax_s": famjax_s,
                    "famjax_grid_s": fit_s, "scipy_s": scipy_s, "speedup": speedup,
                    "warm_s": warm_s, "one_more_row_s": one_more_row_s, "cli_s": cli_s[0],
                    "cli_speedup": scipy_s / cli_s[0], "cli_cached_s": cli_s[1],
                    "bootstrap_failed": boot.failed,
                    "famjax_objective": result.objective, "scipy_objective": float(reference.fun),
                    "bootstrap_se": boot.se}))


if __name__ == "__main__":
  main()
