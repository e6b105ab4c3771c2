"""famjax as an lm-evaluation-harness model: its numbers against the model's own forward pass,
computed here independently, on a tiny trained family (the `eval` extra)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.special import log_softmax

from famjax.data.config import DataConfig
from famjax.train import loop
from famjax.train.config import ExperimentConfig, TrainConfig

from conftest import tiny_model

harness = pytest.importorskip("famjax.evaluation.harness",
                              reason="lm-eval is the eval extra: pip install -e '.[eval]'")
from lm_eval.api.instance import Instance  # noqa: E402

CONTEXTS = ["the model exits", "cache for deeper", "scaling law compute budget family " * 3,
            "if else loss"]
CONTINUATIONS = [" early when", " tiers def", " granularity", " token layer"]


@pytest.fixture(scope="module")
def workdir(corpus_dir, tmp_path_factory):
  """A G = 3 family with a 32-token context, trained 30 steps on the test corpus."""
  out = tmp_path_factory.mktemp("evaluated")
  cfg = ExperimentConfig(model=tiny_model(), data=DataConfig(corpus=str(corpus_dir),
                                                             val_fraction=0.1),
                         train=TrainConfig(batch_size=8, seq_len=32, steps=30, warmup_steps=3,
                                           learning_rate=1e-2, eval_every=30,
                                           checkpoint_every=30, eval_batches=1,
                                           progress=False))
  loop.train(cfg, out)
  return out


@pytest.fixture(scope="module")
def lms(workdir):
  return {(g, b): harness.FamjaxLM(workdir, exit=g, batch_size=b) for g in (1, 2, 3)
          for b in (1, 8)}


def requests(kind, args_list):
  return [Instance(request_type=kind, doc={}, arguments=args, idx=i)
          for i, args in enumerate(args_list)]


def own_log_probs(lm, tokens: list[int], exit_: int) -> np.ndarray:
  """log p(tokens[t + 1] | tokens[:t + 1]) for every t, from model(...) at exit `exit_`."""
  logits_TV = np.asarray(lm.decoder.logits(np.asarray([tokens[:-1]]))[exit_ - 1, 0], np.float64)
  log_probs_TV = log_softmax(logits_TV, axis=-1)
  return log_probs_TV[np.arange(len(tokens) - 1), tokens[1:]]


@pytest.mark.parametrize("exit_", [1, 2, 3])
def test_loglikelihood_is_the_sum_of_the_exits_token_log_probabilities(lms, exit_):
  lm = lms[(exit_, 8)]
  pairs = list(zip(CONTEXTS, CONTINUATIONS))
  results = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
  for (context, continuation), (log_likelihood, greedy) in zip(pairs, results):
    stripped = context.rstrip()  # the harness moves a context's trailing spaces to the answer
    context, continuation = stripped, context[len(stripped):] + continuation
    context_tokens = lm.tok_encode(context)
    continuation_tokens = lm.tok_encode(context + continuation)[len(context_tokens):]
    whole = (context_tokens + continuation_tokens)[-(lm.max_length + 1):]
    own = own_log_probs(lm, whole, exit_)[-len(continuation_tokens):]
    assert log_likelihood == pytest.approx(float(own.sum()), rel=1e-5, abs=1e-4)
    logits_TV = np.asarray(lm.decoder.logits(np.asarray([whole[:-1]]))[exit_ - 1, 0])
    argmax = logits_TV.argmax(-1)[-len(continuation_tokens):]
    assert greedy == bool(np.all(argmax == np.asarray(continuation_tokens)))


def test_a_greedy_continuation_is_reported_greedy(lms):
  lm = lms[(2, 8)]
  prompt = lm.tok_encode(CONTEXTS[0])
  generated = lm._generate(prompt, 6)
  continuation = lm.tok_decode(generated)
  [(_, greedy)] = lm.loglikelihood(requests("loglikelihood", [(CONTEXTS[0], continuation)]),
                                   disable_tqdm=True)
  assert greedy and lm.tok_encode(CONTEXTS[0] + continuation)[len(prompt):] == generated


def test_batching_changes_no_number(lms):
  pairs = list(zip(CONTEXTS, CONTINUATIONS))
  one = lms[(3, 1)].loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
  eight = lms[(3, 8)].loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
  for (a, greedy_a), (b, greedy_b) in zip(one, eight):
    assert a == pytest.approx(b, rel=1e-5, abs=1e-5) and greedy_a == greedy_b


def test_rolling_loglikelihood_is_the_documents_token_loss_times_its_length(lms):
  """A document shorter than the context: the first token after end-of-text, the rest after
  their prefix. One 3x longer than the 32-token context: windows of 32 predictions, each seeing
  the 32 tokens before its last prediction (the harness's convention), recomputed here."""
  lm = lms[(3, 8)]
  short, long = "the shared backbone keeps", " ".join(CONTEXTS) * 2
  rolling = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(short,), (long,)]),
                                     disable_tqdm=True)
  tokens = [lm.eot_token_id] + lm.tok_encode(short)
  loss = -own_log_probs(lm, tokens, 3).mean()
  assert rolling[0] == pytest.approx(-loss * (len(tokens) - 1), rel=1e-5)
  tokens, width = lm.tok_encode(long), lm.max_length
  assert len(tokens) > 2 * width
  total = own_log_probs(lm, [lm.eot_token_id] + tokens[:width], 3).sum()
  done = width
  while done < len(tokens):
    end = min(done + width, len(tokens))
    total += own_log_probs(lm, tokens[end - width - 1:end], 3)[-(end - done):].sum()
    done = end
  assert rolling[1] == pytest.approx(total, rel=1e-5)


