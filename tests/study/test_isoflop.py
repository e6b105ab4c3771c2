"""The IsoFLOP planner: arithmetic, shape rule, exit placement, size windows, dropped runs and
shares."""

import dataclasses
import math

import pytest

from famjax.model import counts
from famjax.model.config import ModelConfig
from famjax.study import isoflop
from famjax.study.config import StudyConfig
from famjax.train.config import ExperimentConfig, TrainConfig

BASE = ExperimentConfig(model=ModelConfig(vocab_size=264, max_seq_len=64),
                        train=TrainConfig(batch_size=16, seq_len=64, steps=1, warmup_steps=0))
STUDY = StudyConfig(budgets=(3e10, 1e11, 3e11), granularities=(1, 2, 4), head_dim=4,
                    widths=(4, 8, 12, 16, 20, 24, 32, 40), sizes_per_budget=4,
                    tokens_per_param=100.0, leverage="1e11:4", min_steps=50)


@pytest.fixture(scope="module")
def plan():
  return isoflop.plan_study(STUDY, BASE, corpus_tokens=30_000_000)


def test_tokens_times_flops_per_token_is_the_budget_within_one_step(plan):
  per_step = BASE.train.batch_size * BASE.train.seq_len
  for run in plan.runs:
    budget = run.budget if run.kind == isoflop.ISOFLOP else run.budget / run.granularity
    fpt = counts.account(run.experiment.model, 64).flops_per_token
    assert run.flops_per_token == fpt
    assert run.tokens == run.steps * per_step == run.experiment.train.total_steps * per_step
    assert 0 <= budget - run.flops < fpt * per_step, run.run_id
  # lr_width_power 0: every size trains at the base rate
  assert {r.experiment.train.learning_rate for r in plan.runs} == {BASE.train.learning_rate}


def test_six_n_rule_counts_six_flops_per_parameter():
  plan = isoflop.plan_study(dataclasses.replace(STUDY, flops="6N", leverage=""), BASE)
  for run in plan.runs:
    n = counts.account(run.experiment.model, 64).params_non_embedding
    assert run.flops_per_token == 6.0 * n


def test_flops_rule_is_the_runs_flops_per_token_as_a_power_of_n(plan):
  six_n = isoflop.flops_rule(dataclasses.replace(STUDY, flops="6N"), BASE.model, 64, (1, 4))
  for g in (1, 4):
    log_c, power, error = six_n[g]
    assert power == pytest.approx(1.0) and log_c == pytest.approx(math.log(6.0))
    assert error < 1e-9
  rule = isoflop.flops_rule(STUDY, BASE.model, 64, (1, 2, 4, 9))
  assert set(rule) == {1, 2, 4}  # no ladder width has 9 layers for 9 exits
  for run in plan.runs:
    if run.kind == isoflop.ISOFLOP:
      log_c, power, error = rule[run.granularity]
      n = run.accounting.params_non_embedding
      assert math.exp(log_c) * n ** power == pytest.approx(run.flops_per_token, rel=error + 1e-9)
  assert rule[4][0] > rule[1][0] or rule[4][1] > rule[1][1]  # more exit heads, more FLOPs


def test_shape_rule():
  study = StudyConfig(head_dim=8, ff_ratio=8 / 3, aspect_ratio=32.0, min_layers=4,
                      layer_multiple=4, widths=(64, 256, 512), sizes_per_budget=2)
  small = isoflop.model_shape(study, BASE.model, 64, 1)
  assert (small.n_heads, small.d_ff, small.n_layers) == (8, 168, 4)
  wide = isoflop.model_shape(study, BASE.model, 512, 2)
  assert (wide.n_heads, wide.d_ff, wide.n_layers) == (64, 1368, 16)  # 512 / 32 = 16 layers
  assert isoflop.model_shape(study, BASE.model, 288, 1).n_layers == 12  # 9 rounds up to 12


