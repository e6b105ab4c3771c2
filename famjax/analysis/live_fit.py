"""The live fit: the familial law refitted as each run of a sweep finishes."""

from __future__ import annotations

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from famjax.analysis.study_analysis import law_data
from famjax.scaling import fitting, laws
from famjax.study import records
from famjax.study.config import AnalysisConfig
from famjax.study.isoflop import ISOFLOP


class LiveFit:
  """Refits the familial law each time a run finishes, from the previous estimate and thinned
  starts (rows are padded to size buckets, so a growing study compiles a few programs, not one per
  run), and prints the current estimates. The first call reads the study's records from disk
  (runs finished before this sweep); later calls add the records the sweep passes."""

  def __init__(self, study_dir, config: AnalysisConfig, fingerprint: str | None = None,
               starts_every: int = 50):
    self.study_dir, self.config, self.fingerprint = study_dir, config, fingerprint
    self.starts = laws.FAMILIAL.starts(starts_every)
    self.params: dict | None = None
    self.records: list[dict] | None = None

  def _add(self, spec, run_records) -> None:
    if self.records is None or spec is None or run_records is None:
      self.records = records.collect(self.study_dir, self.fingerprint).to_dict("records")
    else:
      self.records = [r for r in self.records if r["run_id"] != spec.run_id] + list(run_records)

  def __call__(self, spec=None, run_records=None) -> str | None:
    """spec and run_records: a run the sweep has just finished (None: reread the study)."""
    if spec is not None and spec.kind != ISOFLOP:
      return None  # the law's rows did not change
    self._add(spec, run_records)
    frame = pd.DataFrame(self.records, columns=None if self.records else list(records.REQUIRED))
    rows = records.law_rows(frame, "familial", loss=self.config.fit_loss,
                            param_count=self.config.param_count)
    try:
      data = law_data(rows, laws.FAMILIAL, "the runs so far")
    except ValueError:
      return None  # not identifiable yet
    starts = self.starts
    if self.params is not None:
      starts = {k: np.append(v, self.params[k]) for k, v in starts.items()}
    result = fitting.fit(fitting.Problem.of(laws.FAMILIAL, data), starts=starts)
    self.params = result.params
    natural = laws.to_natural_params(result.params)
    line = (f"live fit over {len(rows)} runs: gamma={natural['gamma']:.4f} "
            f"alpha={natural['alpha']:.3f} beta={natural['beta']:.3f} E={natural['E']:.3g}")
    tqdm.write(line)
    return line
