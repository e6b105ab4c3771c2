"""`python -m experiments.continuation_task` in a checkout: the same as `famjax continuation-task`
(famjax/commands)."""

import sys

from famjax import cli

if __name__ == "__main__":
  cli.main(["famjax", "continuation-task", *sys.argv[1:]])
