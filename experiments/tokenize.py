"""`python -m experiments.tokenize` in a checkout: the same as `famjax tokenize`
(famjax/commands)."""

import sys

from famjax import cli

if __name__ == "__main__":
  cli.main(["famjax", "tokenize", *sys.argv[1:]])
