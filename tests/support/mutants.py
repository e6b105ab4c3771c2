"""Runs deliberately broken copies of famjax (mutants) against the tests that should catch them.

  .venv/bin/python tests/support/mutants.py            # every mutant below
  .venv/bin/python tests/support/mutants.py rotary     # those whose name contains "rotary"
  .venv/bin/python tests/support/mutants.py -j 2       # two mutants at a time (one per core)

Each mutant is one text replacement in one file. The tree is copied to a temporary directory,
mutated there, and the listed tests run with that copy first on PYTHONPATH (the checkout itself is
never touched). A mutant is killed when its tests fail. See docs/testing.md.
"""

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# (name, file, original text, mutated text, tests that must fail)
MUTANTS = [
    ("huber delta 1e-3 -> 1", "famjax/scaling/problem_and_solver.py", "DEFAULT_DELTA = 1e-3",
     "DEFAULT_DELTA = 1.0",
     "tests/scaling/test_fitting.py::test_the_default_fit_shrugs_off_an_outlier"),
    ("rotary returns its input", "famjax/model/transformer.py", "  half = x_BTQH.shape[-1] // 2\n",
     "  return x_BTQH\n  half = x_BTQH.shape[-1] // 2\n",
     "tests/model/test_transformer.py -k rotary"),
    ("bootstrap groups without replacement", "famjax/scaling/resampling.py",
     "  draws = jax.random.randint(key, (n, n_groups), 0, n_groups)",
     "  draws = jnp.broadcast_to(jnp.arange(n_groups), (n, n_groups))",
     "tests/scaling/test_fitting.py -k group_resampling"),
    ("EL with every exit the full model's size", "famjax/scaling/leverage.py",
     "ladder = g / n_exits if ladder is None", "ladder = g / g if ladder is None",
     "tests/scaling/test_fitting.py -k efficiency_leverage"),
    ("exit 0's loss weight 0", "famjax/train/config.py", "      return (1.0 / n_exits,) * n_exits",
     "      return (0.0,) + (1.0 / (n_exits - 1),) * (n_exits - 1) if n_exits > 1 else (1.0,)",
     "tests/train/test_train.py -k weighted_sum"),
    ("exit weights ignored", "famjax/train/step.py", "    return jnp.dot(weights_G, ce_G), ce_G",
     "    return jnp.mean(ce_G), ce_G", "tests/train/test_train.py -k weighted_sum"),
    ("attention FLOPs dropped", "famjax/model/counts.py",
     "  return 4 * seq_len * cfg.n_heads * cfg.head_size", "  return 0",
     "tests/model/test_counts.py"),
    ("key/value heads counted as query heads", "famjax/model/counts.py",
     "  attention = 2 * (cfg.n_heads + cfg.kv_heads) * cfg.head_size * cfg.d_model",
     "  attention = 4 * cfg.n_heads * cfg.head_size * cfg.d_model",
     "tests/model/test_counts.py -k parameter_tree"),
    ("heads not sharded", "famjax/model/sharding.py", '    ("heads", "model"),',
     '    ("heads", None),',
     "tests/model/test_sharding.py -k rules_table"),
    ("windows without the overlap token", "famjax/data/batches.py",
     "return np.asarray(self._tokens[start:start + self._seq_len + 1], dtype=np.int32)",
     "return np.asarray(self._tokens[start + 1:start + self._seq_len + 2], dtype=np.int32)",
     "tests/data/test_batches.py -k windows"),
    ("eval batches from the second window", "famjax/data/batches.py",
     "  return [np.stack([windows[b * batch_size + i] for",
     "  return [np.stack([windows[b * batch_size + i + 1] for",
     "tests/data/test_batches.py -k eval"),
    ("no warmup in the schedule", "famjax/train/optimizer.py",
     "    return optax.warmup_cosine_decay_schedule(0.0, peak, tc.warmup_steps, total, end)",
     "    return optax.warmup_cosine_decay_schedule(peak, peak, tc.warmup_steps, total, end)",
     "tests/train/test_train.py -k schedules"),
    ("norm scales decayed", "famjax/train/optimizer.py", "lambda p: p.ndim > 1, params)",
     "lambda p: p.ndim > 0, params)", "tests/train/test_train.py -k weight_decay"),
    ("no workdir lock", "famjax/common/files.py",
     "      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)",
     "      pass", "tests/test_faults.py -k holder"),
    ("no checkpoint fallback", "famjax/train/checkpoint.py", "      continue\n    mngr.reload()",
     "      raise\n    mngr.reload()", "tests/test_faults.py -k damaged"),
    ("stale metrics kept on resume", "famjax/train/workdir_files.py",
     'if record["step"] <= resume_step and key not in seen:', "if key not in seen:",
     "tests/test_faults.py -k step_zero"),
    ("unweighted mean exit loss", "famjax/study/records.py",
     'weighted = done.assign(weighted=done["loss"] * done["exit_weight"])',
     'weighted = done.assign(weighted=done["loss"] / done["G"])',
     "tests/study/test_records.py -k weighted"),
    ("runs overspend their budget", "famjax/study/isoflop.py",
     "  steps = int(run_budget / fpt // per_step)",
     "  steps = int(run_budget / fpt // per_step) + 1",
     "tests/study/test_isoflop.py -k budget_within"),
    ("task shares overlap", "famjax/study/isoflop.py",
     "return tuple(ordered[task_index::num_tasks])",
     "return tuple(ordered[task_index:])", "tests/study/test_isoflop.py -k exactly_once"),
    ("bootstrap without screened starts", "famjax/scaling/bootstrap.py",
     "  if p.n_rows <= fit_stages.SCREENED_MAX_ROWS:\n", "  if False:\n",
     "tests/scaling/test_bootstrap.py -k 'wider_start_search or host_procedure'"),
    ("traced bootstrap without restarts from thinned starts", "famjax/scaling/bootstrap.py",
     "  return jax.lax.while_loop(lambda c: c[1].any(), block, (ends, unsettled_B))[0]",
     "  return ends", "tests/scaling/test_bootstrap.py -k thinned_starts_settle"),
    ("a screened end replaces a lower refit", "famjax/scaling/solver/fit_stages.py",
     "  return found.where(lower_B, current, xp)",
     "  return found",
     "tests/scaling/test_bootstrap.py -k wider_start_search"),
    ("microbatch gradients summed, not averaged", "famjax/train/step.py",
     "  return jax.tree.map(lambda x: x / microbatches, total)", "  return total",
     "tests/train/test_train.py -k microbatches_update"),
    ("a study takes any --config", "famjax/study/saved_config.py", "  if fixed:\n", "  if False:\n",
     "tests/test_pipeline.py -k remembers"),
    ("another layout treated as damage", "famjax/train/checkpoint.py",
     "  if not saved or saved == expected:\n    return None",
     "  return None", "tests/test_faults.py -k another_parameter_layout"),
    ("the live fit rereads the disk", "famjax/analysis/live_fit.py",
     '      self.records = [r for r in self.records if r["run_id"] != spec.run_id]'
     ' + list(run_records)',
     '      self.records = records.collect(self.study_dir, self.fingerprint).to_dict("records")',
     "tests/study/test_records.py -k live_fit"),
    ("every process reads the whole global batch", "famjax/data/batches.py",
     "np.stack([windows[i] for i in index_B[rows]])",
     "np.stack([windows[i] for i in index_B])[rows]", "tests/data/test_batches.py -k own"),
    ("a resumed tokenization redoes finished units", "famjax/data/store.py",
     '           for i, u in enumerate(source.units) if not (out / f"u{i:06d}.json").exists()]',
     "           for i, u in enumerate(source.units)]",
     "tests/data/test_corpora.py -k killed"),
    ("a window across shards loses a token", "famjax/data/store.py",
     "      pieces.append(self._shard(i)[start - begin:end - begin])",
     "      pieces.append(self._shard(i)[start - begin + (i > 0):end - begin])",
     "tests/data/test_corpora.py -k shards_split"),
    ("held-out rows left in their own refit", "famjax/scaling/compare.py",
     "(~in_fold_FR).astype(np.float64),", "np.ones_like(in_fold_FR, np.float64),",
     "tests/scaling/test_compare.py -k whole_perturbation"),
    ("an import cycle", "famjax/model/counts.py", "from famjax.model.config import ModelConfig\n",
     "from famjax.model.config import ModelConfig\n"
     "from famjax.study import isoflop  # noqa: F401\n",
     "tests/test_structure.py -k cycles"),
    ("gamma's basic p against gamma, not 2 gamma", "famjax/scaling/bootstrap.py",
     '"p_basic": float(np.mean(gamma_B >= 2 * gamma))',
     '"p_basic": float(np.mean(gamma_B >= gamma))', "tests/scaling/test_bootstrap.py -k inverts"),
    ("gamma_direct without seed intercepts", "famjax/analysis/gamma_grid.py",
     ' + "_"\n                        + rows["seed"].astype(str))', ")",
     "tests/analysis/test_gamma_grid.py -k shared_gamma"),
    ("exits paired with controls of another seed", "famjax/analysis/gamma_grid.py",
     'CONTROL_KEY = ["d_model", "D", "seed", "N_exit_non_embedding"]',
     'CONTROL_KEY = ["d_model", "D", "N_exit_non_embedding"]',
     "tests/analysis/test_gamma_grid.py -k 'branch or size_and_sharing'"),
    ("placement exits paired with controls of another seed", "famjax/analysis/placements.py",
     "  paired = exits.merge(controls, on=CONTROL_KEY)",
     '  paired = exits.merge(controls.drop(columns="seed"), on=["d_model", "D",'
     ' "N_exit_non_embedding"])', "tests/analysis/test_placements.py -k one_exponent_fits_worse"),
    ("the tax pairs the deepest exit with a dense model of another seed",
     "famjax/analysis/gamma_grid.py", 'on=["d_model", "D", "seed"], suffixes=("", "_dense")',
     'on=["d_model", "D"], suffixes=("", "_dense")', "tests/analysis/test_gamma_grid.py -k tax"),
    ("the grid trains a control of the backbone's own depth", "famjax/study/isoflop.py",
     "sorted(depths - {model.n_layers})", "sorted(depths)",
     "tests/study/test_isoflop.py -k gamma_grid"),
    ("EL at the optimum ignores how many seeds a size has", "famjax/analysis/measured_leverage.py",
     "if len(group) == most)", "if len(group))",
     "tests/test_pipeline.py -k leverage_at_the_optimum"),
    ("dense models of a leverage point take the first seed", "famjax/study/isoflop.py",
     "budget / granularity, granularity, dense, seed=family.seed,",
     "budget / granularity, granularity, dense,",
     "tests/study/test_isoflop.py -k share_the_budget"),
    ("an existing study refuses new --dry_run assumptions", "famjax/study/saved_config.py",
     "for cls in (AnalysisConfig, EstimateConfig)", "for cls in (AnalysisConfig,)",
     "tests/test_pipeline.py -k remembers"),
    ("Decoder exits counted from 0", "famjax/decode/decoder.py", "    return int(exit_) - 1\n",
     "    return int(exit_)\n", "tests/decode/test_decode.py -k cached_logits"),
    ("a KV cache of query heads", "famjax/decode/relay_state.py",
     "  shape = (batch, max_len, cfg.kv_heads, cfg.head_size)",
     "  shape = (batch, max_len, cfg.n_heads, cfg.head_size)",
     "tests/decode/test_decode.py -k grouped"),
    ("HF projections read untransposed", "famjax/hf/weights.py",
     '    attn[ours] = {"kernel": w.T.reshape(m, heads[ours], h)}',
     '    attn[ours] = {"kernel": w.reshape(m, heads[ours], h)}',
     "tests/hf/test_hf.py -k transformers_computed"),
    ("frozen parameters train", "famjax/train/trainable_params.py",
     "  if last_layers is None:\n    return True",
     "  if True:\n    return True", "tests/hf/test_hf.py -k warm_started"),
    ("no exit-loss warm-up", "famjax/train/step.py",
     "    weights_G[:-1] *= step / tc.exit_warmup_steps", "    pass",
     "tests/hf/test_hf.py -k warm_started"),
    ("harness loglikelihood drops the last token", "famjax/evaluation/scoring.py",
     "      span = slice(n_inputs - n_cont, n_inputs)",
     "      span = slice(n_inputs - n_cont, n_inputs - 1)",
     "tests/evaluation/test_harness.py -k sum_of"),
    ("link prediction interval without the point's own noise", "famjax/evaluation/accuracy_link.py",
     '  noise = Z95 * np.asarray(points["stderr"])[test_P]',
     '  noise = 0.0 * np.asarray(points["stderr"])[test_P]',
     "tests/evaluation/test_accuracy_link.py -k held_out"),
    ("link bootstrap resamples exits, not runs", "famjax/evaluation/accuracy_link.py",
     "  rows_by_run = [np.flatnonzero(run_P == r) for r in runs]",
     "  runs, rows_by_run = run_P, [np.array([i]) for i in range(run_P.size)]",
     "tests/evaluation/test_accuracy_link.py -k whole_runs"),
    ("traced FLOPs count a scan's body once", "famjax/hardware/cost.py",
     '_LOOP_LENGTH = {"scan": lambda params: params["length"]}', "_LOOP_LENGTH = {}",
     "tests/hardware/test_memory.py -k matmul_flops"),
    ("TPU HBM read in decimal units", "famjax/hardware/tpu.py",
     '_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}',
     '_UNITS = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}',
     "tests/hardware/test_memory.py -k refusal"),
    ("a killed plan's compile workers live on", "famjax/hardware/memory.py",
     "  threading.Thread(target=_exit_with_parent, daemon=True).start()\n", "",
     "tests/hardware/test_memory.py -k killed"),
    ("plots switch matplotlib's backend", "famjax/analysis/plots.py",
     "from matplotlib.figure import Figure\n",
     "from matplotlib.figure import Figure\n\nmatplotlib.use('Agg')\n",
     "tests/test_structure.py -k matplotlib"),
]


