"""Training throughput and model FLOPs utilisation (MFU) of a preset on the devices present.

Trains `--preset` (famjax/presets/train.py) in bfloat16 on every local device (data parallel
unless --model / --fsdp say otherwise), for each --remat policy, and prints step time, tokens/s,
MFU = famjax.accounting FLOPs per token x tokens/s / (peak FLOP/s per device x devices; the peak
from famjax.model.config import MeshConfig
from famjax.train.config import ExperimentConfig, experiment_from_dict
from famjax.hardware.chips by device kind, or --peak_flops) and peak device memory. On
accelerators jax.nn.dot_product_attention picks the fused attention kernel. Ends with one JSON line.

Usage: python benchmarks/mfu.py --preset small [--remat none,block,dots] [--batch 32 --seq 512]
On a CPU, use small shapes: --preset tiny --batch 8 --seq 128.
"""

import argparse
import dataclasses
import json
import statistics
import time

import jax
import numpy as np

from famjax.hardware import chips
from famjax.model import counts, sharding
from famjax.model.config import MeshConfig
from famjax.presets import train as presets
from famjax.train.config import ExperimentConfig, experiment_from_dict
from famjax.train.loop import Trainer


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="small")
  parser.add_argument("--remat", default="none,block,dots")
  parser.add_argument("--batch", type=int, default=0, help="global batch (0: the preset's)")
  parser.add_argument("--seq", type=int, default=0, help="sequence length (0: the preset's)")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--fsdp", type=int, default=1)
  parser.add_argument("--model", type=int, default=1)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--peak_flops", type=float, default=0.0, help="per device; 0: by kind")
  args = parser.parse_args()
  base = experiment_from_dict(presets.get_config(args.preset).to_dict())
  train_cfg = dataclasses.replace(base.train, batch_size=args.batch or base.train.batch_size,
                                  seq_len=args.seq or base.train.seq_len, progress=False)
  devices = jax.devices()
  kind = devices[0].device_kind
  chip = chips.of_device_kind(kind)
  peak = args.peak_flops or (chip.peak_flops if chip else None)
  mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=args.fsdp, model=args.model))
  batch = np.random.default_rng(0).integers(0, base.model.vocab_size,
                                            (train_cfg.batch_size, train_cfg.seq_len + 1),
                                            dtype=np.int32)
  print(f"{len(devices)} x {kind}; preset {args.preset}, {args.dtype}, batch "
        f"{train_cfg.batch_size} x {train_cfg.seq_len}; peak "
        f"{f'{peak:.3g} FLOP/s per device' if peak else 'unknown (pass --peak_flops)'}")
  results = []
  for remat in args.remat.split(","):
    model = dataclasses.replace(base.model, dtype=args.dtype, remat=remat,
                                max_seq_len=max(base.model.max_seq_len, train_cfg.seq_len))
    trainer = Trainer.create(ExperimentConfig(model=model, train=train_cfg), mesh)
    jax.block_until_ready(trainer.step(batch))  # compile
    times = []
    for _ in range(args.steps):
      start = time.perf_counter()
      jax.block_until_ready(trainer.step(batch))
      times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    tokens_per_s = train_cfg.batch_size * train_cfg.seq_len / step_s
    flops_per_token = counts.account(model, train_cfg.seq_len).flops_per_token
    mfu = flops_per_token * tokens_per_s / (peak * len(devices)) if peak else None
    stats = devices[0].memory_stats() or {}
    peak_gb = stats.get("peak_bytes_in_use", 0) / 1e9 or None
    results.append({"remat": remat, "step_s": step_s, "tokens_per_s": tokens_per_s,
                    "mfu": mfu, "peak_memory_gb": peak_gb})
    print(f"remat {remat:<5}: {step_s * 1e3:8.1f} ms/step, {tokens_per_s:12,.0f} tokens/s, MFU "
          f"{f'{mfu:.1%}' if mfu is not None else 'n/a'}, peak memory "
          f"{f'{peak_gb:.2f} GB' if peak_gb else 'n/a'}", flush=True)
  print(json.dumps({"device": kind, "n_devices": len(devices), "preset": args.preset,
                    "dtype": args.dtype, "batch": train_cfg.batch_size, "seq": train_cfg.seq_len,
                    "results": results}))


if __name__ == "__main__":
  main()
