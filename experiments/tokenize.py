"""Tokenizes a config's corpus into the token store and prints what it holds:
python -m experiments.tokenize --config=experiments/configs/isoflop.py:paper
--config.data.corpus='/data/*.parquet' --config.data.tokenizer=/data/tokenizer.json

Training and studies build the store on first use; run this once beforehand where many
processes would otherwise start on the same corpus together (a SLURM array). Takes the same
--config (train.py or isoflop.py presets) as the run it prepares; only the data section is read.
"""


from ml_collections import config_flags

from experiments import cli
from famjax import data
from famjax.data.config import DataConfig

_CONFIG = config_flags.DEFINE_config_file("config", None,
                                          cli.config_help("train.py", "tiny", "small"))


def main(argv):
  del argv
  cfg = DataConfig(**_CONFIG.value.data.to_dict())
  tokens = data.load_tokens(cfg)
  print(f"corpus {cfg.corpus!r}, tokenizer {tokens.tokenizer.name} ({tokens.vocab_size:,} ids, "
        f"EOS {tokens.tokenizer.eos_id}); fingerprint {tokens.fingerprint[:12]}")
  print(f"train: {tokens.n_train_docs:,} documents, {len(tokens.train):,} tokens")
  print(f"val:   {tokens.n_val_docs:,} documents, {len(tokens.val):,} tokens")
  print(f"store: {tokens.store}")


if __name__ == "__main__":
  cli.run(main, "train.py", "tiny")
