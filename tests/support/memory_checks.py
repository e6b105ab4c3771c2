"""Run in a subprocess (JAX must start with 2 CPU devices); prints `RESULT {json}`.

Measures every setting of a small family's train step on a simulated 2-device node, then asks
famjax.hardware.memory.choose for each capacity between the measured peaks, so that the test can
compare its search with the brute-force cheapest setting. Called by tests/hardware/test_memory.py.
"""

import itertools
import json
import sys
from pathlib import Path

from famjax.hardware import memory
from famjax.model.config import ModelConfig


def main(cache: Path):
  devices = memory.simulated_devices(2)
  model = ModelConfig(vocab_size=264, d_model=64, n_layers=4, n_heads=4, d_ff=128,
                      max_seq_len=64, exit_layers=(2, 4))
  shape = (8, 64)
  target = memory.Target(devices, 1, 1e12, cache)
  measured = {}
  for fsdp, remat, micro in itertools.product((1, 2), memory.REMAT_ORDER, (1, 2, 4)):
    setting = memory.Setting(fsdp, remat, micro)
    measured[str(setting)] = [list(memory._rank(setting)),
                              memory.measure(model, shape, setting, target).__dict__]
  chosen = {}
  for peak in sorted({fp["peak"] for _, fp in measured.values()}):
    plan = memory.choose(model, shape, memory.Target(devices, 1, peak, cache))
    chosen[peak] = [str(plan.setting), plan.compiles]
  impossible = memory.choose(model, shape, memory.Target(devices, 1, 1000.0, cache), ("r",))
  floor = memory.choose(model, shape, memory.Target(devices, 1, 1e12, cache),
                        floor=memory.Setting(2, "dots", 2))
  print("RESULT " + json.dumps({
      "measured": measured, "chosen": chosen,
      "impossible": [impossible.setting, str(impossible.measured_at),
                     memory.refusals([impossible], memory.Target(devices, 1, 1000.0))],
      "floor": str(floor.setting),
      "bounds": {name: memory.lower_bound(model, shape, memory.Setting(
          int(name.split(",")[0].split()[1]), name.split()[3].rstrip(","),
          int(name.split()[-1])), target) for name in measured},
      "state_difference": {f: memory.choose(model, shape, memory.Target(
          devices, 1, 1e12, cache), floor=memory.Setting(f, "none", 1)).state_difference
          for f in (1, 2)}}))


if __name__ == "__main__":
  main(Path(sys.argv[1]))
