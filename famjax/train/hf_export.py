"""Exports of a trained run's exits (`famjax export`):
famjax.hf.checkpoint_export.export_exit on the parameters of the run's newest checkpoint, with the
run's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from flax import nnx
from tqdm.auto import tqdm

from famjax import data
from famjax.common.files import atomic_write_text
from famjax.hf.checkpoint_export import export_exit, host_params
from famjax.hf.checkpoint_import import INIT_RECORD
from famjax.train import loop


def export_run(workdir, exit_: int | str, out, progress: bool = True) -> list[dict]:
  """Exports exit `exit_` (1..G) of a trained run, or every exit ("all": out/exit{g}/ each and
  out/index.json saying which exit each directory holds)."""
  workdir = Path(workdir)
  cfg, model = loop.load_model(workdir)
  params = host_params(nnx.to_pure_dict(nnx.state(model)))  # once for every exit
  tokenizer = data.load_tokenizer(workdir) if (workdir / "tokenizer").is_dir() else None
  side = workdir / INIT_RECORD
  kwargs = dict(tokenizer=tokenizer, tokenizer_dir=workdir / "tokenizer",
                side_dir=side if side.is_dir() else None)
  if exit_ != "all":
    return [export_exit(cfg.model, params, int(exit_), out, **kwargs)]
  out = Path(out)
  if out.exists() and not (out / "index.json").is_file():
    raise FileExistsError(f"{out} exists and is not a famjax export; choose another --out")
  out.mkdir(parents=True, exist_ok=True)
  records = []
  for g in tqdm(range(1, cfg.model.n_exits + 1), desc="export", unit="exit",
                disable=not progress):
    record = export_exit(cfg.model, params, g, out / f"exit{g}", **kwargs)
    records.append({**record, "directory": f"exit{g}"})
  atomic_write_text(out / "index.json", json.dumps({"workdir": str(workdir),
                                                    "exits": records}, indent=1))
  return records
