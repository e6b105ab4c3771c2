"""IsoFLOP planner: budgets x granularities x a ladder of model sizes -> run specs (pure functions).

Shape rule (StudyConfig): width d_model; n_heads = d_model / head_dim; d_ff = ff_ratio * d_model,
rounded to a multiple of 8; n_layers = d_model / aspect_ratio rounded up to a multiple of
layer_multiple, at least min_layers. Exits: exit g of G sits after layer round(g * n_layers / G)
(evenly spaced; the last exit is the final layer) unless study.exit_layers lists them.
Sizes: at budget C the study trains the sizes_per_budget consecutive ladder widths centred on the
prior optimum, the width that sees tokens_per_param tokens per parameter when trained on C FLOPs
(Hoffmann et al.: ~20), so that each IsoFLOP curve brackets its minimum if the prior is right
within the window (the report says when a minimum sits at an edge).
Tokens: D = C / (training FLOPs per token), rounded down to whole optimizer steps, so that
D x FLOPs per token = C within one step.
Gamma grid (study.grid_widths x study.grid_tokens, optional): at each width and D, one family
per G in study.granularities on the same backbone (the shape rule's depth for that width), all
trained on the same D tokens (same steps, same seed: the same batches), and dense "exit
controls" with the shape of each exit's sub-model (its depth, the family's width) on that D.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Mapping

import numpy as np

from famjax.hardware import chips
from famjax.model import counts
from famjax.model.config import ModelConfig
from famjax.study.config import StudyConfig
from famjax.train.config import ExperimentConfig, TrainConfig, config_hash

ISOFLOP, DENSE_MATCH = "isoflop", "dense_match"
GRID, EXIT_CONTROL = "gamma_grid", "exit_control"  # the gamma grid's families and dense controls
# families with the exit placements of study.placements, and their dense controls (every depth)
PLACEMENT, PLACEMENT_CONTROL = "placement", "placement_control"
# runs whose records have G = 1 whatever they match
DENSE_KINDS = (DENSE_MATCH, EXIT_CONTROL, PLACEMENT_CONTROL)


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run of a study."""

  run_id: str
  kind: str  # ISOFLOP: a point of an IsoFLOP curve; DENSE_MATCH: a size-matched dense model
  budget: float  # C of the curve; a dense match belongs to the leverage point (C, G)
  granularity: int  # G of the family (of the matched family for DENSE_MATCH)
  seed: int
  experiment: ExperimentConfig
  flops_per_token: float  # by the study's FLOP rule
  tokens: int  # D, whole optimizer steps
  matches: str = ""  # DENSE_MATCH: run id of the family it is compared with
  matched_exit: int = 0  # DENSE_MATCH: the family's exit (1-based) whose sub-model it matches
  # parameters and FLOPs of the model, computed once here and read by the plan and the records
  accounting: counts.Accounting | None = None

  def __post_init__(self):
    if self.accounting is None:
      model, seq_len = self.experiment.model, self.experiment.train.seq_len
      object.__setattr__(self, "accounting", counts.account(model, seq_len))

  @property
  def steps(self) -> int:
    return self.experiment.train.total_steps

  @property
  def flops(self) -> float:
    return self.flops_per_token * self.tokens

  def describe(self) -> dict:
    """The plan-table fields of this run, JSON-ready."""
    acc = self.accounting
    return {"run_id": self.run_id, "kind": self.kind, "C": self.budget, "G": self.granularity,
            "seed": self.seed, "d_model": self.experiment.model.d_model,
            "n_layers": self.experiment.model.n_layers,
            "exit_layers": list(self.experiment.model.exit_layers),
            "N_per_exit": list(acc.params_per_exit),
            "N_non_embedding_per_exit": list(acc.non_embedding_per_exit), "D": self.tokens,
            "steps": self.steps, "flops": self.flops, "flops_per_token": self.flops_per_token,
            "outside_backbone_share": acc.outside_backbone_share,
            "flops_over_dense": acc.flops_over_dense, "matches": self.matches,
            "matched_exit": self.matched_exit,
            "config_hash": config_hash(self.experiment)}


