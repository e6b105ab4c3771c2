"""Any exit of a family exported as a Llama or Qwen2 directory that transformers loads (a "norm"
head is a Llama of l_g layers; a "block" head adds its private block as layer l_g + 1)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax

from famjax.common.files import atomic_write_text
from famjax.hf import configs, weights
from famjax.hf.checkpoint_import import EXPORT_MARKER, TOKENIZER_FILES, host_params
from famjax.model.config import ModelConfig


def _exit_layers(cfg: ModelConfig, params: dict, g: int) -> list[dict]:
  """Exit g's (0-based) layers in order, one Block parameter dict each."""
  layers = []
  for s in range(g + 1):
    stacked = params["segments"][s]["blocks"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    layers += [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n)]
  if "block" in params["exits"][g]:
    layers.append(params["exits"][g]["block"])
  return layers


def _special_ids(tokenizer) -> dict:
  ids = {"eos_token_id": getattr(tokenizer, "eos_id", None),
         "bos_token_id": getattr(tokenizer, "bos_id", None)}
  return {k: int(v) for k, v in ids.items() if v is not None}


def _write_tokenizer(out: Path, tokenizer_dir: Path | None, tokenizer, side_dir: Path | None,
                     max_len: int) -> list[str]:
  """Copies the run's tokenizer file (and, from side_dir, an imported model's tokenizer_config
  and special tokens); writes a tokenizer_config.json when none came. Returns the files."""
  if tokenizer is None or tokenizer_dir is None:
    return []
  source = tokenizer_dir / tokenizer.file_name
  shutil.copyfile(source, out / tokenizer.file_name)
  written = [tokenizer.file_name]
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    if side_dir is not None and (side_dir / name).is_file():
      shutil.copyfile(side_dir / name, out / name)
      written.append(name)
  if "tokenizer_config.json" not in written and tokenizer.file_name in TOKENIZER_FILES:
    token = lambda i: None if i is None else tokenizer.token_text(i)
    config = {"tokenizer_class": "PreTrainedTokenizerFast" if tokenizer.file_name ==
              "tokenizer.json" else "LlamaTokenizer", "model_max_length": max_len,
              "eos_token": token(tokenizer.eos_id),
              "bos_token": token(getattr(tokenizer, "bos_id", None))}
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=1))
    written.append("tokenizer_config.json")
  return written


def export_exit(cfg: ModelConfig, params: dict, exit_: int, out, tokenizer=None,
                tokenizer_dir: Path | None = None, side_dir: Path | None = None) -> dict:
  """Writes exit `exit_` (1..G) as a HF directory `out` (replaced whole; nothing is left half
  written). Returns what was written: exit, layers, architecture, files."""
  if not 1 <= exit_ <= cfg.n_exits:
    raise ValueError(f"--exit must be in 1..{cfg.n_exits} (the family's exits) or 'all'; "
                     f"got {exit_}")
  g = exit_ - 1
  params = host_params(params)
  layers = _exit_layers(cfg, params, g)
  unembed = None if cfg.unembed == "tied" else (
      params["exits"][g if cfg.unembed == "per_exit" else 0]["unembed"]["kernel"])
  tensors = weights.from_layers(cfg, params["embed"]["embedding"], layers,
                                params["exits"][g]["norm"]["scale"], unembed)
  special = _special_ids(tokenizer) if tokenizer is not None else {}
  hf = configs.hf_config(cfg, len(layers), unembed is None, special)
  out = Path(out)
  tmp = out.with_name(f".{out.name}.tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  weights.write(tensors, tmp)
  atomic_write_text(tmp / configs.CONFIG, json.dumps(hf, indent=1))
  generation = {"_from_model_config": True, **special}
  atomic_write_text(tmp / "generation_config.json", json.dumps(generation, indent=1))
  files = [weights.SINGLE, configs.CONFIG, "generation_config.json"]
  files += _write_tokenizer(tmp, tokenizer_dir, tokenizer, side_dir, cfg.max_seq_len)
  record = {"exit": exit_, "exit_layer": cfg.exit_layers[g], "num_hidden_layers": len(layers),
            "architecture": hf["architectures"][0], "files": files}
  atomic_write_text(tmp / EXPORT_MARKER, json.dumps(record, indent=1))
  _replace(tmp, out)
  return record


def _replace(tmp: Path, out: Path) -> None:
  """Moves tmp to out; an existing out is replaced only if famjax exported it."""
  if out.exists():
    if not (out / EXPORT_MARKER).is_file():
      shutil.rmtree(tmp, ignore_errors=True)
      raise FileExistsError(f"{out} exists and is not a famjax export; choose another --out")
    shutil.rmtree(out)
  tmp.rename(out)
