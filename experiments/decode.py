"""`python -m experiments.decode` in a checkout: the same as `famjax decode` (famjax/commands)."""

import sys

from famjax import cli

if __name__ == "__main__":
  cli.main(["famjax", "decode", *sys.argv[1:]])
