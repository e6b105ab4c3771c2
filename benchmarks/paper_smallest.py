"""Trains the smallest model shape of the `paper` IsoFLOP preset (its dense d1024L8, 168M
parameters, bfloat16) for --steps on the embedded corpus (bytes, padded to its 32768-token
vocabulary), in --microbatches passes of the batch (4: 8 sequences of 2048 a pass, well inside an
80 GB device by the memory plan), and prints one JSON line: tokens/s, MFU, losses, seconds.

Usage: python benchmarks/paper_smallest.py [--steps 200] [--batch 32] [--seq 2048]
(on a CPU: --steps 3 --batch 2 --seq 128 --microbatches 1)
"""

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import jax

from famjax.data.config import DataConfig
from famjax.hardware import chips
from famjax.model import counts
from famjax.presets import isoflop as presets
from famjax.study import isoflop, saved_config
from famjax.train import loop, workdir_files
from famjax.train.config import ExperimentConfig, TrainConfig


def smallest_paper_model():
  study_cfg, base = saved_config.configs(presets.get_config("paper").to_dict())
  plan = isoflop.plan_study(study_cfg, base, study_cfg.planned_corpus_tokens)
  return min((r.experiment.model for r in plan.runs),
             key=lambda m: counts.account(m, 2048).params_total)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--microbatches", type=int, default=4)
  args = parser.parse_args()
  model = dataclasses.replace(smallest_paper_model(), max_seq_len=max(args.seq, 2048))
  cfg = ExperimentConfig(
      model=model, data=DataConfig(),  # the embedded corpus, bytes padded to the vocabulary
      train=TrainConfig(batch_size=args.batch, microbatches=args.microbatches, seq_len=args.seq,
                        steps=args.steps, warmup_steps=min(20, args.steps - 1),
                        learning_rate=3e-4, eval_every=args.steps, eval_batches=2,
                        checkpoint_every=args.steps, log_every=max(1, args.steps // 10),
                        progress=False))
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    summary = loop.train(cfg, workdir)
    seconds = time.perf_counter() - start
    rates = [r["tokens_per_s"] for r in workdir_files.read_metrics(
        Path(workdir) / workdir_files.METRICS) if "tokens_per_s" in r]
  tokens_per_s = rates[-1]  # the last log window: compiled, warmed up
  chip = chips.of_device_kind(jax.devices()[0].device_kind)
  peak = chip.peak_flops if chip else None
  mfu = summary["flops_per_token"] * tokens_per_s / peak if peak else None
  print(json.dumps({"shape": f"d{model.d_model}L{model.n_layers}",
                    "params": summary["params_total"], "device": jax.devices()[0].device_kind,
                    "steps": summary["step"], "batch": [args.batch, args.seq],
                    "tokens_per_s": tokens_per_s, "mfu": mfu,
                    "val_loss": summary["val_loss"], "seconds": seconds}))


if __name__ == "__main__":
  main()