def run(mutant) -> bool:
  name, path, old, new, tests = mutant
  with tempfile.TemporaryDirectory() as tmp:
    copy = Path(tmp) / "tree"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".venv", ".git", "runs",
                                                              "__pycache__", "*.egg-info"))
    target = copy / path
    text = target.read_text()
    if text.count(old) != 1:
      raise SystemExit(f"{name}: the text to mutate is not found once in {path}")
    target.write_text(text.replace(old, new))
    env = dict(os.environ, PYTHONPATH=str(copy))
    # the named tests run whatever their tier (make test or make check)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          *shlex.split(tests)], cwd=copy, env=env, capture_output=True, text=True)
  if out.returncode not in (0, 1):  # 5: no test selected; 2-4: an error, not a failing test
    raise SystemExit(f"{name}: pytest exited {out.returncode} on {tests!r}, which is no verdict:\n"
                     f"{out.stdout[-1500:]}{out.stderr[-1500:]}")
  return out.returncode == 1


def main(pattern: str = "", jobs: int = 1):
  chosen = [m for m in MUTANTS if pattern in m[0]]
  survivors = []
  with ThreadPoolExecutor(jobs) as pool:  # each mutant is its own pytest process
    for mutant, killed in zip(chosen, pool.map(run, chosen)):
      print(f"{'killed  ' if killed else 'SURVIVED'} {mutant[0]}  ({mutant[4]})", flush=True)
      if not killed:
        survivors.append(mutant[0])
  print(f"{len(chosen) - len(survivors)} of {len(chosen)} mutants killed")
  return 1 if survivors else 0


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("pattern", nargs="?", default="", help="run the mutants whose name has it")
  parser.add_argument("-j", "--jobs", type=int, default=1, help="mutants run at a time")
  args = parser.parse_args()
  sys.exit(main(args.pattern, args.jobs))
