"""`python -m experiments.evaluate` in a checkout: the same as `famjax evaluate`
(famjax/commands)."""

import sys

from famjax import cli

if __name__ == "__main__":
  cli.main(["famjax", "evaluate", *sys.argv[1:]])
