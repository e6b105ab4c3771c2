"""Hugging Face `config.json` <-> ModelConfig for the Llama family (Llama, Mistral, Qwen2).

Every option famjax does not implement is refused in one line naming the file and the field;
options that change nothing famjax computes (dropout, cache flags, token ids, tensor-parallel
hints) are read past. Weights load as float32 whatever `torch_dtype` / `dtype` says.
"""

from __future__ import annotations

import json
from pathlib import Path

from famjax.model.config import ModelConfig

CONFIG = "config.json"
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2"}


class UnsupportedConfig(ValueError):
  """A config.json option famjax does not implement, or a malformed value."""


def read(directory: Path) -> dict:
  path = directory / CONFIG
  if not path.is_file():
    raise FileNotFoundError(f"{directory} has no {CONFIG}: famjax.hf reads a local Hugging Face "
                            "model directory (config.json and safetensors weights)")
  try:
    values = json.loads(path.read_text())
  except ValueError as e:
    raise UnsupportedConfig(f"{path}: not valid JSON ({e})") from None
  if not isinstance(values, dict):
    raise UnsupportedConfig(f"{path}: not a JSON object")
  return values


def architecture(values: dict, path: Path) -> str:
  names = values.get("architectures") or []
  known = [n for n in names if n in ARCHITECTURES]
  if len(names) != 1 or not known:
    raise UnsupportedConfig(f"{path}: architectures={names!r} is not supported; famjax reads "
                            f"one of {sorted(ARCHITECTURES)}")
  return ARCHITECTURES[known[0]]


def _refuse(ok: bool, path: Path, field: str, value, allowed: str) -> None:
  if not ok:
    raise UnsupportedConfig(f"{path}: {field}={value!r} is not supported (famjax implements "
                            f"{allowed})")


def _rope_theta(values: dict, path: Path) -> float:
  """The rotary base from rope_parameters (transformers 5) or rope_theta / rope_scaling (4.x);
  any scaling type but "default" is refused."""
  params = values.get("rope_parameters") or values.get("rope_scaling") or {}
  field = "rope_parameters" if values.get("rope_parameters") else "rope_scaling"
  _refuse(isinstance(params, dict), path, field, params, "a single rope_parameters dict")
  kind = params.get("rope_type", params.get("type", "default"))
  _refuse(kind == "default", path, f"{field}.rope_type", kind, "rope_type 'default': plain "
          "rotary embeddings without scaling")
  factor = params.get("partial_rotary_factor", values.get("partial_rotary_factor", 1.0))
  _refuse(factor == 1.0, path, "partial_rotary_factor", factor, "1.0: every channel rotates")
  return float(params.get("rope_theta", values.get("rope_theta", 10_000.0)))


def _check_options(kind: str, values: dict, path: Path) -> None:
  _refuse(values.get("hidden_act", "silu") == "silu", path, "hidden_act",
          values.get("hidden_act"), "'silu' (SwiGLU)")
  _refuse(not values.get("mlp_bias", False), path, "mlp_bias", values.get("mlp_bias"),
          "MLPs without biases")
  _refuse("quantization_config" not in values, path, "quantization_config",
          values.get("quantization_config"), "float weights")
  if kind == "llama":
    _refuse(not values.get("attention_bias", False), path, "attention_bias",
            values.get("attention_bias"), "Llama attention without biases (Qwen2's q/k/v "
            "biases are read as Qwen2ForCausalLM; Llama's also has an o_proj bias)")
  window = values.get("sliding_window")
  if kind == "mistral":
    _refuse(window is None or window >= values.get("max_position_embeddings", 0), path,
            "sliding_window", window, "full attention: sliding_window null or at least "
            "max_position_embeddings")
  if kind == "qwen2":
    _refuse(not values.get("use_sliding_window", False), path, "use_sliding_window",
            values.get("use_sliding_window"), "full attention (use_sliding_window false)")
  layer_types = values.get("layer_types") or []
  _refuse(all(t == "full_attention" for t in layer_types), path, "layer_types",
          sorted(set(layer_types)), "'full_attention' layers only")


def _int(values: dict, key: str, path: Path, default=None) -> int:
  value = values.get(key, default)
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise UnsupportedConfig(f"{path}: {key}={value!r} must be a positive integer")
  return value


def model_config(values: dict, path: Path) -> ModelConfig:
  """The dense famjax model (one exit, after the last layer) a config.json describes."""
  kind = architecture(values, path)
  _check_options(kind, values, path)
  d_model, n_heads = _int(values, "hidden_size", path), _int(values, "num_attention_heads", path)
  n_layers = _int(values, "num_hidden_layers", path)
  kv_heads = _int(values, "num_key_value_heads", path, n_heads)
  head_dim = values.get("head_dim") or d_model // n_heads
  _int({"head_dim": head_dim}, "head_dim", path)
  try:
    return ModelConfig(
        vocab_size=_int(values, "vocab_size", path), d_model=d_model, n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=0 if kv_heads == n_heads else kv_heads,
        head_dim=0 if head_dim * n_heads == d_model else head_dim,
        attention_bias=kind == "qwen2", d_ff=_int(values, "intermediate_size", path),
        max_seq_len=_int(values, "max_position_embeddings", path, 2048),
        exit_layers=(n_layers,), exit_head="norm",
        unembed="tied" if values.get("tie_word_embeddings", False) else "shared",
        rope_theta=_rope_theta(values, path), norm_eps=float(values.get("rms_norm_eps", 1e-6)))
  except ValueError as e:
    raise UnsupportedConfig(f"{path}: {e}") from None


def architecture_fields(cfg: ModelConfig) -> dict:
  """The ModelConfig fields an imported checkpoint fixes (the rest are famjax's choices)."""
  names = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
           "attention_bias", "d_ff", "rope_theta", "norm_eps")
  return {name: getattr(cfg, name) for name in names}


def hf_config(cfg: ModelConfig, n_layers: int, tied: bool, special_ids: dict) -> dict:
  """config.json of an exported sub-model of n_layers layers: LlamaForCausalLM, or
  Qwen2ForCausalLM when the model has q/k/v biases."""
  qwen = cfg.attention_bias
  return {
      "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
      "model_type": "qwen2" if qwen else "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
      "num_hidden_layers": n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size, "hidden_act": "silu",
      "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "tie_word_embeddings": tied, "torch_dtype": "float32", "dtype": "float32",
      **({"use_sliding_window": False} if qwen else {"attention_bias": False, "mlp_bias": False}),
      **special_ids,
  }
