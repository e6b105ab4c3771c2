"""Temp memory of the train step (XLA's own memory analysis, no accelerator needed) for a dense
model and G = 4 families, per remat policy; compile time against depth. One process.

Shapes: d_model 512, 8 layers, 8 heads, d_ff 1536, vocabulary 32768 (tied), batch 8 x 1024 tokens,
float32; G = 4 exits after layers 2, 4, 6, 8. Compile time: d_model 128, exits after L/2 and L.
Ends with one JSON line (norm_over_dense, block_over_dense, dense_temp_gb, compile_32_over_4).

Usage: python benchmarks/step_memory.py [--remat none,block,dots] [--depths 4,16,32]
"""

import argparse
import dataclasses
import json
import time

import jax
import numpy as np

from famjax.model import sharding
from famjax.model.config import ModelConfig
from famjax.train import optimizer, step
from famjax.train.config import ExperimentConfig, TrainConfig


def compiled_step(model: ModelConfig, batch: int, seq_len: int):
  cfg = ExperimentConfig(model=model, train=TrainConfig(batch_size=batch, seq_len=seq_len,
                                                        steps=10, warmup_steps=1))
  mesh = sharding.make_mesh()
  progs = step.programs(model, mesh)
  with jax.set_mesh(mesh):
    params = jax.eval_shape(progs.init_params, 0)
    opt_state = jax.eval_shape(progs.init_opt, params)
    tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), np.int32)
    hparams = {k: np.float32(v) for k, v in optimizer.hyperparameters(cfg.train, 1e-3).items()}
    weights = np.full(model.n_exits, 1.0 / model.n_exits, np.float32)
    start = time.perf_counter()
    compiled = progs.step.lower(params, opt_state, tokens, hparams, weights).compile()
  return compiled, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--remat", default="none,block,dots")
  parser.add_argument("--depths", default="4,16,32")
  args = parser.parse_args()
  base = ModelConfig(vocab_size=32768, d_model=512, n_layers=8, n_heads=8, d_ff=1536,
                     max_seq_len=1024, unembed="tied", exit_layers=(8,))
  variants = {"dense": dict(exit_layers=(8,)), "G=4 norm": dict(exit_layers=(2, 4, 6, 8)),
              "G=4 block": dict(exit_layers=(2, 4, 6, 8), exit_head="block")}
  temp = {}
  print(f"{'step':<12} {'remat':<6} {'temp GB':>8} {'over dense':>10}")
  for remat in args.remat.split(","):
    for name, overrides in variants.items():
      model = dataclasses.replace(base, **overrides, remat=remat)
      compiled, _ = compiled_step(model, 8, 1024)
      temp[(name, remat)] = compiled.memory_analysis().temp_size_in_bytes / 1e9
      ratio = temp[(name, remat)] / temp[("dense", remat)]
      print(f"{name:<12} {remat:<6} {temp[(name, remat)]:>8.2f} {ratio:>10.2f}", flush=True)
  compile_s = {}
  for depth in (int(d) for d in args.depths.split(",")):
    model = ModelConfig(vocab_size=264, d_model=128, n_layers=depth, n_heads=4, d_ff=384,
                        max_seq_len=128, exit_layers=(depth // 2, depth))
    _, compile_s[depth] = compiled_step(model, 8, 128)
    print(f"compile, {depth} layers: {compile_s[depth]:.2f} s", flush=True)
  depths = sorted(compile_s)
  print(json.dumps({
      "dense_temp_gb": temp[("dense", "none")],
      "norm_over_dense": temp[("G=4 norm", "none")] / temp[("dense", "none")],
      "block_over_dense": temp[("G=4 block", "none")] / temp[("dense", "none")],
      "temp_gb": {f"{n} / {r}": v for (n, r), v in temp.items()},
      "compile_s": compile_s,
      "compile_32_over_4": compile_s[depths[-1]] / compile_s[depths[0]]}))


if __name__ == "__main__":
  main()