@dataclasses.dataclass(frozen=True)
class StudyPlan:
  runs: tuple[RunSpec, ...]
  dropped: tuple[tuple[str, str], ...]  # (run id, why it was dropped)
  notes: tuple[str, ...]  # warnings about the design, e.g. a prior N* outside the ladder

  @property
  def total_flops(self) -> float:
    return sum(r.flops for r in self.runs)

  def accelerator_hours(self, device: str, mfu: float) -> float:
    return self.total_flops / (chips.chip(device).peak_flops * mfu) / 3600.0

  def run(self, run_id: str) -> RunSpec:
    return next(r for r in self.runs if r.run_id == run_id)

  def describe(self) -> dict:
    """Every planned run (the plan table's fields), what was dropped and why: JSON-ready."""
    return {"runs": [r.describe() for r in self.runs], "dropped": [list(d) for d in self.dropped],
            "notes": list(self.notes), "total_flops": self.total_flops}

  def share(self, task_index: int, num_tasks: int) -> tuple[RunSpec, ...]:
    """Task i's runs: the plan sorted by FLOPs (largest first), dealt round-robin, so shares
    are balanced and together hold every run exactly once."""
    if not (isinstance(num_tasks, int) and num_tasks >= 1):
      raise ValueError(f"num_tasks must be an integer >= 1; got {num_tasks!r}")
    if not (isinstance(task_index, int) and 0 <= task_index < num_tasks):
      raise ValueError(f"task_index must be in 0..{num_tasks - 1}; got {task_index!r}")
    ordered = sorted(self.runs, key=lambda r: (-r.flops, r.run_id))
    return tuple(ordered[task_index::num_tasks])


def model_shape(study: StudyConfig, base: ModelConfig, d_model: int, granularity: int,
                n_layers: int | None = None) -> ModelConfig:
  """The model of width d_model under the shape rule (n_layers overrides the rule's depth)."""
  if n_layers is None:
    by_aspect = math.ceil(d_model / study.aspect_ratio / study.layer_multiple)
    n_layers = max(study.min_layers, by_aspect * study.layer_multiple)
  d_ff = max(8, int(round(study.ff_ratio * d_model / 8)) * 8)
  return dataclasses.replace(base, d_model=d_model, n_heads=d_model // study.head_dim, d_ff=d_ff,
                             n_layers=n_layers,
                             exit_layers=exit_layers(study, n_layers, granularity))


def exit_layers(study: StudyConfig, n_layers: int, granularity: int) -> tuple[int, ...]:
  """study.exit_layers for this G if given, else evenly spaced: round(g * n_layers / G)."""
  layers = study.explicit_exits.get(granularity)
  if layers is None:
    layers = tuple(int(round(g * n_layers / granularity)) for g in range(1, granularity + 1))
  if layers[-1] != n_layers or len(set(layers)) != granularity:
    raise ValueError(f"study.exit_layers: exits {layers} for G={granularity} must be distinct "
                     f"and end at the final layer of a {n_layers}-layer model")
  return layers


def family_params(study: StudyConfig, acc: counts.Accounting) -> int:
  """N of a family under study.param_count."""
  return acc.params_non_embedding if study.param_count == "non_embedding" else acc.params_total


def flops_per_token(study: StudyConfig, acc: counts.Accounting) -> float:
  """Training FLOPs per token under study.flops."""
  if study.flops == "6N":
    return 6.0 * family_params(study, acc)
  return acc.flops_per_token


def learning_rate(study: StudyConfig, train: TrainConfig, model: ModelConfig) -> float:
  """train.learning_rate at the ladder's first width, times (that width / d_model) to the power
  study.lr_width_power (0: one rate for every size)."""
  return train.learning_rate * (study.widths[0] / model.d_model) ** study.lr_width_power


