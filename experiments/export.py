"""`python -m experiments.export` in a checkout: the same as `famjax export` (famjax/commands)."""

import sys

from famjax import cli

if __name__ == "__main__":
  cli.main(["famjax", "export", *sys.argv[1:]])
