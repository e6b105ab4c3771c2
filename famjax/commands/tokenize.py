"""Tokenizes a config's corpus into the token store and prints what it holds:
famjax tokenize --config=paper
--config.data.corpus='/data/*.parquet' --config.data.tokenizer=/data/tokenizer.json

Training and studies build the store on first use; run this once beforehand where many
processes would otherwise start on the same corpus together (a SLURM array). Takes the same
--config as the run it prepares (a name is a study preset; a run's, --config=train.py:NAME); only
the data section is read.
"""


from ml_collections import config_flags

from famjax import data
from famjax.commands import common
from famjax.data.config import DataConfig

# the --config preset file and preset that `famjax tokenize` uses when --config is not given
PRESET = ('isoflop.py', 'tiny')  # the study presets: each also has a data section

_CONFIG = config_flags.DEFINE_config_file("config", None,
                                          common.config_help("isoflop.py", "tiny", "paper"))


def main(argv):
  del argv
  cfg = DataConfig(**_CONFIG.value.data.to_dict())
  tokens = data.load_tokens(cfg)
  print(f"corpus {cfg.corpus!r}, tokenizer {tokens.tokenizer.name} ({tokens.vocab_size:,} ids, "
        f"EOS {tokens.tokenizer.eos_id}); fingerprint {tokens.fingerprint[:12]}")
  print(f"train: {tokens.n_train_docs:,} documents, {len(tokens.train):,} tokens")
  print(f"val:   {tokens.n_val_docs:,} documents, {len(tokens.val):,} tokens")
  print(f"store: {tokens.store}")

