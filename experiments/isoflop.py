"""`python -m experiments.isoflop` in a checkout: the same as `famjax study` (famjax/commands)."""

import sys

from famjax import cli

if __name__ == "__main__":
  cli.main(["famjax", "study", *sys.argv[1:]])
