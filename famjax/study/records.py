"""Run records of a study: one per (run, exit), written atomically into each run's own workdir,
collected into a pandas DataFrame, turned into the rows each scaling law is fitted to, and
exported as CSV and parquet that `famjax fit --data=` reads directly.

Rows of the laws (N under the study's param_count, D the run's training tokens):
- branch: one row per exit of every family: N = the exit's sub-model, loss = that exit's loss;
- familial (unified L(N, D, G)): one row per run: N = the whole family, loss = the mean exit loss
  under the trained exit weights (1/G each by default);
- chinchilla: the G = 1 runs alone (dense models), as the familial rows.
Size-matched dense runs (leverage points) are kept out of the laws' rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from famjax.common.files import atomic_write_text
from famjax.scaling.laws import LAWS
from famjax.study.isoflop import DENSE_KINDS, ISOFLOP, RunSpec

RECORDS = "records.json"
OK, FAILED = "ok", "failed"
REQUIRED = ("run_id", "kind", "status", "C", "G", "exit", "exit_layer", "P", "Q", "N_exit",
            "N_exit_non_embedding", "N_family", "N_family_non_embedding", "D", "train_loss",
            "val_loss", "exit_weight", "flops_per_token", "seed", "corpus_fingerprint",
            "config_hash", "wall_seconds")


def run_records(spec: RunSpec, summary: dict | None, *, fingerprint: str, wall_seconds: float,
                error: str = "") -> list[dict]:
  """One record per exit of a finished run (summary from train.train), or of a failed one
  (summary None: losses null, `error` says why)."""
  from famjax.train.config import config_hash
  cfg = spec.experiment
  acc = spec.accounting
  weights = cfg.train.weights_for(cfg.model.n_exits)
  n_exits = cfg.model.n_exits
  records = []
  for g, layer in enumerate(cfg.model.exit_layers, start=1):
    loss = lambda key: None if summary is None or summary.get(key) is None else summary[key][g - 1]
    half = lambda i: (None if summary is None or not summary.get("val_loss_halves")
                      else summary["val_loss_halves"][i][g - 1])
    records.append({
        "run_id": spec.run_id, "kind": spec.kind, "status": FAILED if summary is None else OK,
        "error": error, "C": spec.budget,
        "G": 1 if spec.kind in DENSE_KINDS else spec.granularity,
        "exit": g, "exit_layer": layer, "P": g - 1, "Q": n_exits - g,
        "N_exit": acc.params_per_exit[g - 1],
        "N_exit_non_embedding": acc.non_embedding_per_exit[g - 1],
        "N_family": acc.params_total, "N_family_non_embedding": acc.params_non_embedding,
        "D": spec.tokens if summary is None else summary["tokens"], "steps": spec.steps,
        "train_loss": loss("train_loss"), "val_loss": loss("val_loss"),
        # over each half of the validation batches (absent from records made before 2026-12-03)
        "val_loss_first_half": half(0), "val_loss_second_half": half(1),
        "exit_weight": weights[g - 1] / sum(weights), "flops_per_token": spec.flops_per_token,
        "seed": spec.seed, "corpus_fingerprint": fingerprint,
        "config_hash": config_hash(cfg), "wall_seconds": wall_seconds,
        "d_model": cfg.model.d_model, "n_layers": cfg.model.n_layers,
        "matches": spec.matches, "matched_exit": spec.matched_exit,
        "matched_G": spec.granularity})
  return records


def write_records(workdir: str | Path, records: list[dict]) -> Path:
  path = Path(workdir) / RECORDS
  atomic_write_text(path, json.dumps(records, indent=1))
  return path


def read_records(path: str | Path) -> list[dict]:
  """A run's records; a malformed file is an error naming it."""
  path = Path(path)
  try:
    records = json.loads(path.read_text())
    if not isinstance(records, list) or not records:
      raise ValueError("expected a non-empty JSON list of records")
    for record in records:
      missing = [k for k in REQUIRED if k not in record] if isinstance(record, dict) else REQUIRED
      if missing:
        raise ValueError(f"a record lacks {list(missing)}")
  except (OSError, ValueError) as e:
    raise ValueError(f"malformed run record {path}: {e}") from None
  return records


