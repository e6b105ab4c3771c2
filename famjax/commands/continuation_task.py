"""Writes a local multiple-choice task that small models can score (famjax.evaluation.tasks):
passages of a corpus, each followed by its true next characters and shuffles of them.

famjax continuation-task --out=tasks/ [--corpus=stdlib] [--n_docs=200]
then: famjax evaluate --study=S --tasks=famjax_continuation --include_path=tasks/
"""

import itertools

from absl import flags

PRESET = None  # `famjax continuation-task` takes no --config

_OUT = flags.DEFINE_string("out", None, "Directory for the task's YAML and jsonl.", required=True)
_CORPUS = flags.DEFINE_string("corpus", "stdlib", "Where the passages come from: 'stdlib' or "
                              "local files, as data.corpus.")
_NAME = flags.DEFINE_string("name", "famjax_continuation", "The task's name.")
_DOCS = flags.DEFINE_integer("n_docs", 200, "Documents (questions).", lower_bound=1)
_CHOICES = flags.DEFINE_integer("n_choices", 4, "Choices per question: the truth and its "
                                "shuffles; chance is 1/n_choices.", lower_bound=2)
_CONTEXT = flags.DEFINE_integer("context_chars", 48, "Characters of passage (with the "
                               "continuation, within the model's context).", lower_bound=1)
_CONTINUATION = flags.DEFINE_integer("continuation_chars", 12, "Characters to choose.",
                                     lower_bound=3)
_SEED = flags.DEFINE_integer("seed", 0, "Which passages.")
SOURCE_TEXTS = 2000  # the first this many documents of the corpus are drawn from


def main(argv):
  del argv
  from famjax.data import sources
  from famjax.evaluation import tasks
  source = sources.from_corpus(_CORPUS.value)
  texts = list(itertools.islice((t for unit in source.units for t in sources.read(
      unit, source.text_field)), SOURCE_TEXTS))
  yaml = tasks.write_continuation_task(
      _OUT.value, texts, _NAME.value, n_docs=_DOCS.value, n_choices=_CHOICES.value,
      context_chars=_CONTEXT.value, continuation_chars=_CONTINUATION.value, seed=_SEED.value)
  print(f"task {_NAME.value}: {yaml} ({_DOCS.value} documents, chance {1 / _CHOICES.value:.3f})")

