"""Parameter and FLOP counts of a family and of each exit's deployable sub-model, from ModelConfig.

Conventions (Chinchilla, Hoffmann et al. 2022, appendix F): a matmul with a weight of P entries
costs 2P FLOPs per token forward and 4P backward; attention costs 2*T*Q*H (query heads x head
width: D unless model.head_dim says otherwise) for the scores and as much for the weighted values
per token and layer forward (full T x T product, as the kernels compute it). Training = forward
+ backward = 3 x forward. Norms, softmax and the embedding gather are not counted.
"Non-embedding" excludes the input embedding and every unembedding matrix (Kaplan et al. 2020).
"""

from __future__ import annotations

import dataclasses

from famjax.model.config import ModelConfig


def block_params(cfg: ModelConfig) -> int:
  """One decoder block: q, k, v, o projections (and q, k, v biases), SwiGLU (three matrices) and
  two RMSNorm scales."""
  qkv_bias = (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_size if cfg.attention_bias else 0
  return block_matmul_params(cfg) + qkv_bias + 2 * cfg.d_model


def block_matmul_params(cfg: ModelConfig) -> int:
  """q and o project d_model to and from n_heads heads, k and v to n_kv_heads heads."""
  attention = 2 * (cfg.n_heads + cfg.kv_heads) * cfg.head_size * cfg.d_model
  return attention + 3 * cfg.d_model * cfg.d_ff


def private_blocks(cfg: ModelConfig) -> tuple[int, ...]:
  """1 where exit g has its own decoder block ("block" heads, every exit but the last)."""
  return tuple(int(cfg.exit_head == "block" and g < cfg.n_exits - 1) for g in range(cfg.n_exits))


def n_unembeddings(cfg: ModelConfig) -> int:
  return {"tied": 0, "shared": 1, "per_exit": cfg.n_exits}[cfg.unembed]


@dataclasses.dataclass(frozen=True)
class Accounting:
  params_total: int  # every parameter of the family
  params_non_embedding: int  # without the input embedding and the unembedding matrices
  params_per_exit: tuple[int, ...]  # exit g's deployable sub-model: layers 1..l_g + its head
  non_embedding_per_exit: tuple[int, ...]
  flops_per_token: float  # training the family, forward + backward, every exit head included
  train_flops_per_token_per_exit: tuple[float, ...]  # training sub-model g alone (a dense model)
  forward_flops_per_token_per_exit: tuple[float, ...]  # inference through exit g
  # the regime: share of all parameters outside the backbone's layers (input embedding, exit
  # heads with their private blocks, norms and unembeddings), and the family's training FLOPs
  # per token over a dense model of the same width and depth (one head)
  outside_backbone_share: float
  flops_over_dense: float


def _attention_flops(cfg: ModelConfig, seq_len: int) -> int:
  """Scores and weighted values over every query head (grouped keys and values are shared, not
  fewer products)."""
  return 4 * seq_len * cfg.n_heads * cfg.head_size


def block_forward_flops(cfg: ModelConfig, seq_len: int) -> int:
  """One decoder block's forward FLOPs per token: its matmuls and its attention."""
  return 2 * block_matmul_params(cfg) + _attention_flops(cfg, seq_len)


def account(cfg: ModelConfig, seq_len: int) -> Accounting:
  """All counts for sequences of seq_len tokens (attention FLOPs grow with seq_len)."""
  vd = cfg.vocab_size * cfg.d_model
  block = block_params(cfg)
  private = private_blocks(cfg)
  n_attention_layers = cfg.n_layers + sum(private)

  params_total = (vd + cfg.n_layers * block + sum(cfg.d_model + p * block for p in private)
                  + n_unembeddings(cfg) * vd)
  params_non_embedding = params_total - vd - n_unembeddings(cfg) * vd
  own_unembed = 0 if cfg.unembed == "tied" else vd
  per_exit, non_emb_per_exit, train_per_exit, forward_per_exit = [], [], [], []
  for g, layers in enumerate(cfg.exit_layers):
    depth = layers + private[g]
    non_emb = depth * block + cfg.d_model
    per_exit.append(vd + non_emb + own_unembed)
    non_emb_per_exit.append(non_emb)
    forward = depth * block_forward_flops(cfg, seq_len) + 2 * vd
    forward_per_exit.append(float(forward))
    train_per_exit.append(3.0 * forward)

  forward_family = n_attention_layers * block_forward_flops(cfg, seq_len) + 2 * cfg.n_exits * vd
  forward_dense = cfg.n_layers * block_forward_flops(cfg, seq_len) + 2 * vd
  return Accounting(
      params_total=params_total,
      params_non_embedding=params_non_embedding,
      params_per_exit=tuple(per_exit),
      non_embedding_per_exit=tuple(non_emb_per_exit),
      flops_per_token=3.0 * forward_family,
      train_flops_per_token_per_exit=tuple(train_per_exit),
      forward_flops_per_token_per_exit=tuple(forward_per_exit),
      outside_backbone_share=1.0 - cfg.n_layers * block / params_total,
      flops_over_dense=forward_family / forward_dense,
  )