@pytest.mark.parametrize("n_layers, granularity, expected", [
    (8, 4, (2, 4, 6, 8)), (8, 3, (3, 5, 8)), (4, 4, (1, 2, 3, 4)), (12, 2, (6, 12)), (5, 1, (5,)),
])
def test_exits_are_evenly_spaced_and_the_last_is_the_final_layer(n_layers, granularity, expected):
  assert isoflop.exit_layers(STUDY, n_layers, granularity) == expected


def test_explicit_exit_layers():
  study = dataclasses.replace(STUDY, exit_layers="2:3,4;4:1,2,3,4")
  assert isoflop.exit_layers(study, 4, 2) == (3, 4)
  with pytest.raises(ValueError, match="study.exit_layers"):
    isoflop.exit_layers(study, 8, 2)  # (3, 4) does not end at layer 8
  with pytest.raises(ValueError, match="study.exit_layers"):
    dataclasses.replace(STUDY, exit_layers="2:1,2,4")


def test_each_budget_trains_consecutive_widths_that_move_up_with_compute(plan):
  windows = {}
  for run in plan.runs:
    if run.kind == isoflop.ISOFLOP:
      windows.setdefault(run.budget, set()).add(run.experiment.model.d_model)
  starts = []
  for budget, widths in sorted(windows.items()):
    index = [STUDY.widths.index(w) for w in sorted(widths)]
    assert index == list(range(index[0], index[0] + STUDY.sizes_per_budget)), budget
    starts.append(index[0])
  assert starts == sorted(starts) and starts[-1] > starts[0]
  for budget in STUDY.budgets:  # every G sees the same sizes at a budget
    assert {r.granularity for r in plan.runs if r.budget == budget} == {1, 2, 4}


def test_runs_with_too_few_steps_or_too_many_epochs_are_dropped_with_the_reason():
  tight = isoflop.plan_study(dataclasses.replace(STUDY, min_steps=400, leverage=""), BASE,
                       corpus_tokens=600_000)
  reasons = dict(tight.dropped)
  assert any("fewer than study.min_steps=400" in why for why in reasons.values())
  assert any("epochs of the 600,000-token training corpus" in why for why in reasons.values())
  kept = {r.run_id for r in tight.runs}
  assert not kept & set(reasons)
  assert all(r.steps >= 400 and r.tokens <= 600_000 for r in tight.runs)


def test_a_prior_outside_the_ladder_is_noted():
  plan = isoflop.plan_study(dataclasses.replace(STUDY, budgets=(1e14,), leverage="", min_steps=1),
                            BASE)
  assert plan.notes and "outside the ladder" in plan.notes[0]


def test_dense_models_match_each_exit_and_share_the_budget():
  plan = isoflop.plan_study(dataclasses.replace(STUDY, seeds=(0, 1)), BASE,
                            corpus_tokens=30_000_000)
  dense = [r for r in plan.runs if r.kind == isoflop.DENSE_MATCH]
  families = [r for r in plan.runs if r.kind == isoflop.ISOFLOP and r.budget == 1e11
              and r.granularity == 4]
  assert sorted({r.matches for r in dense}) == sorted(r.run_id for r in families)
  assert len(dense) == 4 * len(families) and len(families) == 2 * STUDY.sizes_per_budget
  for run in dense:
    family = plan.run(run.matches)
    family_acc = counts.account(family.experiment.model, 64)
    acc = counts.account(run.experiment.model, 64)
    g = run.matched_exit
    assert run.experiment.model.n_exits == 1 and run.seed == family.seed
    assert acc.params_total == family_acc.params_per_exit[g - 1]
    assert acc.params_non_embedding == family_acc.non_embedding_per_exit[g - 1]
    assert run.budget == 1e11 and abs(run.flops - 1e11 / 4) < run.flops_per_token * 1024


