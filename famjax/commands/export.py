"""Exports a trained family's exits as Hugging Face directories: famjax export
--workdir=TRAINED_RUN --exit=2 --out=DIR (or --exit=all: DIR/exit{g}/ each, and DIR/index.json).

Each directory is a LlamaForCausalLM (Qwen2ForCausalLM when the model has q/k/v biases) of the
exit's depth (+1 layer for a "block" head): config.json, model.safetensors, generation_config.json
and the run's tokenizer. Logic lives in famjax.hf; this file only parses flags and prints.
"""

from pathlib import Path

from absl import flags, logging

from famjax.train import hf_export

PRESET = None  # `famjax export` takes no --config

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run's workdir.", required=True)
_EXIT = flags.DEFINE_string("exit", "all", "Exit to export, 1..G, or 'all'.")
_OUT = flags.DEFINE_string("out", None, "Directory to write (replaced if a famjax export).",
                           required=True)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  exit_ = _EXIT.value.strip()
  if exit_ != "all" and not exit_.isdigit():
    raise ValueError(f"--exit must be an exit number (1..G) or 'all'; got {exit_!r}")
  records = hf_export.export_run(Path(_WORKDIR.value), exit_ if exit_ == "all" else int(exit_),
                        Path(_OUT.value))
  for record in records:
    where = Path(_OUT.value) / record.get("directory", "")
    layers = record["num_hidden_layers"]
    print(f"exit {record['exit']} (layer {record['exit_layer']}): {record['architecture']} of "
          f"{layers} layer{'s' * (layers != 1)} -> {where}")