def test_generate_until_stops_at_the_first_stop_string(lms):
  lm = lms[(3, 8)]
  free = lm.generate_until(requests("generate_until", [(CONTEXTS[1], {"max_gen_toks": 12})]),
                           disable_tqdm=True)[0]
  assert len(free) > 2
  stop = free[1:3]
  [cut] = lm.generate_until(requests("generate_until", [
      (CONTEXTS[1], {"until": [stop], "max_gen_toks": 12})]), disable_tqdm=True)
  assert cut == free.split(stop)[0] and stop not in cut


def test_speculative_generation_equals_the_deepest_exits(workdir, lms):
  speculative = harness.FamjaxLM(workdir, strategy="speculative", draft_exit=1, lookahead=3)
  ask = requests("generate_until", [(CONTEXTS[0], {"max_gen_toks": 10})])
  assert speculative.generate_until(ask, disable_tqdm=True) == lms[(3, 8)].generate_until(
      ask, disable_tqdm=True)


def test_bad_model_args_are_errors_naming_them(workdir):
  with pytest.raises(ValueError, match="exit must be in 1..3"):
    harness.FamjaxLM(workdir, exit=4)
  with pytest.raises(ValueError, match=r"unknown model_args \['temperature'\]"):
    harness.FamjaxLM(workdir, temperature=1.0)
  with pytest.raises(ValueError, match="strategy must be one of"):
    harness.FamjaxLM(workdir, strategy="beam")


MC_TASK = """task: famjax_next_word
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_task(directory, n=12):
  """A multiple-choice task over the test corpus's phrases: which word comes next."""
  directory.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  words = "the model exits early when its confidence is high".split()
  with (directory / "next_word.jsonl").open("w") as f:
    for _ in range(n):
      cut = int(rng.integers(2, len(words) - 1))
      wrong = [w for w in ("budget", "granularity", "while") if w != words[cut]][:2]
      choices = [" " + words[cut]] + [" " + w for w in wrong]
      f.write(json.dumps({"context": " ".join(words[:cut]), "choices": choices,
                          "answer": 0}) + "\n")
  (directory / "next_word.yaml").write_text(MC_TASK.format(data=directory / "next_word.jsonl"))


@pytest.mark.slow
def test_a_local_task_runs_through_the_harness_command_line(workdir, tmp_path):
  write_task(tmp_path / "tasks")
  env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
  out = subprocess.run(
      [sys.executable, "-m", "famjax.evaluation", "--model", "famjax", "--model_args",
       f"workdir={workdir},exit=2,batch_size=4", "--tasks", "famjax_next_word",
       "--include_path", str(tmp_path / "tasks"), "--output_path", str(tmp_path / "out")],
      cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, env=env,
      timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  [result_file] = list((tmp_path / "out").rglob("results*.json"))
  results = json.loads(result_file.read_text())["results"]["famjax_next_word"]
  assert 0.0 <= results["acc,none"] <= 1.0 and "acc_stderr,none" in results


@pytest.mark.slow
def test_the_evaluate_command_tables_every_exit(workdir, tmp_path):
  write_task(tmp_path / "tasks")
  env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
  out = subprocess.run(
      [sys.executable, "-m", "experiments.evaluate", f"--workdir={workdir}",
       "--tasks=famjax_next_word", f"--include_path={tmp_path / 'tasks'}", "--limit=8",
       "--speculative_exit=1"],
      cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, env=env,
      timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads((workdir / "eval" / "results.json").read_text())
  assert list(results) == ["exit1", "exit2", "exit3", "strategy=speculative+draft_exit=1"]
  table = (workdir / "eval" / "table.md").read_text()
  assert table.count("famjax_next_word | acc |") == 1 and table.count(" ± ") == 4
  assert (workdir / "eval" / "tasks_by_exit.png").stat().st_size > 1000
