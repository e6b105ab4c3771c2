"""Bytes per device of the same train steps from the CPU simulation and from the TPU compiler:
how far the CPU plan (study.memory_target="cpu") can be trusted for an accelerator.

Plans the `paper` preset's largest family per budget for a TPU slice (read from famjax's cache
when planned before), then compiles each chosen (shape, setting) for as many simulated CPU
devices, and prints both footprints side by side. Needs the tpu extra (libtpu); run with
JAX_PLATFORMS=cpu. Ends with one JSON line.

Usage: JAX_PLATFORMS=cpu python benchmarks/memory_targets.py [--target tpu:v5p:2x2x2]
"""

import argparse
import dataclasses
import json

from famjax import pipeline
from famjax.hardware import memory, tpu
from famjax.study import isoflop, saved_config


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--target", default="tpu:v5p:2x2x2")
  args = parser.parse_args()
  from famjax.presets import isoflop as presets
  study, base = saved_config.configs(presets.get_config("paper").to_dict())
  study = dataclasses.replace(study, memory_target=args.target, memory_runs="largest")
  chips = tpu.parse(args.target).chips  # the CPU devices first: before JAX's CPU backend starts
  cpu_target = pipeline.memory_target(dataclasses.replace(
      study, memory_target="cpu", memory_devices=chips), base)
  tpu_target = pipeline.memory_target(study, base)
  runs = memory.largest_per_budget(isoflop.plan_study(study, base,
                                                      study.planned_corpus_tokens).runs)
  shape = (base.train.batch_size, base.train.seq_len)
  plans = memory.plan_memory(runs, *shape, tpu_target)
  gb = lambda n: round(n / 1e9, 2)
  rows = []
  print(f"{'shape':<22} {'setting':<30} {'TPU temps':>9} {'TPU peak':>8} {'CPU temps':>9} "
        f"{'CPU peak':>8} {'CPU/TPU':>7}   (GB per device)")
  for plan in (p for p in plans if p.setting is not None):
    cpu = memory.measure(plan.model, shape, plan.setting, cpu_target)
    on_tpu = plan.footprint
    name = f"d{plan.model.d_model}L{plan.model.n_layers} G{plan.model.n_exits}"
    rows.append({"shape": name, "setting": str(plan.setting), "tpu_temps": gb(on_tpu.temporaries),
                 "tpu_peak": gb(on_tpu.peak), "cpu_temps": gb(cpu.temporaries),
                 "cpu_peak": gb(cpu.peak), "cpu_over_tpu": round(cpu.peak / on_tpu.peak, 3)})
    r = rows[-1]
    print(f"{name:<22} {r['setting']:<30} {r['tpu_temps']:>9} {r['tpu_peak']:>8} "
          f"{r['cpu_temps']:>9} {r['cpu_peak']:>8} {r['cpu_over_tpu']:>7}")
  print(json.dumps({"target": args.target, "rows": rows}))


if __name__ == "__main__":
  main()
