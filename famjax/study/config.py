"""The study's config: AnalysisConfig (what the analysis reads), EstimateConfig (what --dry_run
assumes), ExecutionConfig (how this host trains the runs) and StudyConfig (the IsoFLOP plan, the
gamma grid and exit placements)."""

from __future__ import annotations

import dataclasses
import math

from famjax.common.fields import positive_int, require
from famjax.hardware import chips, tpu

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
    require(len(self.compare_laws) != 1 and set(self.compare_laws) <= set(COMPARE_LAWS),
             "study.compare_laws", f"() or two or more of {COMPARE_LAWS}", self.compare_laws)
    require(self.fit_loss in FIT_LOSSES, "study.fit_loss", f"one of {FIT_LOSSES}",
             self.fit_loss)
    require(self.param_count in PARAM_COUNTS, "study.param_count", f"one of {PARAM_COUNTS}",
             self.param_count)
    require(self.bootstrap == 0 or self.bootstrap >= 100, "study.bootstrap",
             "0 (no intervals) or at least 100", self.bootstrap)
    require(isinstance(self.bootstrap_seed, int) and self.bootstrap_seed >= 0,
             "study.bootstrap_seed", "a non-negative integer", self.bootstrap_seed)
    positive_int("study.grid_every", self.grid_every)
    require(all(isinstance(g, int) and g >= 2 for g in self.leverage_granularities),
             "study.leverage_granularities", "integers >= 2", self.leverage_granularities)
    require(self.law_flops in LAW_FLOPS, "study.law_flops", f"one of {LAW_FLOPS}",
             self.law_flops)


@dataclasses.dataclass(frozen=True)
class EstimateConfig:
  """What --dry_run assumes to estimate a study's cost and memory; changes no run either."""

  device: str = "h100"  # accelerator for --dry_run's hours estimate (famjax.hardware.chips)
  mfu: float = 0.4  # model FLOPs utilisation assumed by that estimate
  planned_corpus_tokens: int = 0  # training tokens assumed by --dry_run; 0 reads data.corpus
  # --dry_run --memory (famjax.hardware.memory): the node each run is compiled for, as fake CPU
  # devices, and the memory (GB = 1e9 bytes) its train step may use on each device
  memory_devices: int = 8
  device_memory_gb: float = 80.0
  # what the memory plan compiles for: "cpu" (the simulated node above) or a TPU slice that is not
  # attached, "tpu:v5p:2x2x2" (compiled by libtpu, the tpu extra; famjax.hardware.tpu)
  memory_target: str = "cpu"
  memory_runs: str = "all"  # which runs it plans: "all", or "largest" (each budget's largest)

  def __post_init__(self):
    require(0 < self.mfu <= 1, "study.mfu", "in (0, 1]", self.mfu)
    require(isinstance(self.planned_corpus_tokens, int) and self.planned_corpus_tokens >= 0,
             "study.planned_corpus_tokens", "a non-negative integer", self.planned_corpus_tokens)
    positive_int("study.memory_devices", self.memory_devices)
    require(0 < self.device_memory_gb < math.inf, "study.device_memory_gb", "finite and > 0",
             self.device_memory_gb)
    require(self.memory_runs in ("all", "largest"), "study.memory_runs", "'all' or 'largest'",
             self.memory_runs)
    chips.chip(self.device)
    self.memory_slice  # noqa: B018 (parsing is the check)

  @property
  def memory_slice(self) -> tpu.Slice | None:
    """The TPU slice memory_target names, or None for the simulated CPU node."""
    return None if self.memory_target == "cpu" else tpu.parse(self.memory_target)


@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
  """How this host trains a study's runs (famjax.study.sweep); changes no run's config. A cohort's
  run equals the run alone to float tolerance, not bitwise (famjax.train.cohort)."""

  # runs trained at once, each worker process pinned to its own CPU cores; 0 = one per usable
  # core when JAX computes on the CPU, one on an accelerator or in a multi-process job
  workers: int = 0
  # up to this many runs of one model shape (seeds, learning rates, exit weights, steps) trained
  # as one vectorised program on one device; 1 = every run alone; 0 = 8 on an accelerator and 1
  # on a CPU, where a cohort's step costs its runs' steps and more (docs/benchmarks.md)
  cohort_size: int = 0

  def __post_init__(self):
    require(isinstance(self.workers, int) and 0 <= self.workers <= 1024, "study.workers",
             "an integer in 0..1024 (0 = one per CPU core)", self.workers)
    require(isinstance(self.cohort_size, int) and 0 <= self.cohort_size <= 256,
             "study.cohort_size", "an integer in 0..256 (1 = every run alone, 0 = by backend)",
             self.cohort_size)


