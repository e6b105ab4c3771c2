"""A study's remembered config: STUDY/config.json holds the values a study was started with;
a rerun keeps them and takes new values only for fields that change the analysis."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable, Mapping

import jax

from famjax.common.files import atomic_write_text
from famjax.study.config import AnalysisConfig, EstimateConfig, ExecutionConfig, StudyConfig
from famjax.train.config import ExperimentConfig, experiment_from_dict


def configs(values: Mapping) -> tuple[StudyConfig, ExperimentConfig]:
  """(study, base run config) from nested mappings (an isoflop preset's to_dict())."""
  values = dict(values)
  study = values.pop("study", {})
  known = {f.name for f in dataclasses.fields(StudyConfig)}
  unknown = sorted(set(study) - known)
  if unknown:
    raise ValueError(f"unknown config field(s) {[f'study.{u}' for u in unknown]}; "
                     f"allowed: {sorted(known)}")
  return StudyConfig(**study), experiment_from_dict(values)


CONFIG = "config.json"
# study fields that change only the analysis (fits, report, --dry_run's estimate) or how this host
# trains, never which runs are trained: an existing study accepts new values for these
ANALYSIS_FIELDS = frozenset(f"study.{f.name}"
                            for cls in (AnalysisConfig, EstimateConfig, ExecutionConfig)
                            for f in dataclasses.fields(cls))


def _flat(values: Mapping, prefix: str = "") -> dict:
  """{"study.bootstrap": 1000, ...}: JSON values (tuples as lists) by dotted field name."""
  out = {}
  for key, value in values.items():
    if isinstance(value, Mapping):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = json.loads(json.dumps(value, default=list))
  return out


def _nested(flat: Mapping) -> dict:
  out: dict = {}
  for name, value in flat.items():
    *parents, leaf = name.split(".")
    node = out
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return out


def remembered(outdir: str | Path, values: Mapping, given: Iterable[str] | None = None) -> dict:
  """The config values the study in `outdir` runs with (nested, as a preset's to_dict()).

  A new study takes `values` and records them in STUDY/config.json. An existing study keeps its
  own: `given` names the fields the caller set (dotted, e.g. "study.bootstrap"; None: all of
  `values`, as a whole --config preset does), and those that differ from the recorded values
  are an error naming them, unless they change only the analysis (ANALYSIS_FIELDS): those are
  applied and added to the file's history.
  """
  path = Path(outdir) / CONFIG
  asked = _flat(values)
  if not path.exists():
    if jax.process_index() == 0:
      path.parent.mkdir(parents=True, exist_ok=True)
      atomic_write_text(path, json.dumps({"config": _nested(asked), "history": []}, indent=1))
    return _nested(asked)
  recorded = json.loads(path.read_text())
  current = _flat(recorded["config"])
  names = asked if given is None else [n for n in asked if any(
      n == g or n.startswith(g + ".") for g in given)]
  # a field the record lacks (added to famjax since the study began) takes the asked value
  current.update({n: v for n, v in asked.items() if n not in current})
  changed = {n: asked[n] for n in names if current[n] != asked[n]}
  fixed = sorted(n for n in changed if n not in ANALYSIS_FIELDS)
  if fixed:
    shown = ", ".join(f"{n}: {current[n]!r} -> {changed[n]!r}" for n in fixed[:6])
    raise ValueError(f"{outdir} holds a study made with another config ({shown}); rerun "
                     f"without --config to use the study's own ({path}), change only analysis "
                     f"fields ({', '.join(sorted(ANALYSIS_FIELDS))}), or use a new --outdir")
  if changed:
    history = recorded.get("history", []) + [
        {"changed": {n: [current[n], changed[n]] for n in sorted(changed)}}]
    current.update(changed)
    if jax.process_index() == 0:
      atomic_write_text(path, json.dumps({"config": _nested(current), "history": history},
                                         indent=1))
  return _nested(current)
