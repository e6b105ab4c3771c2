"""`python -m famjax.evaluation --model famjax --model_args workdir=W,exit=2 --tasks ...`: the
lm-evaluation-harness command line, with famjax's model registered."""

from famjax.evaluation import harness

if __name__ == "__main__":
  harness.main()
