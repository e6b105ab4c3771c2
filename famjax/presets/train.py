"""Presets for experiments/train.py: `--config=tiny` (or `small`).

Every field of famjax.config can be overridden from the command line, e.g.
`--config.train.steps=200 --config.model.exit_head=block`.
"""

import dataclasses

import ml_collections

from famjax.data.config import DataConfig
from famjax.model.config import MeshConfig, ModelConfig
from famjax.train.config import TrainConfig

# The byte tokenizer's 259 ids, padded to a multiple of 8 so the vocabulary (embedding and every
# exit's unembedding) splits evenly over up to 8 model-parallel devices.
PADDED_BYTE_VOCAB = 264

PRESETS = {
    # G = 3 exits after layers 2, 3 and 4 of a 0.8M-parameter backbone; a minute on 2 CPU cores.
    "tiny": dict(
        model=ModelConfig(vocab_size=PADDED_BYTE_VOCAB, d_model=128, n_layers=4, n_heads=4,
                          d_ff=384, max_seq_len=128,
                          exit_layers=(2, 3, 4)),
        train=TrainConfig(batch_size=16, seq_len=128, steps=150, learning_rate=3e-3,
                          warmup_steps=15, eval_every=50, checkpoint_every=50, log_every=10),
    ),
    # G = 4 exits with Ruyi-style private blocks on a 25M-parameter backbone; for a GPU.
    "small": dict(
        model=ModelConfig(vocab_size=PADDED_BYTE_VOCAB, d_model=512, n_layers=8, n_heads=8,
                          d_ff=1536, max_seq_len=512,
                          exit_layers=(2, 4, 6, 8), exit_head="block"),
        train=TrainConfig(batch_size=32, seq_len=512, steps=2000, learning_rate=1e-3,
                          warmup_steps=200, eval_every=250, checkpoint_every=500, log_every=50),
    ),
}


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
  sections = {"model": ModelConfig(), "data": DataConfig(), "train": TrainConfig(),
              "mesh": MeshConfig(), **PRESETS[preset]}
  return ml_collections.ConfigDict(
      {name: dataclasses.asdict(value) for name, value in sections.items()})
