"""Familial (G = 4) vs dense (G = 1) training step on the same backbone, same process, same batch.

Prints step time, tokens/s, the measured familial/dense step-time ratio and the ratio the FLOPs
accounting predicts, for each exit-head kind; ends with one JSON line.
Usage: python benchmarks/train_throughput.py [--rounds 12] [--batch 8] [--seq 256]
"""

import argparse
import dataclasses
import json
import statistics
import time

import jax
import numpy as np

from famjax.model import counts, sharding
from famjax.model.config import ModelConfig
from famjax.train.config import ExperimentConfig, TrainConfig
from famjax.train.loop import Trainer

BACKBONE = ModelConfig(d_model=256, n_layers=8, n_heads=8, d_ff=1024, max_seq_len=256,
                       exit_layers=(8,))


def timed_steps(trainer: Trainer, batch: np.ndarray, n: int) -> float:
  """Seconds per step over n steps, after the work is done on the device."""
  start = time.perf_counter()
  for _ in range(n):
    metrics = trainer.step(batch)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / n


def compare(family_cfg: ModelConfig, args, mesh) -> dict:
  train_cfg = TrainConfig(batch_size=args.batch, seq_len=args.seq, steps=1000, warmup_steps=10,
                          progress=False)
  trainers = {name: Trainer.create(ExperimentConfig(model=m, train=train_cfg), mesh)
              for name, m in (("dense", BACKBONE), ("familial", family_cfg))}
  batch = np.random.default_rng(0).integers(0, 259, (args.batch, args.seq + 1), dtype=np.int32)
  times = {name: [] for name in trainers}
  for name, trainer in trainers.items():  # compile and warm up
    timed_steps(trainer, batch, 2)
  for _ in range(args.rounds):  # interleaved, so drift in machine load hits both alike
    for name, trainer in trainers.items():
      times[name].append(timed_steps(trainer, batch, args.steps_per_round))
  step = {name: statistics.median(t) for name, t in times.items()}
  flops = {name: counts.account(t.cfg.model, args.seq).flops_per_token
           for name, t in trainers.items()}
  tokens = args.batch * args.seq
  return {
      "exit_head": family_cfg.exit_head, "exit_layers": list(family_cfg.exit_layers),
      "dense_step_s": step["dense"], "familial_step_s": step["familial"],
      "dense_tokens_per_s": tokens / step["dense"],
      "familial_tokens_per_s": tokens / step["familial"],
      "measured_ratio": step["familial"] / step["dense"],
      "predicted_ratio": flops["familial"] / flops["dense"],
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps_per_round", type=int, default=2)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  args = parser.parse_args()
  mesh = sharding.make_mesh()
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; backbone d_model="
        f"{BACKBONE.d_model}, {BACKBONE.n_layers} layers; batch {args.batch} x {args.seq} tokens")
  results = []
  for head in ("norm", "block"):
    family = dataclasses.replace(BACKBONE, exit_layers=(2, 4, 6, 8), exit_head=head)
    r = compare(family, args, mesh)
    results.append(r)
    print(f"G=4 {head:>5} heads: dense {r['dense_step_s'] * 1e3:7.1f} ms/step "
          f"({r['dense_tokens_per_s']:,.0f} tok/s), familial {r['familial_step_s'] * 1e3:7.1f} "
          f"ms/step ({r['familial_tokens_per_s']:,.0f} tok/s); ratio measured "
          f"{r['measured_ratio']:.3f}, predicted {r['predicted_ratio']:.3f}, "
          f"overhead vs prediction {r['measured_ratio'] / r['predicted_ratio'] - 1:+.1%}")
  primary = results[0]
  print(json.dumps({"device": jax.devices()[0].device_kind, **primary,
                    "overhead_vs_prediction":
                        primary["measured_ratio"] / primary["predicted_ratio"] - 1,
                    "variants": results}))


if __name__ == "__main__":
  main()