def collect(study_dir: str | Path, fingerprint: str | None = None,
            allow_other_corpora: bool = False) -> pd.DataFrame:
  """Every run's records under STUDY/runs/*/records.json, one row per (run, exit).

  Records made on another corpus than `fingerprint` are refused (ValueError naming the runs)
  unless allow_other_corpora.
  """
  paths = sorted(Path(study_dir).glob(f"runs/*/{RECORDS}"))
  rows = [r for path in paths for r in read_records(path)]
  frame = pd.DataFrame(rows, columns=list(REQUIRED) if not rows else None)
  if fingerprint and not allow_other_corpora and len(frame):
    other = frame.loc[frame["corpus_fingerprint"] != fingerprint, "run_id"].unique()
    if len(other):
      raise ValueError(f"runs {sorted(other)[:5]} were trained on another corpus (fingerprint "
                       f"differs from the study's {fingerprint[:12]}); pass "
                       "allow_other_corpora=True (--allow_other_corpora) to mix them")
  return frame


def law_rows(frame: pd.DataFrame, law: str, *, loss: str = "val",
             param_count: str = "non_embedding") -> pd.DataFrame:
  """The rows `law` is fitted to (see the module docstring), with columns N, D, G, exit, loss and
  run_id, C for grouping."""
  if law not in LAWS:
    raise ValueError(f"law must be one of {tuple(LAWS)}; got {law!r}")
  if loss not in ("val", "train"):
    raise ValueError(f"loss must be 'val' or 'train'; got {loss!r}")
  suffix = "_non_embedding" if param_count == "non_embedding" else ""
  done = frame[(frame["kind"] == ISOFLOP) & (frame["status"] == OK)].copy()
  done["loss"] = pd.to_numeric(done[f"{loss}_loss"])
  if law == "branch":
    rows = done.assign(N=done[f"N_exit{suffix}"])
  else:
    weighted = done.assign(weighted=done["loss"] * done["exit_weight"])
    rows = weighted.groupby("run_id", sort=True).agg(
        C=("C", "first"), G=("G", "first"), N=(f"N_family{suffix}", "first"), D=("D", "first"),
        loss=("weighted", "sum"), seed=("seed", "first")).reset_index()
    rows["exit"] = rows["G"]
    if law == "chinchilla":
      rows = rows[rows["G"] == 1]
  columns = ["run_id", "C", "G", "exit", "N", "D", "loss"]
  return rows[columns].astype({"N": float, "D": float, "G": float, "exit": float}).reset_index(
      drop=True)


def write_tables(frame: pd.DataFrame, outdir: str | Path, *, loss: str = "val",
           param_count: str = "non_embedding") -> dict[str, Path]:
  """records.{csv,parquet} and, per law, LAW.{csv,parquet} (fit-ready) in outdir."""
  outdir = Path(outdir)
  outdir.mkdir(parents=True, exist_ok=True)
  written = {}
  tables = {"records": frame, **{law: law_rows(frame, law, loss=loss, param_count=param_count)
                                 for law in LAWS}}
  for name, table in tables.items():
    if not len(table):
      continue
    for suffix, write in ((".csv", lambda t, p: t.to_csv(p, index=False)),
                          (".parquet", lambda t, p: t.to_parquet(p, index=False))):
      path = outdir / f"{name}{suffix}"
      tmp = outdir / f".{name}{suffix}.tmp"
      write(table, tmp)
      tmp.replace(path)
      written[f"{name}{suffix}"] = path
  return written


def finished(workdir: str | Path, config_hash: str) -> bool:
  """Whether the run in workdir finished with this config (its records say status ok)."""
  path = Path(workdir) / RECORDS
  if not path.exists():
    return False
  records = read_records(path)
  return all(r["status"] == OK and r["config_hash"] == config_hash for r in records)
