"""famjax as an lm-evaluation-harness model: `--model famjax --model_args workdir=W,exit=2`.

Importing this module registers the model (lm-eval's own CLI does not import famjax: run it as
`python -m famjax.evaluation ...`, the harness's CLI with the model registered). Exits are
numbered 1..G; `exit` defaults to the deepest. `strategy=confidence` (with `threshold`) and
`strategy=speculative` (with `draft_exit`, `lookahead`) change how generate_until decodes;
loglikelihoods are the exit's own (speculative greedy output is the deepest exit's).

Conventions: a loglikelihood is the sum of the continuation tokens' log-probabilities given the
context (an empty context is the tokenizer's end-of-text token, as the harness does), truncated
on the left to the model's context (model.max_seq_len); loglikelihood_rolling scores a document
in the harness's disjoint windows of that length, each window's first token conditioned on the
end-of-text token; generate_until decodes greedily up to max_gen_toks tokens and cuts the text at
the first stop string.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import numpy as np
from flax import nnx
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from famjax import data
from famjax.decode import decoder, sampling
from famjax.evaluation import scoring
from famjax.model import sharding
from famjax.model.config import DTYPES, MeshConfig
from famjax.train import loop, step

STRATEGIES = ("exit", "confidence", "speculative")
HARNESS_OPTIONS = ("device", "max_batch_size")  # the harness passes these; JAX places the model


@dataclasses.dataclass(frozen=True)
class Strategy:
  """How generate_until decodes: at the exit, with confidence exits, or self-speculatively."""

  name: str = "exit"
  threshold: float = 0.9  # confidence: a token leaves at the first exit this sure
  draft_exit: int = 1  # speculative: the exit that drafts
  lookahead: int = 4  # speculative: tokens drafted per round

  @classmethod
  def from_options(cls, options: dict) -> "Strategy":
    """The strategy model_args name; any other unknown argument is an error naming it."""
    unknown = sorted(set(options) - {"strategy", "threshold", "draft_exit", "lookahead"}
                     - set(HARNESS_OPTIONS))
    if unknown:
      raise ValueError(f"unknown model_args {unknown}; famjax takes workdir, exit, batch_size, "
                       "dtype, strategy, threshold, draft_exit, lookahead")
    name = str(options.get("strategy", "exit"))
    if name not in STRATEGIES:
      raise ValueError(f"model_args strategy must be one of {STRATEGIES}; got {name!r}")
    return cls(name, float(options.get("threshold", 0.9)), int(options.get("draft_exit", 1)),
               int(options.get("lookahead", 4)))


@functools.lru_cache(maxsize=2)
def _load(workdir: str, dtype: str):
  """(config, model, tokenizer) of a trained run, its compute dtype set to `dtype` (kept for the
  next exit of the same run: evaluating every exit loads it once)."""
  cfg, model = loop.load_model(workdir)
  if dtype not in DTYPES:
    raise ValueError(f"model_args dtype must be one of {DTYPES}; got {dtype!r}")
  if dtype != cfg.model.dtype:
    model_cfg = dataclasses.replace(cfg.model, dtype=dtype)
    mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    model = nnx.merge(step.programs(model_cfg, mesh).graphdef, nnx.state(model))
    cfg = dataclasses.replace(cfg, model=model_cfg)
  return cfg, model, data.load_tokenizer(workdir)


@register_model("famjax")
class FamjaxLM(TemplateLM):
  """One exit (or decoding strategy) of a trained famjax run."""

  def __init__(self, workdir: str, exit: int | str = 0, batch_size: int | str = 8,
               dtype: str = "float32", **options):
    super().__init__()
    self.strategy = Strategy.from_options(options)
    self.cfg, model, self.tokenizer_ = _load(str(workdir), str(dtype))
    n_exits = self.cfg.model.n_exits
    self.exit = int(exit) or n_exits
    if not 1 <= self.exit <= n_exits:
      raise ValueError(f"model_args exit must be in 1..{n_exits}; got {exit}")
    self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
    self.decoder = decoder.Decoder(model)

  @classmethod
  def create_from_arg_obj(cls, arg_dict, additional_config=None):
    """The harness's own options (--batch_size, --device) give way to model_args."""
    extra = {k: v for k, v in (additional_config or {}).items()
             if v is not None and k not in arg_dict}
    return cls(**arg_dict, **extra)

  @classmethod
  def create_from_arg_string(cls, arg_string, additional_config=None):
    return cls.create_from_arg_obj(utils.simple_parse_args_string(arg_string), additional_config)

  @property
  def eot_token_id(self) -> int:
    return int(self.tokenizer_.eos_id)

  @property
  def max_length(self) -> int:
    return self.decoder.max_len

  def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
    del add_special_tokens, kwargs  # famjax's tokenizers add no special tokens
    return [int(t) for t in self.tokenizer_.encode(string)]

  def tok_decode(self, tokens) -> str:
    return self.tokenizer_.decode([int(t) for t in tokens])

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    pairs = [(context, continuation) for _, context, continuation in requests]
    with tqdm(total=len(pairs), desc=f"loglikelihood, exit {self.exit}",
              disable=disable_tqdm) as bar:
      results = scoring.score(self.decoder, pairs, self.exit, self.batch_size, bar.update)
    for (key, _, _), result in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood", key, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    out = []
    for (text,) in tqdm([r.args for r in requests], desc="loglikelihood_rolling",
                        disable=disable_tqdm):
      windows = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
          self.tok_encode(text), self.eot_token_id, self.max_length, 1)]
      scores = scoring.score(self.decoder, windows, self.exit, self.batch_size)
      out.append(float(sum(s for s, _ in scores)))
      self.cache_hook.add_partial("loglikelihood_rolling", (text,), out[-1])
    return out

  def _generate(self, prompt: list[int], max_new: int) -> list[int]:
    """Greedy tokens after `prompt` by the chosen strategy (stops at end-of-text)."""
    strategy = self.strategy
    if strategy.name == "confidence":
      tokens = self.decoder.confident([prompt], max_new, strategy.threshold)[0]
    elif strategy.name == "speculative":
      tokens = self.decoder.speculative([prompt], max_new, strategy.draft_exit,
                                        strategy.lookahead)[0]
    else:
      until = sampling.Sampling(stop_tokens=(self.eot_token_id,))
      tokens = self.decoder.generate([prompt], self.exit, max_new, until)[1]
    row = [int(t) for t in np.asarray(tokens)[0] if t >= 0]
    return row[:row.index(self.eot_token_id)] if self.eot_token_id in row else row

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    out = []
    for context, options in tqdm([r.args for r in requests], desc="generate_until",
                                 disable=disable_tqdm):
      until = options.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = min(int(options.get("max_gen_toks", 256)), self.max_length - 1)
      prompt = (self.tok_encode(context) or [self.eot_token_id])[-(self.max_length - max_new):]
      text = self.tok_decode(self._generate(prompt, max_new))
      for stop in until:
        text = text.split(stop)[0]
      out.append(text)
      self.cache_hook.add_partial("generate_until", (context, options), text)
    return out


def main(argv=None) -> None:
  """lm-eval's command line with `--model famjax` registered (`python -m famjax.evaluation`)."""
  from lm_eval.__main__ import cli_evaluate
  sys.argv = [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)
  cli_evaluate()
