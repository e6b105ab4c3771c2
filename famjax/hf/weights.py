"""Hugging Face safetensors <-> famjax parameters of a dense model (one segment, one exit).

HF Llama-family names (`model.layers.{i}.self_attn.q_proj.weight`, ...) hold torch Linear weights
[out, in]; famjax holds kernels [in, out] with heads split out ([M, Q, H] for q, [Q, H, M] for
o) and the layers stacked on a leading axis. Both use the half-split rotary layout (HF's
`rotate_half`), so q and k need no permutation. Files: `model.safetensors`, or the shards a
`model.safetensors.index.json` lists.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from famjax.model.config import ModelConfig

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PROJECTIONS = {"query": "q_proj", "key": "k_proj", "value": "v_proj"}
MLP = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


class BadCheckpoint(ValueError):
  """A weight file that does not match its config.json: missing tensor, wrong shape, bad file."""


def _files(directory: Path) -> list[Path]:
  if (directory / INDEX).is_file():
    weight_map = json.loads((directory / INDEX).read_text()).get("weight_map", {})
    return sorted({directory / name for name in weight_map.values()})
  if (directory / SINGLE).is_file():
    return [directory / SINGLE]
  found = sorted(p.name for p in directory.glob("*.bin")) + sorted(
      p.name for p in directory.glob("*.pth"))
  raise FileNotFoundError(f"{directory} has neither {SINGLE} nor {INDEX}"
                          + (f" (found {found[:3]}: convert torch pickles to safetensors "
                             "first)" if found else ""))


def read_tensors(directory: Path) -> tuple[dict[str, np.ndarray], dict[str, Path]]:
  """Every tensor of the checkpoint as float32 numpy, and the file each came from."""
  tensors, origin = {}, {}
  for path in _files(directory):
    if not path.is_file():
      raise BadCheckpoint(f"{directory / INDEX} lists {path.name}, which does not exist")
    try:
      loaded = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
      raise BadCheckpoint(f"{path}: not a readable safetensors file ({e})") from None
    for name, array in loaded.items():
      tensors[name] = np.asarray(array, np.float32)
      origin[name] = path
  return tensors, origin


class _Reader:
  """Takes tensors by name, checking each one's shape; errors name the file and the tensor."""

  def __init__(self, directory: Path, tensors: dict, origin: dict):
    self.directory, self.tensors, self.origin = directory, tensors, origin
    self.used: set[str] = set()

  def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in self.tensors:
      files = sorted({p.name for p in self.origin.values()}) or [SINGLE]
      raise BadCheckpoint(f"{self.directory}: tensor {name} is missing from {', '.join(files)}")
    array = self.tensors[name]
    if array.shape != shape:
      raise BadCheckpoint(f"{self.origin[name]}: tensor {name} has shape {list(array.shape)}; "
                          f"config.json implies {list(shape)}")
    self.used.add(name)
    return array


def _layer(read: _Reader, cfg: ModelConfig, i: int) -> dict:
  m, f, h = cfg.d_model, cfg.d_ff, cfg.head_size
  heads = {"query": cfg.n_heads, "key": cfg.kv_heads, "value": cfg.kv_heads}
  prefix = f"model.layers.{i}."
  attn = {}
  for ours, theirs in PROJECTIONS.items():
    w = read.take(f"{prefix}self_attn.{theirs}.weight", (heads[ours] * h, m))
    attn[ours] = {"kernel": w.T.reshape(m, heads[ours], h)}
    if cfg.attention_bias:
      b = read.take(f"{prefix}self_attn.{theirs}.bias", (heads[ours] * h,))
      attn[ours]["bias"] = b.reshape(heads[ours], h)
  o = read.take(f"{prefix}self_attn.o_proj.weight", (m, cfg.n_heads * h))
  attn["out"] = {"kernel": o.T.reshape(cfg.n_heads, h, m)}
  shapes = {"gate": (f, m), "up": (f, m), "down": (m, f)}
  mlp = {ours: {"kernel": read.take(f"{prefix}mlp.{theirs}.weight", shapes[ours]).T}
         for ours, theirs in MLP.items()}
  return {"attn_norm": {"scale": read.take(f"{prefix}input_layernorm.weight", (m,))},
          "attn": attn, "mlp": mlp,
          "mlp_norm": {"scale": read.take(f"{prefix}post_attention_layernorm.weight", (m,))}}


def _stack(layers: list[dict]) -> dict:
  if isinstance(layers[0], dict):
    return {k: _stack([layer[k] for layer in layers]) for k in layers[0]}
  return np.stack(layers)


def to_params(directory: Path, cfg: ModelConfig) -> dict:
  """The dense model's parameters (nnx.to_pure_dict layout) from the directory's weights."""
  read = _Reader(directory, *read_tensors(directory))
  v, m = cfg.vocab_size, cfg.d_model
  head = {"norm": {"scale": read.take("model.norm.weight", (m,))}}
  if cfg.unembed != "tied":
    head["unembed"] = {"kernel": read.take("lm_head.weight", (v, m)).T}
  params = {"embed": {"embedding": read.take("model.embed_tokens.weight", (v, m))},
            "segments": {0: {"blocks": _stack([_layer(read, cfg, i)
                                               for i in range(cfg.n_layers)])}},
            "exits": {0: head}}
  unused = sorted(set(read.tensors) - read.used - {"lm_head.weight"})
  unused = [n for n in unused if not n.endswith("rotary_emb.inv_freq")]  # a cached table
  if unused:
    raise BadCheckpoint(f"{directory}: tensors famjax would not use: {unused[:4]}"
                        f"{' ...' if len(unused) > 4 else ''} (an option config.json does not "
                        "declare?)")
  return params


def _layer_tensors(layer: dict, cfg: ModelConfig, i: int) -> dict[str, np.ndarray]:
  m = cfg.d_model
  prefix = f"model.layers.{i}."
  out = {f"{prefix}input_layernorm.weight": layer["attn_norm"]["scale"],
         f"{prefix}post_attention_layernorm.weight": layer["mlp_norm"]["scale"],
         f"{prefix}self_attn.o_proj.weight": layer["attn"]["out"]["kernel"].reshape(-1, m).T}
  for ours, theirs in PROJECTIONS.items():
    kernel = layer["attn"][ours]["kernel"]
    out[f"{prefix}self_attn.{theirs}.weight"] = kernel.reshape(m, -1).T
    if "bias" in layer["attn"][ours]:
      out[f"{prefix}self_attn.{theirs}.bias"] = layer["attn"][ours]["bias"].reshape(-1)
  for ours, theirs in MLP.items():
    out[f"{prefix}mlp.{theirs}.weight"] = layer["mlp"][ours]["kernel"].T
  return out


def from_layers(cfg: ModelConfig, embedding, layers: list[dict], norm_scale, unembed_MV
                ) -> dict[str, np.ndarray]:
  """HF tensors of a dense model: its embedding, one parameter dict per layer (a Block's), the
  final norm and the unembedding [M, V] (None when tied to the embedding)."""
  tensors = {"model.embed_tokens.weight": embedding, "model.norm.weight": norm_scale}
  for i, layer in enumerate(layers):
    tensors.update(_layer_tensors(layer, cfg, i))
  if unembed_MV is not None:
    tensors["lm_head.weight"] = unembed_MV.T
  return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in tensors.items()}


def write(tensors: dict[str, np.ndarray], directory: Path) -> None:
  save_file(tensors, str(directory / SINGLE), metadata={"format": "pt"})