def flops_rule(study: StudyConfig, base: ModelConfig, seq_len: int,
               granularities) -> dict[int, tuple[float, float, float]]:
  """The study's training FLOPs per token as a power of its N, per G: {G: (log c, p, max
  relative error over the ladder)} with k = c N^p fitted (least squares in logs) to the shapes
  of every ladder width with G exits. A G for which no width has enough layers is left out."""
  rule = {}
  for g in granularities:
    n, k = [], []
    for width in study.widths:
      try:
        acc = counts.account(model_shape(study, base, width, g), seq_len)
      except ValueError:  # fewer layers than exits
        continue
      n.append(family_params(study, acc))
      k.append(flops_per_token(study, acc))
    if not n:
      continue
    log_n, log_k = np.log(np.array(n, float)), np.log(np.array(k, float))
    power, log_c = np.polyfit(log_n, log_k, 1) if len(n) > 1 else (1.0, log_k[0] - log_n[0])
    error = float(np.max(np.abs(np.exp(log_c + power * log_n - log_k) - 1)))
    rule[int(g)] = (float(log_c), float(power), error)
  return rule


def budget_widths(study: StudyConfig, base: ExperimentConfig, budget: float) -> tuple[list, str]:
  """The sizes_per_budget consecutive ladder widths centred on the prior optimum: the width whose
  dense model, trained on C FLOPs, sees tokens_per_param tokens per parameter (D/N falls as the
  width grows). Also a note if the prior optimum lies outside the ladder."""
  seq_len = base.train.seq_len
  accs = [counts.account(model_shape(study, base.model, w, 1), seq_len) for w in study.widths]
  n_w = np.array([family_params(study, acc) for acc in accs], float)
  d_w = np.array([budget / flops_per_token(study, acc) for acc in accs])
  log_ratio = np.log(d_w / n_w)[::-1]  # increasing
  position = len(n_w) - 1 - np.interp(np.log(study.tokens_per_param), log_ratio,
                                      np.arange(len(n_w)))
  k = study.sizes_per_budget
  start = int(np.clip(round(position - (k - 1) / 2), 0, len(n_w) - k))
  note = ""
  if not log_ratio[0] <= np.log(study.tokens_per_param) <= log_ratio[-1]:
    note = (f"C={budget:.3g}: D/N = study.tokens_per_param={study.tokens_per_param:g} falls "
            f"outside the ladder (D/N from {d_w[-1] / n_w[-1]:.3g} to {d_w[0] / n_w[0]:.3g}); "
            "its curve may not bracket the minimum (extend study.widths)")
  return list(study.widths[start:start + k]), note


def _tag(budget: float) -> str:
  return f"{budget:.3g}".replace("+", "")


