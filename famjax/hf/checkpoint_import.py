"""A Llama, Mistral or Qwen2 checkpoint from a local directory imported as a dense famjax model,
and a family started from it (exits added, `train.init_from`). Files are read with `safetensors`;
transformers is not needed. Exits are numbered 1..G, as on the command line."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np

from famjax.common.files import atomic_write_text
from famjax.hf import configs, weights
from famjax.hf.weights import BadCheckpoint
from famjax.model.config import ModelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
EXPORT_MARKER = "famjax_export.json"
INIT_RECORD = "init_from"  # a run's copy of its source's config and tokenizer side files


def _directory(path) -> Path:
  directory = Path(path).expanduser()
  if not directory.is_dir():
    raise FileNotFoundError(f"{directory} is not a directory (a local Hugging Face model: "
                            "config.json and safetensors weights; nothing is downloaded)")
  return directory


def tokenizer_file(directory: Path) -> Path | None:
  """The directory's tokenizer (tokenizer.json preferred), or None."""
  return next((directory / n for n in TOKENIZER_FILES if (directory / n).is_file()), None)


def _check_tokenizer(directory: Path, cfg: ModelConfig) -> None:
  path = directory / "tokenizer.json"
  if not path.is_file():
    return
  from tokenizers import Tokenizer
  size = Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
  if size > cfg.vocab_size:
    raise BadCheckpoint(f"{path}: its {size}-token vocabulary is larger than vocab_size="
                        f"{cfg.vocab_size} in {directory / configs.CONFIG}")


def load(path) -> tuple[ModelConfig, dict]:
  """(ModelConfig, params) of the dense model in a local HF directory: params in the layout of
  nnx.to_pure_dict(FamilialTransformer(cfg)), float32 numpy."""
  directory = _directory(path)
  cfg = configs.model_config(configs.read(directory), directory / configs.CONFIG)
  _check_tokenizer(directory, cfg)
  return cfg, weights.to_params(directory, cfg)


def dense_config(path) -> ModelConfig:
  """The dense ModelConfig of a local HF directory's config.json (weights not read)."""
  directory = _directory(path)
  return configs.model_config(configs.read(directory), directory / configs.CONFIG)


def with_checkpoint(values: dict) -> dict:
  """An experiment's nested config values (as experiments/train.py's flags give them) with the
  architecture of train.init_from's checkpoint, and its tokenizer when data.tokenizer is left at
  "byte". Other fields (exit_layers, exit_head, unembed, ...) stay the user's."""
  path = values.get("train", {}).get("init_from")
  if not path:
    return values
  directory = _directory(path)
  fixed = configs.architecture_fields(dense_config(directory))
  out = {**values, "model": {**values.get("model", {}), **fixed}}
  tokenizer = tokenizer_file(directory)
  if tokenizer is not None and values.get("data", {}).get("tokenizer", "byte") == "byte":
    out["data"] = {**values.get("data", {}), "tokenizer": str(tokenizer)}
  return out


def family_config(path, **choices) -> ModelConfig:
  """The ModelConfig of a family on the checkpoint's backbone: its architecture, and famjax's
  choices (exit_layers, exit_head, unembed, dtype, remat, ...) from `choices`."""
  directory = _directory(path)
  dense = dense_config(directory)
  fixed = configs.architecture_fields(dense)
  clash = sorted(set(choices) & set(fixed))
  if clash:
    raise ValueError(f"model.{clash[0]} comes from {directory / configs.CONFIG}; leave it out")
  values = {"exit_layers": (dense.n_layers,), "unembed": dense.unembed,
            "max_seq_len": dense.max_seq_len, **fixed, **choices}
  return ModelConfig(**values)


def check_architecture(cfg: ModelConfig, dense: ModelConfig, path) -> None:
  """The run's model must be the checkpoint's backbone: errors name the field and both values."""
  ours, theirs = configs.architecture_fields(cfg), configs.architecture_fields(dense)
  for name in ours:
    if ours[name] != theirs[name]:
      raise ValueError(f"model.{name}={ours[name]!r} differs from {theirs[name]!r} in "
                       f"{Path(path) / configs.CONFIG} (train.init_from): the architecture "
                       "comes from the checkpoint")
  if cfg.unembed == "tied" and dense.unembed != "tied":
    raise ValueError(f"model.unembed='tied' cannot hold the separate lm_head of {path}: use "
                     "'shared' or 'per_exit'")


def _unembedding(cfg: ModelConfig, params: dict) -> np.ndarray:
  """The dense model's [M, V] unembedding."""
  if cfg.unembed == "tied":
    return params["embed"]["embedding"].T
  return params["exits"][0]["unembed"]["kernel"]


def family_params(cfg: ModelConfig, fresh: dict, dense_cfg: ModelConfig, dense: dict,
                  init_exits: str = "copy") -> dict:
  """A family's parameters on the dense model's backbone. Segments take their layers; the deepest
  exit takes the final norm and unembedding, so its logits equal the dense model's. Added exits
  ("copy") start from the final norm and unembedding, and a private block from the layer after
  the exit (as EE-Tuning); with "fresh" they keep `fresh`'s initialisation (the family's own
  parameters, nnx.to_pure_dict layout). Returns float32 numpy arrays."""
  out = host_params(fresh)
  layers = dense["segments"][0]["blocks"]
  bounds = (0,) + cfg.exit_layers
  out["embed"] = dense["embed"]
  for g in range(cfg.n_exits):
    out["segments"][g]["blocks"] = jax.tree.map(lambda a, g=g: a[bounds[g]:bounds[g + 1]], layers)
  final_norm, unembed_MV = dense["exits"][0]["norm"], _unembedding(dense_cfg, dense)
  last = cfg.n_exits - 1
  for g, head in out["exits"].items():
    if g != last and init_exits == "fresh":
      continue
    head["norm"] = final_norm
    if "block" in head:  # a private block (never the last exit's) starts as layer l_g + 1
      head["block"] = jax.tree.map(lambda a, g=g: a[cfg.exit_layers[g]], layers)
    if cfg.unembed == "per_exit":
      head["unembed"] = {"kernel": unembed_MV}
  if cfg.unembed == "shared":
    out["exits"][0]["unembed"] = {"kernel": unembed_MV}
  return jax.tree.map(lambda a: np.asarray(a, np.float32), out)


def save_source_files(directory, workdir: Path) -> None:
  """Copies the source checkpoint's config.json and tokenizer side files (no weights) into
  workdir/init_from/, so that exports carry its tokenizer_config and special tokens."""
  directory, dest = Path(directory), Path(workdir) / INIT_RECORD
  dest.mkdir(parents=True, exist_ok=True)
  for name in (configs.CONFIG,) + SIDE_FILES:
    if (directory / name).is_file():
      shutil.copyfile(directory / name, dest / name)
  atomic_write_text(dest / "source.txt", str(directory.resolve()) + "\n")


def host_params(params: dict) -> dict:
  """Parameters as numpy arrays on the host (a no-op for numpy ones)."""
  return jax.tree.map(np.asarray, jax.device_get(params))

