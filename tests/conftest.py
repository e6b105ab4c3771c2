"""Shared fixtures: a small generated corpus, a private token cache, tiny configs, and data drawn
from the paper's law."""

import os
import random
from pathlib import Path

import jax
import numpy as np
import pytest

from famjax.data.config import DataConfig
from famjax.model.config import ModelConfig
from famjax.scaling import fitting, laws
from famjax.train.config import ExperimentConfig, TrainConfig

WORDS = ("the model exits early when its confidence is high and the shared backbone keeps its "
         "cache for deeper tiers def return import class for while if else loss token layer "
         "scaling law compute budget family granularity").split()


def reference_data_dir() -> Path:
  """Public reference data: $FAMJAX_REFERENCE_DATA, or ../shared/reference-data beside the
  checkout (tests that need it skip where it is absent)."""
  env = os.environ.get("FAMJAX_REFERENCE_DATA")
  return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "reference-data"


# The files of `make check` that take longest (measured 2026-12-03), started first: with
# `--dist loadfile --no-loadscope-reorder` (the Makefile's) the two workers take whole files in
# collection order, so a long file dealt last would leave one worker running it alone at the end
# (xdist's default order, most tests first, started the second code path's 4-minute file last).
# Only the order changes, never what runs.
LONGEST_FIRST = ("test_portability.py", "test_bootstrap.py", "test_notebooks.py",
                 "test_pipeline.py",
                 "test_sharding.py", "test_memory.py", "test_decode.py", "test_fitting.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file


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


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
  """One persistent XLA cache for the whole run: both xdist workers, the command lines and the
  notebooks they start, so that a program compiled once (a tiny train step, a fitter) is read
  back everywhere else instead of compiled again."""
  base = tmp_path_factory.getbasetemp()
  path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "xla-cache"
  path.mkdir(exist_ok=True)
  settings = {"JAX_COMPILATION_CACHE_DIR": str(path),
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2"}
  old = {name: os.environ.get(name) for name in settings}
  os.environ.update(settings)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  yield path
  for name, value in old.items():
    if value is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = value


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


PAPER = laws.to_log_params(laws.PAPER_FAMILIAL)


def synthetic_family(noise=0.0, seed=0):
  """An IsoFLOP-like design over N, D and G drawn from the paper's law."""
  rng = np.random.default_rng(seed)
  n, d, g = np.meshgrid(np.geomspace(3e7, 3e9, 6), np.geomspace(1e9, 1e11, 5), [1, 2, 4, 8])
  data = {"N": n.ravel(), "D": d.ravel(), "G": g.ravel().astype(float)}
  with jax.enable_x64(True):
    clean = np.asarray(laws.loss(laws.FAMILIAL, PAPER, fitting.as_data(data)))
  data["loss"] = clean * np.exp(noise * rng.standard_normal(clean.shape))
  return data
