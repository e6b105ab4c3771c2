"""A local multiple-choice task that small models can score: a passage of text, then its true
next characters against the same characters shuffled. Telling them apart takes only the local
statistics a model learns early, so accuracy rises from chance (1 / choices) as loss falls: a
task for testing loss-to-accuracy links on CPU-sized studies, written as lm-eval YAML + jsonl
(`--include_path`), needing no download.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from famjax.common.files import atomic_write_text

TEMPLATE = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def continuation_docs(texts, n_docs: int, context_chars: int = 64, continuation_chars: int = 12,
                      n_choices: int = 4, seed: int = 0) -> list[dict]:
  """`n_docs` passages drawn from `texts`, each with the true continuation at a random position
  among `n_choices` (the others: distinct shuffles of its characters)."""
  if n_choices < 2:
    raise ValueError(f"n_choices must be at least 2; got {n_choices}")
  span = context_chars + continuation_chars
  texts = [t for t in texts if len(t) > span and len(set(t[-span:])) > 2]
  if not texts:
    raise ValueError(f"no text is longer than context_chars + continuation_chars = {span}")
  rng = np.random.default_rng(seed)
  docs = []
  while len(docs) < n_docs:
    text = texts[rng.integers(len(texts))]
    start = int(rng.integers(0, len(text) - span))
    context, truth = text[start:start + context_chars], text[start + context_chars:start + span]
    choices = {truth}
    for _ in range(50):
      if len(choices) == n_choices:
        break
      choices.add("".join(rng.permutation(list(truth))))
    if len(choices) < n_choices or not context.strip():
      continue
    wrong = sorted(choices - {truth})
    answer = int(rng.integers(n_choices))
    docs.append({"context": context, "choices": wrong[:answer] + [truth] + wrong[answer:],
                 "answer": answer})
  return docs


def write_continuation_task(directory, texts, name: str = "famjax_continuation",
                            **options) -> Path:
  """NAME.yaml and NAME.jsonl in `directory` (options: continuation_docs'); returns the YAML."""
  directory = Path(directory).resolve()
  directory.mkdir(parents=True, exist_ok=True)
  docs = continuation_docs(texts, options.pop("n_docs", 200), **options)
  data = directory / f"{name}.jsonl"
  atomic_write_text(data, "".join(json.dumps(d) + "\n" for d in docs))
  yaml = directory / f"{name}.yaml"
  atomic_write_text(yaml, TEMPLATE.format(name=name, data=data))
  return yaml
