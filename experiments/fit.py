"""`python -m experiments.fit` in a checkout: the same as `famjax fit` (famjax/commands)."""

import sys

from famjax import cli

if __name__ == "__main__":
  cli.main(["famjax", "fit", *sys.argv[1:]])
