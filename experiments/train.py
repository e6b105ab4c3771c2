"""Trains one familial model: python -m experiments.train --config=...:tiny --workdir=DIR.

Logic lives in famjax (importable from Colab); this file only parses flags.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from famjax import config as famjax_config
from famjax import sharding, train

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/train.py:tiny",
                                          "Preset file and name, e.g. configs/train.py:tiny.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/tiny", "Checkpoints, metrics and summary go here; "
                               "rerunning with the same workdir resumes.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-host runs (or set "
    "JAX_COORDINATOR_ADDRESS); unset on one host.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0-based.")


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  cfg = famjax_config.experiment_from_dict(_CONFIG.value.to_dict())
  summary = train.train(cfg, _WORKDIR.value)
  print(f"trained {summary['step']} steps, {summary['tokens']:,} tokens; corpus "
        f"{summary['corpus_fingerprint'][:12]}")
  print(f"{'exit':>4} {'layer':>5} {'params':>12} {'train loss':>10} {'val loss':>9}")
  for g, layer in enumerate(summary["exit_layers"]):
    print(f"{g + 1:>4} {layer:>5} {summary['params_per_exit'][g]:>12,} "
          f"{summary['train_loss'][g]:>10.4f} {summary['val_loss'][g]:>9.4f}")
  print(f"summary: {_WORKDIR.value}/summary.json")


if __name__ == "__main__":
  app.run(main)
