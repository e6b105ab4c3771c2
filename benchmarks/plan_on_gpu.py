"""The memory plan's choice for one shape, checked on the device it plans for: the cheapest
setting the compiler fits in this device's memory (famjax.hardware.memory), then one real train step
at that setting, with the compiler's peak and the device's own peak bytes side by side.

Default shape: the `paper` preset's smallest family (d1024L8, G = 4, vocabulary 32768, bfloat16)
with one device's share of its batch (512 / 8 = 64 sequences of 2048 tokens). On a CPU the
device reports no peak (null): `--smoke` runs a tiny shape there to check the script.
Ends with one JSON line.

Usage: python benchmarks/plan_on_gpu.py [--smoke]
"""

import argparse
import dataclasses
import json

import jax
import numpy as np

from famjax.hardware import memory
from famjax.model import sharding
from famjax.model.config import MeshConfig, ModelConfig
from famjax.train import optimizer, step
from famjax.train.config import TrainConfig

PAPER_SMALLEST = ModelConfig(vocab_size=32768, d_model=1024, n_layers=8, n_heads=8, d_ff=2728,
                             max_seq_len=2048, dtype="bfloat16", exit_layers=(2, 4, 6, 8))
SMOKE = ModelConfig(vocab_size=256, d_model=64, n_layers=4, n_heads=4, d_ff=128, max_seq_len=128,
                    exit_layers=(2, 4))


def run_step(model: ModelConfig, shape: tuple[int, int], setting: memory.Setting, device):
  """One train step at `setting` on `device`; its peak bytes in use (None if not reported)."""
  mesh = sharding.make_mesh(MeshConfig(data=1), devices=[device])
  progs = step.programs(dataclasses.replace(model, remat=setting.remat), mesh,
                         setting.microbatches)
  batch, seq_len = shape
  with jax.set_mesh(mesh):
    params = progs.init_params(0)
    opt_state = progs.init_opt(params)
    tokens = np.random.default_rng(0).integers(0, model.vocab_size, (batch, seq_len + 1),
                                               dtype=np.int32)
    hparams = {k: np.float32(v) for k, v in optimizer.hyperparameters(TrainConfig(), 1e-4).items()}
    weights = np.full(model.n_exits, 1.0 / model.n_exits, np.float32)
    jax.block_until_ready(progs.step(params, opt_state, tokens, hparams, weights))
  stats = device.memory_stats() or {}
  return stats.get("peak_bytes_in_use"), stats.get("bytes_limit")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="a tiny shape (a CPU check)")
  args = parser.parse_args()
  model, shape = (SMOKE, (8, 128)) if args.smoke else (PAPER_SMALLEST, (64, 2048))
  device = jax.devices()[0]
  limit = (device.memory_stats() or {}).get("bytes_limit", 8e9)
  target = memory.Target((device,), 1, float(limit), None, device.platform)
  plan = memory.choose(model, shape, target)
  if plan.setting is None:
    print(json.dumps({"device": device.device_kind, "setting": None,
                      "compiler_peak_bytes": plan.footprint.peak, "limit_bytes": limit}))
    return
  device_peak, _ = run_step(model, shape, plan.setting, device)
  print(json.dumps({
      "device": device.device_kind, "shape": f"d{model.d_model}L{model.n_layers} G{model.n_exits}",
      "batch": shape, "setting": str(plan.setting), "limit_bytes": limit,
      "compiler_peak_bytes": plan.footprint.peak, "device_peak_bytes": device_peak,
      "device_over_compiler": None if device_peak is None else device_peak / plan.footprint.peak}))


if __name__ == "__main__":
  main()
