"""Trains one familial model: famjax train --config=tiny
--workdir=DIR [--config.train.steps=500 ...].

With --config.train.init_from=HF_DIR (a local Llama, Mistral or Qwen2 directory) the model's
architecture fields and, unless data.tokenizer names one, the tokenizer come from that
checkpoint; --config.model.exit_layers places the exits on its layers.

Logic lives in famjax (importable from Colab); this file only parses flags.
"""

from absl import flags
from ml_collections import config_flags

from famjax.commands import common
from famjax.hf import checkpoint_import
from famjax.train import config, loop

# the --config preset file and preset that `famjax train` uses when --config is not given
PRESET = ('train.py', 'tiny')

_CONFIG = config_flags.DEFINE_config_file("config", None,
                                          common.config_help("train.py", "tiny", "small"))
_WORKDIR = flags.DEFINE_string("workdir", "runs/tiny", "Checkpoints, metrics and summary go here; "
                               "rerunning with the same workdir resumes.")
flags.adopt_module_key_flags(common)  # --coordinator_address, --num_processes, ...


def main(argv):
  del argv
  common.quiet_logs()
  common.use_compilation_cache()
  common.initialize_distributed()
  cfg = config.experiment_from_dict(checkpoint_import.with_checkpoint(_CONFIG.value.to_dict()))
  if cfg.train.init_from:
    print(f"init_from {cfg.train.init_from}: {cfg.model.n_layers} layers, d_model "
          f"{cfg.model.d_model}, exits after layers {list(cfg.model.exit_layers)}, tokenizer "
          f"{cfg.data.tokenizer}, trainable {cfg.train.trainable!r}")
  summary = loop.train(cfg, _WORKDIR.value)
  print(f"trained {summary['step']} steps, {summary['tokens']:,} tokens; corpus "
        f"{summary['corpus_fingerprint'][:12]}")
  print(f"{'exit':>4} {'layer':>5} {'params':>12} {'train loss':>10} {'val loss':>9}")
  for g, layer in enumerate(summary["exit_layers"]):
    train_loss = summary["train_loss"][g] if summary["train_loss"] else float("nan")
    print(f"{g + 1:>4} {layer:>5} {summary['params_per_exit'][g]:>12,} "
          f"{train_loss:>10.4f} {summary['val_loss'][g]:>9.4f}")
  print(f"summary: {_WORKDIR.value}/summary.json")

