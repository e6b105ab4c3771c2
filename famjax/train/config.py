"""TrainConfig (optimisation, schedule, logging, checkpointing) and ExperimentConfig (everything one
run needs), their fingerprint and their reading from nested mappings."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Mapping

from famjax.common.fields import positive_int, require
from famjax.data.config import DataConfig
from famjax.model.config import MeshConfig, ModelConfig

SCHEDULES = ("cosine", "wsd")
INIT_EXITS = ("copy", "fresh")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation, schedule, logging and checkpointing of one training run."""

  seed: int = 0  # parameter init and data order
  batch_size: int = 16  # global batch, sequences
  microbatches: int = 1  # gradient accumulation: the batch runs in this many equal parts, one
  #                        after another (one part's activation memory, the whole batch's update)
  seq_len: int = 128  # tokens per sequence
  steps: int = 200  # optimizer steps; ignored when tokens > 0
  tokens: int = 0  # token budget D; > 0 sets steps = tokens // (batch_size * seq_len)
  learning_rate: float = 3e-3  # peak learning rate
  min_lr_ratio: float = 0.1  # final learning rate / peak
  warmup_steps: int = 20  # linear warmup from 0
  schedule: str = "cosine"  # "cosine" decay, or "wsd" (warmup, stable, linear decay)
  decay_fraction: float = 0.2  # wsd: share of steps spent decaying
  weight_decay: float = 0.1  # AdamW decoupled weight decay
  b1: float = 0.9  # Adam beta1
  b2: float = 0.95  # Adam beta2
  grad_clip: float = 1.0  # global-norm clipping threshold
  exit_weights: tuple[float, ...] = ()  # loss weight per exit; () = 1/G each
  # early exits' loss weights rise linearly from 0 to exit_weights over this many steps (the
  # deepest exit's is constant); 0 = no warm-up
  exit_warmup_steps: int = 0
  # warm start: a local Hugging Face directory (Llama, Mistral, Qwen2) whose weights a fresh run
  # starts from (famjax.hf); the model's architecture fields must match its config.json
  init_from: str = ""
  init_exits: str = "copy"  # heads of added exits: "copy" the final norm and unembedding, "fresh"
  # what trains: "all", "exits" (every exit head's parameters) or "exits+last_K" (and the last K
  # backbone layers, K ending where an exit's segment ends); the rest stays frozen
  trainable: str = "all"
  log_every: int = 10  # steps between train-loss logs
  eval_every: int = 50  # steps between validation evaluations
  eval_batches: int = 4  # fixed validation batches per evaluation
  checkpoint_every: int = 50  # steps between checkpoints
  keep_checkpoints: int = 3  # checkpoints kept on disk
  progress: bool = True  # show a tqdm bar
  # reporting only (not in config_hash): a jax.profiler trace of steps (start, stop), 1-based and
  # both included, into the run's tensorboard/; () = none
  profile_steps: tuple[int, ...] = ()
  wandb_project: str = ""  # Weights & Biases project of the run's metrics; "" = no W&B
  wandb_group: str = ""  # its W&B group ("" = none; a study sets its own directory's name)

  def __post_init__(self):
    object.__setattr__(self, "exit_weights", tuple(float(w) for w in self.exit_weights))
    object.__setattr__(self, "profile_steps", tuple(self.profile_steps))
    for name in ("batch_size", "microbatches", "seq_len", "log_every", "eval_every",
                 "eval_batches", "checkpoint_every", "keep_checkpoints"):
      positive_int(f"train.{name}", getattr(self, name))
    require(self.batch_size % self.microbatches == 0, "train.microbatches",
             f"a divisor of train.batch_size={self.batch_size}", self.microbatches)
    require(isinstance(self.seed, int) and self.seed >= 0, "train.seed",
             "a non-negative integer", self.seed)
    require(isinstance(self.steps, int) and self.steps >= 0, "train.steps",
             "a non-negative integer", self.steps)
    require(isinstance(self.tokens, int) and self.tokens >= 0, "train.tokens",
             "a non-negative integer", self.tokens)
    require(self.total_steps > 0, "train.steps / train.tokens",
             f"at least one step (tokens >= batch_size * seq_len = "
             f"{self.batch_size * self.seq_len})", (self.steps, self.tokens))
    require(0 < self.learning_rate < math.inf, "train.learning_rate", "finite and > 0",
             self.learning_rate)
    require(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", "in [0, 1]",
             self.min_lr_ratio)
    require(isinstance(self.warmup_steps, int) and 0 <= self.warmup_steps < self.total_steps,
             "train.warmup_steps", f"an integer in 0..{self.total_steps - 1}", self.warmup_steps)
    require(self.schedule in SCHEDULES, "train.schedule", f"one of {SCHEDULES}", self.schedule)
    require(0.0 < self.decay_fraction <= 1.0, "train.decay_fraction", "in (0, 1]",
             self.decay_fraction)
    require(self.weight_decay >= 0, "train.weight_decay", ">= 0", self.weight_decay)
    require(0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0, "train.b1 / train.b2", "in [0, 1)",
             (self.b1, self.b2))
    require(self.grad_clip > 0, "train.grad_clip", "> 0", self.grad_clip)
    require(all(0 <= w < math.inf for w in self.exit_weights), "train.exit_weights",
             "finite and non-negative", self.exit_weights)
    require(not self.exit_weights or sum(self.exit_weights) > 0, "train.exit_weights",
             "not all zero", self.exit_weights)
    require(isinstance(self.exit_warmup_steps, int)
             and 0 <= self.exit_warmup_steps <= self.total_steps, "train.exit_warmup_steps",
             f"an integer in 0..{self.total_steps} (the run's steps)", self.exit_warmup_steps)
    require(self.init_exits in INIT_EXITS, "train.init_exits", f"one of {INIT_EXITS}",
             self.init_exits)
    require(isinstance(self.init_from, str), "train.init_from", "a directory path or ''",
             self.init_from)
    _ = self.trainable_last_layers  # validates train.trainable
    steps = self.profile_steps
    require(steps == () or (len(steps) == 2 and all(isinstance(s, int) for s in steps)
                             and 1 <= steps[0] <= steps[1] <= self.total_steps),
             "train.profile_steps", f"() or (start, stop) with 1 <= start <= stop <= "
             f"{self.total_steps} (the run's steps)", steps)

  @property
  def total_steps(self) -> int:
    if self.tokens > 0:
      return self.tokens // (self.batch_size * self.seq_len)
    return self.steps

  @property
  def trainable_last_layers(self) -> int | None:
    """None when everything trains ("all"); else the backbone layers that train beside the exit
    heads (0 for "exits", K for "exits+last_K")."""
    if self.trainable == "all":
      return None
    if self.trainable == "exits":
      return 0
    prefix = "exits+last_"
    tail = self.trainable[len(prefix):] if self.trainable.startswith(prefix) else ""
    require(tail.isdigit() and int(tail) > 0, "train.trainable",
             '"all", "exits" or "exits+last_K" with K > 0 backbone layers', self.trainable)
    return int(tail)

  def weights_for(self, n_exits: int) -> tuple[float, ...]:
    """Loss weight of each exit: the configured ones, or 1/G each."""
    if not self.exit_weights:
      return (1.0 / n_exits,) * n_exits
    require(len(self.exit_weights) == n_exits, "train.exit_weights",
             f"a tuple of length {n_exits} (one weight per exit)", self.exit_weights)
    return self.exit_weights


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything one training run needs."""

  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()

  def __post_init__(self):
    self.train.weights_for(self.model.n_exits)
    require(self.train.seq_len <= self.model.max_seq_len, "train.seq_len",
             f"<= model.max_seq_len={self.model.max_seq_len}", self.train.seq_len)
    last = self.train.trainable_last_layers
    ends = [self.model.n_layers - l for l in self.model.exit_layers[:-1]]
    require(not last or last in ends, "train.trainable",
             f"'exits+last_K' with K in {ends} (layers after an exit: whole segments train, "
             "model.exit_layers)" if ends else "'all' or 'exits' (a dense model has one segment)",
             self.train.trainable)


# train fields that change what a run reports, not what it trains
REPORTING_FIELDS = ("profile_steps", "wandb_project", "wandb_group")
# Fields added after runs were recorded, with their defaults: left out of fingerprints and run
# identities while at the default, so that every run recorded before them keeps its hash.
ADDED_FIELDS = {
    "model": {"n_kv_heads": 0, "head_dim": 0, "attention_bias": False},
    "train": {"exit_warmup_steps": 0, "init_from": "", "init_exits": "copy", "trainable": "all"},
}


def without_added_defaults(section: str, values: dict) -> dict:
  """A section's fields (dataclasses.asdict) without the ADDED_FIELDS that hold their default."""
  added = ADDED_FIELDS.get(section, {})
  return {k: v for k, v in values.items() if k not in added or v != added[k]}


def config_hash(cfg: ExperimentConfig) -> str:
  """A short fingerprint of every field of a run's config but REPORTING_FIELDS (and ADDED_FIELDS
  at their defaults)."""
  values = {name: without_added_defaults(name, section)
            for name, section in dataclasses.asdict(cfg).items()}
  values["train"] = {k: v for k, v in values["train"].items() if k not in REPORTING_FIELDS}
  text = json.dumps(values, sort_keys=True, default=list)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _build(cls, values: Mapping[str, Any], prefix: str):
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"unknown config field(s) {[f'{prefix}.{u}' for u in unknown]}; "
                     f"allowed: {sorted(known)}")
  return cls(**values)


def experiment_from_dict(values: Mapping[str, Any]) -> ExperimentConfig:
  """Builds an ExperimentConfig from nested mappings (e.g. ml_collections.ConfigDict.to_dict())."""
  sections = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "mesh": MeshConfig}
  unknown = sorted(set(values) - set(sections))
  if unknown:
    raise ValueError(f"unknown config section(s) {unknown}; allowed: {sorted(sections)}")
  return ExperimentConfig(**{name: _build(cls, dict(values.get(name, {})), name)
                             for name, cls in sections.items()})