@dataclasses.dataclass
class _Planner:
  """Turns models and budgets into runs for one study, collecting the runs it drops (why)."""
  study: StudyConfig
  base: ExperimentConfig
  corpus_tokens: int | None  # training tokens of the corpus: enables the epochs check
  dropped: list = dataclasses.field(default_factory=list)

  def spec(self, run_id: str, kind: str, budget: float, run_budget: float, granularity: int,
           model, **extra) -> RunSpec | None:
    """A run training `model` on run_budget FLOPs with the study's first seed unless `seed` is in
    extra, or None (the reason appended to dropped)."""
    study, tc = self.study, self.base.train
    seed = extra.pop("seed", study.seeds[0])
    per_step = tc.batch_size * tc.seq_len
    acc = counts.account(model, tc.seq_len)
    fpt = flops_per_token(study, acc)
    steps = int(run_budget / fpt // per_step)
    if steps < study.min_steps:
      self.dropped.append((run_id, f"C={run_budget:.3g} buys {steps} steps of {per_step} tokens "
                                   f"at {fpt:,.0f} FLOPs/token, fewer than "
                                   f"study.min_steps={study.min_steps}"))
      return None
    tokens, corpus = steps * per_step, self.corpus_tokens
    if corpus and tokens > study.max_epochs * corpus:
      self.dropped.append((run_id, f"D={tokens:,} tokens is {tokens / corpus:.2f} epochs of the "
                                   f"{corpus:,}-token training corpus, more than "
                                   f"study.max_epochs={study.max_epochs}"))
      return None
    warmup = min(steps - 1, int(round(study.warmup_fraction * steps)))
    train = dataclasses.replace(tc, steps=steps, tokens=0, warmup_steps=warmup, seed=seed,
                                exit_weights=(), learning_rate=learning_rate(study, tc, model))
    experiment = dataclasses.replace(self.base, model=model, train=train)
    return RunSpec(run_id=run_id, kind=kind, budget=budget, granularity=granularity, seed=seed,
                   experiment=experiment, flops_per_token=fpt, tokens=tokens, accounting=acc,
                   **extra)

  def dense_matches(self, budget: float, granularity: int, runs) -> list:
    """The G dense models matched to each family at (C, G) (study.leverage_widths: every width
    and seed of the budget, or the middle width's first seed): dense model g has exit g's
    sub-model (layers 1..l_g, plus the exit's private block if it has one), the family's seed,
    and trains C / G FLOPs, as leverage.efficiency_leverage assumes."""
    study = self.study
    families = [r for r in runs if r.kind == ISOFLOP and r.budget == budget
                and r.granularity == granularity]
    if study.leverage_widths == "middle":
      widths = budget_widths(study, self.base, budget)[0]
      middle = widths[(len(widths) - 1) // 2]
      first = [r for r in families if r.seed == study.seeds[0]]
      families = first and [min(first, key=lambda r: abs(r.experiment.model.d_model - middle))]
    if not families:
      self.dropped.append((f"C{_tag(budget)}_G{granularity}_dense*", "its family was dropped"))
      return []
    return [m for family in families for m in self._matches(family, budget, granularity)]

  def _matches(self, family, budget: float, granularity: int) -> list:
    model, before, matches = family.experiment.model, len(self.dropped), []
    private = counts.private_blocks(model)
    for g, layer in enumerate(model.exit_layers, start=1):
      dense = model_shape(self.study, self.base.model, model.d_model, 1,
                          n_layers=layer + private[g - 1])
      matches.append(self.spec(f"{family.run_id}_dense{g}", DENSE_MATCH, budget,
                               budget / granularity, granularity, dense, seed=family.seed,
                               matches=family.run_id, matched_exit=g))
    if len(self.dropped) > before:  # a leverage point needs all G dense models
      self.dropped.extend((m.run_id, "another dense model of its leverage point was dropped")
                          for m in matches if m is not None)
      return []
    return matches

  def grid(self) -> list:
    """The gamma grid: per (width, D, seed) a family for every G and a dense control for every
    exit depth below the backbone's (the G = 1 family is the control of the last exits)."""
    study, per_step = self.study, self.base.train.batch_size * self.base.train.seq_len
    runs = []
    for width, tokens, seed in itertools.product(study.grid_widths, study.grid_tokens,
                                                 study.seeds):
      steps = max(1, round(tokens / per_step))
      tag = f"grid_d{width}_D{steps * per_step}"
      depths = set()
      for granularity in study.granularities:
        model = model_shape(study, self.base.model, width, granularity)
        private = counts.private_blocks(model)
        depths |= {layer + p for layer, p in zip(model.exit_layers, private)}
        runs.append(self._fixed_tokens(f"{tag}_G{granularity}_s{seed}", GRID, granularity,
                                       model, steps, seed=seed))
      for depth in sorted(depths - {model.n_layers}):
        dense = model_shape(study, self.base.model, width, 1, n_layers=depth)
        runs.append(self._fixed_tokens(f"{tag}_control{depth}_s{seed}", EXIT_CONTROL, 1, dense,
                                       steps, seed=seed))
    return [r for r in runs if r is not None]

  def placements(self) -> list:
    """Per seed, a family of one backbone for every exit placement of study.placements and a
    dense control for every exit depth (the backbone's own included), all on the same tokens:
    exits whose P and Q vary apart from G."""
    study, per_step = self.study, self.base.train.batch_size * self.base.train.seq_len
    if not study.placement_layers:
      return []
    backbone = model_shape(study, self.base.model, study.placement_width, 1)
    steps = max(1, round(study.placement_tokens / per_step))
    tag = f"place_d{study.placement_width}_D{steps * per_step}"
    families, depths = [], set()
    for layers in study.placement_layers:
      if layers[-1] != backbone.n_layers:
        raise ValueError(f"study.placements: exits {layers} must end at the final layer of the "
                         f"{backbone.n_layers}-layer backbone of width {study.placement_width}")
      family = dataclasses.replace(backbone, exit_layers=layers)
      depths |= {layer + p for layer, p in zip(layers, counts.private_blocks(family))}
      families.append(family)
    runs = []
    for seed in study.placement_seeds or study.seeds:
      runs += [self._fixed_tokens(f"{tag}_L{'-'.join(map(str, f.exit_layers))}_s{seed}",
                                  PLACEMENT, len(f.exit_layers), f, steps, seed=seed)
               for f in families]
      runs += [self._fixed_tokens(f"{tag}_control{depth}_s{seed}", PLACEMENT_CONTROL, 1,
                                  model_shape(study, self.base.model, study.placement_width, 1,
                                              n_layers=depth), steps, seed=seed)
               for depth in sorted(depths)]
    return [r for r in runs if r is not None]

  def _fixed_tokens(self, run_id, kind, granularity, model, steps, **extra) -> RunSpec | None:
    """A run of exactly `steps` optimizer steps (its budget C is what they cost)."""
    per_step = self.base.train.batch_size * self.base.train.seq_len
    fpt = flops_per_token(self.study, counts.account(model, self.base.train.seq_len))
    budget = steps * per_step * fpt
    # half a step of slack so that rounding C / FLOPs-per-token cannot lose a step
    return self.spec(run_id, kind, budget, budget + per_step * fpt / 2, granularity, model,
                     **extra)


def plan_study(study: StudyConfig, base: ExperimentConfig,
               corpus_tokens: int | None = None) -> StudyPlan:
  """Every run of the study. `base` gives everything but the model's shape and the steps
  (vocabulary, exit heads, batch, sequence length, optimizer); corpus_tokens (training tokens of
  the corpus) enables the epochs check."""
  planner, runs, notes = _Planner(study, base, corpus_tokens), [], []
  for budget in study.budgets:
    widths, note = budget_widths(study, base, budget)
    if note:
      notes.append(note)
    for granularity in study.granularities:
      for width in widths:
        model = model_shape(study, base.model, width, granularity)
        for seed in study.seeds:
          run_id = f"C{_tag(budget)}_G{granularity}_d{width}L{model.n_layers}_s{seed}"
          spec = planner.spec(run_id, ISOFLOP, budget, budget, granularity, model, seed=seed)
          if spec:
            runs.append(spec)
  for budget, granularity in study.leverage_points:
    runs.extend(planner.dense_matches(budget, granularity, runs))
  runs.extend(planner.grid())
  runs.extend(planner.placements())
  return StudyPlan(tuple(runs), tuple(planner.dropped), tuple(notes))


def plan_table(plan_: StudyPlan, extra: tuple[str, Mapping[str, str]] = ("", {})) -> str:
  """The plan as a text table, with total FLOPs. `heads`: share of the family's parameters in
  its embedding and exit heads; `x dense`: its FLOPs per token over a dense model of its shape;
  `extra`: (header, {run id: cell}) of more columns, e.g. famjax.hardware.memory.run_cells."""
  header = (f"{'run id':<34} {'C':>8} {'G':>2} {'exit layers':<12} {'N per exit (total)':<34} "
            f"{'D':>12} {'steps':>6} {'FLOPs':>9} {'heads':>6} {'x dense':>7} {extra[0]}").rstrip()
  lines = [header, "-" * len(header)]
  for r in plan_.runs:
    d = r.describe()
    n = ",".join(f"{x:,}" for x in d["N_per_exit"])
    lines.append(f"{r.run_id:<34} {r.budget:>8.2g} {r.granularity:>2} "
                 f"{','.join(map(str, d['exit_layers'])):<12} {n:<34} {r.tokens:>12,} "
                 f"{r.steps:>6} {r.flops:>9.3g} {r.accounting.outside_backbone_share:>6.1%} "
                 f"{r.accounting.flops_over_dense:>7.2f} {extra[1].get(r.run_id, '')}".rstrip())
  lines.append(f"{len(plan_.runs)} runs, {plan_.total_flops:.3g} training FLOPs in all")
  return "\n".join(lines)