@dataclasses.dataclass(frozen=True)
class StudyConfig(AnalysisConfig, EstimateConfig, ExecutionConfig):
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
    ExecutionConfig.__post_init__(self)
    for name in ("granularities", "widths", "seeds", "grid_widths", "grid_tokens",
                 "placement_seeds"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    require((len(self.budgets) >= 1 or self.grid_widths or self.placements)
             and all(0 < c < math.inf for c in self.budgets), "study.budgets",
             "finite FLOP counts > 0, at least one unless the study has a gamma grid or "
             "placements", self.budgets)
    require(list(self.budgets) == sorted(set(self.budgets)), "study.budgets",
             "strictly increasing", self.budgets)
    require(len(self.granularities) >= 1
             and all(isinstance(g, int) and g >= 1 for g in self.granularities)
             and list(self.granularities) == sorted(set(self.granularities)),
             "study.granularities", "strictly increasing integers >= 1", self.granularities)
    for name in ("head_dim", "min_layers", "layer_multiple", "sizes_per_budget", "min_steps"):
      positive_int(f"study.{name}", getattr(self, name))
    require(self.head_dim % 2 == 0, "study.head_dim", "even (rotary embeddings rotate pairs)",
             self.head_dim)
    require(len(self.widths) >= 1 and all(isinstance(w, int) and w > 0 and w % self.head_dim == 0
                                           for w in self.widths)
             and list(self.widths) == sorted(set(self.widths)), "study.widths",
             f"strictly increasing multiples of study.head_dim={self.head_dim}", self.widths)
    require(self.sizes_per_budget <= len(self.widths), "study.sizes_per_budget",
             f"at most len(study.widths)={len(self.widths)}", self.sizes_per_budget)
    require(self.min_layers >= self.granularities[-1], "study.min_layers",
             f">= the largest granularity {self.granularities[-1]}", self.min_layers)
    for name in ("ff_ratio", "aspect_ratio", "tokens_per_param", "max_epochs"):
      require(0 < getattr(self, name) < math.inf, f"study.{name}", "finite and > 0",
               getattr(self, name))
    require(0 <= self.warmup_fraction < 1, "study.warmup_fraction", "in [0, 1)",
             self.warmup_fraction)
    require(0 <= self.lr_width_power <= 2, "study.lr_width_power", "in [0, 2]",
             self.lr_width_power)
    require(len(self.seeds) >= 1 and all(isinstance(s, int) and s >= 0 for s in self.seeds)
             and len(set(self.seeds)) == len(self.seeds), "study.seeds",
             "distinct non-negative integers", self.seeds)
    require(self.flops in FLOP_RULES, "study.flops", f"one of {FLOP_RULES}", self.flops)
    require(self.leverage_widths in LEVERAGE_WIDTHS, "study.leverage_widths",
             f"one of {LEVERAGE_WIDTHS}", self.leverage_widths)
    self._check_grid_exits_and_leverage()

  @property
  def analysis(self) -> AnalysisConfig:
    """The fields the analysis reads, as the one object the report takes."""
    return AnalysisConfig(**{f.name: getattr(self, f.name)
                             for f in dataclasses.fields(AnalysisConfig)})

  def _check_grid_exits_and_leverage(self):
    require(all(isinstance(w, int) and w > 0 and w % self.head_dim == 0 for w in self.grid_widths)
             and list(self.grid_widths) == sorted(set(self.grid_widths)), "study.grid_widths",
             f"strictly increasing multiples of study.head_dim={self.head_dim}", self.grid_widths)
    require(all(isinstance(d, int) and d > 0 for d in self.grid_tokens)
             and list(self.grid_tokens) == sorted(set(self.grid_tokens)), "study.grid_tokens",
             "strictly increasing integers > 0 (training tokens)", self.grid_tokens)
    require(bool(self.grid_widths) == bool(self.grid_tokens)
             and (not self.grid_widths or len(self.granularities) >= 2), "study.grid_widths",
             "given with study.grid_tokens (both or neither) and at least two granularities",
             self.grid_widths)
    self._check_placements()
    for g, layers in self.explicit_exits.items():
      require(g in self.granularities and len(layers) == g, "study.exit_layers",
               f"entries 'G:l1,...,lG' with G in {self.granularities} and G layers",
               self.exit_layers)
    for c, g in self.leverage_points:
      require(c in self.budgets and g in self.granularities and g >= 2, "study.leverage",
               f"'C:G' pairs with C in study.budgets {self.budgets} and G >= 2 in "
               f"study.granularities {self.granularities}", self.leverage)

  def _check_placements(self):
    layers = self.placement_layers
    require(all(len(p) >= 2 and list(p) == sorted(set(p)) and p[0] >= 1 for p in layers),
             "study.placements", "exit layer sets like '1,4;2,4;1,2,4': each strictly "
             "increasing, at least two exits, layers from 1", self.placements)
    if layers:
      require(self.placement_width > 0 and self.placement_width % self.head_dim == 0,
               "study.placement_width", f"a positive multiple of study.head_dim={self.head_dim} "
               "(given study.placements)", self.placement_width)
      require(isinstance(self.placement_tokens, int) and self.placement_tokens > 0,
               "study.placement_tokens", "training tokens > 0 (given study.placements)",
               self.placement_tokens)
    require(all(isinstance(s, int) and s >= 0 for s in self.placement_seeds)
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
