"""Where a study's analysis spends its time: `famjax study --fit_only --profile` on a finished
study, cold (an empty persistent compilation cache) and warm (the cache the cold run filled),
each in a fresh process; then the law comparison on results/medium's familial rows
(`famjax fit --compare=...`, 1000 bootstrap refits per law), cold and warm. Prints each
analysis's table (seconds per part, compiling and running, cache hits) and the wall times, and
ends with one JSON line.
Usage: python benchmarks/analysis_speed.py [--study runs/isoflop-tiny] [--skip_compare]
(the study: `make run` leaves one at runs/isoflop-tiny)
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAWS = "paper,gamma_d,submodel,a_penalty,size_only"


def timed(cmd: list[str]) -> tuple[float, str]:
  start = time.perf_counter()
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if done.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
  return seconds, done.stdout


def profile_table(stdout: str) -> str:
  lines = stdout.splitlines()
  first = next(i for i, line in enumerate(lines) if line.startswith("section "))
  return "\n".join(lines[first:])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--study", default="runs/isoflop-tiny")
  parser.add_argument("--skip_compare", action="store_true")
  args = parser.parse_args()
  famjax = [sys.executable, "-m", "famjax"]
  out = {}
  with tempfile.TemporaryDirectory() as cache:
    if not (ROOT / args.study / "plan.json").exists():
      raise SystemExit(f"{args.study} holds no study: run `make run` first")
    for state in ("cold", "warm"):
      seconds, stdout = timed(famjax + ["study", f"--outdir={args.study}", "--fit_only",
                                        "--profile", f"--compilation_cache={cache}"])
      print(f"--fit_only of {args.study}, {state} cache: {seconds:.1f} s\n"
            f"{profile_table(stdout)}\n")
      out[f"fit_only_{state}_s"] = seconds
  if not args.skip_compare:
    with tempfile.TemporaryDirectory() as cache:
      for state in ("cold", "warm"):
        seconds, _ = timed(famjax + ["fit", "--data=results/medium/data/familial.csv",
                                     f"--compare={LAWS}", "--bootstrap=1000",
                                     f"--out={cache}/compare.json",
                                     f"--compilation_cache={cache}"])
        print(f"law comparison on results/medium ({LAWS}), {state} cache: {seconds:.1f} s")
        out[f"compare_medium_{state}_s"] = seconds
  print(json.dumps(out))


if __name__ == "__main__":
  main()