def test_leverage_widths_middle_matches_only_the_middle_family_of_the_first_seed():
  study = dataclasses.replace(STUDY, leverage_widths="middle", seeds=(3, 1))
  plan = isoflop.plan_study(study, BASE, corpus_tokens=30_000_000)
  dense = [r for r in plan.runs if r.kind == isoflop.DENSE_MATCH]
  widths = isoflop.budget_widths(study, BASE, 1e11)[0]
  (family_id,) = {r.matches for r in dense}
  family = plan.run(family_id)
  assert len(dense) == 4 and family.seed == 3 and {r.seed for r in dense} == {3}
  assert family.experiment.model.d_model == widths[(len(widths) - 1) // 2]
  with pytest.raises(ValueError, match=r"study.leverage_widths.*one of \('all', 'middle'\)"):
    dataclasses.replace(STUDY, leverage_widths="best")


def test_two_shares_cover_the_plan_exactly_once(plan):
  shares = [plan.share(i, 2) for i in range(2)]
  ids = [r.run_id for share in shares for r in share]
  assert sorted(ids) == sorted(r.run_id for r in plan.runs) and len(set(ids)) == len(ids)
  flops = [sum(r.flops for r in share) for share in shares]
  assert abs(flops[0] - flops[1]) <= max(r.flops for r in plan.runs)
  with pytest.raises(ValueError, match="task_index must be in 0..1"):
    plan.share(2, 2)


def test_run_ids_are_unique_and_name_the_design(plan):
  ids = [r.run_id for r in plan.runs]
  assert len(ids) == len(set(ids))
  assert "C1e11_G4_d12L4_s0" in ids


def test_table_lists_every_run_and_the_total(plan):
  text = isoflop.plan_table(plan)
  assert all(r.run_id in text for r in plan.runs)
  assert f"{len(plan.runs)} runs" in text and f"{plan.total_flops:.3g}" in text


def test_paper_preset_plans_billion_parameter_families_without_reading_a_corpus():
  from famjax.presets import isoflop as presets
  from famjax.study import saved_config
  study_cfg, base = saved_config.configs(presets.get_config("paper").to_dict())
  plan = isoflop.plan_study(study_cfg, base, study_cfg.planned_corpus_tokens)
  assert len(plan.runs) >= 5 * 4 * 4
  sizes = [counts.account(r.experiment.model, 2048).params_total for r in plan.runs]
  assert min(sizes) < 1e9 and max(sizes) > 5e9
  rates = {r.experiment.model.d_model: r.experiment.train.learning_rate for r in plan.runs}
  assert rates[1024] == pytest.approx(3e-4) and rates[4096] == pytest.approx(1.5e-4)
  hours = plan.accelerator_hours("h100", 0.4)
  assert hours == pytest.approx(plan.total_flops / (989e12 * 0.4) / 3600)


def test_medium_preset_is_out_of_the_embedding_regime_with_a_gamma_grid():
  """Every family: width >= 32, heads >= 16 wide, embedding and exit heads under 25% of its
  parameters; budgets up to at least 1e12, two seeds, gamma-grid families and their controls."""
  from famjax.presets import isoflop as presets
  from famjax.study import saved_config
  study_cfg, base = saved_config.configs(presets.get_config("medium").to_dict())
  plan = isoflop.plan_study(study_cfg, base)
  families = [r for r in plan.runs if r.kind in (isoflop.ISOFLOP, isoflop.GRID)]
  for run in families:
    model = run.experiment.model
    assert model.d_model >= 32 and model.d_model // model.n_heads >= 16, run.run_id
    assert run.accounting.outside_backbone_share < 0.25, run.run_id
  assert max(study_cfg.budgets) >= 1e12 and len(study_cfg.seeds) == 2
  kinds = {r.kind for r in plan.runs}
  assert {isoflop.ISOFLOP, isoflop.DENSE_MATCH, isoflop.GRID, isoflop.EXIT_CONTROL} <= kinds
  assert not plan.dropped


def test_gamma_grid_trains_every_g_on_one_backbone_and_the_same_tokens():
  grid_study = dataclasses.replace(STUDY, grid_widths=(16,), grid_tokens=(102_400,), seeds=(0, 1),
                                   leverage="")
  runs = [r for r in isoflop.plan_study(grid_study, BASE).runs
          if r.kind in (isoflop.GRID, isoflop.EXIT_CONTROL)]
  families = [r for r in runs if r.kind == isoflop.GRID]
  assert sorted((r.granularity, r.seed) for r in families) == [(g, s) for g in (1, 2, 4)
                                                               for s in (0, 1)]
  assert {r.tokens for r in runs} == {102_400} and {r.steps for r in runs} == {100}
  assert {(r.experiment.model.d_model, r.experiment.model.n_layers) for r in families} == {(16, 4)}
  controls = sorted({r.experiment.model.n_layers for r in runs if r.kind == isoflop.EXIT_CONTROL})
  assert controls == [1, 2, 3]  # the exits' depths below the backbone's 4 layers
  assert {r.experiment.train.seed for r in families} == {0, 1}


PLACEMENTS = "1,4;2,4;3,4;1,2,4;2,3,4;1,2,3,4"


def test_placements_vary_exits_apart_from_g_on_one_backbone_and_the_same_tokens():
  study = dataclasses.replace(STUDY, budgets=(), leverage="", placements=PLACEMENTS,
                              placement_width=16, placement_tokens=102_400,
                              placement_seeds=(0, 1, 2))
  runs = isoflop.plan_study(study, BASE).runs
  assert {r.kind for r in runs} == {isoflop.PLACEMENT, isoflop.PLACEMENT_CONTROL}
  families = [r for r in runs if r.kind == isoflop.PLACEMENT]
  assert sorted(";".join(",".join(map(str, r.experiment.model.exit_layers))
                         for r in families if r.seed == 0).split(";")) == sorted(
      PLACEMENTS.split(";"))
  assert all(r.granularity == len(r.experiment.model.exit_layers) for r in families)
  assert {(r.experiment.model.d_model, r.experiment.model.n_layers) for r in families} == {(16, 4)}
  controls = [r for r in runs if r.kind == isoflop.PLACEMENT_CONTROL]
  assert sorted(r.experiment.model.n_layers for r in controls if r.seed == 2) == [1, 2, 3, 4]
  assert {r.tokens for r in runs} == {102_400} and len(runs) == 3 * (6 + 4)
  assert {r.experiment.train.seed for r in runs} == {0, 1, 2}
  with pytest.raises(ValueError, match="must end at the final layer of the 4-layer backbone"):
    isoflop.plan_study(dataclasses.replace(study, placements="1,3"), BASE)


@pytest.mark.parametrize("field, value, message", [
    ("placements", "2,1", "study.placements must be exit layer sets"),
    ("placements", "4", "study.placements must be exit layer sets"),
    ("placements", "1;x", "study.placements must look like"),
    ("placements", "1,4", "study.placement_width must be a positive multiple"),
    ("budgets", (), "study.budgets must be finite FLOP counts > 0, at least one unless"),
    ("grid_widths", (6,), "study.grid_widths must be strictly increasing multiples"),
    ("grid_tokens", (0,), "study.grid_tokens must be strictly increasing integers > 0"),
    ("grid_widths", (8,), "study.grid_widths must be given with study.grid_tokens"),
    ("law_flops", "7N", "study.law_flops must be one of"),
    ("lr_width_power", -1.0, "study.lr_width_power must be in .0, 2."),
    ("budgets", (1e11, 3e10), "study.budgets must be strictly increasing"),
    ("granularities", (1, 8), "study.min_layers must be >= the largest granularity 8"),
    ("widths", (4, 6), "study.widths must be strictly increasing multiples of study.head_dim=4"),
    ("bootstrap", 10, "study.bootstrap must be 0 .no intervals. or at least 100"),
    ("leverage", "1e12:2", "study.leverage must be 'C:G' pairs with C in study.budgets"),
    ("fit_loss", "test", "study.fit_loss must be one of"),
])
def test_bad_study_config_names_the_field(field, value, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(STUDY, **{field: value})
