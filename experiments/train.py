"""`python -m experiments.train` in a checkout: the same as `famjax train` (famjax/commands)."""

import sys

from famjax import cli

if __name__ == "__main__":
  cli.main(["famjax", "train", *sys.argv[1:]])
