"""Shared fixtures: a small generated corpus, a private token cache, tiny configs."""

import os
import random
from pathlib import Path

import pytest

from famjax.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig

WORDS = ("the model exits early when its confidence is high and the shared backbone keeps its "
         "cache for deeper tiers def return import class for while if else loss token layer "
         "scaling law compute budget family granularity").split()


def reference_data_dir() -> Path:
  """Public reference data: $FAMJAX_REFERENCE_DATA, or ../shared/reference-data beside the
  checkout (tests that need it skip where it is absent)."""
  env = os.environ.get("FAMJAX_REFERENCE_DATA")
  return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "reference-data"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
  """Keeps the tests' token caches out of the user's ~/.cache."""
  path = tmp_path_factory.mktemp("famjax-cache")
  old = os.environ.get("FAMJAX_CACHE")
  os.environ["FAMJAX_CACHE"] = str(path)
  yield path
  if old is None:
    os.environ.pop("FAMJAX_CACHE", None)
  else:
    os.environ["FAMJAX_CACHE"] = old


def write_corpus(root, n_docs=60, words_per_doc=400, seed=0):
  rng = random.Random(seed)
  root.mkdir(parents=True, exist_ok=True)
  for i in range(n_docs):
    text = " ".join(rng.choice(WORDS) for _ in range(words_per_doc))
    (root / f"doc{i:03d}.txt").write_text(text + "\n")
  return root


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("corpus") / "docs")


def tiny_model(**overrides) -> ModelConfig:
  values = dict(d_model=32, n_layers=3, n_heads=2, d_ff=64, max_seq_len=32, exit_layers=(1, 2, 3))
  values.update(overrides)
  return ModelConfig(**values)


@pytest.fixture
def tiny_experiment(corpus_dir):
  def make(model=None, **train_overrides):
    train = dict(batch_size=8, seq_len=32, steps=60, learning_rate=1e-2, warmup_steps=5,
                 log_every=10, eval_every=30, eval_batches=2, checkpoint_every=30, progress=False)
    train.update(train_overrides)
    return ExperimentConfig(model=model or tiny_model(),
                            data=DataConfig(corpus=str(corpus_dir), val_fraction=0.1),
                            train=TrainConfig(**train))
  return make
