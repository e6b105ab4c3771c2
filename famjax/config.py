"""Frozen, validated configuration dataclasses: every invalid value is a ValueError naming its
field."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Mapping

HEAD_KINDS = ("norm", "block")
UNEMBED_MODES = ("tied", "shared", "per_exit")
DTYPES = ("float32", "bfloat16")
SCHEDULES = ("cosine", "wsd")
TOKENIZERS = ("byte", "bpe")
INIT_EXITS = ("copy", "fresh")
REMAT = ("none", "block", "dots")


def _require(ok: bool, field: str, allowed: str, got: Any) -> None:
  if not ok:
    raise ValueError(f"{field} must be {allowed}; got {got!r}")


def _positive_int(field: str, value: Any) -> None:
  _require(isinstance(value, int) and value > 0, field, "a positive integer", value)


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
      _positive_int(f"model.{name}", getattr(self, name))
    for name in ("n_kv_heads", "head_dim"):
      _require(isinstance(getattr(self, name), int) and getattr(self, name) >= 0,
               f"model.{name}", "0 (the default) or a positive integer", getattr(self, name))
    _require(self.head_dim or self.d_model % self.n_heads == 0, "model.d_model",
             f"divisible by model.n_heads={self.n_heads} (or set model.head_dim)", self.d_model)
    _require(self.head_size % 2 == 0, "model.head_dim (0: d_model // n_heads)",
             "even (rotary embeddings rotate pairs)", self.head_size)
    _require(self.n_heads % self.kv_heads == 0, "model.n_kv_heads",
             f"a divisor of model.n_heads={self.n_heads} (0: n_heads)", self.n_kv_heads)
    _require(isinstance(self.attention_bias, bool), "model.attention_bias", "True or False",
             self.attention_bias)
    layers = self.exit_layers
    _require(len(layers) >= 1 and all(isinstance(l, int) for l in layers), "model.exit_layers",
             "a non-empty tuple of integers", layers)
    _require(all(1 <= l <= self.n_layers for l in layers), "model.exit_layers",
             f"entries in 1..{self.n_layers} (model.n_layers)", layers)
    _require(all(a < b for a, b in zip(layers, layers[1:])), "model.exit_layers",
             "strictly increasing", layers)
    _require(layers[-1] == self.n_layers, "model.exit_layers",
             f"a tuple whose last entry equals model.n_layers={self.n_layers}", layers)
    _require(self.exit_head in HEAD_KINDS, "model.exit_head", f"one of {HEAD_KINDS}",
             self.exit_head)
    _require(self.unembed in UNEMBED_MODES, "model.unembed", f"one of {UNEMBED_MODES}",
             self.unembed)
    _require(self.dtype in DTYPES, "model.dtype", f"one of {DTYPES}", self.dtype)
    _require(self.remat in REMAT, "model.remat", f"one of {REMAT}", self.remat)
    _positive_int("model.loss_chunk", self.loss_chunk)
    _require(self.rope_theta > 0, "model.rope_theta", "> 0", self.rope_theta)
    _require(self.norm_eps > 0, "model.norm_eps", "> 0", self.norm_eps)

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
class DataConfig:
  """Where the text comes from, how it is tokenized and where the token cache lives."""

  # "stdlib", or comma-separated local files, directories and glob patterns: parquet, arrow,
  # jsonl / json (.gz, .zst), UTF-8 text (a document per file), save_to_disk directories
  corpus: str = "stdlib"
  text_field: str = "text"  # the column (field) holding each record's text
  # "byte", "bpe" (trained locally on bpe_sample_mb of training text), or a path to a pretrained
  # Hugging Face tokenizer.json or sentencepiece .model
  tokenizer: str = "byte"
  bpe_vocab_size: int = 4096  # vocabulary of the local BPE tokenizer, specials included
  bpe_sample_mb: int = 100  # the local BPE trains on the first this many MB of training text
  eos_token: str = ""  # end-of-document token of a pretrained tokenizer; "": its own EOS
  val_fraction: float = 0.01  # share of documents (by a hash of their text) held out
  num_workers: int = 0  # tokenizer processes; 0: all cores
  cache_dir: str = ""  # token store and local tokenizers; "" = ~/.cache/famjax

  def __post_init__(self):
    _require(isinstance(self.corpus, str) and self.corpus.strip() != "", "data.corpus",
             '"stdlib" or a comma-separated list of local paths or patterns', self.corpus)
    _require(isinstance(self.text_field, str) and self.text_field != "", "data.text_field",
             "a column name", self.text_field)
    _require(isinstance(self.tokenizer, str)
             and (self.tokenizer in TOKENIZERS or self.tokenizer.endswith((".json", ".model"))),
             "data.tokenizer", f"one of {TOKENIZERS} or a path to a tokenizer.json or a "
             "sentencepiece .model", self.tokenizer)
    _require(isinstance(self.bpe_vocab_size, int) and 260 <= self.bpe_vocab_size <= 65_535,
             "data.bpe_vocab_size", "an integer in 260..65535", self.bpe_vocab_size)
    _require(isinstance(self.bpe_sample_mb, int) and self.bpe_sample_mb >= 1,
             "data.bpe_sample_mb", "a positive integer", self.bpe_sample_mb)
    _require(0.0 < self.val_fraction < 0.5, "data.val_fraction", "in (0, 0.5)",
             self.val_fraction)
    _require(isinstance(self.num_workers, int) and self.num_workers >= 0, "data.num_workers",
             "0 (all cores) or a positive integer", self.num_workers)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh shape; one axis may be -1: all devices the other axes leave."""

  data: int = -1  # data-parallel axis (batch)
  fsdp: int = 1  # fully-sharded data parallel: batch, and parameters and optimizer state
  model: int = 1  # model-parallel axis (heads, MLP hidden, vocabulary)

  def __post_init__(self):
    for name in ("data", "fsdp", "model"):
      value = getattr(self, name)
      _require(isinstance(value, int) and (value == -1 or value >= 1), f"mesh.{name}",
               "-1 (all remaining devices) or a positive integer", value)
    _require([self.data, self.fsdp, self.model].count(-1) <= 1, "mesh",
             "at most one axis equal to -1", (self.data, self.fsdp, self.model))


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
      _positive_int(f"train.{name}", getattr(self, name))
    _require(self.batch_size % self.microbatches == 0, "train.microbatches",
             f"a divisor of train.batch_size={self.batch_size}", self.microbatches)
    _require(isinstance(self.seed, int) and self.seed >= 0, "train.seed",
             "a non-negative integer", self.seed)
    _require(isinstance(self.steps, int) and self.steps >= 0, "train.steps",
             "a non-negative integer", self.steps)
    _require(isinstance(self.tokens, int) and self.tokens >= 0, "train.tokens",
             "a non-negative integer", self.tokens)
    _require(self.total_steps > 0, "train.steps / train.tokens",
             f"at least one step (tokens >= batch_size * seq_len = "
             f"{self.batch_size * self.seq_len})", (self.steps, self.tokens))
    _require(0 < self.learning_rate < math.inf, "train.learning_rate", "finite and > 0",
             self.learning_rate)
    _require(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", "in [0, 1]",
             self.min_lr_ratio)
    _require(isinstance(self.warmup_steps, int) and 0 <= self.warmup_steps < self.total_steps,
             "train.warmup_steps", f"an integer in 0..{self.total_steps - 1}", self.warmup_steps)
    _require(self.schedule in SCHEDULES, "train.schedule", f"one of {SCHEDULES}", self.schedule)
    _require(0.0 < self.decay_fraction <= 1.0, "train.decay_fraction", "in (0, 1]",
             self.decay_fraction)
    _require(self.weight_decay >= 0, "train.weight_decay", ">= 0", self.weight_decay)
    _require(0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0, "train.b1 / train.b2", "in [0, 1)",
             (self.b1, self.b2))
    _require(self.grad_clip > 0, "train.grad_clip", "> 0", self.grad_clip)
    _require(all(0 <= w < math.inf for w in self.exit_weights), "train.exit_weights",
             "finite and non-negative", self.exit_weights)
    _require(not self.exit_weights or sum(self.exit_weights) > 0, "train.exit_weights",
             "not all zero", self.exit_weights)
    _require(isinstance(self.exit_warmup_steps, int)
             and 0 <= self.exit_warmup_steps <= self.total_steps, "train.exit_warmup_steps",
             f"an integer in 0..{self.total_steps} (the run's steps)", self.exit_warmup_steps)
    _require(self.init_exits in INIT_EXITS, "train.init_exits", f"one of {INIT_EXITS}",
             self.init_exits)
    _require(isinstance(self.init_from, str), "train.init_from", "a directory path or ''",
             self.init_from)
    _ = self.trainable_last_layers  # validates train.trainable
    steps = self.profile_steps
    _require(steps == () or (len(steps) == 2 and all(isinstance(s, int) for s in steps)
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
    _require(tail.isdigit() and int(tail) > 0, "train.trainable",
             '"all", "exits" or "exits+last_K" with K > 0 backbone layers', self.trainable)
    return int(tail)

  def weights_for(self, n_exits: int) -> tuple[float, ...]:
    """Loss weight of each exit: the configured ones, or 1/G each."""
    if not self.exit_weights:
      return (1.0 / n_exits,) * n_exits
    _require(len(self.exit_weights) == n_exits, "train.exit_weights",
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
    _require(self.train.seq_len <= self.model.max_seq_len, "train.seq_len",
             f"<= model.max_seq_len={self.model.max_seq_len}", self.train.seq_len)
    last = self.train.trainable_last_layers
    ends = [self.model.n_layers - l for l in self.model.exit_layers[:-1]]
    _require(not last or last in ends, "train.trainable",
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


FLOP_RULES = ("accounting", "6N")
PARAM_COUNTS = ("non_embedding", "total")
FIT_LOSSES = ("val", "train")
LAW_FLOPS = ("runs", "6N")
LEVERAGE_WIDTHS = ("all", "middle")
COMPARE_LAWS = ("paper", "gamma_d", "submodel", "a_penalty", "size_only")  # laws.CANDIDATES


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
  """What a study's analysis reads (fits, report, EL): study fields that never change which runs
  are trained, so an existing study accepts new values for them. The report takes this object."""

  fit_loss: str = "val"  # loss the laws are fitted to: "val" (held out) or "train" (as the paper)
  bootstrap: int = 1000  # bootstrap refits per law (whole runs resampled)
  bootstrap_seed: int = 0  # seed of the bootstrap's resamples
  # keep every k-th of each law's fit starts (the name predates "grid" meaning the gamma grid
  # alone; kept so that flags and saved configs still work)
  grid_every: int = 1
  param_count: str = "non_embedding"  # N of the laws: "non_embedding" (Kaplan) or "total"
  leverage_granularities: tuple[int, ...] = ()  # G of the law's EL table; () = granularities >= 2
  # FLOPs per token of the law's EL and N*(C): "runs" (the study's own rule, `flops`, fitted per
  # G as c N^p over the ladder) or "6N" (C = 6ND, as the paper derives them)
  law_flops: str = "runs"
  # familial laws the report ranks by held-out error (famjax.scaling.laws.CANDIDATES); () = none
  compare_laws: tuple[str, ...] = COMPARE_LAWS

  def __post_init__(self):
    object.__setattr__(self, "leverage_granularities", tuple(self.leverage_granularities))
    object.__setattr__(self, "compare_laws", tuple(self.compare_laws))
    _require(len(self.compare_laws) != 1 and set(self.compare_laws) <= set(COMPARE_LAWS),
             "study.compare_laws", f"() or two or more of {COMPARE_LAWS}", self.compare_laws)
    _require(self.fit_loss in FIT_LOSSES, "study.fit_loss", f"one of {FIT_LOSSES}",
             self.fit_loss)
    _require(self.param_count in PARAM_COUNTS, "study.param_count", f"one of {PARAM_COUNTS}",
             self.param_count)
    _require(self.bootstrap == 0 or self.bootstrap >= 100, "study.bootstrap",
             "0 (no intervals) or at least 100", self.bootstrap)
    _require(isinstance(self.bootstrap_seed, int) and self.bootstrap_seed >= 0,
             "study.bootstrap_seed", "a non-negative integer", self.bootstrap_seed)
    _positive_int("study.grid_every", self.grid_every)
    _require(all(isinstance(g, int) and g >= 2 for g in self.leverage_granularities),
             "study.leverage_granularities", "integers >= 2", self.leverage_granularities)
    _require(self.law_flops in LAW_FLOPS, "study.law_flops", f"one of {LAW_FLOPS}",
             self.law_flops)


@dataclasses.dataclass(frozen=True)
class EstimateConfig:
  """What --dry_run assumes to estimate a study's cost and memory; changes no run either."""

  device: str = "h100"  # accelerator for --dry_run's hours estimate (accounting.PEAK_FLOPS)
  mfu: float = 0.4  # model FLOPs utilisation assumed by that estimate
  planned_corpus_tokens: int = 0  # training tokens assumed by --dry_run; 0 reads data.corpus
  # --dry_run --memory (famjax.study.memory): the node each run is compiled for, as fake CPU
  # devices, and the memory (GB = 1e9 bytes) its train step may use on each device
  memory_devices: int = 8
  device_memory_gb: float = 80.0
  # what the memory plan compiles for: "cpu" (the simulated node above) or a TPU slice that is not
  # attached, "tpu:v5p:2x2x2" (compiled by libtpu, the tpu extra; famjax.study.tpu)
  memory_target: str = "cpu"
  memory_runs: str = "all"  # which runs it plans: "all", or "largest" (each budget's largest)

  def __post_init__(self):
    _require(0 < self.mfu <= 1, "study.mfu", "in (0, 1]", self.mfu)
    _require(isinstance(self.planned_corpus_tokens, int) and self.planned_corpus_tokens >= 0,
             "study.planned_corpus_tokens", "a non-negative integer", self.planned_corpus_tokens)
    _positive_int("study.memory_devices", self.memory_devices)
    _require(0 < self.device_memory_gb < math.inf, "study.device_memory_gb", "finite and > 0",
             self.device_memory_gb)
    _require(self.memory_runs in ("all", "largest"), "study.memory_runs", "'all' or 'largest'",
             self.memory_runs)
    if self.memory_target != "cpu":
      from famjax.study import tpu
      tpu.parse(self.memory_target)


@dataclasses.dataclass(frozen=True)
class StudyConfig(AnalysisConfig, EstimateConfig):
  """An IsoFLOP study: budgets x granularities x a ladder of model sizes, trained and fitted.

  Shape rule: a model of width d_model has n_heads = d_model / head_dim, d_ff = ff_ratio * d_model
  (rounded to a multiple of 8) and n_layers = d_model / aspect_ratio rounded up to a multiple of
  layer_multiple, at least min_layers. Each budget C trains the sizes_per_budget consecutive
  widths of the ladder centred on the width whose dense model sees tokens_per_param tokens per
  parameter when trained on C FLOPs (famjax.study.isoflop).
  """

  budgets: tuple[float, ...] = (1e10, 3e10, 1e11)  # training FLOPs C of each IsoFLOP curve
  granularities: tuple[int, ...] = (1, 2, 4)  # G: exits per family; G = 1 is the dense baseline
  widths: tuple[int, ...] = (16, 24, 32, 40, 48, 64)  # d_model ladder, smallest to largest
  head_dim: int = 8  # n_heads = d_model // head_dim
  ff_ratio: float = 3.0  # d_ff = ff_ratio * d_model, rounded to a multiple of 8
  aspect_ratio: float = 32.0  # d_model / n_layers before rounding
  min_layers: int = 4  # at least max(granularities): every exit needs a layer of its own
  layer_multiple: int = 4  # n_layers rounded up to a multiple of this
  sizes_per_budget: int = 4  # consecutive ladder widths trained at each budget
  tokens_per_param: float = 20.0  # prior optimum D/N, centre of each budget's sizes
  flops: str = "accounting"  # FLOPs per token: "accounting" (famjax.accounting) or "6N"
  exit_layers: str = ""  # explicit exits per G, "2:2,4;4:1,2,3,4"; others evenly spaced
  min_steps: int = 50  # runs with fewer optimizer steps are dropped
  max_epochs: float = 1.0  # runs needing more passes over the training corpus are dropped
  warmup_fraction: float = 0.05  # of each run's steps
  # learning rate per size: train.learning_rate at widths[0], times (widths[0] / d_model)^power
  lr_width_power: float = 0.0
  seeds: tuple[int, ...] = (0,)  # every (C, G, size) is trained once per seed
  leverage: str = ""  # (C, G) points where G size-matched dense models are trained: "1e11:2,1e11:4"
  # which families of a leverage point get their dense models: "all" (every width and seed of
  # the budget, so that the report can take the family nearest the fitted N*(C) with every
  # seed) or "middle" (the middle width, first seed: G runs instead of widths x seeds x G)
  leverage_widths: str = "all"
  # gamma measured without the law (famjax.study.isoflop): at each of these widths and token
  # counts D, every G of granularities on one backbone and dense controls shaped as its exits;
  # () = none
  grid_widths: tuple[int, ...] = ()
  grid_tokens: tuple[int, ...] = ()
  # exits decoupled from G (famjax.study.isoflop): families of one backbone (width
  # placement_width, its depth by the shape rule) trained on placement_tokens with each of these
  # exit placements, "1,4;2,4;3,4;1,2,4", and dense controls of every exit depth; "" = none
  placements: str = ""
  placement_width: int = 0
  placement_tokens: int = 0
  placement_seeds: tuple[int, ...] = ()  # () = study.seeds

  def __post_init__(self):
    object.__setattr__(self, "budgets", tuple(float(c) for c in self.budgets))
    AnalysisConfig.__post_init__(self)
    EstimateConfig.__post_init__(self)
    for name in ("granularities", "widths", "seeds", "grid_widths", "grid_tokens",
                 "placement_seeds"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    _require((len(self.budgets) >= 1 or self.grid_widths or self.placements)
             and all(0 < c < math.inf for c in self.budgets), "study.budgets",
             "finite FLOP counts > 0, at least one unless the study has a gamma grid or "
             "placements", self.budgets)
    _require(list(self.budgets) == sorted(set(self.budgets)), "study.budgets",
             "strictly increasing", self.budgets)
    _require(len(self.granularities) >= 1
             and all(isinstance(g, int) and g >= 1 for g in self.granularities)
             and list(self.granularities) == sorted(set(self.granularities)),
             "study.granularities", "strictly increasing integers >= 1", self.granularities)
    for name in ("head_dim", "min_layers", "layer_multiple", "sizes_per_budget", "min_steps"):
      _positive_int(f"study.{name}", getattr(self, name))
    _require(self.head_dim % 2 == 0, "study.head_dim", "even (rotary embeddings rotate pairs)",
             self.head_dim)
    _require(len(self.widths) >= 1 and all(isinstance(w, int) and w > 0 and w % self.head_dim == 0
                                           for w in self.widths)
             and list(self.widths) == sorted(set(self.widths)), "study.widths",
             f"strictly increasing multiples of study.head_dim={self.head_dim}", self.widths)
    _require(self.sizes_per_budget <= len(self.widths), "study.sizes_per_budget",
             f"at most len(study.widths)={len(self.widths)}", self.sizes_per_budget)
    _require(self.min_layers >= self.granularities[-1], "study.min_layers",
             f">= the largest granularity {self.granularities[-1]}", self.min_layers)
    for name in ("ff_ratio", "aspect_ratio", "tokens_per_param", "max_epochs"):
      _require(0 < getattr(self, name) < math.inf, f"study.{name}", "finite and > 0",
               getattr(self, name))
    _require(0 <= self.warmup_fraction < 1, "study.warmup_fraction", "in [0, 1)",
             self.warmup_fraction)
    _require(0 <= self.lr_width_power <= 2, "study.lr_width_power", "in [0, 2]",
             self.lr_width_power)
    _require(len(self.seeds) >= 1 and all(isinstance(s, int) and s >= 0 for s in self.seeds)
             and len(set(self.seeds)) == len(self.seeds), "study.seeds",
             "distinct non-negative integers", self.seeds)
    _require(self.flops in FLOP_RULES, "study.flops", f"one of {FLOP_RULES}", self.flops)
    _require(self.leverage_widths in LEVERAGE_WIDTHS, "study.leverage_widths",
             f"one of {LEVERAGE_WIDTHS}", self.leverage_widths)
    self._check_grid_exits_and_leverage()

  @property
  def analysis(self) -> AnalysisConfig:
    """The fields the analysis reads, as the one object the report takes."""
    return AnalysisConfig(**{f.name: getattr(self, f.name)
                             for f in dataclasses.fields(AnalysisConfig)})

  def _check_grid_exits_and_leverage(self):
    _require(all(isinstance(w, int) and w > 0 and w % self.head_dim == 0 for w in self.grid_widths)
             and list(self.grid_widths) == sorted(set(self.grid_widths)), "study.grid_widths",
             f"strictly increasing multiples of study.head_dim={self.head_dim}", self.grid_widths)
    _require(all(isinstance(d, int) and d > 0 for d in self.grid_tokens)
             and list(self.grid_tokens) == sorted(set(self.grid_tokens)), "study.grid_tokens",
             "strictly increasing integers > 0 (training tokens)", self.grid_tokens)
    _require(bool(self.grid_widths) == bool(self.grid_tokens)
             and (not self.grid_widths or len(self.granularities) >= 2), "study.grid_widths",
             "given with study.grid_tokens (both or neither) and at least two granularities",
             self.grid_widths)
    self._check_placements()
    for g, layers in self.explicit_exits.items():
      _require(g in self.granularities and len(layers) == g, "study.exit_layers",
               f"entries 'G:l1,...,lG' with G in {self.granularities} and G layers",
               self.exit_layers)
    for c, g in self.leverage_points:
      _require(c in self.budgets and g in self.granularities and g >= 2, "study.leverage",
               f"'C:G' pairs with C in study.budgets {self.budgets} and G >= 2 in "
               f"study.granularities {self.granularities}", self.leverage)

  def _check_placements(self):
    layers = self.placement_layers
    _require(all(len(p) >= 2 and list(p) == sorted(set(p)) and p[0] >= 1 for p in layers),
             "study.placements", "exit layer sets like '1,4;2,4;1,2,4': each strictly "
             "increasing, at least two exits, layers from 1", self.placements)
    if layers:
      _require(self.placement_width > 0 and self.placement_width % self.head_dim == 0,
               "study.placement_width", f"a positive multiple of study.head_dim={self.head_dim} "
               "(given study.placements)", self.placement_width)
      _require(isinstance(self.placement_tokens, int) and self.placement_tokens > 0,
               "study.placement_tokens", "training tokens > 0 (given study.placements)",
               self.placement_tokens)
    _require(all(isinstance(s, int) and s >= 0 for s in self.placement_seeds)
             and len(set(self.placement_seeds)) == len(self.placement_seeds),
             "study.placement_seeds", "() or distinct non-negative integers",
             self.placement_seeds)

  @property
  def placement_layers(self) -> tuple[tuple[int, ...], ...]:
    """The exit layer sets parsed from placements."""
    try:
      return tuple(tuple(int(l) for l in part.split(","))
                   for part in filter(None, (p.strip() for p in self.placements.split(";"))))
    except ValueError:
      raise ValueError(f"study.placements must look like '1,4;2,4;1,2,4'; got "
                       f"{self.placements!r}") from None

  @property
  def explicit_exits(self) -> dict[int, tuple[int, ...]]:
    """{G: exit layers} parsed from exit_layers."""
    out = {}
    for part in filter(None, (p.strip() for p in self.exit_layers.split(";"))):
      try:
        g, layers = part.split(":")
        out[int(g)] = tuple(int(l) for l in layers.split(","))
      except ValueError:
        raise ValueError(f"study.exit_layers must look like '2:2,4;4:1,2,3,4'; got "
                         f"{self.exit_layers!r}") from None
    return out

  @property
  def leverage_points(self) -> tuple[tuple[float, int], ...]:
    """(C, G) pairs parsed from leverage."""
    out = []
    for part in filter(None, (p.strip() for p in self.leverage.split(","))):
      try:
        c, g = part.split(":")
        out.append((float(c), int(g)))
      except ValueError:
        raise ValueError(f"study.leverage must look like '1e11:2,1e11:4'; got "
                         f"{self.leverage!r}") from None
    return tuple(out)
