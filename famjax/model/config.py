"""ModelConfig (the familial transformer's shape and heads) and MeshConfig (the device mesh)."""

from __future__ import annotations

import dataclasses

from famjax.common.fields import positive_int, require

HEAD_KINDS = ("norm", "block")
UNEMBED_MODES = ("tied", "shared", "per_exit")
DTYPES = ("float32", "bfloat16")
REMAT = ("none", "block", "dots")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A familial decoder-only transformer: one backbone, one exit after each layer in exit_layers."""

  vocab_size: int = 259  # tokens, specials included (byte tokenizer: 256 bytes + 3 specials)
  d_model: int = 128  # residual stream width
  n_layers: int = 4  # backbone decoder blocks
  n_heads: int = 4  # query heads
  n_kv_heads: int = 0  # key/value heads (grouped-query attention; 1: multi-query); 0: n_heads
  head_dim: int = 0  # width of each head; 0: d_model // n_heads
  attention_bias: bool = False  # biases on the query, key and value projections (as Qwen2)
  d_ff: int = 384  # SwiGLU hidden width
  max_seq_len: int = 256  # longest sequence the rotary tables cover
  exit_layers: tuple[int, ...] = (2, 3, 4)  # exit g after layer exit_layers[g]; last: n_layers
  exit_head: str = "norm"  # "norm": RMSNorm + unembed; "block": private block + RMSNorm + unembed
  unembed: str = "per_exit"  # "tied" (input embedding), "shared" (one head) or "per_exit"
  rope_theta: float = 10_000.0  # rotary base frequency
  norm_eps: float = 1e-6  # RMSNorm epsilon
  dtype: str = "float32"  # compute dtype; parameters always stay float32
  remat: str = "none"  # rematerialise each block in the backward pass: "none", "block" (all of
  #                      it) or "dots" (keep matmul outputs, recompute the rest)
  loss_chunk: int = 4096  # tokens per cross-entropy chunk: no [tokens, vocab] logits beyond this

  def __post_init__(self):
    object.__setattr__(self, "exit_layers", tuple(self.exit_layers))
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
      positive_int(f"model.{name}", getattr(self, name))
    for name in ("n_kv_heads", "head_dim"):
      require(isinstance(getattr(self, name), int) and getattr(self, name) >= 0,
               f"model.{name}", "0 (the default) or a positive integer", getattr(self, name))
    require(self.head_dim or self.d_model % self.n_heads == 0, "model.d_model",
             f"divisible by model.n_heads={self.n_heads} (or set model.head_dim)", self.d_model)
    require(self.head_size % 2 == 0, "model.head_dim (0: d_model // n_heads)",
             "even (rotary embeddings rotate pairs)", self.head_size)
    require(self.n_heads % self.kv_heads == 0, "model.n_kv_heads",
             f"a divisor of model.n_heads={self.n_heads} (0: n_heads)", self.n_kv_heads)
    require(isinstance(self.attention_bias, bool), "model.attention_bias", "True or False",
             self.attention_bias)
    layers = self.exit_layers
    require(len(layers) >= 1 and all(isinstance(l, int) for l in layers), "model.exit_layers",
             "a non-empty tuple of integers", layers)
    require(all(1 <= l <= self.n_layers for l in layers), "model.exit_layers",
             f"entries in 1..{self.n_layers} (model.n_layers)", layers)
    require(all(a < b for a, b in zip(layers, layers[1:])), "model.exit_layers",
             "strictly increasing", layers)
    require(layers[-1] == self.n_layers, "model.exit_layers",
             f"a tuple whose last entry equals model.n_layers={self.n_layers}", layers)
    require(self.exit_head in HEAD_KINDS, "model.exit_head", f"one of {HEAD_KINDS}",
             self.exit_head)
    require(self.unembed in UNEMBED_MODES, "model.unembed", f"one of {UNEMBED_MODES}",
             self.unembed)
    require(self.dtype in DTYPES, "model.dtype", f"one of {DTYPES}", self.dtype)
    require(self.remat in REMAT, "model.remat", f"one of {REMAT}", self.remat)
    positive_int("model.loss_chunk", self.loss_chunk)
    require(self.rope_theta > 0, "model.rope_theta", "> 0", self.rope_theta)
    require(self.norm_eps > 0, "model.norm_eps", "> 0", self.norm_eps)

  @property
  def n_exits(self) -> int:
    return len(self.exit_layers)

  @property
  def head_size(self) -> int:
    """Each attention head's width: head_dim, or d_model // n_heads when that is 0."""
    return self.head_dim or self.d_model // self.n_heads

  @property
  def kv_heads(self) -> int:
    """Key/value heads: n_kv_heads, or n_heads when that is 0."""
    return self.n_kv_heads or self.n_heads


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh shape; one axis may be -1: all devices the other axes leave."""

  data: int = -1  # data-parallel axis (batch)
  fsdp: int = 1  # fully-sharded data parallel: batch, and parameters and optimizer state
  model: int = 1  # model-parallel axis (heads, MLP hidden, vocabulary)

  def __post_init__(self):
    for name in ("data", "fsdp", "model"):
      value = getattr(self, name)
      require(isinstance(value, int) and (value == -1 or value >= 1), f"mesh.{name}",
               "-1 (all remaining devices) or a positive integer", value)
    require([self.data, self.fsdp, self.model].count(-1) <= 1, "mesh",
             "at most one axis equal to -1", (self.data, self.fsdp, self.model))
